"""Object detection / instance segmentation: COCO data, Faster / Mask R-CNN, a Hugging Face DETR, recipes, errors."""

from __future__ import annotations

import json
import pickle
import random
from pathlib import Path

import lightning as L
import pytest
import torch
from conftest import REPO
from PIL import Image

from ptft.core.callbacks import WritePredictions
from ptft.core.errors import PtftError
from ptft.core.module import load_checkpoint
from ptft.core.optim import OptimizerConfig, SchedulerConfig
from ptft.vision.detection import FasterRCNN, HFObjectDetector, MaskRCNN
from ptft.vision.detection_data import CocoDetectionDataModule

# Category ids need not be contiguous: 3 -> label 0 ("red"), 7 -> label 1 ("blue").
CATEGORIES = {3: ("red", (230, 40, 40)), 7: ("blue", (40, 60, 230))}
SIZE = 64
# A tiny R-CNN: timm's test_resnet (0.1M parameters) under a 16-channel pyramid, 64-pixel inputs, small samplers.
TINY_RCNN = {
    "backbone": "timm:test_resnet",
    "pretrained": False,
    "out_indices": [2, 3],
    "fpn_channels": 16,
    "anchor_sizes": [16, 32],
    "representation_size": 128,
    "min_size": SIZE,
    "max_size": SIZE,
    "model_kwargs": {
        "rpn_batch_size_per_image": 64, "box_batch_size_per_image": 32, "rpn_pre_nms_top_n_train": 200,
        "rpn_post_nms_top_n_train": 100, "rpn_pre_nms_top_n_test": 100, "rpn_post_nms_top_n_test": 50,
    },
}


def write_coco(root: Path, n: int, seed: int, images_dir: str | None = None) -> str:
    """Noise images with 1-2 non-overlapping red / blue rectangles, and their COCO file (boxes + polygons)."""
    rng = random.Random(seed)
    g = torch.Generator().manual_seed(seed)
    folder = root / images_dir if images_dir else root
    folder.mkdir(parents=True, exist_ok=True)
    images, annotations = [], []
    for i in range(n):
        pixels = torch.randint(60, 180, (SIZE, SIZE, 3), generator=g)
        placed: list[tuple[int, int, int, int]] = []
        for _ in range(rng.randint(1, 2)):
            for _attempt in range(20):
                w, h = rng.randint(14, 30), rng.randint(14, 30)
                x, y = rng.randint(0, SIZE - w), rng.randint(0, SIZE - h)
                if all(x + w <= a or a + c <= x or y + h <= b or b + d <= y for a, b, c, d in placed):
                    break
            else:
                continue
            placed.append((x, y, w, h))
            cid = rng.choice(list(CATEGORIES))
            pixels[y : y + h, x : x + w] = torch.tensor(CATEGORIES[cid][1])
            annotations.append({
                "id": 100 + len(annotations), "image_id": i + 1, "category_id": cid, "bbox": [x, y, w, h],
                "area": w * h, "iscrowd": 0, "segmentation": [[x, y, x + w, y, x + w, y + h, x, y + h]],
            })
        Image.fromarray(pixels.to(torch.uint8).numpy()).save(folder / f"{i:03d}.png")
        images.append({"id": i + 1, "file_name": f"{i:03d}.png", "width": SIZE, "height": SIZE})
    categories = [{"id": k, "name": name} for k, (name, _) in CATEGORIES.items()]
    path = root / "annotations.json"
    path.write_text(json.dumps({"images": images, "annotations": annotations, "categories": categories}))
    return str(path)


@pytest.fixture
def coco(tmp_path: Path) -> dict[str, str]:
    return {"train": write_coco(tmp_path / "train", 48, seed=0), "val": write_coco(tmp_path / "val", 16, seed=1)}


def trainer(**kwargs) -> L.Trainer:
    return L.Trainer(
        accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, num_sanity_val_steps=0, **kwargs,
    )


def test_data_maps_categories_and_flips_boxes_with_masks(coco):
    data = CocoDetectionDataModule(train=coco["train"], val=coco["val"], hflip=1.0, num_workers=0)
    assert data.label_names == ["red", "blue"] and data.num_labels == 2
    data.masks = True
    data.setup("fit")
    raw = data.splits["train"][0][0]
    item = data.datasets["train"][0]
    x1, y1, x2, y2 = raw.boxes[0]
    torch.testing.assert_close(item["target"]["boxes"][0], torch.tensor([SIZE - x2, y1, SIZE - x1, y2]))
    assert item["target"]["labels"][0] == raw.labels[0]
    mask = item["target"]["masks"][0]  # the polygon's mask, flipped with the image
    assert mask.shape == (SIZE, SIZE) and mask.sum() == (x2 - x1) * (y2 - y1)
    assert mask[int(y1), int(SIZE - x2)] == 1 and mask[int(y1), int(SIZE - x1)] == 0
    assert item["image"].dtype == torch.float32 and item["image"].max() <= 1.0
    val = data.datasets["val"][0]["target"]  # evaluation images are not flipped
    torch.testing.assert_close(val["boxes"][0], torch.tensor(data.splits["val"][0][0].boxes[0]))


def test_faster_rcnn_learns_the_boxes_and_predicts(coco, tmp_path):
    L.seed_everything(0)
    data = CocoDetectionDataModule(train=coco["train"], val=coco["val"], batch_size=4, num_workers=0, predict=str(Path(coco["val"]).parent))
    model = FasterRCNN(
        num_labels=data.num_labels, label_names=data.label_names, predict_threshold=0.5,
        optimizer=OptimizerConfig(lr=3e-3, weight_decay=1e-4), scheduler=SchedulerConfig(name="constant", warmup_ratio=0.0),
        **TINY_RCNN,
    )
    assert model.head_modules(model.model) == ["backbone.fpn", "rpn", "roi_heads"]
    writer = WritePredictions(str(tmp_path / "predictions.jsonl"))
    run = trainer(max_steps=72, check_val_every_n_epoch=100, callbacks=[writer])
    before = run.validate(model, data, verbose=False)[0]
    run.fit(model, data)
    after = run.validate(model, data, verbose=False)[0]
    print(f"box mAP before {before['val/map']:.3f} / mAP@50 {before['val/map_50']:.3f}; "
          f"after 72 steps {after['val/map']:.3f} / {after['val/map_50']:.3f}")
    assert before["val/map_50"] < 0.05
    assert after["val/map_50"] > 0.3 and after["val/map"] > before["val/map"] + 0.1
    run.predict(model, data)
    rows = [json.loads(line) for line in (tmp_path / "predictions.jsonl").read_text().splitlines()]
    assert len(rows) == 16 and rows[0]["image"].endswith("000.png")
    assert set(rows[0]) == {"image", "boxes", "labels", "label_ids", "scores"}
    found = [r for r in rows if r["boxes"]]
    assert len(found) >= 8  # most images get a confident detection
    assert all(set(r["labels"]) <= {"red", "blue"} and min(r["scores"]) >= 0.5 for r in found)
    assert all(0 <= v <= SIZE for r in found for box in r["boxes"] for v in box)


@pytest.mark.slow
def test_map_on_two_processes_equals_one_process(coco):
    """Validation of a trained detector on 2 processes (gloo, 8 images each) and on 1: the same box mAP, computed
    from every rank's detections. Slow (about 2 minutes on 2 busy cores): run with -m slow."""
    L.seed_everything(0)
    data = CocoDetectionDataModule(train=coco["train"], val=coco["val"], batch_size=4, num_workers=0)
    model = FasterRCNN(num_labels=2, label_names=data.label_names, optimizer=OptimizerConfig(lr=3e-3, weight_decay=1e-4),
                       scheduler=SchedulerConfig(name="constant", warmup_ratio=0.0), **TINY_RCNN)
    run = trainer(max_steps=72, check_val_every_n_epoch=100)
    run.fit(model, data)
    single = run.validate(model, data, verbose=False)[0]
    assert single["val/map_50"] > 0.3  # a detector worth comparing
    ddp = L.Trainer(accelerator="cpu", devices=2, strategy="ddp_spawn", logger=False, enable_progress_bar=False,
                    enable_model_summary=False).validate(model, data, verbose=False)[0]
    for key in ("val/map", "val/map_50", "val/map_75", "val/mar_100"):
        assert ddp[key] == pytest.approx(single[key], abs=1e-6), (key, ddp[key], single[key])


def test_mask_rcnn_trains_and_logs_mask_map(coco):
    L.seed_everything(0)
    data = CocoDetectionDataModule(train=coco["train"], val=coco["val"], batch_size=4, num_workers=0)
    model = MaskRCNN(
        num_labels=2, label_names=data.label_names, optimizer=OptimizerConfig(lr=3e-3), mask_head_channels=16, **TINY_RCNN
    )
    data.connect(model)
    assert data.masks
    run = trainer(max_epochs=1, limit_train_batches=4, limit_val_batches=2)
    run.fit(model, data)
    logged = run.callback_metrics
    assert "val/loss" not in logged and torch.isfinite(logged["train/loss_mask"])
    # The logged values are torchmetrics' box and mask mAP over the same 2 validation batches.
    from torchmetrics.detection import MeanAveragePrecision

    reference = MeanAveragePrecision(iou_type=("bbox", "segm"), backend="pycocotools")
    model.eval()
    for batch, _ in zip(data.val_dataloader(), range(2)):
        with torch.no_grad():
            detections, _ = model.detect(batch)
        targets = [{"boxes": t["boxes"], "labels": t["labels"], "iscrowd": t["iscrowd"], "masks": t["masks"].bool()}
                   for t in batch["targets"]]
        reference.update(detections, targets)
    expected = reference.compute()
    for name in ("map", "map_50", "map_75", "mar_100"):
        assert float(logged[f"val/{name}"]) == pytest.approx(float(expected[f"bbox_{name}"]), abs=1e-6), name
        assert float(logged[f"val/segm_{name}"]) == pytest.approx(float(expected[f"segm_{name}"]), abs=1e-6), name
    assert float(expected["bbox_mar_100"]) > 0 and float(expected["segm_mar_100"]) > 0  # not all zeros


def test_pretrained_files_load_into_the_backbones(tmp_path):
    import timm
    import torchvision
    from safetensors.torch import save_file

    source = timm.create_model("test_resnet")  # what ptft's vision pre-training writes: a timm state dict
    save_file(source.state_dict(), tmp_path / "timm.safetensors")
    model = FasterRCNN(**{**TINY_RCNN, "pretrained_file": str(tmp_path / "timm.safetensors")})
    body = model.model.backbone.body
    torch.testing.assert_close(body.conv1[0].weight, source.conv1[0].weight)
    assert type(body.bn1).__name__ == "FrozenBatchNorm2d"  # pretrained statistics are kept
    assert model.hparams.pretrained_file is None  # full checkpoints rebuild without the file
    model.export(str(tmp_path / "export"))
    assert json.loads((tmp_path / "export" / "config.json").read_text())["backbone"] == "timm:test_resnet"
    assert (tmp_path / "export" / "model.safetensors").is_file()

    tv = torchvision.models.mobilenet_v3_small()
    torch.save(tv.state_dict(), tmp_path / "mobilenet.pth")
    model = FasterRCNN(backbone="mobilenet_v3_small", pretrained_file=str(tmp_path / "mobilenet.pth"), min_size=64, max_size=64)
    torch.testing.assert_close(model.model.backbone.body["0"][0].weight, tv.features[0][0].weight)
    with pytest.raises(PtftError, match="does not fit the torchvision resnet18 backbone"):
        FasterRCNN(backbone="resnet18", pretrained_file=str(tmp_path / "mobilenet.pth"))


@pytest.fixture(scope="module")
def tiny_detr(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A local DETR folder: random 1+1-layer, width-32 transformer on timm's test_resnet, with its image processor."""
    from transformers import AutoModelForObjectDetection, DetrConfig, DetrImageProcessor

    path = tmp_path_factory.mktemp("tiny-detr")
    config = DetrConfig(
        backbone_config={"model_type": "timm_backbone", "backbone": "test_resnet", "out_indices": [3]},
        d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2, decoder_attention_heads=2,
        encoder_ffn_dim=64, decoder_ffn_dim=64, num_queries=8, num_labels=2,
    )
    torch.manual_seed(0)
    AutoModelForObjectDetection.from_config(config).save_pretrained(path)
    DetrImageProcessor(size={"shortest_edge": SIZE, "longest_edge": SIZE}).save_pretrained(path)
    return str(path)


def test_hf_detector_trains_with_its_image_processor(coco, tiny_detr, tmp_path):
    L.seed_everything(0)
    data = CocoDetectionDataModule(train=coco["train"], val=coco["val"], batch_size=4, num_workers=0)
    model = HFObjectDetector(tiny_detr, num_labels=2, label_names=data.label_names, optimizer=OptimizerConfig(lr=1e-3))
    assert model.processor is not None and model.model.config.id2label == {0: "red", 1: "blue"}
    assert pickle.loads(pickle.dumps(model.batch_encoder())).processor is not None  # goes to DataLoader workers
    assert model.head_modules(model.model) == ["bbox_predictor", "class_labels_classifier"]
    start = {n: p.detach().clone() for n, p in model.model.named_parameters()}
    run = trainer(max_epochs=1, limit_train_batches=3, limit_val_batches=1)
    run.fit(model, data)
    assert {"train/loss", "val/loss", "val/map", "val/map_50"} <= set(run.callback_metrics)
    moved = [n for n, p in model.model.named_parameters() if not torch.equal(p, start[n])]
    assert any(n.startswith("class_labels_classifier") for n in moved) and any("backbone" in n for n in moved)
    model.export(str(tmp_path / "export"))
    assert (tmp_path / "export" / "preprocessor_config.json").exists()


def test_hf_detector_without_image_processor_uses_its_architectures_processor(coco, tmp_path):
    """A bare config (no preprocessor_config.json): YOLOS gets YolosImageProcessor with its defaults and a warning
    naming them; boxes, training, decoding and the checkpoint's processor all come from that class."""
    from transformers import YolosImageProcessor

    yolos = {"model_type": "yolos", "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
             "intermediate_size": 64, "image_size": [SIZE, SIZE], "patch_size": 16, "num_detection_tokens": 8}
    data = CocoDetectionDataModule(train=coco["train"], val=coco["val"], batch_size=2, num_workers=0)
    size = {"shortest_edge": SIZE, "longest_edge": SIZE}
    with pytest.warns(UserWarning, match=r"no preprocessor_config.json: images are preprocessed with "
                                         r"YolosImageProcessor's defaults \(size .*64"):
        model = HFObjectDetector("hustvl/yolos-tiny", pretrained=False, model_config=yolos, image_processor={"size": size},
                                 num_labels=2, label_names=data.label_names)
    assert type(model.processor) is YolosImageProcessor
    data.setup("fit")
    from ptft.vision.detection_data import collate

    batch = collate([data.datasets["val"][i] for i in range(2)], encoder=model.batch_encoder())
    box = batch["targets"][0]["boxes"][0]
    cx, cy, w, h = batch["inputs"]["labels"][0]["boxes"][0].tolist()
    torch.testing.assert_close(torch.tensor([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2]) * SIZE, box)
    loss = model.training_step(batch, 0)
    loss.backward()
    assert torch.isfinite(loss) and all(p.grad is not None for p in model.model.class_labels_classifier.parameters())
    model.eval()
    with torch.no_grad():
        detections, val_loss = model.detect(batch)
        outputs = model(batch)
    # The processor's own decoding (softmax without the "no object" class), in image pixels.
    expected = model.processor.post_process_object_detection(outputs, threshold=0.0, target_sizes=[(SIZE, SIZE)] * 2)
    torch.testing.assert_close(detections[0]["scores"], expected[0]["scores"])
    torch.testing.assert_close(detections[0]["boxes"], expected[0]["boxes"].clamp(0, SIZE))
    assert detections[0]["boxes"].shape == (8, 4) and val_loss is not None
    calls = {}
    model.log = lambda name, value, **kwargs: calls.__setitem__(name, (float(value), kwargs))
    with torch.no_grad():
        model.validation_step(batch, 0)
    value, kwargs = calls["val/loss"]  # an epoch mean over every rank's images
    assert kwargs["sync_dist"] and value == pytest.approx(float(val_loss), rel=1e-5)
    assert model.hparams["image_processor"]["image_processor_type"] == "YolosImageProcessor"  # reloads without the hub


@pytest.mark.parametrize(
    ("recipe", "model_args"),
    [
        ("recipes/vision/faster-rcnn.yaml", TINY_RCNN),
        ("recipes/vision/mask-rcnn.yaml", {**TINY_RCNN, "mask_head_channels": 16}),
        ("recipes/vision/detr.yaml", None),
    ],
)
def test_recipes_train_two_steps(recipe, model_args, run_recipe, run_cli, tiny_detr, tmp_path):
    root = tmp_path / "coco"
    train = write_coco(root / "train", 4, seed=0, images_dir="images")  # 2 batches: one epoch, then validation
    val = write_coco(root / "val", 4, seed=1, images_dir="images")
    args = [
        f"--data.init_args.train={train}", f"--data.init_args.train_images={root / 'train' / 'images'}",
        f"--data.init_args.val={val}", f"--data.init_args.val_images={root / 'val' / 'images'}",
        "--data.init_args.num_workers=0", "--data.init_args.batch_size=2",
    ]
    if model_args is None:
        args += [f"--model.init_args.model_name={tiny_detr}", "--model.init_args.pretrained=false"]
    else:
        args += [f"--model.init_args.{k}={v if isinstance(v, str) else json.dumps(v)}" for k, v in model_args.items()]
    cli = run_recipe(recipe, args)
    assert cli.trainer.global_step == 2
    assert cli.model.label_names == ["red", "blue"]  # linked from the data by the CLI
    assert "val/map" in cli.trainer.callback_metrics
    best = cli.trainer.checkpoint_callback.best_model_path  # monitors val/map
    restored = load_checkpoint(best)  # without the CLI, the hub or the pretrained files
    assert type(restored) is type(cli.model) and restored.label_names == ["red", "blue"]
    torch.testing.assert_close(restored.state_dict(), cli.model.state_dict())
    if model_args is None:  # the image processor's settings are in the checkpoint too
        assert restored.processor.to_dict() == cli.model.processor.to_dict()
    if "faster-rcnn" in recipe:
        run_cli(["predict", "--config", str(REPO / recipe), *args, f"--data.init_args.predict={root / 'val' / 'images'}",
                 f"--ckpt_path={best}", "--trainer.logger=false"])
        rows = (tmp_path / "runs" / "faster-rcnn" / "predictions.jsonl").read_text().splitlines()
        assert len(rows) == 4 and json.loads(rows[0])["image"].endswith("000.png")


def bad(coco_path: str, change) -> str:
    coco = json.loads(Path(coco_path).read_text())
    change(coco)
    Path(coco_path).write_text(json.dumps(coco))
    return coco_path


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda c: c["annotations"][0].update(bbox=[50, 10, 30, 10]), r"annotation 100 has bbox \[50, 10, 30, 10\] .* outside image 1 \(000.png, 64x64\)"),
        (lambda c: c["annotations"][0].update(bbox=[5, 5, 0, 10]), r"annotation 100 on image 1 .* non-positive box width/height"),
        (lambda c: c["annotations"][0].update(bbox=[64.2, 5, 0.6, 10]), r"annotation 100 has bbox \[64.2, 5, 0.6, 10\] .* no area inside image 1"),
        (lambda c: c["annotations"][0].update(category_id=99), r"annotation 100 has category_id 99, which is not in 'categories' \[3, 7\]"),
        (lambda c: c["annotations"][0].update(image_id=999), r"annotation 100 refers to image id 999, which is not in 'images'"),
    ],
    ids=["outside", "empty-box", "no-area-inside", "category", "image-id"],
)
def test_bad_annotations_are_one_line_errors(coco, change, message):
    path = bad(coco["train"], change)
    with pytest.raises(PtftError, match=message) as err:
        CocoDetectionDataModule(train=path, val=coco["val"], num_workers=0)
    assert "\n" not in str(err.value) and "on_bad_annotation=skip" in str(err.value)
    data = CocoDetectionDataModule(train=path, val=coco["val"], num_workers=0, on_bad_annotation="skip")
    assert sum(len(im.boxes) for im in data.splits["train"][0]) == len(json.loads(Path(path).read_text())["annotations"]) - 1


def test_bad_images_are_one_line_errors(coco):
    folder = Path(coco["train"]).parent
    (folder / "001.png").write_bytes(b"not a png")
    data = CocoDetectionDataModule(train=coco["train"], val=coco["val"], num_workers=0)
    with pytest.raises(PtftError, match=r"train: image 2 '.*001.png' cannot be read"):
        data.setup("fit")
    (folder / "001.png").unlink()
    with pytest.raises(PtftError, match=r"train: image 2 '.*001.png' does not exist"):
        data.setup("fit")
    Image.new("RGB", (32, 48)).save(folder / "001.png")
    with pytest.raises(PtftError, match=r"is 32x48 but its annotation file says 64x64"):
        data.setup("fit")


def test_mask_rcnn_needs_segmentations(coco):
    bad(coco["train"], lambda c: c["annotations"][1].pop("segmentation"))
    data = CocoDetectionDataModule(train=coco["train"], val=coco["val"], num_workers=0)
    data.connect(MaskRCNN(mask_head_channels=16, **TINY_RCNN))
    with pytest.raises(PtftError, match="train: annotation 101 has no segmentation, which Mask R-CNN needs"):
        data.setup("fit")


def test_categories_must_agree_between_splits(coco):
    bad(coco["val"], lambda c: c["categories"][0].update(name="crimson"))
    with pytest.raises(PtftError, match="val categories .* differ from train's"):
        _ = CocoDetectionDataModule(train=coco["train"], val=coco["val"], num_workers=0).label_names


def test_hf_detector_decodes_boxes_of_padded_images_at_their_scale(tiny_detr):
    """The processor pads a batch to its largest image and makes boxes relative to the padded canvas: a smaller
    image's predictions must decode against that canvas, not shrink to its top-left corner."""
    from types import SimpleNamespace

    model = HFObjectDetector(tiny_detr, num_labels=2, label_names=["red", "blue"]).eval()
    boxes = [torch.tensor([[10.0, 20.0, 60.0, 80.0]]), torch.tensor([[100.0, 10.0, 180.0, 90.0]])]
    batch = {
        "images": [torch.rand(3, 100, 100), torch.rand(3, 100, 200)], "files": ["a", "b"], "sizes": [(100, 100), (100, 200)],
        "targets": [{"boxes": b, "labels": torch.tensor([0]), "iscrowd": torch.tensor([0])} for b in boxes],
    }
    batch = model.batch_encoder()(batch)
    assert batch["inputs"]["pixel_values"].shape[-2:] == (SIZE, SIZE) and batch["valid_sizes"] == [(64, 64), (32, 64)]
    logits = torch.tensor([[[8.0, 0.0, 0.0]]]).repeat(2, 1, 1)  # one confident "red" query per image
    pred = torch.stack([label["boxes"] for label in batch["inputs"]["labels"]])  # the training targets as predictions
    model.forward = lambda _batch: SimpleNamespace(logits=logits, pred_boxes=pred, loss=None)
    detections, _ = model.detect(batch)
    for detection, box in zip(detections, boxes):
        torch.testing.assert_close(detection["boxes"], box, atol=0.5, rtol=0)


def test_exif_orientation_turns_images_upright_before_the_size_check(tmp_path):
    """Annotation tools label the EXIF-upright view: a photo stored 48x32 with orientation 6 is 32x48 in COCO."""
    exif = Image.Exif()
    exif[0x0112] = 6  # shown turned 90 degrees clockwise
    Image.new("RGB", (48, 32), (90, 90, 90)).save(tmp_path / "photo.jpg", exif=exif)
    coco = {
        "images": [{"id": 1, "file_name": "photo.jpg", "width": 32, "height": 48}],
        "annotations": [{"id": 1, "image_id": 1, "category_id": 3, "bbox": [2, 30, 20, 15], "area": 300, "iscrowd": 0}],
        "categories": [{"id": 3, "name": "red"}],
    }
    (tmp_path / "coco.json").write_text(json.dumps(coco))
    data = CocoDetectionDataModule(train=str(tmp_path / "coco.json"), val=str(tmp_path / "coco.json"), num_workers=0)
    data.setup("fit")
    item = data.datasets["val"][0]
    assert item["image"].shape == (3, 48, 32) and item["size"] == (48, 32)
    torch.testing.assert_close(item["target"]["boxes"][0], torch.tensor([2.0, 30.0, 22.0, 45.0]))
