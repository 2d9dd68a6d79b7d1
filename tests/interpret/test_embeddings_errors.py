"""Embeddings (the head's input, t-SNE before / after), error analysis (confusion, per-class scores, confident
mistakes with their inputs) and the training callbacks (ErrorAnalysis, ExplainCallback) on tiny models."""

from __future__ import annotations

import csv
import math
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import trainer

from ptft.interpret.callbacks import ErrorAnalysis, ExplainCallback
from ptft.interpret.embeddings import head_linear, pooled_embeddings, pretrained_counterpart, tsne_files
from ptft.interpret.errors import (
    class_scores,
    collect_predictions,
    confusion_figure,
    draw_input,
    error_files,
    fetch_example,
    top_mistakes,
)
from ptft.text import TextClassificationDataModule, TextClassifier
from ptft.vision import ImageClassificationDataModule, ImageClassifier

PNG = b"\x89PNG\r\n\x1a\n"


def is_png(path: Path) -> bool:
    return Path(path).read_bytes()[:8] == PNG


def read_rows(path: Path) -> list[list[str]]:
    with open(path, newline="") as handle:
        return list(csv.reader(handle))


def text_case(tiny_bert: str, text_files: dict[str, str], head: str = "model", batch_size: int = 8):
    torch.manual_seed(0)
    model = TextClassifier(tiny_bert, num_labels=2, label_names=["negative", "positive"], head=head)
    data = TextClassificationDataModule(train_file=text_files["train"], val_file=text_files["val"], batch_size=batch_size)
    data.connect(model)
    data.setup("fit")
    return model, data


def image_case(image_dirs: dict[str, str]):
    torch.manual_seed(0)
    model = ImageClassifier("test_resnet", num_labels=3, label_names=["blue", "green", "red"], pretrained=False)
    data = ImageClassificationDataModule(train=image_dirs["train"], val=image_dirs["test"], image_size=32, batch_size=5,
                                         num_workers=0)
    data.connect(model)
    data.setup("fit")
    return model, data


def all_logits(model, loader) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return torch.cat([model(batch) for batch in loader])


# --- embeddings -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("head", ["model", "mean"])
def test_text_embeddings_are_what_the_final_linear_layer_sees(head, tiny_bert, text_files):
    model, data = text_case(tiny_bert, text_files, head)
    loader = data.val_dataloader()
    model.train()
    embeddings, labels = pooled_embeddings(model, loader)
    assert model.training  # the training flag is restored
    name, layer = head_linear(model)
    assert name == {"model": "classifier", "mean": "head.classifier"}[head]
    assert embeddings.shape == (32, 32) and labels.shape == (32,)
    torch.testing.assert_close(layer(embeddings), all_logits(model, loader))
    torch.testing.assert_close(labels, torch.cat([b["labels"] for b in loader]))
    assert pooled_embeddings(model, loader, max_examples=10)[0].shape == (10, 32)


def test_image_embeddings_are_what_the_final_linear_layer_sees(image_dirs):
    model, data = image_case(image_dirs)
    loader = data.val_dataloader()
    embeddings, labels = pooled_embeddings(model, loader)
    name, layer = head_linear(model)
    assert name == "fc" and embeddings.shape == (12, layer.in_features)
    torch.testing.assert_close(layer(embeddings), all_logits(model, loader))
    assert sorted(labels.tolist()) == [0] * 4 + [1] * 4 + [2] * 4


def test_tsne_files_before_and_after_fine_tuning(tiny_bert, text_files, tmp_path):
    model, data = text_case(tiny_bert, text_files)
    start = model.model.bert.embeddings.word_embeddings.weight.detach().clone()
    with torch.no_grad():  # "fine-tuning": the encoder moves away from where it started
        for param in model.model.bert.parameters():
            param.add_(0.5 * torch.randn_like(param))
    before = pretrained_counterpart(model)
    torch.testing.assert_close(before.model.bert.embeddings.word_embeddings.weight, start)
    assert not before.training

    paths = tsne_files(model, data.val_dataloader(), tmp_path, 24, before=before)
    assert [p.name for p in paths] == ["embeddings-tsne.png", "embeddings.npz", "embeddings.csv"]
    assert is_png(tmp_path / "embeddings-tsne.png")
    saved = np.load(tmp_path / "embeddings.npz")
    assert saved["after"].shape == saved["before"].shape == (24, 32) and saved["labels"].shape == (24,)
    assert list(saved["label_names"]) == ["negative", "positive"]
    assert not np.allclose(saved["after"], saved["before"])
    expected, _ = pooled_embeddings(before, data.val_dataloader(), 24)
    np.testing.assert_allclose(saved["before"], expected.numpy(), rtol=1e-5, atol=1e-6)
    rows = read_rows(tmp_path / "embeddings.csv")
    assert rows[0] == ["model", "row", "label", "x", "y"] and len(rows) == 1 + 2 * 24
    assert {r[0] for r in rows[1:]} == {"before", "after"}


def test_pretrained_counterpart_of_a_loaded_checkpoint_is_its_model_name_pretrained(tiny_bert, text_files, tmp_path):
    from ptft.core.module import load_checkpoint

    model, data = text_case(tiny_bert, text_files)
    start = model.model.bert.embeddings.word_embeddings.weight.detach().clone()
    run = trainer(tmp_path, max_steps=3)
    run.fit(model, data)
    run.save_checkpoint(tmp_path / "tuned.ckpt")
    loaded = load_checkpoint(str(tmp_path / "tuned.ckpt"))
    assert not torch.allclose(loaded.model.bert.embeddings.word_embeddings.weight, start)  # it did fine-tune
    with pytest.warns(UserWarning, match="pretrained weights"):
        before = pretrained_counterpart(loaded)
    torch.testing.assert_close(before.model.bert.embeddings.word_embeddings.weight, start)


# --- errors -----------------------------------------------------------------------------------------------------
def test_confusion_counts_per_class_scores_and_top_mistakes():
    probs = torch.tensor([
        [0.90, 0.05, 0.05],  # 0 -> 0
        [0.20, 0.70, 0.10],  # 0 -> 1 (0.70)
        [0.10, 0.20, 0.70],  # 1 -> 2 (0.70)
        [0.05, 0.90, 0.05],  # 1 -> 1
        [0.60, 0.30, 0.10],  # 2 -> 0 (0.60)
        [0.01, 0.01, 0.98],  # 2 -> 2
        [0.05, 0.94, 0.01],  # 2 -> 1 (0.94)
        [0.40, 0.35, 0.25],  # 0 -> 0
    ])
    labels = torch.tensor([0, 0, 1, 1, 2, 2, 2, 0])
    counts = torch.zeros(3, 3, dtype=torch.long)
    for label, predicted in zip(labels.tolist(), probs.argmax(-1).tolist()):
        counts[label, predicted] += 1
    scores = class_scores(probs, labels)
    torch.testing.assert_close(scores["confusion"], counts)
    tp = counts.diag().float()
    torch.testing.assert_close(scores["precision"], tp / counts.sum(0))
    torch.testing.assert_close(scores["recall"], tp / counts.sum(1))
    torch.testing.assert_close(scores["support"], torch.tensor([3, 2, 3]))

    mistakes = top_mistakes(probs, labels, 3)
    assert [m.position for m in mistakes] == [6, 1, 2]  # 0.94, then the two 0.70 in their order
    assert all(m.label != m.predicted for m in mistakes)
    assert [m.probability for m in mistakes] == sorted((m.probability for m in mistakes), reverse=True)
    assert len(top_mistakes(probs, labels, 10)) == 4  # every mistake, no more
    figure = confusion_figure(probs, labels, ["a", "b", "c"])
    assert len([ax for ax in figure.axes if ax.get_title()]) == 3


def test_error_files_show_the_mistaken_texts(tiny_bert, text_files, tmp_path):
    model, data = text_case(tiny_bert, text_files)
    loader = data.val_dataloader()
    predictions = collect_predictions(model, loader)
    assert predictions.probs.shape == (32, 2) and sorted(predictions.indices.tolist()) == list(range(32))
    torch.testing.assert_close(predictions.probs, all_logits(model, loader).softmax(-1))

    paths = error_files(model, loader, tmp_path, 4)
    assert {p.name for p in paths} == {"confusion.png", "confusion.csv", "per_class.csv", "mistakes.png", "mistakes.csv"}
    assert is_png(tmp_path / "confusion.png") and is_png(tmp_path / "mistakes.png")
    confusion = read_rows(tmp_path / "confusion.csv")
    assert sum(int(v) for row in confusion[1:] for v in row[1:]) == 32
    assert [r[4] for r in read_rows(tmp_path / "per_class.csv")[1:]] == ["16", "16"]
    texts = {row["text"] for row in csv.DictReader(open(text_files["val"]))}
    rows = read_rows(tmp_path / "mistakes.csv")[1:]
    wrong = int((predictions.probs.argmax(-1) != predictions.labels).sum())
    assert len(rows) == min(4, wrong) > 0
    for index, label, predicted, probability, text in rows:
        assert label != predicted and text in texts  # the decoded input is the example's text
        assert data.val_dataloader().dataset[int(index)]["labels"] == ["negative", "positive"].index(label)


def test_image_and_audio_inputs_are_drawn(image_dirs):
    import matplotlib.pyplot as plt

    model, data = image_case(image_dirs)
    loader = data.val_dataloader()
    figure, axes = plt.subplots(1, 2)
    red = next(i for i in range(len(loader.dataset)) if loader.dataset[i]["labels"] == 2)
    draw_input(axes[0], model, fetch_example(loader, red))
    pixels = axes[0].images[0].get_array()
    assert pixels.shape == (32, 32, 3) and 0 <= pixels.min() and pixels.max() <= 1
    means = pixels.reshape(-1, 3).mean(0)
    assert means[0] > 0.6 and means[1] < 0.4 and means[2] < 0.4  # un-normalised: red again

    rate = 16000
    wave = torch.sin(2 * math.pi * 1000 * torch.arange(rate // 2) / rate)
    audio = types.SimpleNamespace(sampling_rate=rate)
    draw_input(axes[1], audio, {"input_values": wave[None], "attention_mask": torch.ones(1, rate // 2)})
    spectrogram = axes[1].images[0].get_array()
    n_fft = 2 * (spectrogram.shape[0] - 1)
    assert abs(spectrogram.mean(1).argmax() * rate / n_fft - 1000) <= rate / n_fft  # the 1 kHz tone's bin
    plt.close(figure)


# --- callbacks ----------------------------------------------------------------------------------------------------
def test_error_analysis_each_validation_epoch_not_the_sanity_check(tiny_bert, text_files, tmp_path, monkeypatch):
    from wandb_reader import run_contents

    from ptft.core.tracking import WandbLogger
    from ptft.interpret import callbacks

    calls = []
    original = callbacks.write_error_report

    def spy(module, predictions, fetch, folder, top_k):
        calls.append((module.trainer.sanity_checking, len(predictions.labels), Path(folder).name))
        return original(module, predictions, fetch, folder, top_k)

    monkeypatch.setattr(callbacks, "write_error_report", spy)
    model, data = text_case(tiny_bert, text_files, batch_size=16)
    logger = WandbLogger(offline=True, save_dir=str(tmp_path), project="ptft-test")
    fit = trainer(tmp_path, max_epochs=2, limit_train_batches=1, num_sanity_val_steps=2, logger=logger,
                  callbacks=[ErrorAnalysis(top_k=3)])
    fit.fit(model, data)
    assert calls == [(False, 32, "validate-epoch0"), (False, 32, "validate-epoch1")]
    folder = tmp_path / "ptft-test" / logger.version / "errors"  # <save_dir>/<project>/<run id>, not save_dir itself
    assert sorted(p.name for p in folder.iterdir()) == ["validate-epoch0", "validate-epoch1"]
    assert is_png(folder / "validate-epoch1" / "confusion.png")

    logger.experiment.finish()
    (run_dir,) = (tmp_path / "wandb").glob("offline-run-*")
    _, history = run_contents(run_dir)
    kinds = {key: [row[f"errors/validate/{key}/_type"] for row in history if f"errors/validate/{key}/_type" in row]
             for key in ("confusion", "mistakes", "per_class")}
    assert kinds == {"confusion": ["images/separated"] * 2, "mistakes": ["images/separated"] * 2,
                     "per_class": ["table-file"] * 2}, [sorted(row) for row in history]


def test_error_analysis_on_two_processes_counts_as_one(tiny_bert, text_files, tmp_path):
    rows = read_rows(Path(text_files["val"]))
    Path(text_files["val"]).write_text("\n".join(",".join(r) for r in rows[:32]) + "\n")  # 31 rows: the sampler repeats one
    counts = {}
    for name, kwargs in (("one", {}), ("two", {"devices": 2, "strategy": "ddp_fork"})):
        model, data = text_case(tiny_bert, text_files, batch_size=4)
        run = trainer(tmp_path / name, callbacks=[ErrorAnalysis(top_k=4)], **kwargs)
        run.validate(model, data, verbose=False)
        folder = tmp_path / name / "errors" / "validate-epoch0"
        counts[name] = [read_rows(folder / f) for f in ("confusion.csv", "per_class.csv", "mistakes.csv")]
    assert sum(int(v) for row in counts["one"][0][1:] for v in row[1:]) == 31
    assert counts["two"] == counts["one"]


def fake_explainer(module, batch, targets, folder, first_index):
    """A per-example method that needs gradients, as attribution methods do."""
    import matplotlib.pyplot as plt

    from ptft.interpret.output import save_figure

    assert torch.is_grad_enabled() and not torch.is_inference_mode_enabled()
    assert not module.training and not module.trainer.sanity_checking
    module.zero_grad()
    logits = module(batch)
    logits.gather(1, targets[:, None]).sum().backward()
    assert module.model.classifier.weight.grad is not None
    FAKE_CALLS.append(module.trainer.current_epoch)
    return [save_figure(plt.figure(), Path(folder) / f"{first_index + i:04d}-fake.png") for i in range(len(targets))]


FAKE_CALLS: list[int] = []


def test_explain_callback_runs_with_gradients_after_each_validation(tiny_bert, text_files, tmp_path, monkeypatch):
    from ptft import interpret

    fake = types.ModuleType("fake_explainer_module")
    fake.explain = fake_explainer
    monkeypatch.setitem(sys.modules, "fake_explainer_module", fake)
    monkeypatch.setitem(interpret.EXAMPLE_METHODS, "fake", "fake_explainer_module:explain")
    FAKE_CALLS.clear()
    model, data = text_case(tiny_bert, text_files, batch_size=16)
    fit = trainer(tmp_path, max_epochs=2, limit_train_batches=1, num_sanity_val_steps=1,
                  callbacks=[ExplainCallback("fake", num_samples=3), ExplainCallback("errors", num_samples=2)])
    fit.fit(model, data)
    assert FAKE_CALLS == [0, 1]
    fit.validate(model, data, verbose=False)  # trainer.validate runs under inference mode: the callback leaves it
    assert fit.validate_loop.inference_mode and FAKE_CALLS == [0, 1, 2]
    for epoch in (0, 1):
        pictures = sorted(p.name for p in (tmp_path / "explain" / f"fake-epoch{epoch}").iterdir())
        assert pictures == ["0000-fake.png", "0001-fake.png", "0002-fake.png"]
        assert is_png(tmp_path / "explain" / f"errors-epoch{epoch}" / "confusion.png")
    assert sorted(p.name for p in (tmp_path / "explain").iterdir()) == [
        "errors-epoch0", "errors-epoch1", "errors-epoch2", "fake-epoch0", "fake-epoch1", "fake-epoch2"]
