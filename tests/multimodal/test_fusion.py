"""FusionClassifier: image + text questions that need both inputs (each fusion learns them), audio + text, the
towers under freezing schedules and tower learning rates, and one-line errors for bad rows."""

from __future__ import annotations

import random
from pathlib import Path

import lightning as L
import pytest
import torch
from audio_signals import write_audio_tree
from conftest import COLORS, write_csv, write_images
from helpers import trainer

from ptft.core import FreezeSchedule, PtftError
from ptft.multimodal import FusionClassifier, MultimodalClassificationDataModule


def questions(root: Path, per_class: int, seed: int) -> str:
    """``is it <colour> ?`` about noisy solid-colour images, answered yes / no: each image is asked about its own
    colour once and about another once, so neither the image nor the question alone beats chance (0.5)."""
    folder = Path(write_images(root / "images", per_class, seed=seed))
    rng = random.Random(seed)
    rows = []
    for image in sorted(folder.rglob("*.png")):
        colour = image.parent.name
        other = rng.choice([c for c in COLORS if c != colour])
        rows.append({"text": f"is it {colour} ?", "image": str(image.relative_to(root)), "label": "yes"})
        rows.append({"text": f"is it {other} ?", "image": str(image.relative_to(root)), "label": "no"})
    rng.shuffle(rows)
    return write_csv(root / "rows.csv", rows)


@pytest.fixture
def vqa(tmp_path: Path) -> dict[str, str]:
    return {"train": questions(tmp_path / "train", 16, seed=0), "val": questions(tmp_path / "val", 6, seed=1)}


def image_model(tiny_bert: str, data: MultimodalClassificationDataModule, **kwargs) -> FusionClassifier:
    L.seed_everything(0)
    kwargs = {"image_model": "test_resnet", "optimizer": {"lr": 2e-3}, **kwargs}
    model = FusionClassifier(text_model=tiny_bert, pretrained=False, fusion_dim=32, num_labels=data.num_labels,
                             label_names=data.label_names, **kwargs)
    data.connect(model)
    return model


def vqa_data(vqa: dict[str, str], **kwargs) -> MultimodalClassificationDataModule:
    return MultimodalClassificationDataModule(train=vqa["train"], val=vqa["val"], image_size=32, batch_size=16,
                                              num_workers=0, **kwargs)


@pytest.mark.parametrize(("fusion", "extra", "epochs"), [
    ("concat", {}, 25), ("gated", {}, 25),
    # Regions to attend to: a ViT's patch tokens (the tiny CNN pools a 32-pixel image into one)
    ("cross_attention", {"image_model": "test_vit", "dropout": 0.0}, 30)])
def test_each_fusion_answers_questions_that_need_both_inputs(tiny_bert, vqa, tmp_path, fusion, extra, epochs):
    data = vqa_data(vqa)
    assert data.label_names == ["no", "yes"]
    model = image_model(tiny_bert, data, fusion=fusion, **extra)
    before = trainer(tmp_path).validate(model, data, verbose=False)[0]["val/acc"]
    trainer(tmp_path, max_epochs=epochs).fit(model, data)
    after = trainer(tmp_path).validate(model, data, verbose=False)[0]["val/acc"]
    assert after >= 0.85 > before + 0.2, (before, after)  # chance 0.5


def test_text_tower_frozen_by_schedule_while_fusion_trains_and_tower_lr(tiny_bert, vqa, tmp_path):
    data = vqa_data(vqa)
    model = image_model(tiny_bert, data, tower_lr={"vision": 5e-4})
    assert set(model.towers()) == {"text", "vision", "fusion"}
    groups = model.param_groups()
    vision_lrs = {g["lr"] for g in groups if all(n.startswith("vision.") for n in g["names"])}
    assert 5e-4 in vision_lrs and all(lr <= 5e-4 for lr in vision_lrs)
    before = {n: p.detach().clone() for n, p in model.model.named_parameters()}
    trainer(tmp_path, max_epochs=1, callbacks=[FreezeSchedule(tower="text", train_layers=0)]).fit(model, data)
    moved = {n for n, p in model.model.named_parameters() if not torch.equal(before[n], p)}
    assert moved and not any(n.startswith("text.") for n in moved)
    assert any(n.startswith("fusion.") for n in moved) and any(n.startswith("vision.") for n in moved)


def test_audio_and_text(tiny_bert, tiny_wav2vec2, tmp_path):
    """The label is the sound's kind when the text asks for it, else the kind named in the text: which input to trust
    changes per row, what the gated unit is for (concatenation memorises these 48 rows instead). Clips go through
    the audio tower's feature extractor at its 16 kHz."""
    root = Path(write_audio_tree(tmp_path / "clips", 16, seed=3))
    rows = []
    rng = random.Random(0)
    for clip in sorted(root.rglob("*.wav")):
        named = rng.choice(["low", "high", "chirp", "clicks"])
        asks = rng.random() < 0.5
        rows.append({"text": "what do you hear ?" if asks else f"they said {named}", "audio": str(clip),
                     "label": clip.parent.name if asks else named})
    data = MultimodalClassificationDataModule(train=write_csv(tmp_path / "rows.csv", rows), batch_size=8,
                                              num_workers=0, val_fraction=0.25)
    L.seed_everything(0)
    model = FusionClassifier(text_model=tiny_bert, audio_model=tiny_wav2vec2, pretrained=False, fusion="gated",
                             fusion_dim=32,
                             num_labels=data.num_labels, label_names=data.label_names, optimizer={"lr": 2e-3})
    assert set(model.towers()) == {"text", "audio", "fusion"}
    data.connect(model)
    assert data.sampling_rate == 16000
    trainer(tmp_path, max_epochs=20).fit(model, data)
    acc = trainer(tmp_path).validate(model, data, verbose=False)[0]["val/acc"]
    assert acc >= 0.6  # chance 0.25


def test_bad_rows_are_one_line_errors(tiny_bert, vqa, tmp_path):
    rows = [{"text": "is it red ?", "image": "", "label": "yes"}, {"text": "is it red ?", "image": "x.png", "label": "no"}]
    data = MultimodalClassificationDataModule(train=write_csv(tmp_path / "a.csv", rows), num_workers=0)
    model = image_model(tiny_bert, vqa_data(vqa))
    data.connect(model)
    with pytest.raises(PtftError, match=r"1 row\(s\) without a image file \(column 'image'\), first: data row 1"):
        data.setup("fit")
    rows[0]["image"] = "missing.png"
    data = MultimodalClassificationDataModule(train=write_csv(tmp_path / "b.csv", rows), num_workers=0)
    data.connect(model)
    with pytest.raises(PtftError, match=r"2 unreadable image\(s\) in train, first: .*missing.png \(does not exist\)"):
        data.setup("fit")
    with pytest.raises(PtftError, match=r"has no column 'text'"):
        MultimodalClassificationDataModule(train=write_csv(tmp_path / "c.csv", [{"question": "q", "label": "a"}]))
    audio_rows = write_csv(tmp_path / "d.csv", [{"text": "a", "audio": "x.wav", "label": "a"}])
    data = MultimodalClassificationDataModule(train=audio_rows, num_workers=0)
    data.connect(model)
    with pytest.raises(PtftError, match=r"has no column 'image' with the image files .*set data.init_args.file_column"):
        data.setup("fit")
    with pytest.raises(PtftError, match=r"tower='audio' does not exist; FusionClassifier has towers \['fusion', 'text', 'vision'\]"):
        image_model(tiny_bert, vqa_data(vqa), tower_lr={"audio": 1e-4})
    with pytest.raises(PtftError, match="give image_model .* or audio_model"):
        FusionClassifier(text_model=tiny_bert, pretrained=False)


def test_fusion_recipe_fits_with_towers_frozen_then_predicts(run_recipe, run_cli, tiny_bert, vqa, tmp_path):
    """The recipe's frozen towers stay at their loaded weights during epoch 0 while the fusion head trains; predict
    writes one row per CSV row."""
    import csv

    from transformers import AutoModel

    from ptft.cli import RECIPES

    args = [f"--model.init_args.text_model={tiny_bert}", "--model.init_args.image_model=test_vit",
            "--model.init_args.image_pretrained=false", "--model.init_args.fusion_dim=32",
            f"--data.init_args.train={vqa['train']}", f"--data.init_args.val={vqa['val']}",
            "--data.init_args.image_size=32", "--data.init_args.num_workers=0"]
    cli = run_recipe("recipes/multimodal/image-text-fusion.yaml", args)
    assert cli.trainer.global_step == 2 and cli.model.label_names == ["no", "yes"]  # linked from the data
    loaded = AutoModel.from_pretrained(tiny_bert).state_dict()
    text = {k.removeprefix("text."): v for k, v in cli.model.model.state_dict().items() if k.startswith("text.")}
    assert text and all(torch.equal(v, loaded[k]) for k, v in text.items())
    cli.trainer.save_checkpoint(tmp_path / "fusion.ckpt")
    run_cli(["predict", "--config", str(RECIPES / "multimodal/image-text-fusion.yaml"), *args,
             f"--data.init_args.predict={vqa['val']}", f"--ckpt_path={tmp_path / 'fusion.ckpt'}"])
    rows = list(csv.DictReader(open(tmp_path / "runs/image-text-fusion/predictions.csv")))
    assert len(rows) == len(list(csv.DictReader(open(vqa["val"]))))
    assert list(rows[0])[:3] == ["file", "label", "label_id"] and {r["label"] for r in rows} <= {"no", "yes"}


def test_two_processes_train_every_parameter_and_score_like_one(tiny_bert, vqa, tmp_path):
    """Under DDP every parameter must get a gradient (an unused one, like BERT's pooler, stops the first step), and
    the validation accuracy of 2 processes is the one of a single process."""
    data = vqa_data(vqa, eval_batch_size=6)
    model = image_model(tiny_bert, data, fusion="cross_attention", image_model="test_vit")
    assert not any(n.startswith("text.pooler") for n, _ in model.model.named_parameters())
    single = trainer(tmp_path).validate(model, data, verbose=False)[0]
    ddp = trainer(tmp_path, max_steps=2, devices=2, strategy="ddp_fork", limit_val_batches=3)
    ddp.fit(model, data)  # rank 0's weights come back to this process
    again = trainer(tmp_path, devices=2, strategy="ddp_fork").validate(model, data, verbose=False)[0]
    after = trainer(tmp_path).validate(model, data, verbose=False)[0]
    assert again["val/acc"] == pytest.approx(after["val/acc"]) and again["val/loss"] == pytest.approx(after["val/loss"], rel=1e-5)
    assert single["val/loss"] != after["val/loss"]  # the 2-process steps trained it


def test_embeddings_and_error_analysis_of_a_fusion_classifier(tiny_bert, vqa, tmp_path):
    """The modality-agnostic explanations (ptft.interpret) read a two-tower model: the fused vector the classifier
    sees, and mistakes drawn with their text and image."""
    from ptft.interpret.embeddings import head_linear, pooled_embeddings, tsne_files
    from ptft.interpret.errors import error_files

    data = vqa_data(vqa)
    model = image_model(tiny_bert, data)
    data.setup("fit")
    loader = data.val_dataloader()
    embeddings, labels = pooled_embeddings(model, loader)
    _, linear = head_linear(model)
    assert embeddings.shape == (len(data.val_dataloader().dataset), linear.in_features) and len(labels) == len(embeddings)
    batch = next(iter(loader))
    with torch.no_grad():
        logits = model.eval()(batch)
    torch.testing.assert_close(linear(embeddings[: len(logits)]), logits, rtol=1e-4, atol=1e-5)
    names = {p.name for p in error_files(model, loader, tmp_path / "errors", 4)}
    names |= {p.name for p in tsne_files(model, loader, tmp_path / "tsne", None, before=None)}
    assert {"confusion.png", "mistakes.png", "per_class.csv", "embeddings-tsne.png"} <= names
