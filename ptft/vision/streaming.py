"""Image classification from LitData shards (``ptft convert --kind image``): the images' stored bytes decoded at
read time and given timm's transforms for the model, as :class:`ptft.vision.ImageClassificationDataModule` does."""

from __future__ import annotations

import io
from typing import Any, Literal

import lightning as L
from PIL import Image

from ptft.core.streaming import ConvertRows, StreamingDataModule, file_rows
from ptft.vision.data import IMAGE_SUFFIXES, augment_options, collate, image_sizes, image_transform, to_rgb


def convert_rows(input: str, options: dict[str, Any]) -> ConvertRows:
    """``ptft convert --kind image``: every image of a class-folder tree, a zip of one or a CSV, checked first."""
    return file_rows(input, options, IMAGE_SUFFIXES, "images", image_sizes, "image")


class DecodeImage:
    """A stored sample -> ``pixel_values`` (decoded, RGB upright, transformed), ``labels`` and ``index``."""

    def __init__(self, transform: Any) -> None:
        self.transform = transform

    def __call__(self, sample: dict[str, Any]) -> dict[str, Any]:
        with Image.open(io.BytesIO(sample["image"])) as image:
            rgb = to_rgb(image)
        return {"pixel_values": self.transform(rgb), "labels": sample["label"], "index": sample["index"]}


class StreamingImageDataModule(StreamingDataModule):
    """Image classification from shards written by ``ptft convert --kind image``, with timm's transforms for the
    model (augmented train, deterministic eval), for image sets larger than memory or than local disk.

    Shuffling, seeding, the validation and test splits and mid-epoch resume come from
    :class:`ptft.core.streaming.StreamingDataModule`; the augmentation arguments are those of
    :class:`ptft.vision.ImageClassificationDataModule`.

    Args:
        data: The folder ``ptft convert --output`` wrote (``train/``, ``val/``, optionally ``test/``, ``labels.json``).
        image_size: Input size (square) overriding the model's default, e.g. 32 for CIFAR-sized images.
        crop_pct: Evaluation center-crop fraction overriding the model's (1.0 = resize only).
        auto_augment: Training augmentation policy, as timm spells it (``rand-m9-mstd0.5-inc1``, ``original``,
            ``augmix-m5-w4-d2``, ``3a``) or ``trivialaugment``. Turns colour jitter off, as timm does.
        hflip: Probability of a horizontal flip in training.
        color_jitter: Colour-jitter strength, or 3-4 values (with hue); 0 turns it off.
        scale: Random-resized-crop area range as fractions of the image; ``None`` is timm's ``[0.08, 1.0]``.
        ratio: Random-resized-crop aspect-ratio range; ``None`` is timm's ``[0.75, 1.333]``.
        re_prob: Random-erasing probability (after normalisation).
        re_mode: Random-erasing fill: ``const``, ``rand`` or ``pixel``.
        re_count: Number of erased boxes per image.
        augment: Other training-transform arguments of ``timm.data.create_transform``.
        shuffle: Shuffle training rows every epoch (LitData: chunk order, then rows inside each chunk).
        batch_size: Training batch size.
        eval_batch_size: Validation / test batch size; defaults to ``batch_size``.
        seed: Seed of the training order; by default the one of ``seed_everything``. Resuming needs the same seed,
            batch size, worker count and process count.
        num_workers: DataLoader worker processes decoding and transforming images.
    """

    kind = "image"

    def __init__(
        self,
        data: str,
        image_size: int | None = None,
        crop_pct: float | None = None,
        auto_augment: str | None = None,
        hflip: float = 0.5,
        color_jitter: float | list[float] = 0.4,
        scale: tuple[float, float] | None = None,
        ratio: tuple[float, float] | None = None,
        re_prob: float = 0.0,
        re_mode: Literal["const", "rand", "pixel"] = "const",
        re_count: int = 1,
        augment: dict[str, Any] | None = None,
        shuffle: bool = True,
        batch_size: int = 64,
        eval_batch_size: int | None = None,
        seed: int | None = None,
        num_workers: int = 2,
    ) -> None:
        super().__init__(data, batch_size, eval_batch_size, num_workers, seed, shuffle)
        self.save_hyperparameters(logger=False)
        self.image_size = image_size
        self.crop_pct = crop_pct
        self.augment = augment_options(
            augment, auto_augment=auto_augment, hflip=hflip, color_jitter=color_jitter, scale=scale, ratio=ratio,
            re_prob=re_prob, re_mode=re_mode, re_count=re_count,
        )
        self.model_data_config: dict[str, Any] | None = None
        self.transform(training=True)  # a bad augmentation setting fails here, before any shard is read

    def connect(self, model: L.LightningModule) -> None:
        if hasattr(model, "data_config"):
            self.model_data_config = model.data_config()

    def transform(self, training: bool) -> Any:
        """timm's transform for the connected model, with this module's size and augmentation overrides."""
        return image_transform(self.model_data_config, self.image_size, self.crop_pct, self.augment, training)

    def decoder(self, split: str) -> DecodeImage:
        return DecodeImage(self.transform(training=split == "train"))

    def collate_fn(self) -> Any:
        return collate
