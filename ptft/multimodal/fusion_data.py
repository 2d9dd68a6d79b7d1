"""Labelled (text, image) or (text, audio) pairs for fusion classifiers, from CSV files.

Each split is a CSV with a text column, a file column (image or audio, relative to the CSV) and a label column. This
module adds reading only: splits, checks and loaders come from :mod:`ptft.core.data`, image decoding and transforms
from :mod:`ptft.vision.data`, audio decoding, checks and feature extraction from :mod:`ptft.audio.data`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import lightning as L
from torch.utils.data import Dataset

from ptft.audio.augment import WaveAugment
from ptft.audio.data import AudioReading
from ptft.core.data import ClassificationDataModule
from ptft.core.errors import PtftError
from ptft.core.files import FileSource, _read_csv
from ptft.core.labels import encode_labels, split_label_names
from ptft.multimodal.data import PairCollator
from ptft.vision.data import ImageDataset, augment_options, drop_unreadable_images, image_transform

#: One row: its text, its image or audio file, its label (``None`` to predict).
Row = tuple[str, FileSource, str | None]


class PairedDataset(Dataset):
    """A media dataset (images or clips, with labels) whose items also carry their text's token ids."""

    def __init__(self, media: Dataset, tokens: list[list[int]]) -> None:
        self.media = media
        self.tokens = tokens

    def __len__(self) -> int:
        return len(self.tokens)

    def item_names(self) -> list[str]:
        """Each row's file as given (the ``file`` column of predictions)."""
        return self.media.item_names()

    def __getitem__(self, index: int) -> dict[str, Any]:
        return {**self.media[index], "input_ids": self.tokens[index]}


class MultimodalClassificationDataModule(AudioReading, ClassificationDataModule):
    """Labelled text + image or text + audio pairs for :class:`ptft.multimodal.FusionClassifier`.

    Each split is a CSV of ``text``, a file path (relative to the CSV) and ``label`` columns. Whether the files are
    images or audio follows the model (its ``image_model`` or ``audio_model``); images get the image tower's
    preprocessing (and timm's training augmentation), clips the audio tower's sampling rate and feature extractor.
    Before training, every row is checked: a row without its text, its file or its label stops with a one-line error
    naming it, and unreadable files follow ``on_bad_file``.

    Args:
        train: Training CSV.
        val: Validation CSV; held out from ``train`` when missing.
        test: Test CSV (``ptft test``).
        predict: CSV of rows to classify (no label column needed).
        labels: Class names in id order; discovered (sorted) from the training labels when not given.
        text_column: CSV column with the texts (a review, a question, a transcript…).
        file_column: CSV column with each row's image or audio file; ``None`` reads the column ``image`` or
            ``audio``, as the model's second tower is.
        label_column: CSV column with labels.
        max_length: Longest text in tokens (longer ones are truncated).
        image_size: Input size (square) overriding the image tower's default.
        hflip: Probability of a horizontal flip of training images (0 when left and right matter: "the left one").
        scale: Random-resized-crop area range of training images.
        clip_seconds: Longest training clip (longer ones are randomly cropped); ``None`` keeps whole clips.
        augment: Waveform augmentation of training clips (:class:`ptft.audio.WaveAugment`).
        on_bad_file: Unreadable images or audio files: ``error`` (stop, naming the first) or ``skip``.
        batch_size: Training batch size per process.
        eval_batch_size: Validation / test / predict batch size; defaults to ``batch_size``.
        val_fraction: Fraction of training rows held out for validation when ``val`` is missing.
        seed: Seed of the held-out split and of the batch order; by default the one of ``seed_everything``.
        num_workers: DataLoader worker processes.
    """

    def __init__(
        self,
        train: str | None = None,
        val: str | None = None,
        test: str | None = None,
        predict: str | None = None,
        labels: list[str] | None = None,
        text_column: str = "text",
        file_column: str | None = None,
        label_column: str = "label",
        max_length: int = 128,
        image_size: int | None = None,
        hflip: float = 0.0,
        scale: tuple[float, float] = (0.8, 1.0),
        clip_seconds: float | None = None,
        augment: WaveAugment | None = None,
        on_bad_file: Literal["error", "skip"] = "error",
        batch_size: int = 32,
        eval_batch_size: int | None = None,
        val_fraction: float = 0.1,
        seed: int | None = None,
        num_workers: int = 2,
    ) -> None:
        super().__init__(batch_size, eval_batch_size, num_workers, labels, seed, val_fraction)
        self.save_hyperparameters(logger=False)
        if train is None and test is None and predict is None:
            raise PtftError("give train (and optionally val / test) CSVs of text, file and label, or a CSV to predict")
        self.init_audio(None, True, clip_seconds, True, augment, None, on_bad_file, "keep")
        self.text_column, self.file_column, self.label_column = text_column, file_column, label_column
        self.max_length = max_length
        self.image_size = image_size
        self.augment_images = augment_options(None, auto_augment=None, hflip=hflip, color_jitter=None, scale=scale,
                                              ratio=None, re_prob=0.0, re_mode="const", re_count=1)
        self.on_bad_file = on_bad_file
        self.media: Literal["image", "audio"] | None = None
        self.tokenizer: Any = None
        self.image_config: dict[str, Any] = {}
        hint = "; set data.init_args.text_column / label_column"
        self.tables: dict[str, tuple[Path, list[dict[str, str]]] | None] = {
            split: None if location is None else _read_csv(
                location, split, [text_column] + ([label_column] if split != "predict" else []), hint)
            for split, location in (("train", train), ("val", val), ("test", test), ("predict", predict))
        }

    # --- labels and the model ---------------------------------------------------------------------------------
    def discover_labels(self) -> list[str]:
        """Sorted training labels (or the given ``labels``); validation and test labels must be among them."""
        labels = {split: None if self.tables[split] is None else self._labels(split) for split in ("train", "val", "test")}
        return split_label_names(labels, self.given_labels, "rows")

    def _labels(self, split: str) -> list[str]:
        path, rows = self.tables[split]
        missing = [i for i, row in enumerate(rows) if not (row[self.label_column] or "").strip()]
        if missing:
            raise PtftError(f"{path}: {len(missing)} row(s) without a label, first: data row {missing[0] + 1}")
        return [row[self.label_column].strip() for row in rows]

    def connect(self, model: L.LightningModule) -> None:
        media = getattr(model, "media", None)
        if media not in ("image", "audio") or not hasattr(model, "tokenizer"):
            raise PtftError(f"MultimodalClassificationDataModule feeds a fusion classifier "
                            f"(ptft.multimodal.FusionClassifier), not {type(model).__name__}")
        self.media = media
        self.tokenizer = model.tokenizer()
        if media == "image":
            self.image_config = model.data_config()
        else:
            super().connect(model)  # the audio tower's sampling rate and feature extractor

    # --- the base's hooks ---------------------------------------------------------------------------------------
    def load_split(self, split: str) -> list[Row] | None:
        table = self.tables[split]
        if table is None:
            return None
        if self.media is None:
            raise PtftError("MultimodalClassificationDataModule is not connected to a model: call connect(model) first")
        path, rows = table
        column = self.file_column or self.media
        if rows and column not in rows[0]:
            raise PtftError(f"{path} has no column {column!r} with the {self.media} files (columns: {list(rows[0])}); "
                            "set data.init_args.file_column")
        if not rows:
            raise PtftError(f"{split}: {path} has no rows")
        for col, what in ((self.text_column, "text"), (column, f"{self.media} file")):
            missing = [i for i, row in enumerate(rows) if not (row[col] or "").strip()]
            if missing:
                raise PtftError(f"{path}: {len(missing)} row(s) without a {what} (column {col!r}), first: data row "
                                f"{missing[0] + 1}; every row needs both inputs")
        labels = self._labels(split) if split != "predict" else [None] * len(rows)
        return [(row[self.text_column], FileSource(path.parent / row[column].strip()), label)
                for row, label in zip(rows, labels)]

    def check(self, split: str, rows: list[Row]) -> list[Row]:
        if self.media == "image":
            return drop_unreadable_images(self, split, rows, [f for _, f, _ in rows], self.on_bad_file)
        kept = AudioReading.check(self, split, [(f, i) for i, (_, f, _) in enumerate(rows)])
        return [rows[i] for _, i in kept]

    def build(self, split: str, rows: list[Row]) -> PairedDataset:
        labels = None if split == "predict" else encode_labels([label for _, _, label in rows], self.label_names, split)
        files = [f for _, f, _ in rows]
        if self.media == "image":
            transform = image_transform(self.image_config, self.image_size, None, self.augment_images, split == "train")
            media: Dataset = ImageDataset(files, labels, transform)
        else:
            media = self.clips(split, files, labels)
        tokens = self.tokenizer([text for text, _, _ in rows], truncation=True, max_length=self.max_length)["input_ids"]
        return PairedDataset(media, tokens)

    def collate_fn(self) -> PairCollator:
        pad = self.tokenizer.pad_token_id if self.tokenizer is not None else None
        media = None if self.media == "image" else AudioReading.collate_fn(self)
        return PairCollator(0 if pad is None else pad, media_collate=media)
