"""DualEncoder: assembled towers learn colour captions (zero-shot, retrieval), transformers CLIP / SigLIP by folder,
one-line errors, and 2 processes log the evaluation metrics of one."""

from __future__ import annotations

import csv
from pathlib import Path

import lightning as L
import pytest
import torch
from helpers import trainer

from ptft.core import PtftError
from ptft.multimodal import DualEncoder, ImageTextDataModule


def assembled(tiny_bert: str, data: ImageTextDataModule, **kwargs) -> DualEncoder:
    L.seed_everything(0)  # timm's crops draw from Python's random, the weights from torch
    return DualEncoder(text_model=tiny_bert, image_model="test_resnet", pretrained=False, projection_dim=16,
                       class_names=data.class_names, **{"optimizer": {"lr": 1e-3}, **kwargs})


def colour_data(image_dirs, **kwargs) -> ImageTextDataModule:
    return ImageTextDataModule(train=image_dirs["train"], val=image_dirs["test"], test=image_dirs["test"],
                               image_size=32, batch_size=12, num_workers=0, **kwargs)


def test_assembled_towers_learn_colour_captions(tiny_bert, image_dirs, tmp_path):
    data = colour_data(image_dirs)
    assert data.class_names == ["blue", "green", "red"]
    model = assembled(tiny_bert, data)
    data.connect(model)
    before = trainer(tmp_path).validate(model, data, verbose=False)[0]
    trainer(tmp_path, max_epochs=20).fit(model, data)
    after = trainer(tmp_path).validate(model, data, verbose=False)[0]
    assert after["val/zero_shot_acc"] >= 0.9 > before["val/zero_shot_acc"] + 0.2  # chance: 1/3
    assert after["val/image_to_text/recall@1"] >= 0.9 and after["val/text_to_image/recall@1"] >= 0.9
    assert after["val/loss"] < 0.7 * before["val/loss"]
    assert set(after) >= {f"val/{d}/recall@{k}" for d in ("image_to_text", "text_to_image") for k in (1, 5, 10)}


def test_sigmoid_loss_learns_too_and_csv_captions(tiny_bert, image_dirs, tmp_path):
    rows = [{"path": str(p), "caption": f"something {p.parent.name}"} for p in sorted(Path(image_dirs["train"]).rglob("*.png"))]
    with open(tmp_path / "pairs.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, ["path", "caption"])
        writer.writeheader()
        writer.writerows(rows)
    data = ImageTextDataModule(train=str(tmp_path / "pairs.csv"), image_size=32, batch_size=12, num_workers=0,
                               val_fraction=0.25)
    assert data.class_names is None  # captions from a CSV: no classes, no zero-shot accuracy
    model = assembled(tiny_bert, data, loss="sigmoid")
    assert model.loss_kind == "sigmoid" and model.model.logit_bias is not None
    data.connect(model)
    before = trainer(tmp_path).validate(model, data, verbose=False)[0]
    trainer(tmp_path, max_epochs=20).fit(model, data)
    after = trainer(tmp_path).validate(model, data, verbose=False)[0]
    assert "val/zero_shot_acc" not in after
    assert after["val/image_to_text/recall@1"] >= 0.9 and after["val/loss"] < 0.7 * before["val/loss"]


@pytest.mark.parametrize("kind", ["clip", "siglip"])
def test_transformers_dual_encoders_by_folder(kind, tiny_clip, tiny_siglip, image_dirs, tmp_path):
    folder = {"clip": tiny_clip, "siglip": tiny_siglip}[kind]
    data = ImageTextDataModule(train=image_dirs["train"], val=image_dirs["test"], batch_size=12, num_workers=0)
    model = DualEncoder(model_name=folder, class_names=data.class_names)
    assert model.loss_kind == {"clip": "contrastive", "siglip": "sigmoid"}[kind]  # auto: the family's own loss
    assert model.data_config()["input_size"] == (3, 32, 32)  # from the model's image processor
    towers = model.towers()
    names = [n for n, _ in model.model.named_parameters()]
    for tower in ("text", "vision"):
        assert towers[tower] and any(n.startswith(towers[tower][0] + ".") for n in names)
    ids = model.layer_ids()
    assert ids["model.logit_scale"] == max(ids.values())
    data.connect(model)
    trainer(tmp_path, max_steps=2, limit_val_batches=1).fit(model, data)
    assert torch.isfinite(torch.tensor(trainer(tmp_path).validate(model, data, verbose=False)[0]["val/loss"]))


def test_one_line_errors(tiny_bert, tiny_clip, image_dirs, tmp_path):
    with pytest.raises(PtftError, match="not both"):
        DualEncoder(model_name=tiny_clip, text_model=tiny_bert, image_model="test_resnet")
    with pytest.raises(PtftError, match="not both"):
        DualEncoder()
    with pytest.raises(PtftError, match=r"needs text_model and image_model \(or audio_model\)"):
        DualEncoder(text_model=tiny_bert)
    with pytest.raises(PtftError, match="not an image-text dual encoder"):
        DualEncoder(model_name=tiny_bert)
    with pytest.raises(PtftError, match="prompt must contain"):
        DualEncoder(model_name=tiny_clip, prompt="a photo")
    with pytest.raises(PtftError, match="no logit bias"):
        DualEncoder(model_name=tiny_clip, loss="sigmoid")
    (tmp_path / "bad.csv").write_text("path,text\nx.png,a cat\n")
    with pytest.raises(PtftError, match="no column 'caption'.*caption_column"):
        ImageTextDataModule(train=str(tmp_path / "bad.csv"))
    (tmp_path / "empty.csv").write_text("path,caption\nx.png,a cat\ny.png,  \n")
    with pytest.raises(PtftError, match="1 row\\(s\\) without a caption, first: data row 2"):
        ImageTextDataModule(train=str(tmp_path / "empty.csv"))
    (tmp_path / "no-image.csv").write_text("path,caption\nx.png,a cat\n,a dog\n")
    with pytest.raises(PtftError, match="1 row\\(s\\) without an image path, first: data row 2"):
        ImageTextDataModule(train=str(tmp_path / "no-image.csv"))
    model = DualEncoder(text_model=tiny_bert, image_model="test_resnet", pretrained=False)
    with pytest.raises(PtftError, match="needs class names"):
        model.prompts()


def test_zero_shot_recipe_fits_and_predicts(run_recipe, run_cli, tiny_bert, image_dirs, tmp_path):
    from ptft.cli import RECIPES

    args = [f"--model.init_args.text_model={tiny_bert}", "--model.init_args.image_model=test_resnet",
            "--model.init_args.pretrained=false", f"--data.init_args.train={image_dirs['train']}",
            f"--data.init_args.test={image_dirs['test']}", "--data.init_args.image_size=32", "--data.init_args.num_workers=0"]
    cli = run_recipe("recipes/multimodal/clip-zero-shot.yaml", args)
    assert cli.trainer.global_step == 2 and cli.model.class_names == ["blue", "green", "red"]  # linked from the data
    cli.trainer.save_checkpoint(tmp_path / "de.ckpt")
    run_cli(["predict", "--config", str(RECIPES / "multimodal/clip-zero-shot.yaml"), *args,
             f"--data.init_args.predict={image_dirs['test']}", f"--ckpt_path={tmp_path / 'de.ckpt'}"])
    rows = list(csv.DictReader(open(tmp_path / "runs/clip-zero-shot/predictions.csv")))
    assert len(rows) == len(list(Path(image_dirs["test"]).rglob("*.png")))
    assert list(rows[0])[:3] == ["file", "label", "label_id"] and {r["label"] for r in rows} <= {"blue", "green", "red"}
    assert all(abs(sum(float(r[f"p_{c}"]) for c in ("blue", "green", "red")) - 1) < 1e-4 for r in rows)


def validate_metrics(tiny_bert, image_dirs, tmp_path, batch_size: int, **kwargs) -> dict[str, float]:
    data = ImageTextDataModule(train=image_dirs["train"], val=image_dirs["train"], image_size=32, batch_size=batch_size,
                               num_workers=0)
    model = assembled(tiny_bert, data)
    data.connect(model)
    return {k: float(v) for k, v in trainer(tmp_path, **kwargs).validate(model, data, verbose=False)[0].items()}


def test_two_processes_log_the_evaluation_metrics_of_one(tiny_bert, image_dirs, tmp_path):
    """36 pairs: one process in batches of 12, or 2 of 6 each whose negatives are gathered (the same 12 pairs: the
    evaluation sampler deals examples out in turn); set metrics (recall, zero-shot) over every rank's pairs."""
    single = validate_metrics(tiny_bert, image_dirs, tmp_path, 12)
    ddp = validate_metrics(tiny_bert, image_dirs, tmp_path, 6, devices=2, strategy="ddp_fork")
    assert 0 < single["val/image_to_text/recall@1"] < 1  # random towers: a value the ranks could get wrong
    assert set(ddp) == set(single)
    for key, value in single.items():
        assert ddp[key] == pytest.approx(value, rel=1e-5, abs=1e-6), (key, ddp, single)


def test_each_distinct_caption_is_encoded_once_with_the_same_result(tiny_bert, tmp_path):
    """Pairs sharing a caption share one text-tower pass: the embeddings equal those of encoding every caption."""
    from PIL import Image

    rows = []
    for i, caption in enumerate(["a red one", "a much longer caption of a green one", "a red one", "blue", "blue"]):
        Image.new("RGB", (16, 16), (40 * i, 20, 200)).save(tmp_path / f"{i}.png")
        rows.append(f"{i}.png,{caption}")
    (tmp_path / "pairs.csv").write_text("path,caption\n" + "\n".join(rows) + "\n")
    data = ImageTextDataModule(train=str(tmp_path / "pairs.csv"), val=str(tmp_path / "pairs.csv"), image_size=32,
                               batch_size=5, num_workers=0)
    model = assembled(tiny_bert, data).eval()
    data.connect(model)
    data.setup("validate")
    batch = next(iter(data.val_dataloader()))
    assert batch["groups"].tolist() == [1, 0, 1, 2, 2]  # distinct captions, sorted: longer, red, blue
    calls = []
    model.model.text.register_forward_hook(lambda m, args, kwargs, out: calls.append(len(kwargs["input_ids"])),
                                           with_kwargs=True)
    with torch.no_grad():
        images, shared = model(batch)
        plain = model.encode_texts(batch["input_ids"], batch["attention_mask"])
    assert calls == [3, 5]  # the 3 distinct captions in one pass, then all 5
    assert torch.allclose(shared, plain, atol=1e-5)
