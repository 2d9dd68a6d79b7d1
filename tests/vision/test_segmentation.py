import csv
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from conftest import REPO
from PIL import Image
from safetensors.torch import save_file
from torchmetrics.classification import MulticlassJaccardIndex

from ptft.core.callbacks import WritePredictions
from ptft.core.errors import PtftError
from ptft.core.optim import OptimizerConfig
from ptft.vision.segmentation import HFSemanticSegmenter, SemanticSegmenter
from ptft.vision.segmentation_data import IGNORE, SegmentationDataModule

UNET_RECIPE = "recipes/vision/segmentation-unet.yaml"
SEGFORMER_RECIPE = "recipes/vision/segformer.yaml"
CLASSES = ["background", "square", "disc"]
TINY_UNET = {"decoder_channels": [16, 16, 16, 8, 8]}
TINY_FPN = {"decoder_pyramid_channels": 32, "decoder_segmentation_channels": 32}  # GroupNorm(32): multiples of 32
TINY_SEGFORMER = {
    "model_type": "segformer", "depths": [1, 1, 1, 1], "hidden_sizes": [8, 16, 16, 32],
    "num_attention_heads": [1, 1, 1, 2], "decoder_hidden_size": 32, "mlp_ratios": [2, 2, 2, 2],
}


def write_split(root: Path, n: int, seed: int, size: tuple[int, int] = (64, 64)) -> str:
    """Noise images with a reddish square (class 1) and a bluish disc (class 2) at random places and sizes; the
    disc's outline is unlabelled (255). Odd images are JPEGs, masks are PNGs of the same stem."""
    rng = np.random.default_rng(seed)
    h, w = size
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "masks").mkdir(parents=True, exist_ok=True)
    yy, xx = np.mgrid[:h, :w]
    for i in range(n):
        img = rng.integers(0, 256, (h, w, 3))
        mask = np.zeros((h, w), np.uint8)
        s = rng.integers(min(h, w) // 4, min(h, w) // 2)
        y0, x0 = rng.integers(0, h - s), rng.integers(0, w - s)
        img[y0 : y0 + s, x0 : x0 + s] = (210, 50, 50) + rng.integers(-40, 40, (s, s, 3))
        mask[y0 : y0 + s, x0 : x0 + s] = 1
        r = rng.integers(min(h, w) // 8, min(h, w) // 5)
        cy, cx = rng.integers(r, h - r), rng.integers(r, w - r)
        dist = np.hypot(xx - cx, yy - cy)
        img[dist <= r] = (50, 70, 210) + rng.integers(-40, 40, (int((dist <= r).sum()), 3))
        mask[dist <= r] = 2
        mask[np.abs(dist - r) < 0.7] = 255
        Image.fromarray(img.clip(0, 255).astype(np.uint8)).save(root / "images" / f"{i:03d}.{'jpg' if i % 2 else 'png'}")
        Image.fromarray(mask, mode="L").save(root / "masks" / f"{i:03d}.png")
    return str(root)


@pytest.fixture(scope="module")
def seg_data(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("seg")
    (root / "classes.txt").write_text("\n".join(CLASSES) + "\n")
    return {"train": write_split(root / "train", 48, seed=0), "val": write_split(root / "val", 16, seed=1)}


def trainer(steps: int, **kwargs) -> L.Trainer:
    return L.Trainer(
        max_steps=steps, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, accelerator="cpu", num_sanity_val_steps=0, **kwargs,
    )


def data_module(seg_data, **kwargs) -> SegmentationDataModule:
    kwargs = {"image_size": 64, "batch_size": 8, "num_workers": 0, "scale": (0.6, 1.0), **kwargs}
    return SegmentationDataModule(train=seg_data["train"], val=seg_data["val"], **kwargs)


def trivial_miou(dm: SegmentationDataModule) -> float:
    """mIoU of predicting the majority class (background) everywhere, with the module's own metric."""
    dm.setup("validate")
    metric = MulticlassJaccardIndex(num_classes=dm.num_labels, average="macro", ignore_index=IGNORE)
    for batch in dm.val_dataloader():
        metric.update(torch.zeros_like(batch["labels"]), batch["labels"])
    return float(metric.compute())


@pytest.fixture(scope="module")
def trained(seg_data):
    """An FPN over test_resnet trained 30 steps (batch 8, 64 px) on the shapes."""
    dm = data_module(seg_data)
    L.seed_everything(0)
    model = SemanticSegmenter(
        "test_resnet", architecture="fpn", pretrained=False, model_kwargs=TINY_FPN,
        num_labels=dm.num_labels, label_names=dm.label_names, optimizer=OptimizerConfig(lr=3e-3),
    )
    dm.connect(model)
    fit = trainer(30, check_val_every_n_epoch=100)
    fit.fit(model, dm)
    return model, dm, fit.validate(model, dm, verbose=False)[0], fit


def test_fpn_learns_shapes_well_above_the_trivial_predictor(trained):
    _, dm, metrics, _ = trained
    baseline = trivial_miou(dm)
    print(f"val/miou {metrics['val/miou']:.3f} (all-background {baseline:.3f}), pixel acc {metrics['val/pixel_acc']:.3f}")
    assert dm.label_names == CLASSES  # from classes.txt beside the split folders
    assert baseline < 0.35
    assert metrics["val/miou"] > baseline + 0.3


def test_predict_writes_masks_at_the_original_size(trained, tmp_path):
    model, *_ = trained
    write_split(tmp_path / "new", 3, seed=5, size=(40, 56))
    (tmp_path / "new" / "images" / "sub").mkdir()
    Image.new("RGB", (30, 20), (210, 50, 50)).save(tmp_path / "new" / "images" / "sub" / "red.jpg")
    model.predict_dir = str(tmp_path / "out")
    dm = SegmentationDataModule(predict=str(tmp_path / "new"), labels=CLASSES, image_size=64, num_workers=0)
    dm.connect(model)
    writer = WritePredictions(str(tmp_path / "predictions.csv"))
    trainer(1, callbacks=[writer]).predict(model, dm)
    rows = list(csv.DictReader((tmp_path / "predictions.csv").read_text().splitlines()))
    assert [Path(r["file"]).name for r in rows] == ["000.png", "001.jpg", "002.png", "red.jpg"]
    assert rows[3]["mask"] == str(tmp_path / "out" / "sub" / "red.png")  # relative paths are kept
    predicted = np.asarray(Image.open(rows[0]["mask"]))
    truth = np.asarray(Image.open(tmp_path / "new" / "masks" / "000.png"))
    assert predicted.shape == truth.shape == (40, 56)
    labelled = truth != 255
    assert (predicted[labelled] == truth[labelled]).mean() > 0.8
    assert np.asarray(Image.open(rows[3]["mask"])).shape == (20, 30)


def test_pretrained_file_loads_into_the_encoder_and_layers_follow_timm(tmp_path):
    import timm

    source = timm.create_model("test_resnet", num_classes=1000)
    save_file(source.state_dict(), tmp_path / "backbone.safetensors")
    model = SemanticSegmenter(
        "test_resnet", pretrained_file=str(tmp_path / "backbone.safetensors"), model_kwargs=TINY_UNET, num_labels=3,
        optimizer=OptimizerConfig(lr=1e-4, head_lr=1e-2),
    )
    torch.testing.assert_close(model.model.encoder.model.layer4[0].conv1.weight, source.layer4[0].conv1.weight)
    assert model.hparams.pretrained is False and model.hparams.pretrained_file is None  # checkpoints rebuild by name
    layers = model.layer_ids()
    assert layers["encoder.model.conv1.0.weight"] == 0
    assert layers["encoder.model.layer1.0.conv1.weight"] < layers["encoder.model.layer4.0.conv1.weight"]
    top = max(layers.values())
    assert {n for n, i in layers.items() if i == top} == {
        n for n, _ in model.model.named_parameters() if not n.startswith("encoder.")
    }
    heads = {n for g in model.param_groups() if g["lr"] == 1e-2 for n in g["names"]}
    assert heads == {n for n, _ in model.model.named_parameters() if n.startswith(("decoder.", "segmentation_head."))}


def test_flattened_timm_stage_names_get_block_layers():
    model = SemanticSegmenter("convnext_atto", pretrained=False, model_kwargs=TINY_UNET, num_labels=2)
    layers = model.layer_ids()
    assert layers["encoder.model.stem_0.weight"] == 0
    assert 0 < layers["encoder.model.stages_0.blocks.0.conv_dw.weight"] < layers["encoder.model.stages_3.blocks.1.mlp.fc2.weight"]


def test_checkpoint_and_export_reload_without_the_hub(trained, tmp_path):
    import segmentation_models_pytorch as smp

    from ptft.core.module import load_checkpoint

    model, _, _, fit = trained
    fit.save_checkpoint(tmp_path / "model.ckpt")
    restored = load_checkpoint(str(tmp_path / "model.ckpt")).eval()
    assert isinstance(restored, SemanticSegmenter) and restored.label_names == CLASSES
    model.export(str(tmp_path / "exported"))
    reloaded = smp.from_pretrained(str(tmp_path / "exported")).eval()
    x = torch.randn(1, 3, 64, 64)
    model.eval()
    torch.testing.assert_close(reloaded(x), model.model(x))
    torch.testing.assert_close(restored.model(x), model.model(x))


def test_segformer_tiny_trains(seg_data, tmp_path):
    from ptft.core.module import load_checkpoint

    dm = data_module(seg_data)
    L.seed_everything(0)
    model = HFSemanticSegmenter(
        "nvidia/mit-b0", pretrained=False, model_config=TINY_SEGFORMER, num_labels=dm.num_labels,
        label_names=dm.label_names, optimizer=OptimizerConfig(lr=1e-2),
    )
    assert model.head_modules(model.model) == ["decode_head"]
    assert model.model.config.id2label[2] == "disc"
    layers = model.layer_ids()
    assert layers["segformer.stages.0.patch_embeddings.proj.weight"] == 0
    assert max(layers.values()) == layers["decode_head.classifier.weight"] > layers["segformer.stages.3.blocks.0.mlp.fc1.weight"]
    dm.connect(model)
    fit = trainer(30, check_val_every_n_epoch=100)
    fit.fit(model, dm)
    metrics = fit.validate(model, dm, verbose=False)[0]
    print(f"segformer val/miou {metrics['val/miou']:.3f} (all-background {trivial_miou(dm):.3f})")
    assert metrics["val/miou"] > trivial_miou(dm) + 0.15
    fit.save_checkpoint(tmp_path / "segformer.ckpt")
    restored = load_checkpoint(str(tmp_path / "segformer.ckpt")).eval()  # the config is in the checkpoint
    batch = {"pixel_values": torch.randn(2, 3, 64, 64)}
    torch.testing.assert_close(restored(batch), model.eval()(batch))


def test_paired_augmentation_moves_image_and_mask_together(tmp_path):
    # The image encodes its mask: class 1 pixels are red, class 2 blue, background black; after random crops,
    # rescaling and flips, the colour of each pixel must still name its class.
    root = tmp_path / "pair"
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    rng = np.random.default_rng(0)
    for i in range(4):
        mask = np.zeros((48, 64), np.uint8)
        mask[rng.integers(0, 20) :][:, : rng.integers(10, 40)] = 1
        mask[:, rng.integers(45, 60) :] = 2
        img = np.zeros((48, 64, 3), np.uint8)
        img[mask == 1] = (255, 0, 0)
        img[mask == 2] = (0, 0, 255)
        Image.fromarray(img).save(root / "images" / f"{i}.png")
        Image.fromarray(mask).save(root / "masks" / f"{i}.png")
    dm = SegmentationDataModule(train=str(root), val=str(root), image_size=32, scale=(0.2, 1.0), hflip=0.5, num_workers=0)
    dm.mean, dm.std = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)
    dm.setup("fit")
    for _ in range(5):
        for item in dm.datasets["train"]:
            image, labels = item["pixel_values"], item["labels"]
            assert labels.shape == (32, 32) and labels.dtype == torch.int64
            colour_class = torch.where(image[0] > 0.5, 1, torch.where(image[2] > 0.5, 2, 0))
            assert (colour_class == labels).float().mean() > 0.9  # antialiased image edges may differ
            assert set(labels.unique().tolist()) <= {0, 1, 2}  # masks are resized with nearest: no blended ids


def test_ignore_index_and_reduce_labels(tmp_path):
    root = tmp_path / "ade"
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    Image.new("RGB", (8, 8)).save(root / "images" / "a.jpg")
    Image.fromarray(np.array([[0, 1, 2, 255]] * 2, np.uint8).repeat(4, 0).repeat(2, 1)).save(root / "masks" / "a.png")
    dm = SegmentationDataModule(train=str(root), val=str(root), reduce_labels=True, image_size=8, num_workers=0)
    assert dm.label_names == ["0", "1"]  # ids 1 and 2 become 0 and 1
    dm.setup("fit")
    assert dm.datasets["val"][0]["labels"][0].tolist() == [IGNORE, IGNORE, 0, 0, 1, 1, IGNORE, IGNORE]


def bad_split(tmp_path: Path, problem: str) -> tuple[str, dict]:
    root = Path(write_split(tmp_path / "bad", 3, seed=3, size=(32, 32)))
    kwargs: dict = {}
    if problem == "size":
        Image.new("L", (30, 32)).save(root / "masks" / "001.png")
    elif problem == "no mask":
        (root / "masks" / "002.png").unlink()
    elif problem == "class id":
        Image.new("L", (32, 32), 7).save(root / "masks" / "001.png")
        kwargs["labels"] = CLASSES
    elif problem == "image":
        (root / "images" / "001.jpg").write_bytes(b"not an image")
    elif problem == "mask":
        (root / "masks" / "001.png").write_bytes(b"\x89PNG broken")
    elif problem == "rgb mask":
        Image.new("RGB", (32, 32)).save(root / "masks" / "001.png")
    return str(root), kwargs


@pytest.mark.parametrize(
    ("problem", "message"),
    [
        ("size", r"mask .*001\.png is 30x32 but its image .*001\.jpg is 32x32 \(width x height\)"),
        ("no mask", r"train: 1 image\(s\) without a mask, first: .*002\.png"),
        ("class id", r"mask .*001\.png has class id 7 but there are 3 classes \(ids 0-2\); .*ignore_index=255"),
        ("image", r"train: cannot read image .*001\.jpg"),
        ("mask", r"train: cannot read mask .*001\.png"),
        ("rgb mask", r"mask .*001\.png has mode RGB: masks must hold one class id per pixel"),
    ],
)
def test_bad_pairs_are_one_line_errors_before_training(tmp_path, problem, message):
    root, kwargs = bad_split(tmp_path, problem)
    with pytest.raises(PtftError, match=message) as err:
        SegmentationDataModule(train=root, num_workers=0, **kwargs).label_names  # noqa: B018
    assert "\n" not in str(err.value)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"encoder": "test_vit"}, r"cannot build unet over timm encoder 'test_vit': .*feature pyramid"),
        ({"encoder": "no_such_net"}, r"unknown timm encoder 'no_such_net'"),
        ({"architecture": "unet3d"}, r"unknown architecture 'unet3d'"),
        ({"pretrained_file": "missing.safetensors"}, r"pretrained_file 'missing.safetensors' does not exist"),
    ],
)
def test_bad_model_arguments_are_one_line_errors(kwargs, message):
    with pytest.raises(PtftError, match=message):
        SemanticSegmenter(**{"encoder": "test_resnet", "pretrained": False, "num_labels": 2, **kwargs})


def test_cli_reports_bad_masks_before_building_the_model(run_cli, tmp_path, capsys):
    from ptft.cli import main

    root, _ = bad_split(tmp_path, "size")
    with pytest.raises(SystemExit):
        main(["fit", "--config", str(REPO / UNET_RECIPE), f"--data.init_args.train={root}", "--data.init_args.val=null",
              "--model.init_args.encoder=test_resnet", "--model.init_args.pretrained=false"])
    err = capsys.readouterr().err.strip()
    assert err.startswith("ptft: error: train: mask") and "is 30x32 but its image" in err and "\n" not in err


def test_unet_recipe_runs_and_predicts(run_recipe, run_cli, seg_data, tmp_path):
    overrides = [
        "--model.init_args.encoder=test_resnet", "--model.init_args.pretrained=false",
        f"--model.init_args.model_kwargs={TINY_UNET}",
        f"--data.init_args.train={seg_data['train']}", f"--data.init_args.val={seg_data['val']}",
        "--data.init_args.image_size=64", "--data.init_args.num_workers=0",
    ]
    # Batches of 24: the 2 steps are one epoch, so validation runs and the best checkpoint is written.
    cli = run_recipe(UNET_RECIPE, [*overrides, "--data.init_args.batch_size=24"])
    assert isinstance(cli.model, SemanticSegmenter) and cli.model.label_names == CLASSES
    assert cli.trainer.global_step == 2
    assert cli.trainer.checkpoint_callback.monitor == "val/miou"
    best = cli.trainer.checkpoint_callback.best_model_path
    assert best
    images = write_split(tmp_path / "new", 2, seed=9, size=(48, 40))
    run_cli(["predict", "--config", str(REPO / UNET_RECIPE), *overrides, f"--data.init_args.predict={images}",
             f"--ckpt_path={best}", "--trainer.logger=false"], quiet=False)
    rows = list(csv.DictReader((tmp_path / "runs/segmentation-unet/predictions.csv").read_text().splitlines()))
    assert [Path(r["mask"]).name for r in rows] == ["000.png", "001.png"]
    assert Image.open(tmp_path / rows[1]["mask"]).size == (40, 48)


def test_segformer_recipe_runs(run_recipe, seg_data):
    cli = run_recipe(SEGFORMER_RECIPE, [
        "--model.init_args.pretrained=false", f"--model.init_args.model_config={TINY_SEGFORMER}",
        f"--data.init_args.train={seg_data['train']}", f"--data.init_args.val={seg_data['val']}",
        "--data.init_args.reduce_labels=false", "--data.init_args.image_size=64", "--data.init_args.batch_size=4",
        "--data.init_args.num_workers=0",
    ])
    assert isinstance(cli.model, HFSemanticSegmenter) and cli.model.num_labels == 3
    assert cli.trainer.global_step == 2


def test_pretrained_file_must_fit_the_encoder_and_may_be_a_checkpoint(tmp_path):
    import timm

    from ptft.vision.modules import ImageClassifier

    source = timm.create_model("test_resnet", num_classes=1000)
    save_file({f"backbone.{k}": v for k, v in source.state_dict().items()}, tmp_path / "renamed.safetensors")
    with pytest.raises(PtftError, match=r"renamed.safetensors lacks \d+ weights of timm model 'test_resnet' \(first: ") as err:
        SemanticSegmenter("test_resnet", pretrained_file=str(tmp_path / "renamed.safetensors"), model_kwargs=TINY_UNET, num_labels=3)
    assert "\n" not in str(err.value)
    classifier = ImageClassifier("test_resnet", pretrained=False, num_labels=2)  # an earlier fine-tune's checkpoint
    fit = L.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False)
    fit.strategy.connect(classifier)
    fit.save_checkpoint(tmp_path / "classifier.ckpt")
    model = SemanticSegmenter("test_resnet", pretrained_file=str(tmp_path / "classifier.ckpt"), model_kwargs=TINY_UNET, num_labels=3)
    torch.testing.assert_close(model.model.encoder.model.layer4[0].conv1.weight, classifier.model.layer4[0].conv1.weight)


def test_pretrained_file_loads_into_encoders_with_flattened_stage_names(tmp_path):
    """timm's feature extractor renames ``stages.0`` to ``stages_0``: a file of the full model still fits it."""
    import timm

    from ptft.vision.modules import create_timm_model

    source = timm.create_model("convnext_atto")
    save_file(source.state_dict(), tmp_path / "convnext.safetensors")
    body = create_timm_model("convnext_atto", False, str(tmp_path / "convnext.safetensors"), features_only=True)
    torch.testing.assert_close(body.stages_3.blocks[1].mlp.fc2.weight, source.stages[3].blocks[1].mlp.fc2.weight)
    model = SemanticSegmenter("convnext_atto", pretrained_file=str(tmp_path / "convnext.safetensors"), model_kwargs=TINY_UNET, num_labels=2)
    torch.testing.assert_close(model.model.encoder.model.stages_0.blocks[0].conv_dw.weight, source.stages[0].blocks[0].conv_dw.weight)


def test_exif_orientation_turns_images_upright_before_the_size_check(tmp_path):
    """Masks are drawn on the EXIF-upright view: a photo stored 32x48 with orientation 6 fits a 48x32 mask."""
    from ptft.vision.data import to_rgb

    split = write_split(tmp_path / "train", 2, seed=0, size=(32, 48))  # masks 48 wide, 32 high
    photo = Path(split) / "images" / "001.jpg"
    upright = np.asarray(Image.open(photo).convert("RGB"))
    exif = Image.Exif()
    exif[0x0112] = 6  # shown turned 90 degrees clockwise
    Image.fromarray(np.rot90(upright).copy()).save(photo, exif=exif, quality=95)  # stored turned back: 32x48
    assert Image.open(photo).size == (32, 48)
    dm = SegmentationDataModule(train=split, val=split, labels=CLASSES, image_size=32, num_workers=0)
    dm.setup("fit")
    item = dm.datasets["val"][1]
    assert item["pixel_values"].shape == (3, 32, 32) and item["labels"].shape == (32, 32)
    assert np.abs(np.asarray(to_rgb(Image.open(photo)), dtype=float) - upright).mean() < 10  # the same view


def test_hf_segmenter_checkpoint_keeps_the_input_normalisation(tmp_path):
    """The processor's statistics (not ImageNet's) are read once, from the pretrained folder, and saved."""
    from transformers import (
        AutoModelForSemanticSegmentation,
        SegformerConfig,
        SegformerImageProcessor,
    )

    from ptft.core.module import load_checkpoint

    config = {k: v for k, v in TINY_SEGFORMER.items() if k != "model_type"}
    AutoModelForSemanticSegmentation.from_config(SegformerConfig(**config, num_labels=3)).save_pretrained(tmp_path / "tiny")
    SegformerImageProcessor(image_mean=[0.5, 0.4, 0.3], image_std=[0.2, 0.25, 0.3]).save_pretrained(tmp_path / "tiny")
    model = HFSemanticSegmenter(str(tmp_path / "tiny"), num_labels=3, label_names=CLASSES)
    expected = {"mean": (0.5, 0.4, 0.3), "std": (0.2, 0.25, 0.3)}
    assert model.data_config() == expected
    fit = L.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False)
    fit.strategy.connect(model)
    fit.save_checkpoint(tmp_path / "model.ckpt")
    restored = load_checkpoint(str(tmp_path / "model.ckpt"))  # pretrained=False: no processor read on reload
    assert restored.hparams.pretrained is False and restored.data_config() == expected
