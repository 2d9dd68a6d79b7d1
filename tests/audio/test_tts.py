"""Text to speech: SpeechT5 batches (characters, log-mel targets, speakers), one-line errors, a tiny model that learns
spectrograms conditioned on the text, Griffin-Lim, the recipe with wav predictions, and the export."""

from __future__ import annotations

import csv
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from audio_signals import write_transcribed

from ptft.audio import SpeechSynthesizer, TextToSpeechDataModule
from ptft.audio.tts import MelInverter
from ptft.cli import RECIPES
from ptft.core.errors import PtftError


def with_speakers(transcripts: str) -> str:
    """The transcripts CSV with a ``speaker`` column (``anna`` / ``ben`` alternating)."""
    rows = list(csv.DictReader(open(transcripts)))
    path = Path(transcripts).with_name("tts.csv")
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, ["path", "transcript", "speaker"])
        writer.writeheader()
        writer.writerows({**row, "speaker": "anna" if i % 2 == 0 else "ben"} for i, row in enumerate(rows))
    return str(path)


@pytest.fixture
def spoken(tmp_path: Path) -> dict[str, str]:
    return {"train": with_speakers(write_transcribed(tmp_path / "train", 128, seed=1, rate=8000)),
            "val": with_speakers(write_transcribed(tmp_path / "val", 32, seed=2, rate=8000))}


def data(spoken: dict[str, str], **kwargs) -> TextToSpeechDataModule:
    return TextToSpeechDataModule(train=spoken["train"], val=spoken["val"], speaker_column="speaker", batch_size=16,
                                  num_workers=0, **kwargs)


def synthesizer(model_dir: str, module: TextToSpeechDataModule, **kwargs) -> SpeechSynthesizer:
    return SpeechSynthesizer(model_dir, pretrained=False, num_labels=len(module.label_names),
                             label_names=module.label_names, speaker_names=module.speaker_names, **kwargs)


def test_batches_hold_characters_log_mel_targets_and_speakers(tiny_speecht5, spoken):
    module = data(spoken)
    assert module.label_names == ["<pad>", "<unk>", "|", "a", "b", "c", "d"]
    assert module.speaker_names == ["anna", "ben"]
    model = synthesizer(tiny_speecht5, module)
    module.connect(model)
    module.setup("fit")
    batch = next(iter(module.train_dataloader()))
    assert batch["input_ids"].shape[0] == 16 and (batch["attention_mask"] == (batch["input_ids"] != 0)).all()
    labels = batch["labels"]
    assert labels.shape[0] == 16 and labels.shape[2] == 20  # the extractor's mel bands
    # padded frames are -100 (ignored by the loss), real frames are log10 mel energies
    lengths = (labels[..., 0] != -100).sum(1)
    assert lengths.max() == labels.shape[1] and lengths.min() < lengths.max()
    assert (labels[labels != -100] > -11).all()
    assert set(batch["speakers"].tolist()) == {0, 1}


def test_bad_tts_input_stops_with_one_line(tiny_speecht5, spoken, tmp_path):
    with pytest.raises(PtftError, match="has no column 'voice'"):
        data(spoken).__class__(train=spoken["train"], speaker_column="voice")
    with pytest.raises(PtftError, match="drop data.init_args.augment"):
        data(spoken, augment={"gain_db": [-3, 3]})
    with pytest.raises(PtftError, match=r"train: speaker\(s\) \['anna'\] are not among the training speakers"):
        data(spoken, speakers=["ben"])
    module = data(spoken, predict=str(tmp_path / "texts.csv"))
    module.connect(synthesizer(tiny_speecht5, module))
    (tmp_path / "texts.csv").write_text("transcript,speaker\nab,carl\n")
    with pytest.raises(PtftError, match="unknown speaker 'carl'"):
        module.setup("predict")
    (tmp_path / "texts.csv").write_text("transcript,speaker\nab,anna\n ,ben\n")
    module = data(spoken, predict=str(tmp_path / "texts.csv"))
    with pytest.raises(PtftError, match="row 2 of .* has no text to speak"):
        module.setup("predict")
    (tmp_path / "texts.csv").write_text("transcript\nabz\n")
    module = data(spoken, predict=str(tmp_path / "texts.csv"))
    with pytest.raises(PtftError, match=r"character\(s\) \['z'\] outside the vocabulary"):
        module.setup("predict")


def test_tiny_speecht5_learns_spectrograms_that_follow_the_text(tiny_speecht5, spoken):
    torch.manual_seed(0)
    module = data(spoken)
    model = synthesizer(tiny_speecht5, module, optimizer={"lr": 3e-3})
    trainer = L.Trainer(max_epochs=40, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        num_sanity_val_steps=0, accelerator="cpu")
    before = trainer.validate(model, module, verbose=False)[0]["val/loss"]
    trainer.fit(model, module)
    after = trainer.callback_metrics["val/loss"].item()
    assert after < 0.3 * before, (before, after)
    # The predictions depend on the text (the frames, where speech stops, the alignment): the loss on the true
    # transcripts is well below the loss on another clip's transcript.
    model.eval()
    batch = next(iter(module.val_dataloader()))
    shuffled = torch.roll(torch.arange(len(batch["input_ids"])), 1)
    with torch.no_grad():
        torch.manual_seed(1)
        true_text = model.step(batch, "val")[0].item()
        torch.manual_seed(1)
        other = {**batch, "input_ids": batch["input_ids"][shuffled], "attention_mask": batch["attention_mask"][shuffled]}
        wrong_text = model.step(other, "val")[0].item()
    assert true_text < 0.85 * wrong_text, (true_text, wrong_text)


def test_griffin_lim_inverts_a_tone_s_log_mel_spectrogram():
    from transformers import SpeechT5FeatureExtractor

    extractor = SpeechT5FeatureExtractor(sampling_rate=8000, num_mel_bins=40, fmin=50, fmax=3900)
    t = np.arange(8000) / 8000
    for hz in (440.0, 1500.0):
        tone = (0.5 * np.sin(2 * np.pi * hz * t)).astype(np.float32)
        mel = extractor(audio_target=[tone], sampling_rate=8000, return_tensors="pt")["input_values"][0]
        wave = MelInverter(extractor, iterations=32)(mel).numpy()
        assert abs(len(wave) - len(tone)) <= extractor.sample_stride * 2
        spectrum = np.abs(np.fft.rfft(wave))
        peak = np.fft.rfftfreq(len(wave), 1 / 8000)[spectrum.argmax()]
        assert abs(peak - hz) < 0.1 * hz, (hz, peak)  # within the tone's mel band


def test_recipe_trains_speaks_texts_into_wav_files_and_exports(run_recipe, run_cli, tiny_speecht5, spoken, tmp_path):
    import soundfile
    from safetensors.torch import load_file
    from transformers import SpeechT5ForTextToSpeech

    args = [f"--model.init_args.model_name={tiny_speecht5}", "--model.init_args.pretrained=false",
            f"--data.init_args.train={spoken['train']}", f"--data.init_args.val={spoken['val']}",
            "--data.init_args.num_workers=0", "--model.init_args.max_length_ratio=4"]
    cli = run_recipe("recipes/audio/tts-speecht5.yaml", args, steps=8)  # one epoch of 128 clips: validation runs
    assert cli.trainer.global_step == 8 and "val/loss" in cli.trainer.callback_metrics
    assert cli.model.speaker_names == ["anna", "ben"]
    groups = cli.trainer.optimizers[0].param_groups  # head_lr for the new speaker and character embeddings
    assert sorted({g["initial_lr"] for g in groups}) == [pytest.approx(1e-5), pytest.approx(1e-3)]
    head = {id(p) for g in groups if g["initial_lr"] == pytest.approx(1e-3) for p in g["params"]}
    assert id(cli.model.model.speaker_table.weight) in head
    assert id(cli.model.model.speecht5.encoder.prenet.embed_tokens.weight) in head
    ckpt = tmp_path / "tts.ckpt"
    cli.trainer.save_checkpoint(ckpt)
    (tmp_path / "texts.csv").write_text("transcript,speaker\nab cd,anna\ndcba,ben\nbad,\n")
    run_cli(["predict", "--config", str(RECIPES / "audio/tts-speecht5.yaml"), *args,
             f"--data.init_args.predict={tmp_path / 'texts.csv'}", f"--ckpt_path={ckpt}"])
    rows = list(csv.DictReader(open(tmp_path / "runs/tts-speecht5/predictions.csv")))  # run_cli works in tmp_path
    assert [(r["text"], r["speaker"]) for r in rows] == [("ab cd", "anna"), ("dcba", "ben"), ("bad", "anna")]
    for row in rows:
        wave, rate = soundfile.read(tmp_path / row["path"])
        assert rate == 8000 and len(wave) > 0 and np.isfinite(wave).all()
        assert float(row["seconds"]) == pytest.approx(len(wave) / 8000, abs=1e-3)

    cli.model.export(str(tmp_path / "exported"))
    exported = SpeechT5ForTextToSpeech.from_pretrained(tmp_path / "exported")
    table = load_file(tmp_path / "exported" / "speaker_embeddings.safetensors")["speaker_embeddings"]
    assert table.shape == (2, 8)
    ids = torch.tensor([[3, 4, 2, 5, 6]])
    torch.manual_seed(0)
    spec = exported.generate(ids, speaker_embeddings=table[:1], maxlenratio=4.0)
    assert spec.ndim == 2 and spec.shape[1] == 20
