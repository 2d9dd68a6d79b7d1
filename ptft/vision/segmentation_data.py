"""Semantic segmentation data: an image folder and a mask folder of the same file names, augmented as pairs."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from ptft.core.data import ClassificationDataModule
from ptft.core.errors import PtftError
from ptft.vision.data import IMAGE_SUFFIXES, ImageSource, image_sizes, to_rgb

#: Ignored pixels in batches, whatever value marks them in the mask files (``F.cross_entropy``'s default).
IGNORE = -100
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
MASK_MODES = {"1", "L", "P", "I", "I;16", "I;16B", "I;16L"}


@dataclass
class Split:
    """The (image, mask) files of one split and the class ids each mask holds (filled by :meth:`scan`)."""

    name: str
    root: Path
    images: list[Path]
    masks: list[Path] | None
    ids: list[set[int]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.images)

    def select(self, indices: list[int]) -> Split:
        """The pairs at ``indices`` (the held-out split), with their scanned class ids."""
        return Split(
            self.name, self.root, [self.images[i] for i in indices],
            None if self.masks is None else [self.masks[i] for i in indices],
            [self.ids[i] for i in indices] if self.ids else [],
        )


def list_pairs(location: str, split: str, image_dir: str, mask_dir: str, need_masks: bool = True) -> Split:
    """Images under ``<location>/<image_dir>`` and their masks under ``<location>/<mask_dir>`` (same relative stem)."""
    root = Path(location).expanduser()
    if not root.is_dir():
        raise PtftError(f"{split}: {location!r} is not a folder (working directory: {Path.cwd()})")
    image_root = root / image_dir if (root / image_dir).is_dir() else None
    if image_root is None:
        if need_masks:
            raise PtftError(f"{split}: {location!r} has no {image_dir!r} folder (expected {image_dir}/ and {mask_dir}/)")
        image_root = root  # predict: a plain folder of images
    images = sorted(p for p in image_root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if not images:
        raise PtftError(f"{split}: no images in {image_root}")
    if not need_masks:
        return Split(split, image_root, images, None)
    mask_root = root / mask_dir
    if not mask_root.is_dir():
        raise PtftError(f"{split}: {location!r} has no {mask_dir!r} folder of masks")
    by_stem: dict[Path, Path] = {}
    for p in sorted(mask_root.rglob("*"), key=lambda p: p.suffix.lower() != ".png"):  # a .png wins over other types
        if p.suffix.lower() in IMAGE_SUFFIXES:
            by_stem.setdefault(p.relative_to(mask_root).with_suffix(""), p)
    keys = [p.relative_to(image_root).with_suffix("") for p in images]
    missing = [img for img, key in zip(images, keys) if key not in by_stem]
    if missing:
        raise PtftError(
            f"{split}: {len(missing)} image(s) without a mask, first: {missing[0]} "
            f"(expected {mask_root / keys[images.index(missing[0])]}.png)"
        )
    return Split(split, image_root, images, [by_stem[k] for k in keys])


def read_mask(path: Path) -> np.ndarray:
    """A mask file as a 2-D array of class ids (PNG modes ``L``, ``P`` (palette indices) or ``I``)."""
    with Image.open(path) as mask:
        if mask.mode not in MASK_MODES:
            raise PtftError(
                f"mask {path} has mode {mask.mode}: masks must hold one class id per pixel "
                "(single-channel PNG, mode L, P or I), not colours"
            )
        return np.asarray(mask, dtype=np.int64 if mask.mode.startswith("I") else np.uint8)


def class_names_file(folder: Path) -> list[str] | None:
    """Class names from ``classes.txt`` (one per line) or ``classes.json`` (a list, or ``{id: name}``) in ``folder``."""
    txt, js = folder / "classes.txt", folder / "classes.json"
    if txt.is_file():
        return [line.strip() for line in txt.read_text().splitlines() if line.strip()]
    if js.is_file():
        try:
            names = json.loads(js.read_text())
        except json.JSONDecodeError as err:
            raise PtftError(f"{js} is not valid JSON: {err}") from err
        if isinstance(names, dict):
            names = [names[k] for k in sorted(names, key=int)]
        if not isinstance(names, list):
            raise PtftError(f"{js} must hold a list of class names or an {{id: name}} object")
        return [str(n) for n in names]
    return None


class SegmentationDataset(Dataset):
    """(image, mask) pairs decoded with PIL as ``tv_tensors``, so one transform moves both the same way."""

    def __init__(self, split: Split, transform: Any, ignore_index: int, reduce_labels: bool) -> None:
        self.split = split
        self.transform = transform
        self.ignore_index = ignore_index
        self.reduce_labels = reduce_labels

    def __len__(self) -> int:
        return len(self.split.images)

    def labels(self, mask: np.ndarray) -> torch.Tensor:
        """Class ids with ignored pixels as ``IGNORE`` (after ``reduce_labels``: 0 ignored, the rest shifted down)."""
        ids = torch.from_numpy(mask.astype(np.int64))
        ignored = ids == self.ignore_index
        if self.reduce_labels:
            ignored |= ids == 0
            ids = ids - 1
        return ids.masked_fill(ignored, IGNORE)

    def __getitem__(self, index: int) -> dict[str, Any]:
        from torchvision import tv_tensors
        from torchvision.transforms.v2.functional import pil_to_tensor

        path = self.split.images[index]
        with Image.open(path) as img:
            image = tv_tensors.Image(pil_to_tensor(to_rgb(img)))
        if self.split.masks is None:
            name = path.relative_to(self.split.root)  # predicted masks keep the images' relative paths
            return {"pixel_values": self.transform(image), "path": str(path), "name": str(name),
                    "size": tuple(image.shape[-2:])}
        mask = tv_tensors.Mask(self.labels(read_mask(self.split.masks[index])))
        image, mask = self.transform(image, mask)
        return {"pixel_values": image, "labels": mask.as_subclass(torch.Tensor)}


def collate(items: list[dict[str, Any]]) -> dict[str, Any]:
    batch: dict[str, Any] = {"pixel_values": torch.stack([it["pixel_values"] for it in items]).as_subclass(torch.Tensor)}
    if "labels" in items[0]:
        batch["labels"] = torch.stack([it["labels"] for it in items])
    else:
        batch.update({k: [it[k] for it in items] for k in ("path", "name", "size")})
    return batch


class SegmentationDataModule(ClassificationDataModule):
    """Semantic segmentation data: images and per-pixel class-id masks, with paired augmentation.

    Each split is a folder holding ``images/`` and ``masks/`` (names configurable) whose files share relative paths
    up to the suffix: ``images/a/0001.jpg`` pairs with ``masks/a/0001.png``. A mask is a single-channel PNG (mode
    ``L``, ``P`` or ``I``) whose pixel values are class ids; ``ignore_index`` marks unlabelled pixels.

    Class names come from ``labels``, else from ``classes.txt`` (one name per line) or ``classes.json`` in the
    training folder or its parent, else ``"0"…"N-1"`` for the largest id found in the training masks. Every pair
    is checked before training: unreadable files, a mask whose size differs from its image's, and class ids
    outside the classes stop with a one-line error naming the file.

    Training crops a random area (``scale``) resized to ``image_size`` and flips; image and mask move together
    (torchvision ``transforms.v2`` with ``tv_tensors.Mask``: masks are resized with nearest neighbour). Evaluation
    resizes both to ``image_size``; prediction writes masks at each image's original size.

    Args:
        train: Training folder (``images/`` + ``masks/``).
        val: Validation folder; held out from ``train`` when missing.
        test: Test folder (for ``ptft test``).
        predict: Images to segment: a folder of images, or a folder holding ``images/``.
        labels: Class names in id order.
        image_dir: Name of the image sub-folder of a split.
        mask_dir: Name of the mask sub-folder of a split.
        ignore_index: Mask value of unlabelled pixels (no loss, no metric).
        reduce_labels: Treat id 0 as unlabelled and shift the other ids down by one (ADE20K's raw masks, where 0
            means "other").
        image_size: Training and evaluation size, ``S`` (square) or ``[height, width]``; a multiple of 32 for
            U-Net / FPN encoders.
        scale: Range of the image area a training crop covers (``[1.0, 1.0]``: resize only).
        hflip: Probability of a horizontal flip in training.
        color_jitter: Brightness / contrast / saturation jitter strength in training (0 = off).
        batch_size: Training batch size.
        eval_batch_size: Validation / test / predict batch size; defaults to ``batch_size``.
        val_fraction: Fraction of training pairs held out for validation when ``val`` is missing.
        seed: Seed of the held-out split and of the batch order; by default the one of ``seed_everything``.
        num_workers: DataLoader worker processes decoding and transforming images.
    """

    def __init__(
        self,
        train: str | None = None,
        val: str | None = None,
        test: str | None = None,
        predict: str | None = None,
        labels: list[str] | None = None,
        image_dir: str = "images",
        mask_dir: str = "masks",
        ignore_index: int = 255,
        reduce_labels: bool = False,
        image_size: int | list[int] = 512,
        scale: tuple[float, float] = (0.5, 1.0),
        hflip: float = 0.5,
        color_jitter: float = 0.0,
        batch_size: int = 8,
        eval_batch_size: int | None = None,
        val_fraction: float = 0.1,
        seed: int | None = None,
        num_workers: int = 2,
    ) -> None:
        super().__init__(batch_size, eval_batch_size, num_workers, labels, seed, val_fraction)
        self.save_hyperparameters(logger=False)
        if train is None and test is None and predict is None:
            raise PtftError("give train (and optionally val / test) folders of images/ and masks/")
        self.locations = {"train": train, "val": val, "test": test}
        self.splits = {
            split: list_pairs(loc, split, image_dir, mask_dir) if loc is not None else None
            for split, loc in self.locations.items()
        }
        self.predict_location = predict
        self.image_dir = image_dir
        self.ignore_index = ignore_index
        self.reduce_labels = reduce_labels
        size = [image_size] * 2 if isinstance(image_size, int) else list(image_size)
        if len(size) != 2 or min(size) < 1:
            raise PtftError(f"image_size must be S or [height, width], got {image_size}")
        self.image_size = size
        self.scale = tuple(scale)
        self.hflip = hflip
        self.color_jitter = color_jitter
        self.mean, self.std = IMAGENET_MEAN, IMAGENET_STD

    # --- checks and labels ----------------------------------------------------------------------------------
    def scan(self, split: Split) -> None:
        """Opens every pair once: readable, same size, and the class ids each mask holds.

        Images are checked in parallel and cached (:func:`ptft.vision.data.image_sizes`); masks are read whole (their
        class ids are needed), one by one.
        """
        if split.ids or split.masks is None:
            return
        sizes = image_sizes([ImageSource(image) for image in split.images])  # upright: masks are drawn on that view
        for image, mask, size in zip(split.images, split.masks, sizes):
            if isinstance(size, str):
                raise PtftError(f"{split.name}: cannot read image {image}: {size}")
            try:
                values = read_mask(mask)
            except PtftError:
                raise
            except Exception as err:
                raise PtftError(f"{split.name}: cannot read mask {mask}: {str(err).splitlines()[0]}") from err
            if (values.shape[1], values.shape[0]) != size:
                raise PtftError(
                    f"{split.name}: mask {mask} is {values.shape[1]}x{values.shape[0]} but its image {image} is "
                    f"{size[0]}x{size[1]} (width x height); masks must match their images pixel for pixel"
                )
            ids = {int(v) for v in np.unique(values)} - {self.ignore_index}
            if self.reduce_labels:
                ids = {i - 1 for i in ids if i != 0}
            split.ids.append(ids)

    def discover_labels(self) -> list[str]:
        train = self.splits["train"]
        names = self.given_labels
        if names is None and self.locations["train"] is not None:
            folder = Path(self.locations["train"]).expanduser()
            names = class_names_file(folder) or class_names_file(folder.parent)
        if train is not None:
            self.scan(train)
            if names is None:
                seen = set().union(*train.ids)
                if not seen:
                    raise PtftError(f"train: every mask pixel is ignore_index ({self.ignore_index})")
                names = [str(i) for i in range(max(seen) + 1)]
        if names is None:
            raise PtftError("without training data, give the class names: data.init_args.labels=[...]")
        for split in self.splits.values():
            if split is not None:
                self.scan(split)
                self._check_ids(split, len(names))
        return list(names)

    def _check_ids(self, split: Split, num_classes: int) -> None:
        for mask, ids in zip(split.masks or [], split.ids):
            bad = [i for i in ids if i >= num_classes or i < 0]
            if bad:
                raw = max(bad) + 1 if self.reduce_labels else max(bad)
                raise PtftError(
                    f"{split.name}: mask {mask} has class id {raw} but there are {num_classes} classes "
                    f"(ids 0-{num_classes - 1}); mark unlabelled pixels with ignore_index={self.ignore_index}"
                )

    # --- transforms -----------------------------------------------------------------------------------------
    def connect(self, model: L.LightningModule) -> None:
        if hasattr(model, "data_config"):
            cfg = model.data_config()
            self.mean, self.std = tuple(cfg.get("mean", IMAGENET_MEAN)), tuple(cfg.get("std", IMAGENET_STD))

    def transform(self, training: bool) -> Any:
        """Paired ``transforms.v2`` pipeline: geometry applies to image and mask, colour and scaling to the image."""
        from torchvision import tv_tensors
        from torchvision.transforms import v2

        if training:
            steps = [v2.RandomResizedCrop(self.image_size, scale=self.scale, antialias=True)]
            if self.hflip > 0:
                steps.append(v2.RandomHorizontalFlip(self.hflip))
            if self.color_jitter > 0:
                steps.append(v2.ColorJitter(self.color_jitter, self.color_jitter, self.color_jitter))
        else:
            steps = [v2.Resize(self.image_size, antialias=True)]
        steps += [v2.ToDtype({tv_tensors.Image: torch.float32, "others": None}, scale=True), v2.Normalize(self.mean, self.std)]
        return v2.Compose(steps)

    # --- the base's hooks -----------------------------------------------------------------------------------
    def load_split(self, split: str) -> Split | None:
        if split != "predict":
            return self.splits[split]
        if self.predict_location is None:
            return None
        return list_pairs(self.predict_location, "predict", self.image_dir, "", need_masks=False)

    def check(self, split: str, rows: Split) -> Split:
        if split != "predict":
            self.label_names  # noqa: B018 - scans every split's pairs (and checks their class ids) once
            return rows
        problems = self.on_rank_zero(
            lambda: [(p, s) for p, s in zip(rows.images, image_sizes([ImageSource(p) for p in rows.images]))
                     if isinstance(s, str)]
        )
        if problems:
            raise PtftError(f"predict: cannot read image {problems[0][0]}: {problems[0][1]}")
        return rows

    def build(self, split: str, rows: Split) -> SegmentationDataset:
        return SegmentationDataset(rows, self.transform(training=split == "train"), self.ignore_index, self.reduce_labels)

    def collate_fn(self) -> Any:
        return collate
