"""Audio classifiers learn generated sounds: a timm CNN over log-mels, a tiny wav2vec2 (own head and ptft heads), with
the feature encoder frozen, waveform mixup, checkpoints, export, and the shipped audio recipes."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch
from helpers import trainer, weights

from ptft.audio import AudioClassificationDataModule, AudioClassifier, SpectrogramClassifier
from ptft.core import FreezeFeatureEncoder, OptimizerConfig, SchedulerConfig
from ptft.core.errors import PtftError

CONSTANT = SchedulerConfig(name="constant", warmup_ratio=0.0)


def fit(model, audio_dirs, tmp_path, epochs: int, callbacks=(), **data_kwargs) -> float:
    data = AudioClassificationDataModule(train=audio_dirs["train"], val=audio_dirs["val"], batch_size=16,
                                         num_workers=0, clip_seconds=0.5, **data_kwargs)
    data.connect(model)
    run = trainer(tmp_path, max_epochs=epochs, callbacks=list(callbacks))
    run.fit(model, data)
    return float(run.callback_metrics["val/acc"])


def spectrogram_model(data_dirs, **kwargs) -> SpectrogramClassifier:
    names = sorted(p.name for p in Path(data_dirs["train"]).iterdir())
    return SpectrogramClassifier("test_resnet", pretrained=False, sampling_rate=8000, num_labels=len(names),
                                 label_names=names, optimizer=OptimizerConfig(lr=3e-3), scheduler=CONSTANT, **kwargs)


def test_spectrogram_cnn_learns_four_sounds(audio_dirs, tmp_path):
    """Tones, a chirp and clicks (chance 0.25): a tiny timm CNN over log-mels with SpecAugment learns them."""
    L.seed_everything(0)
    model = spectrogram_model(audio_dirs, spec_augment={"freq_masks": 1, "freq_width": 4, "time_masks": 1, "time_width": 5})
    assert fit(model, audio_dirs, tmp_path, epochs=15) >= 0.9


def test_waveform_mixup_trains_and_cutmix_is_refused(audio_dirs, tmp_path):
    L.seed_everything(0)
    model = spectrogram_model(audio_dirs, mixup={"mixup_alpha": 0.4, "cutmix_alpha": 0.0})
    assert fit(model, audio_dirs, tmp_path, epochs=15) >= 0.75
    with pytest.raises(PtftError, match="set mixup.cutmix_alpha: 0"):
        spectrogram_model(audio_dirs, mixup={"mixup_alpha": 0.4})


def wav2vec2(path: str, audio_dirs, **kwargs) -> AudioClassifier:
    names = sorted(p.name for p in Path(audio_dirs["train"]).iterdir())
    return AudioClassifier(path, num_labels=len(names), label_names=names, optimizer=OptimizerConfig(lr=3e-3),
                           scheduler=CONSTANT, **kwargs)


def test_wav2vec2_learns_with_its_feature_encoder_frozen(tiny_wav2vec2, audio_dirs, tmp_path):
    """8 kHz files resampled to the feature extractor's 16 kHz; the conv feature encoder does not move, the rest does."""
    L.seed_everything(0)
    model = wav2vec2(tiny_wav2vec2, audio_dirs)
    before = weights(model.model)
    acc = fit(model, audio_dirs, tmp_path, epochs=12, callbacks=[FreezeFeatureEncoder()])
    after = weights(model.model)
    encoder = [k for k in before if ".feature_extractor." in k]
    assert encoder and all(torch.equal(before[k], after[k]) for k in encoder)
    assert not torch.equal(before["wav2vec2.encoder.layers.0.attention.q_proj.weight"],
                           after["wav2vec2.encoder.layers.0.attention.q_proj.weight"])
    assert acc >= 0.6  # chance 0.25


@pytest.mark.parametrize("head", ["attention", "gru"])
def test_ptft_heads_over_wav2vec2_frames(tiny_wav2vec2, audio_dirs, tmp_path, head):
    L.seed_everything(0)
    model = wav2vec2(tiny_wav2vec2, audio_dirs, head=head)
    assert model.head_modules(model.model) == ["head"]
    assert fit(model, audio_dirs, tmp_path, epochs=6) >= 0.75


def test_freeze_feature_encoder_on_a_model_without_one_is_one_line(audio_dirs, tmp_path):
    model = spectrogram_model(audio_dirs)
    with pytest.raises(PtftError, match=r"freeze pattern\(s\) \['\*feature_extractor\.\*'\] match no parameter"):
        fit(model, audio_dirs, tmp_path, epochs=1, callbacks=[FreezeFeatureEncoder()])


def test_checkpoint_and_export_round_trip(audio_dirs, tmp_path):
    """A checkpoint reloads as the same model (same logits), and the export is a timm folder plus the audio settings."""
    import json

    import timm

    from ptft.core import load_checkpoint

    L.seed_everything(0)
    model = spectrogram_model(audio_dirs, features={"n_mels": 32})
    data = AudioClassificationDataModule(train=audio_dirs["train"], val=audio_dirs["val"], batch_size=8, num_workers=0)
    data.connect(model)
    run = trainer(tmp_path, max_steps=2)
    run.fit(model, data)
    run.save_checkpoint(tmp_path / "a.ckpt")
    batch = next(iter(data.val_dataloader()))
    model.eval()
    reloaded = load_checkpoint(str(tmp_path / "a.ckpt")).eval()
    assert reloaded.features_config.n_mels == 32
    with torch.no_grad():
        assert torch.allclose(model(batch), reloaded(batch), atol=1e-5)
    reloaded.export(str(tmp_path / "out"))
    settings = json.loads((tmp_path / "out" / "ptft_audio.json").read_text())
    assert settings["sampling_rate"] == 8000 and settings["features"]["n_mels"] == 32
    plain = timm.create_model(f"local-dir:{tmp_path / 'out'}", pretrained=True, in_chans=1).eval()
    with torch.no_grad():
        assert torch.allclose(plain(model.spectrogram(batch)), model(batch), atol=1e-5)


def test_keyword_cnn_recipe_and_predictions_name_their_files(run_recipe, run_cli, audio_dirs, tmp_path):
    import csv

    from ptft.cli import RECIPES

    args = ["--model.init_args.model_name=test_resnet", "--model.init_args.pretrained=false",
            "--model.init_args.sampling_rate=8000", f"--data.init_args.train={audio_dirs['train']}",
            f"--data.init_args.test={audio_dirs['val']}", "--data.init_args.num_workers=0"]
    cli = run_recipe("recipes/audio/keyword-cnn.yaml", args)
    assert cli.trainer.global_step == 2
    assert cli.datamodule.sampling_rate == 8000
    cli.trainer.save_checkpoint(tmp_path / "cnn.ckpt")
    run_cli(["predict", "--config", str(RECIPES / "audio/keyword-cnn.yaml"), *args,
             f"--data.init_args.predict={audio_dirs['val']}", f"--ckpt_path={tmp_path / 'cnn.ckpt'}",
             "--trainer.callbacks+=ptft.core.AdaptBatchNorm"])  # statistics of the clips predicted; all still written
    rows = list(csv.DictReader(open(tmp_path / "runs/keyword-cnn/predictions.csv")))  # run_cli works in tmp_path
    files = sorted(str(p) for p in Path(audio_dirs["val"]).rglob("*.wav"))
    assert sorted(r["file"] for r in rows) == files  # every clip once, by the path it was found at
    assert list(rows[0])[:3] == ["file", "label", "label_id"] and {r["label"] for r in rows} <= set(cli.model.label_names)


def test_wav2vec2_classification_recipe(run_recipe, audio_dirs, tiny_wav2vec2):
    cli = run_recipe("recipes/audio/wav2vec2-classification.yaml", [
        f"--model.init_args.model_name={tiny_wav2vec2}", f"--data.init_args.train={audio_dirs['train']}",
        f"--data.init_args.test={audio_dirs['val']}", "--data.init_args.num_workers=0"])
    assert cli.trainer.global_step == 2
    assert cli.datamodule.sampling_rate == 16000  # from the model's preprocessor_config.json
    optimized = {id(p) for group in cli.trainer.optimizers[0].param_groups for p in group["params"]}
    frozen = [n for n, p in cli.model.model.named_parameters() if id(p) not in optimized]  # for the whole run
    assert frozen and all(".feature_extractor." in n for n in frozen)
