"""Audio-text dual encoders (CLAP-style): a tiny wav2vec2 and a tiny BERT learn captions of generated sounds
(zero-shot, retrieval both ways), the recipe fits and predicts, and the data modules refuse the wrong model."""

from __future__ import annotations

import csv
from pathlib import Path

import lightning as L
import pytest
import torch
from audio_signals import write_audio_tree
from helpers import trainer

from ptft.core import PtftError
from ptft.multimodal import AudioTextDataModule, DualEncoder, ImageTextDataModule


@pytest.fixture(scope="module")
def sounds(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("sounds")
    return {"train": write_audio_tree(root / "train", 12, seed=1), "val": write_audio_tree(root / "val", 4, seed=2)}


def audio_text(tiny_bert: str, tiny_wav2vec2: str, data: AudioTextDataModule) -> DualEncoder:
    L.seed_everything(0)
    return DualEncoder(text_model=tiny_bert, audio_model=tiny_wav2vec2, pretrained=False, projection_dim=16,
                       class_names=data.class_names, prompt="the sound of {}.", optimizer={"lr": 2e-3})


def test_sounds_learn_their_captions(tiny_bert, tiny_wav2vec2, sounds, tmp_path):
    data = AudioTextDataModule(train=sounds["train"], val=sounds["val"], batch_size=12, num_workers=0,
                               clip_seconds=0.5)
    assert data.class_names == ["chirp", "clicks", "high", "low"]
    model = audio_text(tiny_bert, tiny_wav2vec2, data)
    assert set(model.towers()) == {"text", "audio", "projection", "scale"}
    data.connect(model)
    assert data.sampling_rate == 16000  # the audio tower's, from its feature extractor (the files are 8 kHz)
    before = trainer(tmp_path).validate(model, data, verbose=False)[0]
    trainer(tmp_path, max_epochs=15).fit(model, data)
    after = trainer(tmp_path).validate(model, data, verbose=False)[0]
    assert after["val/zero_shot_acc"] >= 0.8 > before["val/zero_shot_acc"] + 0.2, (before, after)  # chance 0.25
    assert after["val/audio_to_text/recall@1"] >= 0.8 and "val/text_to_audio/recall@5" in after


def test_clap_recipe_fits_and_predicts(run_recipe, run_cli, tiny_bert, tiny_wav2vec2, sounds, tmp_path):
    from ptft.cli import RECIPES

    args = [f"--model.init_args.text_model={tiny_bert}", f"--model.init_args.audio_model={tiny_wav2vec2}",
            "--model.init_args.pretrained=false", f"--data.init_args.train={sounds['train']}",
            "--data.init_args.num_workers=0"]
    cli = run_recipe("recipes/multimodal/clap-zero-shot.yaml", args)
    assert cli.trainer.global_step == 2 and cli.model.class_names == ["chirp", "clicks", "high", "low"]
    cli.trainer.save_checkpoint(tmp_path / "clap.ckpt")
    run_cli(["predict", "--config", str(RECIPES / "multimodal/clap-zero-shot.yaml"), *args,
             f"--data.init_args.predict={sounds['val']}", f"--ckpt_path={tmp_path / 'clap.ckpt'}"])
    rows = list(csv.DictReader(open(tmp_path / "runs/clap-zero-shot/predictions.csv")))
    assert len(rows) == len(list(Path(sounds["val"]).rglob("*.wav")))
    assert {r["label"] for r in rows} <= {"chirp", "clicks", "high", "low"}


def test_wrong_model_for_the_data_is_one_line(tiny_bert, tiny_wav2vec2, sounds, image_dirs):
    audio = AudioTextDataModule(train=sounds["train"])
    image_model = DualEncoder(text_model=tiny_bert, image_model="test_resnet", pretrained=False)
    with pytest.raises(PtftError, match="AudioTextDataModule feeds an audio-text dual encoder"):
        audio.connect(image_model)
    model = audio_text(tiny_bert, tiny_wav2vec2, audio)
    with pytest.raises(PtftError, match="for an audio_model use ptft.multimodal.AudioTextDataModule"):
        ImageTextDataModule(train=image_dirs["train"]).connect(model)


def test_matching_and_masked_lm_with_audio(tiny_bert, tiny_wav2vec2, sounds, tmp_path):
    """The objectives take audio too: the matching head attends to the audio frames (padding masked)."""
    data = AudioTextDataModule(train=sounds["train"], val=sounds["val"], batch_size=12, num_workers=0,
                               clip_seconds=0.5)
    L.seed_everything(0)
    model = DualEncoder(text_model=tiny_bert, audio_model=tiny_wav2vec2, pretrained=False, projection_dim=16,
                        class_names=data.class_names, objectives={"contrastive": 1.0, "itm": 1.0, "mlm": 1.0},
                        optimizer={"lr": 2e-3})
    data.connect(model)
    fit = trainer(tmp_path, max_epochs=1)
    fit.fit(model, data)
    logged = fit.callback_metrics
    assert all(torch.isfinite(logged[f"val/loss_{n}"]) for n in ("contrastive", "itm", "mlm"))
    assert "val/itm_acc" in logged and "val/mlm_acc" in logged
