"""Image classification data: image-folder trees, zip archives of them, or CSV files of (path, label)."""

from __future__ import annotations

import zipfile
from pathlib import Path
from typing import Any, Literal, TypeVar

import lightning as L
import torch
from PIL import Image, ImageOps
from torch.utils.data import Dataset

from ptft.core.data import ClassificationDataModule, cached_checks
from ptft.core.errors import PtftError
from ptft.core.files import (
    FileSource,
    describe,
    drop_unreadable,
    file_stamps,
    LabelledFileSplits,
    list_files,
    open_file,
)
from ptft.core.labels import encode_labels

T = TypeVar("T")

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}


#: EXIF orientations that turn the image by 90 degrees (width and height swap when shown upright).
_TRANSPOSED = {5, 6, 7, 8}


def to_rgb(image: Image.Image) -> Image.Image:
    """8-bit RGB as viewers (and annotation tools) show the image: turned upright by its EXIF orientation, and
    16/32-bit greyscale (``I;16``, ``I``, ``F``) scaled to 8 bits instead of clipped at 255 (almost all white).

    Integer images scale by 65535 -> 255 (by their maximum when it is larger); float images in [0, 1] by 255, others
    as 8-bit values (clipped to [0, 255]).
    """
    import numpy as np

    image = ImageOps.exif_transpose(image)
    if image.mode.startswith("I") or image.mode == "F":
        values = np.asarray(image, dtype=np.float64)
        top = float(values.max(initial=0.0))
        if image.mode == "F":
            scale = 255.0 if top <= 1.0 else 1.0
        else:
            scale = 255.0 / max(65535.0, top)
        image = Image.fromarray(np.clip(values * scale, 0, 255).round().astype(np.uint8), mode="L")
    return image.convert("RGB")


def upright_size(image: Image.Image) -> tuple[int, int]:
    """``(width, height)`` of an opened image after its EXIF orientation (what :func:`to_rgb` returns), from the
    header alone. A PNG's EXIF is read only when it comes before the pixel data (the usual place)."""
    if image.format == "PNG" and "exif" not in image.info:
        return image.size  # getexif would decode the whole image to look for a trailing eXIf chunk
    width, height = image.size
    return (height, width) if image.getexif().get(0x0112, 1) in _TRANSPOSED else (width, height)


#: An image's location (a file, or a member of a zip archive): the one shared by every modality.
ImageSource = FileSource


def list_images(location: str, arg: str, path_column: str | None = None) -> list[ImageSource]:
    """Every image under a folder or a zip archive (or a folder inside one), at any depth (folder names are
    ignored); or, with ``path_column``, the images a CSV file lists (paths relative to it; other columns ignored)."""
    return list_files(location, arg, IMAGE_SUFFIXES, path_column, kind="images")


def open_image(source: ImageSource, archives: dict[tuple[int, Path], zipfile.ZipFile]) -> Image.Image:
    """Opens an image lazily (header only) from disk or from a zip archive whose handle is kept in ``archives``."""
    return Image.open(open_file(source, archives))


_CHECK_ARCHIVES: dict[tuple[int, Path], zipfile.ZipFile] = {}  # each check worker opens an archive once


def probe_images(images: list[ImageSource]) -> list[list[int] | str]:
    """Each image's ``[width, height]`` upright (:func:`upright_size`) once PIL has opened and verified it, or why
    it cannot be read. Runs in check workers (:func:`ptft.core.data.parallel_map`)."""
    results: list[list[int] | str] = []
    for source in images:
        try:
            with open_image(source, _CHECK_ARCHIVES) as image:
                size = upright_size(image)
                image.verify()
            results.append(list(size))
        except (FileNotFoundError, KeyError):  # KeyError: no such member in the archive
            results.append("does not exist")
        except Exception as err:  # noqa: BLE001 - PIL raises many types for a broken file
            results.append(f"cannot be read ({type(err).__name__}: {(str(err).splitlines() or [''])[0]})")
    return results


def image_sizes(images: list[ImageSource]) -> list[tuple[int, int] | str]:
    """Upright ``(width, height)`` of every image, or why it cannot be read (:func:`probe_images`).

    Opening and verifying every image is the slow part of starting on a large image set: it runs in parallel worker
    processes and is cached (keyed by file path, size and modification time) in ``~/.cache/ptft/checks.sqlite``, so
    a second run over unchanged files reads the cache only. Measured by ``bench/image_check.py``.
    """
    results = cached_checks(images, file_stamps(images, "image-v1"), probe_images)
    return [tuple(r) if isinstance(r, list) else r for r in results]


class ImageDataset(Dataset):
    """Images decoded with PIL (from disk or a zip archive opened once per worker) and a transform."""

    def __init__(self, images: list[ImageSource], labels: list[int] | None, transform: Any) -> None:
        self.images = images
        self.labels = labels
        self.transform = transform
        self._archives: dict[tuple[int, Path], zipfile.ZipFile] = {}

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_archives": {}}  # open zip handles do not cross into worker processes

    def __len__(self) -> int:
        return len(self.images)

    def item_names(self) -> list[str]:
        """Each image's file as given (the ``file`` column of predictions)."""
        return [describe(image) for image in self.images]

    def open(self, index: int) -> Image.Image:
        return open_image(self.images[index], self._archives)

    def __getitem__(self, index: int) -> dict[str, Any]:
        image = to_rgb(self.open(index))
        item: dict[str, Any] = {"pixel_values": self.transform(image)}
        if self.labels is not None:
            item["labels"] = self.labels[index]
        return item

    def unreadable(self) -> list[int]:
        """Indices of images PIL cannot open or verify (:func:`image_sizes`: parallel and cached)."""
        return [i for i, size in enumerate(image_sizes(self.images)) if isinstance(size, str)]


def drop_unreadable_images(data: Any, split: str, rows: list[T], images: list[ImageSource],
                           policy: Literal["error", "skip"]) -> list[T]:
    """``rows`` (``images[i]`` is row ``i``'s image) without those whose image cannot be read, under ``policy``
    (``on_bad_image``; :func:`ptft.core.files.drop_unreadable`). One check for N processes: rank 0 of ``data`` (a
    :class:`ptft.core.data.FineTuneDataModule`) reads the images, or the cache, and every rank gets the problems."""
    problems = data.on_rank_zero(lambda: [(i, s) for i, s in enumerate(image_sizes(images)) if isinstance(s, str)])
    return drop_unreadable(rows, problems, lambda i: describe(images[i]), split, policy, "image", "on_bad_image")


TRIVIAL_AUGMENT = "trivialaugment"
AUTO_AUGMENT_EXAMPLES = "rand-m9-mstd0.5-inc1, original, v0, augmix-m5-w4-d2, 3a, trivialaugment"
# Arguments of ImageClassificationDataModule that go to timm's create_transform under the same name.
AUGMENT_ARGS = ("auto_augment", "hflip", "color_jitter", "scale", "ratio", "re_prob", "re_mode", "re_count")


def augment_options(extra: dict[str, Any] | None, **named: Any) -> dict[str, Any]:
    """The training-transform arguments: the named ones (which ``extra`` may not repeat) and the others."""
    extra = dict(extra or {})
    for key in extra:
        if key in AUGMENT_ARGS:
            raise PtftError(f"augment.{key}: use data.init_args.{key} instead (it has its own argument)")
    for key in ("scale", "ratio"):
        if named[key] is not None:
            named[key] = tuple(named[key])
    jitter = named["color_jitter"]
    if isinstance(jitter, list | tuple) and len(jitter) not in (3, 4):
        raise PtftError(f"color_jitter: give one value or 3-4 (brightness, contrast, saturation[, hue]), got {list(jitter)}")
    named["color_jitter"] = tuple(jitter) if isinstance(jitter, list) else (jitter or None)  # 0: no ColorJitter step
    return {**named, **extra}


def _insert_trivial_augment(transform: Any, mean: Any) -> None:
    """Puts torchvision's TrivialAugmentWide where timm puts its policies: after crop and flips, before ToTensor."""
    from torchvision.transforms import TrivialAugmentWide

    steps = transform.transforms
    to_tensor = next(i for i, t in enumerate(steps) if "ToTensor" in type(t).__name__)
    fill = [round(255 * m) for m in (mean or (0.485, 0.456, 0.406))]  # timm fills with the mean colour too
    steps.insert(to_tensor, TrivialAugmentWide(fill=fill))


def _posterize(img: Image.Image, bits_to_keep: int, **_: Any) -> Image.Image:
    if bits_to_keep <= 0:  # keep no bits: a black image, which Pillow < 12 returned and timm's level tables expect
        return img.point([0] * 256 * len(img.getbands()))
    return ImageOps.posterize(img, min(bits_to_keep, 8))


def _allow_zero_bit_posterize(transform: Any) -> None:
    """timm's Posterize ops ask for 0 bits at high magnitudes (RandAugment ``inc1`` at m10, AutoAugment ``v0``)
    and Pillow >= 12 raises ValueError for that, ending training mid-epoch: route those ops through ``_posterize``."""
    from timm.data.auto_augment import AugmentOp

    for step in getattr(transform, "transforms", []):
        ops = getattr(step, "ops", None) or [op for sub in getattr(step, "policy", []) for op in sub]
        for op in ops:
            if isinstance(op, AugmentOp) and op.name.startswith("Posterize"):
                op.aug_fn = _posterize


def image_transform(model_data_config: dict[str, Any] | None, image_size: int | None, crop_pct: float | None,
                    augment: dict[str, Any], training: bool) -> Any:
    """timm's transform for a model's data config (input size, mean, std, crop), with size, crop and training
    augmentation overrides (``augment``: :func:`augment_options`); shared by every image data module."""
    from timm.data import create_transform

    cfg = dict(model_data_config or {})
    if image_size is not None:
        cfg["input_size"] = (3, image_size, image_size)
    if crop_pct is not None:
        cfg["crop_pct"] = crop_pct
    cfg.setdefault("input_size", (3, 224, 224))
    if not training:
        return create_transform(**cfg, is_training=False)
    cfg.pop("crop_pct", None)
    cfg.pop("crop_mode", None)
    options = dict(augment)
    trivial = options.get("auto_augment") == TRIVIAL_AUGMENT
    if trivial:
        options.update(auto_augment=None, color_jitter=None)  # as timm does for its own policies
    try:
        transform = create_transform(**cfg, is_training=True, **options)
    except (AssertionError, ValueError, TypeError) as err:
        given = {k: v for k, v in augment.items() if k not in AUGMENT_ARGS or (k == "auto_augment" and v)}
        where = f" ({', '.join(f'{k}={v!r}' for k, v in given.items())})" if given else ""
        hint = f"; auto_augment examples: {AUTO_AUGMENT_EXAMPLES}" if augment.get("auto_augment") else ""
        raise PtftError(f"bad training augmentation{where}: {str(err) or 'rejected by timm'}{hint}") from err
    if trivial:
        _insert_trivial_augment(transform, cfg.get("mean"))
    _allow_zero_bit_posterize(transform)
    return transform


def collate(items: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    batch = {"pixel_values": torch.stack([it["pixel_values"] for it in items])}
    if "labels" in items[0]:
        batch["labels"] = torch.tensor([it["labels"] for it in items])
    return batch


class ImageClassificationDataModule(LabelledFileSplits, ClassificationDataModule):
    """Image classification data with timm's transforms for the model (augmented train, deterministic eval).

    Each split is a class-folder tree (``root/<class>/<image>``), a zip archive holding one (``data.zip`` or a
    folder inside it: ``data.zip/train``), or a CSV file of image paths (relative to the CSV) and labels.

    Every image is checked before training starts, by rank 0 alone under DDP, in parallel and cached by file size
    and modification time (:func:`image_sizes`). ``on_bad_image: error`` (default) stops with the count and the
    first unreadable file; ``skip`` drops them and warns with the count. Images to predict must all be readable.

    Args:
        train: Training images.
        val: Validation images; held out from ``train`` when missing.
        test: Test images (for ``ptft test``).
        predict: Images to predict: a folder or a zip of images at any depth (a class-folder tree too), or a CSV
            with the path column (a label column is not needed).
        labels: Class names in id order; discovered (sorted folder names / CSV labels) when not given.
        path_column: CSV column with image paths.
        label_column: CSV column with labels.
        image_size: Input size (square) overriding the model's default, e.g. 32 for CIFAR-sized images.
        crop_pct: Evaluation center-crop fraction overriding the model's (1.0 = resize only).
        auto_augment: Training augmentation policy, as timm spells it: RandAugment ``rand-m9-mstd0.5-inc1``
            (magnitude 9, magnitude noise 0.5, severity-increasing ops), AutoAugment ``original`` / ``v0``
            (``-mstd0.5`` adds noise), AugMix ``augmix-m5-w4-d2``, DeiT-III's ``3a``; or ``trivialaugment``
            (torchvision's ``TrivialAugmentWide``: timm has none). Turns colour jitter off, as timm does.
        hflip: Probability of a horizontal flip in training.
        color_jitter: Colour-jitter strength (brightness, contrast, saturation), or 3-4 values (with hue); 0 turns it
            off. Ignored when ``auto_augment`` is set.
        scale: Random-resized-crop area range as fractions of the image; ``None`` is timm's ``[0.08, 1.0]``.
        ratio: Random-resized-crop aspect-ratio range; ``None`` is timm's ``[0.75, 1.333]``.
        re_prob: Random-erasing probability (after normalisation), e.g. 0.25.
        re_mode: Random-erasing fill: ``const`` (zeros), ``rand`` (per-channel noise) or ``pixel`` (per-pixel noise).
        re_count: Number of erased boxes per image.
        augment: Other training-transform arguments of ``timm.data.create_transform`` (``vflip``,
            ``train_crop_mode``, ``grayscale_prob``, ``interpolation``…).
        on_bad_image: What to do with images that cannot be read: ``error`` or ``skip``.
        batch_size: Training batch size.
        eval_batch_size: Validation / test / predict batch size; defaults to ``batch_size``.
        val_fraction: Fraction of training images held out for validation when ``val`` is missing.
        seed: Seed of the held-out split and of the batch order; by default the one of ``seed_everything``.
        num_workers: DataLoader worker processes decoding and transforming images.
        train_per_class: Few-shot training: keep this many training images of every class (a stratified subset
            chosen by ``seed``, after the held-out split); ``None`` trains on every one.
    """

    file_suffixes = IMAGE_SUFFIXES
    file_kind = "images"

    def __init__(
        self,
        train: str | None = None,
        val: str | None = None,
        test: str | None = None,
        predict: str | None = None,
        labels: list[str] | None = None,
        path_column: str = "path",
        label_column: str = "label",
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
        on_bad_image: Literal["error", "skip"] = "error",
        batch_size: int = 64,
        eval_batch_size: int | None = None,
        val_fraction: float = 0.1,
        seed: int | None = None,
        num_workers: int = 2,
        train_per_class: int | None = None,
    ) -> None:
        super().__init__(batch_size, eval_batch_size, num_workers, labels, seed, val_fraction, train_per_class)
        self.save_hyperparameters(logger=False)
        if train is None and test is None and predict is None:
            raise PtftError("give train (and optionally val / test) images")
        self.image_size = image_size
        self.crop_pct = crop_pct
        self.augment = augment_options(
            augment, auto_augment=auto_augment, hflip=hflip, color_jitter=color_jitter, scale=scale, ratio=ratio,
            re_prob=re_prob, re_mode=re_mode, re_count=re_count,
        )
        self.model_data_config: dict[str, Any] | None = None
        self.transform(training=True)  # a bad augmentation setting fails here, before any image is listed
        self.list_splits(train, val, test, predict, path_column, label_column)
        self.on_bad_image = on_bad_image

    def connect(self, model: L.LightningModule) -> None:
        if hasattr(model, "data_config"):
            self.model_data_config = model.data_config()

    def transform(self, training: bool) -> Any:
        """timm's transform for the connected model, with this module's size and augmentation overrides."""
        return image_transform(self.model_data_config, self.image_size, self.crop_pct, self.augment, training)

    # --- the base's hooks -----------------------------------------------------------------------------------
    def label_ids(self, rows: list[tuple[FileSource, str | None]]) -> list[int]:
        return encode_labels([label for _, label in rows], self.label_names, "training data")

    def check(self, split: str, rows: list[tuple[ImageSource, str | None]]) -> list[tuple[ImageSource, str | None]]:
        return drop_unreadable_images(self, split, rows, [image for image, _ in rows], self.on_bad_image)

    def build(self, split: str, rows: list[tuple[ImageSource, str | None]]) -> ImageDataset:
        images = [image for image, _ in rows]
        labels = None if split == "predict" else encode_labels([label for _, label in rows], self.label_names, split)
        return ImageDataset(images, labels, self.transform(training=split == "train"))

    def collate_fn(self) -> Any:
        return collate
