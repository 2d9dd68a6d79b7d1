"""Text explanations on a tiny BERT trained on reviews whose label is decided by one planted sentiment word: the
word must come out as the most important token (integrated gradients, SHAP), attention rollout is a distribution
over the real tokens, and every method writes pages and pictures a person can open."""

from __future__ import annotations

import random

import pytest
import torch
from conftest import NEGATIVE, POSITIVE, sentiment_rows, write_csv
from helpers import trainer
from PIL import Image

from ptft.core.errors import PtftError
from ptft.core.optim import OptimizerConfig
from ptft.interpret import text
from ptft.interpret.attention import attention_files
from ptft.text import TextClassificationDataModule, TextClassifier

LABELS = ["negative", "positive"]


@pytest.fixture(scope="module")
def trained(tiny_bert, tmp_path_factory) -> TextClassifier:
    """The tiny BERT after 80 steps on 256 planted-word reviews (held-out accuracy is checked where it matters)."""
    folder = tmp_path_factory.mktemp("planted")
    train = write_csv(folder / "train.csv", sentiment_rows(256, seed=1, labels=tuple(LABELS)))
    torch.manual_seed(0)
    model = TextClassifier(tiny_bert, num_labels=2, label_names=LABELS, optimizer=OptimizerConfig(lr=3e-3))
    data = TextClassificationDataModule(train_file=train, batch_size=16, labels=LABELS)
    data.connect(model)
    trainer(folder, max_steps=80).fit(model, data)
    return model


@pytest.fixture(scope="module")
def held_out(trained) -> tuple[dict[str, torch.Tensor], list[int], list[str]]:
    """A padded batch of 12 unseen reviews, their labels and planted words."""
    rows = sentiment_rows(12, seed=7, labels=tuple(LABELS))
    tokenizer = trained.find_processor()
    batch = dict(tokenizer([r["text"] for r in rows], padding=True, return_tensors="pt"))
    planted = [next(w for w in r["text"].split() if w in POSITIVE + NEGATIVE) for r in rows]
    return batch, [LABELS.index(r["label"]) for r in rows], planted


def planted_positions(batch: dict[str, torch.Tensor], tokenizer, planted: list[str]) -> list[int]:
    """The token position of each example's planted word (every sentiment word is one token of MiniLM's vocab)."""
    ids = [tokenizer.convert_tokens_to_ids(w) for w in planted]
    return [(row == i).nonzero()[0].item() for row, i in zip(batch["input_ids"], ids)]


def assert_png(path) -> None:
    with Image.open(path) as image:
        assert image.format == "PNG" and image.width > 100 and image.height > 20
        image.verify()


def test_the_model_learned_the_planted_word(trained, held_out):
    batch, labels, _ = held_out
    trained.eval()
    with torch.no_grad():
        predicted = trained(batch).argmax(-1).tolist()
    assert sum(p == y for p, y in zip(predicted, labels)) >= 11  # else the attribution tests below mean nothing


def test_integrated_gradients_find_the_planted_word_and_are_complete(trained, held_out):
    batch, labels, planted = held_out
    mask = batch["attention_mask"].bool()
    assert not mask.all()  # the batch has padding
    trained.train()
    attributions, delta = text.integrated_gradients(trained, batch, labels)
    assert trained.training  # the caller's mode is restored
    assert attributions.shape == batch["input_ids"].shape and delta.shape == (len(labels),)
    assert (attributions[~mask] == 0).all()

    positions = planted_positions(batch, trained.find_processor(), planted)
    top = attributions.abs().argmax(dim=1).tolist()
    assert sum(t == p for t, p in zip(top, positions)) >= 10, (top, positions)

    # Completeness: the attributions add up to the target logit's change from the pad baseline to the input.
    reference = text.baseline_ids(batch["input_ids"], trained.find_processor(), "pad")
    assert (reference[:, 0] == batch["input_ids"][:, 0]).all()  # [CLS] stays itself
    trained.eval()
    with torch.no_grad():
        rows = torch.arange(len(labels))
        change = trained(batch)[rows, labels] - trained({**batch, "input_ids": reference})[rows, labels]
    torch.testing.assert_close(attributions.sum(dim=1) - change, delta, atol=1e-4, rtol=0)
    assert (delta.abs() < 0.05 * change.abs()).all(), (delta, change)


def test_integrated_gradients_files_are_escaped_pages_and_pictures(trained, tmp_path):
    tokenizer = trained.find_processor()
    batch = dict(tokenizer(["the food was excellent & <b>", "terrible"], padding=True, return_tensors="pt"))
    paths = text.integrated_gradients_files(trained, batch, [1, 0], tmp_path, first_index=7)
    assert [p.name for p in paths] == ["0007-ig.html", "0007-ig.png", "0008-ig.html", "0008-ig.png"]
    page = paths[0].read_text()
    assert "excellent" in page and "&amp;" in page and "&lt;" in page and "<b>" not in page
    assert "integrated gradients: positive (p = " in page
    assert "[PAD]" not in paths[2].read_text() and "terrible" in paths[2].read_text()
    for png in paths[1::2]:
        assert_png(png)


def test_a_ptft_head_frozen_and_in_inference_mode(tiny_bert):
    """An EncoderWithHead (mean pooling) with frozen weights, called from inference mode as prediction code is."""
    model = TextClassifier(tiny_bert, num_labels=2, head="mean")
    model.requires_grad_(False)
    tokenizer = model.find_processor()
    with torch.inference_mode():
        batch = dict(tokenizer(["a superb app", "the staff was useless today"], padding=True, return_tensors="pt"))
        attributions, delta = text.integrated_gradients(model, batch, [1, 0], n_steps=20)
        rollout = text.hf_attention_rollout(model, batch)
    assert attributions.abs().sum() > 0 and attributions[0, 5:].abs().sum() == 0
    assert delta.abs().max() < 1e-3
    torch.testing.assert_close(rollout.sum(dim=1), torch.ones(2))


def test_long_text_wraps_onto_more_lines(tmp_path):
    short = text.display_tokens(["[CLS]", "great", "[SEP]"])
    long = text.display_tokens(["[CLS]", *["wonderful", "##ly"] * 60, "[SEP]"])
    assert long[2] == ("ly", False)  # a WordPiece continuation is drawn against its word
    assert text.layout(long)[1] > 3 and text.layout(short)[1] == 1
    heights = []
    for name, tokens in (("short", short), ("long", long)):
        path = text.highlighted_png(tokens, [1.0] * len(tokens), name, tmp_path / f"{name}.png")
        with Image.open(path) as image:
            heights.append(image.height)
    assert heights[1] > 2 * heights[0]


def test_attention_rollout_is_a_distribution_over_real_tokens(trained, held_out):
    batch, _, _ = held_out
    mask = batch["attention_mask"].bool()
    config = trained.model.config
    assert config._attn_implementation == "sdpa"  # returns no attention weights: the method must switch
    rollout = text.hf_attention_rollout(trained, batch)
    assert config._attn_implementation == "sdpa"
    assert rollout.shape == batch["input_ids"].shape
    assert (rollout >= 0).all() and (rollout[~mask] == 0).all()
    torch.testing.assert_close(rollout.sum(dim=1), torch.ones(len(rollout)))
    maps = text.attention_maps(trained, batch)
    assert maps.shape == (*batch["input_ids"].shape, batch["input_ids"].shape[1])
    torch.testing.assert_close(maps.sum(-1)[mask], torch.ones(int(mask.sum())))
    assert (maps.transpose(1, 2)[~mask] == 0).all()  # nothing attends to padding
    with pytest.raises(PtftError, match="head_fusion"):
        text.hf_attention_rollout(trained, batch, head_fusion="median")


def test_attention_rollout_of_one_layer_is_half_attention_half_identity(tiny_bert):
    """One layer: rollout = renormalised (attention + identity); [CLS]'s row by hand from the eager weights."""
    model = TextClassifier(tiny_bert, num_labels=2, model_config={"num_hidden_layers": 1}, pretrained=False)
    tokenizer = model.find_processor()
    batch = dict(tokenizer(["a lovely book", "it was"], padding=True, return_tensors="pt"))
    attention = text.hf_attentions(model, batch)[0].mean(dim=1)[:, 0]
    expected = attention.clone()
    expected[:, 0] += 1
    expected = expected / 2 * batch["attention_mask"]
    torch.testing.assert_close(text.hf_attention_rollout(model, batch), expected)


def test_attention_files_for_text(trained, tmp_path):
    tokenizer = trained.find_processor()
    batch = dict(tokenizer(["a lovely & quiet room", "poor"], padding=True, return_tensors="pt"))
    paths = attention_files(trained, batch, [1, 0], tmp_path, first_index=0)
    assert [p.name for p in paths] == ["0000-attention.html", "0000-attention.png", "0001-attention.html",
                                       "0001-attention.png"]
    assert "lovely" in paths[0].read_text() and "&amp;" in paths[0].read_text()
    for png in paths[1::2]:
        assert_png(png)


def test_attention_and_shap_refuse_other_modules(tmp_path):
    from ptft.audio import SpectrogramClassifier

    cnn = SpectrogramClassifier("test_resnet", pretrained=False, num_labels=2)
    batch = {"input_values": torch.zeros(1, 1600)}
    with pytest.raises(PtftError, match="TextClassifier.*ImageClassifier"):
        attention_files(cnn, batch, [0], tmp_path, 0)
    with pytest.raises(PtftError, match="TextClassifier"):
        text.shap_files(cnn, batch, [0], tmp_path, 0)
    with pytest.raises(PtftError, match="TextClassifier"):
        text.integrated_gradients(cnn, batch, [0])


def test_shap_finds_the_planted_word_and_writes_files(shap_without_jit, trained, held_out, tmp_path):
    batch, labels, planted = held_out
    picked = random.Random(0).sample(range(len(labels)), 6)
    small = {k: v[picked] for k, v in batch.items()}
    targets = [labels[i] for i in picked]
    explained = text.shap_values(trained, small, targets, max_evals=60)
    hits = 0
    for (pieces, values, page), i in zip(explained, picked):
        assert len(pieces) == len(values) and "<svg" in page
        top = max(range(len(values)), key=lambda j: abs(values[j]))
        hits += pieces[top].strip() == planted[i]
    assert hits >= 5, explained

    paths = text.shap_files(trained, {k: v[:2] for k, v in small.items()}, targets[:2], tmp_path, 3, max_evals=60)
    assert [p.name for p in paths] == ["0003-shap.html", "0003-shap.png", "0004-shap.html", "0004-shap.png"]
    assert planted[picked[0]] in paths[0].read_text() and "SHAP: " in paths[0].read_text()
    for png in paths[1::2]:
        assert_png(png)
