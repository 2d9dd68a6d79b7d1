"""Streaming data (ptft.core.streaming): ``ptft convert`` to LitData shards, the streaming data modules of each
modality, and mid-epoch resume from ``last.ckpt`` through the CLI."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
from audio_signals import write_audio_tree
from conftest import REPO, sentiment_rows, write_csv, write_images
from helpers import trainer

from ptft.cli import main
from ptft.core.errors import PtftError
from ptft.core.streaming import check_shards, convert
from ptft.vision.streaming import StreamingImageDataModule

RECIPE = REPO / "recipes/vision/cifar10-streaming.yaml"
THIS = __name__  # pytest imports this file under this name: the CLI finds the classes below through it


def stored(folder: Path) -> list[dict]:
    """Every sample of a shard folder, as stored (no decoding)."""
    from litdata import StreamingDataset

    dataset = StreamingDataset(str(folder))
    return [dataset[i] for i in range(len(dataset))]


def one_line_error(capsys, argv: list[str]) -> str:
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    errors = [line for line in err.splitlines() if line.startswith("ptft: error: ")]
    assert len(errors) == 1 and err.strip().endswith(errors[0]), err[-2000:]
    return errors[0]


# --- convert ------------------------------------------------------------------------------------------------------
def test_convert_image_folder_holds_every_image_once_with_its_label(tmp_path):
    images = Path(write_images(tmp_path / "images", per_class=4, size=8))
    info = convert("image", str(images), str(tmp_path / "shards"), val_fraction=0.25, num_workers=1)
    assert info["label_names"] == ["blue", "green", "red"] and info["splits"] == {"train": 9, "val": 3}
    assert json.loads((tmp_path / "shards" / "labels.json").read_text()) == info
    files = sorted(p for p in images.rglob("*.png"))  # index = position in the sorted listing
    samples = stored(tmp_path / "shards" / "train") + stored(tmp_path / "shards" / "val")
    assert sorted(s["index"] for s in samples) == list(range(12))
    for s in samples:
        file = files[s["index"]]
        assert info["label_names"][s["label"]] == file.parent.name
        assert s["image"] == file.read_bytes() and s["source"].decode() == str(file)
    # written in a seeded random order, not class by class (LitData shuffles inside chunks only)
    assert [s["index"] for s in stored(tmp_path / "shards" / "train")] != sorted(s["index"] for s in samples[:9])


def test_convert_audio_folder_decodes_as_the_file_module_does(tmp_path):
    from ptft.audio.io import read_audio
    from ptft.audio.streaming import DecodeAudio
    from ptft.core.files import FileSource

    clips = Path(write_audio_tree(tmp_path / "clips", per_class=2, kinds=("low", "high")))
    info = convert("audio", str(clips), str(tmp_path / "shards"), val_fraction=0, num_workers=1)
    assert info["label_names"] == ["high", "low"] and info["splits"] == {"train": 4}
    files = sorted(clips.rglob("*.wav"))
    samples = stored(tmp_path / "shards" / "train")
    assert sorted(s["index"] for s in samples) == [0, 1, 2, 3]
    decode = DecodeAudio(16000, None, None, random_crop=False)  # resampled from 8 kHz, as the file module would
    for s in samples:
        assert info["label_names"][s["label"]] == files[s["index"]].parent.name
        expected, _ = read_audio(FileSource(files[s["index"]]), {}, 16000)
        torch.testing.assert_close(decode(s)["input_values"], expected)


def test_convert_text_keeps_texts_that_name_files_as_text(tmp_path):
    (tmp_path / "notes.txt").write_text("the contents of a file")
    rows = [{"text": r["text"], "label": r["label"]} for r in sentiment_rows(6, seed=1)]
    rows[0]["text"] = str(tmp_path / "notes.txt")  # LitData would store this file's contents for a str value
    data = write_csv(tmp_path / "reviews.csv", rows)
    info = convert("text", data, str(tmp_path / "shards"), val_fraction=0, num_workers=1)
    assert info["label_names"] == ["negative", "positive"]
    samples = sorted(stored(tmp_path / "shards" / "train"), key=lambda s: s["index"])
    assert [s["text"].decode() for s in samples] == [r["text"] for r in rows]
    assert [info["label_names"][s["label"]] for s in samples] == [r["label"] for r in rows]
    # a test set alone, with the training set's label names
    test = [{"text": "fine", "label": "positive"}, {"text": "bad", "label": "negative"}]
    info = convert("text", write_csv(tmp_path / "test.csv", test), str(tmp_path / "shards"), split="test",
                   num_workers=1)
    assert info["splits"] == {"train": 6, "test": 2}
    assert {s["text"].decode(): s["label"] for s in stored(tmp_path / "shards" / "test")} == {"fine": 1, "bad": 0}


@pytest.mark.parametrize("case", ["missing folder", "no files", "missing column", "corrupt image", "corrupt audio",
                                  "test before train"])
def test_bad_input_is_one_line(case, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["ptft"])
    out = str(tmp_path / "shards")
    if case == "missing folder":
        args, expected = ["--kind", "image", "--input", str(tmp_path / "nope")], "does not exist"
    elif case == "no files":
        (tmp_path / "empty" / "cat").mkdir(parents=True)
        args, expected = ["--kind", "image", "--input", str(tmp_path / "empty")], "no images in class folders"
    elif case == "missing column":
        data = write_csv(tmp_path / "reviews.csv", sentiment_rows(4, seed=1))
        args, expected = ["--kind", "text", "--input", data, "--label_column", "stars"], "no column 'stars'"
    elif case == "corrupt image":
        images = Path(write_images(tmp_path / "images", per_class=2, size=8))
        (images / "red" / "broken.png").write_bytes(b"not an image")
        args, expected = ["--kind", "image", "--input", str(images)], f"first: {images / 'red' / 'broken.png'}"
    elif case == "corrupt audio":
        clips = Path(write_audio_tree(tmp_path / "clips", per_class=1, kinds=("low", "high")))
        (clips / "low" / "broken.wav").write_bytes(b"RIFF....WAVEnot audio")
        args, expected = ["--kind", "audio", "--input", str(clips)], f"first: {clips / 'low' / 'broken.wav'}"
    else:
        data = write_csv(tmp_path / "reviews.csv", sentiment_rows(4, seed=1))
        args, expected = ["--kind", "text", "--input", data, "--split", "test"], "convert the training data first"
    line = one_line_error(capsys, ["convert", *args, "--output", out, "--num_workers", "1"])
    assert expected in line, line
    assert not (tmp_path / "shards" / "train").exists()  # stopped before writing


def test_shards_that_need_pickle_are_refused(tmp_path):
    (tmp_path / "index.json").write_text(json.dumps({"config": {"data_format": ["int", "pickle"]}}))
    with pytest.raises(PtftError, match="pickle"):
        check_shards(tmp_path)
    with pytest.raises(PtftError, match="labels.json"):
        StreamingImageDataModule(str(tmp_path))


# --- the streaming data modules with the modality modules ---------------------------------------------------------
def test_audio_and_text_modules_train_from_shards(tmp_path, tiny_bert):
    from ptft.audio import SpectrogramClassifier
    from ptft.audio.streaming import StreamingAudioDataModule
    from ptft.text import TextClassifier
    from ptft.text.streaming import StreamingTextDataModule

    convert("audio", write_audio_tree(tmp_path / "clips", per_class=3, kinds=("low", "high")),
            str(tmp_path / "audio"), val_fraction=0.3, num_workers=1)
    convert("text", write_csv(tmp_path / "reviews.csv", sentiment_rows(16, seed=1)), str(tmp_path / "text"),
            val_fraction=0.25, num_workers=1)
    audio = StreamingAudioDataModule(str(tmp_path / "audio"), clip_seconds=0.3, batch_size=2, num_workers=0)
    text = StreamingTextDataModule(str(tmp_path / "text"), max_length=32, batch_size=4, num_workers=0)
    cases = [
        (SpectrogramClassifier("test_resnet", pretrained=False, sampling_rate=8000, num_labels=audio.num_labels,
                               label_names=audio.label_names), audio),
        (TextClassifier(tiny_bert, num_labels=text.num_labels, label_names=text.label_names), text),
    ]
    for model, data in cases:
        data.connect(model)
        fit = trainer(tmp_path, max_epochs=1, limit_train_batches=2, limit_val_batches=1)
        fit.fit(model, datamodule=data)
        assert fit.global_step == 2 and "val/acc" in fit.callback_metrics
        batch = next(iter(data.train_dataloader()))
        assert "index" not in batch and len(batch["labels"]) == data.batch_size


# --- the recipe, and mid-epoch resume through the CLI ---------------------------------------------------------------
class IndexedImages(StreamingImageDataModule):
    """The recipe's data module, with each sample's stored index in its batch (``sample_index``)."""

    def collate_fn(self):
        return IndexedCollate(super().collate_fn())


class IndexedCollate:
    def __init__(self, collate) -> None:
        self.collate = collate

    def __call__(self, items):
        return {**self.collate(items), "sample_index": torch.tensor([it["index"] for it in items])}


#: Each RecordSamples' batches, one list per run (a preempted run's CLI object never returns).
RUNS: list[list[tuple[int, list[int]]]] = []


class RecordSamples(L.Callback):
    """The (epoch, sample indices) of every training batch, in order."""

    def __init__(self) -> None:
        self.batches: list[tuple[int, list[int]]] = []
        RUNS.append(self.batches)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.batches.append((trainer.current_epoch, batch["sample_index"].tolist()))


class Preempt(L.Callback):
    """Kills the run after step 4, as a preempted machine would (last.ckpt is the one of step 3)."""

    def on_train_batch_end(self, trainer, *args) -> None:
        if trainer.global_step == 4:
            raise RuntimeError("preempted")


def test_recipe_trains_from_shards_and_resumes_mid_epoch_with_the_unseen_samples(run_cli, tmp_path, recwarn):
    """18 training images, 4 per batch: 5 batches an epoch. A run preempted after step 4 (last.ckpt of step 3) and
    resumed with --ckpt_path last sees exactly the batches an uninterrupted run sees from step 3 on: the rest of
    epoch 0, then epoch 1 in its own order."""
    convert("image", write_images(tmp_path / "images", per_class=8, size=16), str(tmp_path / "shards"),
            val_fraction=0.25, num_workers=1)

    def fit(*extra: str) -> list[tuple[int, list[int]]]:
        run_cli(["fit", "--config", str(RECIPE), "--model.init_args.model_name=test_resnet",
                 "--model.init_args.pretrained=false", f"--data.class_path={THIS}.IndexedImages",
                 f"--data.init_args.data={tmp_path / 'shards'}", "--data.init_args.image_size=16",
                 "--data.init_args.batch_size=4", "--data.init_args.num_workers=0",
                 f"--trainer.callbacks+={THIS}.RecordSamples", "--checkpoint.every_n_train_steps=3",
                 "--trainer.accelerator=cpu", "--trainer.enable_progress_bar=false",
                 "--trainer.enable_model_summary=false", "--trainer.num_sanity_val_steps=0",
                 f"--trainer.logger.init_args.save_dir={tmp_path / 'runs'}", *extra], quiet=False)
        return RUNS[-1]

    with pytest.raises(RuntimeError, match="preempted"):
        fit("--trainer.max_steps=10", f"--trainer.callbacks+={THIS}.Preempt")
    stopped = RUNS[-1]
    resumed = fit("--trainer.max_steps=10", "--ckpt_path=last")
    straight = fit("--trainer.max_steps=10", "--trainer.logger.init_args.name=straight")
    assert len(straight) == 10 and stopped == straight[:4]
    assert resumed == straight[3:]  # from the checkpoint of step 3 on: nothing repeated, nothing skipped
    assert not [w for w in recwarn if "dataloader is not resumable" in str(w.message)]
    for epoch in (0, 1):  # every training image once an epoch, in a new order each epoch
        seen = [i for e, ids in straight if e == epoch for i in ids]
        assert sorted(seen) == sorted({i for _, ids in straight for i in ids}) and len(seen) == 18
    assert [ids for e, ids in straight if e == 0] != [ids for e, ids in straight if e == 1]
