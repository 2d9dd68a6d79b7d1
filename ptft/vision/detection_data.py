"""Object detection / instance segmentation data in COCO format: a JSON annotation file and a folder of images."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Literal

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_warn
from PIL import Image
from torch.utils.data import Dataset

from ptft.core.data import FineTuneDataModule, LabelsMixin
from ptft.core.errors import PtftError
from ptft.vision.data import IMAGE_SUFFIXES, ImageSource, image_sizes, to_rgb

#: Boxes may overhang the image by this many pixels (rounding in exported annotations); they are clipped.
BOX_TOLERANCE = 1.0


@dataclass
class CocoImage:
    """One image of a COCO file and its annotations (boxes in absolute ``x1, y1, x2, y2`` pixels)."""

    path: Path
    image_id: int
    width: int
    height: int
    boxes: list[list[float]] = field(default_factory=list)
    labels: list[int] = field(default_factory=list)
    iscrowd: list[int] = field(default_factory=list)
    segmentations: list[Any] = field(default_factory=list)
    annotation_ids: list[Any] = field(default_factory=list)


def read_coco(
    json_path: str, images: str | None, split: str, on_bad_annotation: str
) -> tuple[list[CocoImage], dict[int, str]]:
    """Images with their annotations, and the categories (id -> name) of a COCO file; one-line errors for bad ones."""
    path = Path(json_path).expanduser()
    if not path.is_file():
        raise PtftError(f"{split}: annotation file {json_path!r} does not exist (working directory: {Path.cwd()})")
    try:
        coco = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise PtftError(f"{split}: {json_path} is not valid JSON: {err}") from err
    if not isinstance(coco, dict) or "images" not in coco:
        raise PtftError(f"{split}: {json_path} is not a COCO file (no 'images' list)")
    folder = Path(images).expanduser() if images else path.parent
    if not folder.is_dir():
        raise PtftError(f"{split}_images: {str(folder)!r} is not a folder")
    categories = {int(c["id"]): str(c["name"]) for c in coco.get("categories", [])}
    if not categories:
        raise PtftError(f"{split}: {json_path} has no categories")
    order = {cid: i for i, cid in enumerate(sorted(categories))}
    records: dict[int, CocoImage] = {}
    for im in coco["images"]:
        records[int(im["id"])] = CocoImage(folder / im["file_name"], int(im["id"]), int(im["width"]), int(im["height"]))
    skipped: list[str] = []
    for ann in coco.get("annotations", []):
        problem = _check_annotation(ann, records, categories)
        if problem is not None:
            if on_bad_annotation == "error":
                raise PtftError(f"{split}: {problem}; fix it or set data.init_args.on_bad_annotation=skip")
            skipped.append(problem)
            continue
        rec = records[int(ann["image_id"])]
        x, y, w, h = (float(v) for v in ann["bbox"])
        rec.boxes.append([max(x, 0.0), max(y, 0.0), min(x + w, rec.width), min(y + h, rec.height)])
        rec.labels.append(order[int(ann["category_id"])])
        rec.iscrowd.append(int(ann.get("iscrowd", 0)))
        rec.segmentations.append(ann.get("segmentation"))
        rec.annotation_ids.append(ann.get("id"))
    if skipped:
        rank_zero_warn(f"{split}: skipped {len(skipped)} bad annotation(s), first: {skipped[0]}")
    if not records:
        raise PtftError(f"{split}: {json_path} lists no images")
    return list(records.values()), categories


def _check_annotation(ann: dict[str, Any], images: dict[int, CocoImage], categories: dict[int, str]) -> str | None:
    """What is wrong with one annotation, or ``None``."""
    aid = ann.get("id", "?")
    image = images.get(int(ann.get("image_id", -1)))
    if image is None:
        return f"annotation {aid} refers to image id {ann.get('image_id')}, which is not in 'images'"
    if int(ann.get("category_id", -1)) not in categories:
        return f"annotation {aid} has category_id {ann.get('category_id')}, which is not in 'categories' {sorted(categories)}"
    bbox = ann.get("bbox")
    if not isinstance(bbox, list) or len(bbox) != 4:
        return f"annotation {aid} has no bbox [x, y, width, height]"
    x, y, w, h = (float(v) for v in bbox)
    where = f"image {image.image_id} ({image.path.name}, {image.width}x{image.height})"
    if w <= 0 or h <= 0:
        return f"annotation {aid} on {where} has a non-positive box width/height: bbox {bbox}"
    t = BOX_TOLERANCE
    if x < -t or y < -t or x + w > image.width + t or y + h > image.height + t:
        return f"annotation {aid} has bbox {bbox} (x, y, width, height) outside {where}"
    if min(x + w, image.width) <= max(x, 0.0) or min(y + h, image.height) <= max(y, 0.0):  # what clipping leaves
        return f"annotation {aid} has bbox {bbox} (x, y, width, height) with no area inside {where}"
    return None


def decode_masks(segmentations: list[Any], height: int, width: int, annotation_ids: list[Any]) -> torch.Tensor:
    """Binary masks ``(N, H, W)`` from COCO polygons or RLE with pycocotools."""
    from pycocotools import mask as mask_utils

    masks = torch.zeros((len(segmentations), height, width), dtype=torch.uint8)
    for i, seg in enumerate(segmentations):
        try:
            if isinstance(seg, list):  # polygons: [[x1, y1, x2, y2, ...], ...]
                rle = mask_utils.merge(mask_utils.frPyObjects(seg, height, width))
            elif isinstance(seg, dict) and isinstance(seg.get("counts"), list):  # uncompressed RLE
                rle = mask_utils.frPyObjects(seg, height, width)
            elif isinstance(seg, dict):  # compressed RLE
                rle = {"size": seg["size"], "counts": seg["counts"].encode() if isinstance(seg["counts"], str) else seg["counts"]}
            else:
                raise TypeError(f"no segmentation: {seg!r}")
            masks[i] = torch.from_numpy(mask_utils.decode(rle))
        except Exception as err:  # pycocotools raises plain Exceptions / TypeErrors for malformed input
            raise PtftError(f"annotation {annotation_ids[i]}: cannot read its segmentation ({err})") from err
    return masks


class CocoDataset(Dataset):
    """Images as float tensors in [0, 1] (``C, H, W``) with targets; paired augmentation via ``transforms.v2``.

    A target holds ``boxes`` (absolute ``x1, y1, x2, y2``), ``labels`` (contiguous ids), ``iscrowd``, ``image_id``
    and, with ``masks``, binary ``masks`` ``(N, H, W)``.
    """

    def __init__(self, images: list[CocoImage], hflip: float = 0.0, masks: bool = False, targets: bool = True) -> None:
        from torchvision.transforms import v2

        self.images = images
        self.masks = masks
        self.targets = targets
        steps = [v2.RandomHorizontalFlip(hflip)] if hflip > 0 else []
        self.transform = v2.Compose([*steps, v2.ToDtype(torch.float32, scale=True)])

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> dict[str, Any]:
        from torchvision import tv_tensors
        from torchvision.transforms.v2.functional import pil_to_tensor

        rec = self.images[index]
        with Image.open(rec.path) as im:
            image = tv_tensors.Image(pil_to_tensor(to_rgb(im)))
        item: dict[str, Any] = {"file": str(rec.path), "size": tuple(image.shape[-2:])}  # (height, width)
        if not self.targets:
            item["image"] = self.transform(image).as_subclass(torch.Tensor)
            return item
        target: dict[str, Any] = {
            "boxes": tv_tensors.BoundingBoxes(
                torch.tensor(rec.boxes, dtype=torch.float32).reshape(-1, 4), format="XYXY", canvas_size=(rec.height, rec.width)
            ),
            "labels": torch.tensor(rec.labels, dtype=torch.int64),
            "iscrowd": torch.tensor(rec.iscrowd, dtype=torch.int64),
            "image_id": rec.image_id,
        }
        if self.masks:
            target["masks"] = tv_tensors.Mask(decode_masks(rec.segmentations, rec.height, rec.width, rec.annotation_ids))
        image, target = self.transform(image, target)
        item["image"] = image.as_subclass(torch.Tensor)
        item["target"] = {k: v.as_subclass(torch.Tensor) if isinstance(v, torch.Tensor) else v for k, v in target.items()}
        return item


def collate(items: list[dict[str, Any]], encoder: Callable[[dict[str, Any]], dict[str, Any]] | None = None) -> dict[str, Any]:
    """Detection batches are lists: images differ in size and in the number of objects.

    ``encoder`` (from the model, e.g. a Hugging Face image processor) adds the model's inputs to the batch.
    """
    batch = {"images": [it["image"] for it in items], "files": [it["file"] for it in items], "sizes": [it["size"] for it in items]}
    if "target" in items[0]:
        batch["targets"] = [it["target"] for it in items]
    return encoder(batch) if encoder is not None else batch


class CocoDetectionDataModule(LabelsMixin, FineTuneDataModule):
    """COCO-format detection and instance-segmentation data: annotation JSON files and image folders.

    Each split is a COCO JSON file (``images``: id, file_name, width, height; ``annotations``: id, image_id,
    category_id, bbox ``[x, y, width, height]`` in pixels, optional ``segmentation`` polygons or RLE, ``iscrowd``;
    ``categories``: id, name). Category ids map to contiguous labels in id order; the category names become the
    model's ``label_names``. Masks are decoded with pycocotools when the model needs them (Mask R-CNN).

    Annotations and images are checked before training: a box outside its image, a box with non-positive width or
    height (or none left inside the image once clipped), an unknown category id or image id stops with a one-line error naming the annotation (``skip`` drops
    such annotations instead); unreadable images, or images whose size differs from the JSON, always stop. Images are read turned upright by
    their EXIF orientation (the view annotation tools label), and sizes are compared after that turn.

    Args:
        train: Training annotations (COCO JSON).
        val: Validation annotations; held out from ``train`` when missing.
        test: Test annotations (for ``ptft test``).
        predict: Images to predict: a folder of images, or a COCO JSON file (its ``images`` list).
        train_images: Folder the training ``file_name`` s are relative to; defaults to the JSON file's folder.
        val_images: Same for ``val``.
        test_images: Same for ``test``.
        predict_images: Same for a ``predict`` JSON file.
        labels: Category names in id order, needed only without ``train`` (test / predict from a checkpoint).
        hflip: Probability of a horizontal flip of training images (boxes and masks follow).
        on_bad_annotation: ``error`` (default) or ``skip`` annotations with bad boxes, categories or image ids.
        batch_size: Training batch size (images).
        eval_batch_size: Validation / test / predict batch size; defaults to ``batch_size``.
        val_fraction: Fraction of training images held out for validation when ``val`` is missing.
        seed: Seed of the held-out split and of the batch order; by default the one of ``seed_everything``.
        num_workers: DataLoader worker processes decoding images.
    """

    def __init__(
        self,
        train: str | None = None,
        val: str | None = None,
        test: str | None = None,
        predict: str | None = None,
        train_images: str | None = None,
        val_images: str | None = None,
        test_images: str | None = None,
        predict_images: str | None = None,
        labels: list[str] | None = None,
        hflip: float = 0.5,
        on_bad_annotation: Literal["error", "skip"] = "error",
        batch_size: int = 4,
        eval_batch_size: int | None = None,
        val_fraction: float = 0.1,
        seed: int | None = None,
        num_workers: int = 2,
    ) -> None:
        super().__init__(batch_size, eval_batch_size, num_workers, seed, val_fraction)
        self.save_hyperparameters(logger=False)
        self.init_labels(labels)
        if train is None and test is None and predict is None:
            raise PtftError("give train (and optionally val / test) COCO annotation files")
        given = {"train": (train, train_images), "val": (val, val_images), "test": (test, test_images)}
        self.splits: dict[str, tuple[list[CocoImage], dict[int, str]] | None] = {
            split: read_coco(ann, folder, split, on_bad_annotation) if ann is not None else None
            for split, (ann, folder) in given.items()
        }
        self.predict_location = (predict, predict_images)
        self.hflip = hflip
        self.masks = False
        self.encoder: Callable[[dict[str, Any]], dict[str, Any]] | None = None

    def discover_labels(self) -> list[str]:
        reference = next((s for s in ("train", "val", "test") if self.splits[s] is not None), None)
        if reference is None or (self.splits["train"] is None and self.given_labels is not None):
            if self.given_labels is None:
                raise PtftError("without training annotations, give the category names: data.init_args.labels=[...]")
            return list(self.given_labels)
        categories = self.splits[reference][1]
        names = [categories[c] for c in sorted(categories)]
        for split in ("train", "val", "test"):
            other = self.splits[split]
            if other is not None and other[1] != categories:
                raise PtftError(f"{split} categories {other[1]} differ from {reference}'s {categories}")
        if self.given_labels is not None and list(self.given_labels) != names:
            raise PtftError(f"labels {self.given_labels} differ from the categories of {reference}: {names}")
        return names

    def connect(self, model: L.LightningModule) -> None:
        self.masks = bool(getattr(model, "needs_masks", False))
        # Models that need their own input format (Hugging Face detectors) give a picklable batch encoder.
        self.encoder = model.batch_encoder() if hasattr(model, "batch_encoder") else None

    # --- the base's hooks -----------------------------------------------------------------------------------
    def load_split(self, split: str) -> list[CocoImage] | None:
        if split != "predict":
            return None if self.splits[split] is None else self.splits[split][0]
        location, folder = self.predict_location
        if location is None:
            return None
        path = Path(location).expanduser()
        if not path.is_dir():
            return read_coco(location, folder, "predict", "skip")[0]
        files = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise PtftError(f"predict: no images in {location!r}")
        return [CocoImage(f, i, 0, 0) for i, f in enumerate(files)]  # sizes are read with the images

    def check(self, split: str, rows: list[CocoImage]) -> list[CocoImage]:
        self.label_names  # noqa: B018 - the category checks, before any image is read
        targets = split != "predict"
        if self.masks and targets:
            for rec in rows:
                for aid, seg in zip(rec.annotation_ids, rec.segmentations):
                    if not seg:
                        raise PtftError(f"{split}: annotation {aid} has no segmentation, which Mask R-CNN needs")
        self.on_rank_zero(lambda: check_images(rows, split, sizes=targets))  # one check for N processes
        return rows

    def build(self, split: str, rows: list[CocoImage]) -> CocoDataset:
        targets = split != "predict"
        hflip = self.hflip if split == "train" else 0.0
        return CocoDataset(rows, hflip=hflip, masks=self.masks and targets, targets=targets)

    def collate_fn(self) -> Any:
        return partial(collate, encoder=self.encoder)

    def source_hint(self, split: str) -> str:
        return f"data.init_args.{split}=<folder or COCO JSON>" if split == "predict" else f"data.init_args.{split}"


def check_images(images: list[CocoImage], split: str, sizes: bool = True) -> None:
    """Every image exists, decodes, and (``sizes``) has the width and height its annotation file says.

    Images are read in parallel and cached (:func:`ptft.vision.data.image_sizes`), their sizes EXIF-upright: the view
    annotation tools label.
    """
    for rec, size in zip(images, image_sizes([ImageSource(rec.path) for rec in images])):
        if isinstance(size, str):
            raise PtftError(f"{split}: image {rec.image_id} {str(rec.path)!r} {size}")
        if sizes and size != (rec.width, rec.height):
            raise PtftError(
                f"{split}: image {rec.image_id} {str(rec.path)!r} is {size[0]}x{size[1]} but its annotation file says "
                f"{rec.width}x{rec.height}"
            )
