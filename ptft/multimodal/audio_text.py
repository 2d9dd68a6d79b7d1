"""Clip-caption pairs for audio-text contrastive training (CLAP-style): the image-text data module with audio.

Listing, decoding, checks and feature extraction come from :mod:`ptft.audio`; captions, class names and batching
from :class:`ptft.multimodal.ImageTextDataModule`.
"""

from __future__ import annotations

from typing import Any, Literal

import lightning as L
from torch.utils.data import Dataset

from ptft.audio.augment import WaveAugment
from ptft.audio.data import AudioReading
from ptft.audio.io import AUDIO_SUFFIXES
from ptft.core.errors import PtftError
from ptft.core.files import FileSource, list_files, list_labelled_files
from ptft.multimodal.data import ImageTextDataModule, Row, _csv_pairs


class AudioTextDataModule(AudioReading, ImageTextDataModule):
    """Audio-caption pairs for an audio-text :class:`ptft.multimodal.DualEncoder` (``audio_model``).

    Each split is a CSV of audio paths (relative to the CSV) and captions, or a class-folder tree
    (``root/<class>/<clip>``, also inside a zip) captioned with ``caption_template``, whose class names become the
    zero-shot classes. ``predict`` is a folder, zip or CSV of clips. Clips are decoded with soundfile, resampled to the
    audio tower's rate and run through its feature extractor; they are checked before training as in audio
    classification (unreadable: ``on_bad_audio``, silent: ``on_silent``).

    Args:
        train: Training pairs.
        val: Validation pairs; held out from ``train`` when missing.
        test: Test pairs (``ptft test``).
        predict: Clips to classify zero-shot.
        path_column: CSV column with audio paths.
        caption_column: CSV column with captions.
        caption_template: The caption of a clip in a class folder, ``{}`` standing for the class name.
        class_names: Class names (zero-shot classes) in id order; discovered from the training folders when not given.
        max_length: Longest caption in tokens.
        clip_seconds: Longest training clip (longer ones are randomly cropped); ``None`` keeps whole clips.
        augment: Waveform augmentation of training clips (:class:`ptft.audio.WaveAugment`).
        on_bad_audio: Unreadable or empty files: ``error`` or ``skip``.
        on_silent: Silent files: ``keep`` (warn), ``skip`` or ``error``.
        batch_size: Training batch size per process.
        eval_batch_size: Validation / test / predict batch size; defaults to ``batch_size``.
        val_fraction: Fraction of training pairs held out for validation when ``val`` is missing.
        seed: Seed of the held-out split and of the batch order; by default the one of ``seed_everything``.
        num_workers: DataLoader worker processes.
    """

    def __init__(
        self,
        train: str | None = None,
        val: str | None = None,
        test: str | None = None,
        predict: str | None = None,
        path_column: str = "path",
        caption_column: str = "caption",
        caption_template: str = "the sound of {}.",
        class_names: list[str] | None = None,
        max_length: int = 64,
        clip_seconds: float | None = 5.0,
        augment: WaveAugment | None = None,
        on_bad_audio: Literal["error", "skip"] = "error",
        on_silent: Literal["keep", "skip", "error"] = "keep",
        batch_size: int = 32,
        eval_batch_size: int | None = None,
        val_fraction: float = 0.1,
        seed: int | None = None,
        num_workers: int = 2,
    ) -> None:
        super().__init__(train, val, test, predict, path_column, caption_column, caption_template, class_names,
                         max_length, None, 0.0, (1.0, 1.0), 0.0, on_bad_audio, batch_size, eval_batch_size,
                         val_fraction, seed, num_workers)
        self.init_audio(None, True, clip_seconds, True, augment, None, on_bad_audio, on_silent)

    def _list(self, split: str, location: str | None) -> list[Row] | None:
        if location is None:
            return None
        if location.lower().endswith(".csv"):
            return _csv_pairs(location, split, *self.columns)
        samples, _ = list_labelled_files(location, split, AUDIO_SUFFIXES, *self.columns, kind="audio files")
        return [(f, self.caption_template.format(label.replace("_", " ")), label) for f, label in samples]

    def connect(self, model: L.LightningModule) -> None:
        if getattr(model, "media", None) != "audio" or not hasattr(model, "tokenizer"):
            raise PtftError(f"AudioTextDataModule feeds an audio-text dual encoder (ptft.multimodal.DualEncoder with "
                            f"audio_model), not {type(model).__name__}")
        self.connect_text(model)
        AudioReading.connect(self, model)  # the audio tower's sampling rate and feature extractor

    def load_split(self, split: str) -> list[Row] | None:
        if split == "predict":
            location = self.locations["predict"]
            if location is None:
                return None
            files = list_files(location, "predict", AUDIO_SUFFIXES, self.columns[0], kind="audio files")
            return [(f, None, None) for f in files]
        return self.pairs[split]

    def check(self, split: str, rows: list[Row]) -> list[Row]:
        kept = AudioReading.check(self, split, [(f, i) for i, (f, _, _) in enumerate(rows)])
        return [rows[i] for _, i in kept]

    def media_dataset(self, split: str, items: list[FileSource], labels: list[int] | None) -> Dataset:
        """The clips of a split: training clips cropped and augmented, the others whole."""
        return self.clips(split, items, labels)

    def collate_fn(self) -> Any:
        return ImageTextDataModule.collate_fn(self, media_collate=AudioReading.collate_fn(self))
