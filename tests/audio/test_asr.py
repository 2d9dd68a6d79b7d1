"""CTC speech recognition: the character vocabulary, one-line errors on transcripts, a tiny wav2vec2 whose CER falls
on generated "speech" (a tone per letter), the recipe, predictions as text and the export."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch
from audio_signals import write_transcribed
from helpers import trainer

from ptft.audio import SpeechRecognitionDataModule, SpeechRecognizer
from ptft.audio.asr import build_vocabulary, encode_transcript
from ptft.core import OptimizerConfig, SchedulerConfig
from ptft.cli import RECIPES
from ptft.core.errors import PtftError


@pytest.fixture
def transcribed(tmp_path: Path) -> dict[str, str]:
    return {"train": write_transcribed(tmp_path / "train", 64, seed=1),
            "val": write_transcribed(tmp_path / "val", 16, seed=2)}


def test_vocabulary_from_training_transcripts(transcribed):
    data = SpeechRecognitionDataModule(train=transcribed["train"], val=transcribed["val"], num_workers=0)
    assert data.label_names == ["<pad>", "<unk>", "|", "a", "b", "c", "d"]  # lower-cased, space -> "|"
    index = {n: i for i, n in enumerate(data.label_names)}
    assert encode_transcript("ab c", index) == [3, 4, 2, 5]
    assert build_vocabulary(["hi there"]) == ["<pad>", "<unk>", "|", "e", "h", "i", "r", "t"]


def test_transcript_errors_are_one_line(transcribed, tmp_path):
    val = Path(transcribed["val"])
    val.write_text(val.read_text().replace("clips/003.wav,", "clips/003.wav,XZ "))
    with pytest.raises(PtftError, match=r"val transcript 4 \('xz .*'\) has character\(s\) \['x', 'z'\] outside the vocabulary"):
        SpeechRecognitionDataModule(train=transcribed["train"], val=str(val)).label_names
    (tmp_path / "empty.csv").write_text("path,transcript\nclips/000.wav,\n")
    with pytest.raises(PtftError, match=r"train: 1 empty transcript\(s\)"):
        SpeechRecognitionDataModule(train=str(tmp_path / "empty.csv"))
    (tmp_path / "nocol.csv").write_text("path,text\nclips/000.wav,ab\n")
    with pytest.raises(PtftError, match="has no column 'transcript'"):
        SpeechRecognitionDataModule(train=str(tmp_path / "nocol.csv"))
    with pytest.raises(PtftError, match="speech recognition reads a CSV of path,transcript"):
        SpeechRecognitionDataModule(train=str(tmp_path))
    with pytest.raises(PtftError, match="trains on whole clips"):
        SpeechRecognitionDataModule(train=transcribed["train"], clip_seconds=1.0)


def recognizer(path: str, data: SpeechRecognitionDataModule, lr: float) -> SpeechRecognizer:
    return SpeechRecognizer(path, num_labels=data.num_labels, label_names=data.label_names,
                            model_config={"layerdrop": 0.0, "hidden_dropout": 0.0, "final_dropout": 0.0},
                            optimizer=OptimizerConfig(lr=lr), scheduler=SchedulerConfig(name="constant", warmup_ratio=0.0))


def test_tiny_ctc_model_learns_to_transcribe(tiny_ctc_wav2vec2, tmp_path):
    """Letters are tones, spaces pauses: CER starts above 1 (random insertions) and falls far below 1 (an all-blank
    output, the plateau CTC training starts on, scores exactly 1)."""
    L.seed_everything(0)
    train = write_transcribed(tmp_path / "train", 64, seed=1, rate=8000, letter_s=0.04)
    val = write_transcribed(tmp_path / "val", 16, seed=2, rate=8000, letter_s=0.04)
    data = SpeechRecognitionDataModule(train=train, val=val, batch_size=8, num_workers=0)
    model = recognizer(tiny_ctc_wav2vec2, data, lr=3e-3)
    data.connect(model)
    run = trainer(tmp_path, max_epochs=30, check_val_every_n_epoch=30)
    before = float(run.validate(model, data, verbose=False)[0]["val/cer"])
    run.fit(model, data)
    after = float(run.callback_metrics["val/cer"])
    assert before > 1.0
    assert after < 0.3


def test_recipe_predicts_text_and_exports_a_pipeline_folder(run_recipe, run_cli, tiny_wav2vec2, transcribed, tmp_path):
    import csv

    cli = run_recipe("recipes/audio/asr-ctc.yaml", [
        f"--model.init_args.model_name={tiny_wav2vec2}", f"--data.init_args.train={transcribed['train']}",
        f"--data.init_args.val={transcribed['val']}", "--data.init_args.num_workers=0"],
        steps=4)  # one epoch of 64 clips: validation runs
    assert cli.trainer.global_step == 4
    assert "val/wer" in cli.trainer.callback_metrics and "val/cer" in cli.trainer.callback_metrics
    optimized = {id(p) for group in cli.trainer.optimizers[0].param_groups for p in group["params"]}
    frozen = [n for n, p in cli.model.model.named_parameters() if id(p) not in optimized]  # for the whole run
    assert frozen and all(".feature_extractor." in n for n in frozen)
    ckpt = tmp_path / "asr.ckpt"
    cli.trainer.save_checkpoint(ckpt)
    clips = str(Path(transcribed["val"]).parent / "clips")
    run_cli(["predict", "--config", str(RECIPES / "audio/asr-ctc.yaml"),
             f"--model.init_args.model_name={tiny_wav2vec2}", f"--data.init_args.train={transcribed['train']}",
             f"--data.init_args.val={transcribed['val']}", f"--data.init_args.predict={clips}",
             "--data.init_args.num_workers=0", f"--ckpt_path={ckpt}"])
    rows = list(csv.DictReader(open(tmp_path / "runs/asr-ctc/predictions.csv")))  # run_cli works in tmp_path
    assert len(rows) == 16 and list(rows[0]) == ["file", "transcript"]
    assert sorted(r["file"] for r in rows) == sorted(str(p) for p in Path(clips).glob("*.wav"))
    assert all(set(r["transcript"].replace("<unk>", "")) <= set("abcd ") for r in rows)  # vocabulary tokens only

    from transformers import pipeline

    cli.model.export(str(tmp_path / "exported"))
    asr = pipeline("automatic-speech-recognition", model=str(tmp_path / "exported"))
    assert asr.tokenizer.convert_ids_to_tokens([0, 2]) == ["<pad>", "|"]
    dataset, collate = cli.datamodule.datasets["val"], cli.datamodule.collate_fn()
    cli.model.eval()
    for i in range(4):  # the exported folder transcribes raw audio as ptft does
        batch = collate([dataset[i]])
        with torch.no_grad():
            logits = cli.model(batch)
        ours = cli.model.decode(logits, cli.model.frame_lengths(batch, logits.shape[1]))[0]
        assert asr(dataset[i]["input_values"].copy())["text"].strip() == ours
