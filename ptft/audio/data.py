"""Audio classification data: audio-folder trees (``root/<label>/*.wav``), zip archives of them, or CSV files of
``path,label``; decoded with soundfile, resampled to the model's rate, cropped to fixed-length training clips.

Splits, the held-out validation split, the seed, checks at scale and the loaders come from :mod:`ptft.core.data`;
listing and the unreadable-file policy from :mod:`ptft.core.files`. This module adds decoding and transforms only.
"""

from __future__ import annotations

import zipfile
from pathlib import Path
from typing import Any, Literal

import lightning as L
import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch.utils.data import Dataset

from ptft.audio.augment import WaveAugment, crop
from ptft.audio.io import AUDIO_SUFFIXES, SILENCE_PEAK, audio_info, read_audio
from ptft.core.data import ClassificationDataModule
from ptft.core.errors import PtftError
from ptft.core.files import FileSource, LabelledFileSplits, describe, drop_unreadable
from ptft.core.labels import encode_labels


class AudioDataset(Dataset):
    """Clips decoded (and resampled) on access; training clips longer than ``clip_samples`` are cropped."""

    def __init__(
        self, sources: list[FileSource], labels: list[int] | None, sampling_rate: int, clip_samples: int | None,
        augment: WaveAugment | None, random_crop: bool,
    ) -> None:
        self.sources = sources
        self.labels = labels
        self.sampling_rate = sampling_rate
        self.clip_samples = clip_samples
        self.augment = augment
        self.random_crop = random_crop
        self._archives: dict[tuple[int, Path], zipfile.ZipFile] = {}

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_archives": {}}  # open zip handles do not cross into worker processes

    def __len__(self) -> int:
        return len(self.sources)

    def item_names(self) -> list[str]:
        """Each clip's file as given (the ``file`` column of predictions)."""
        return [describe(source) for source in self.sources]

    def __getitem__(self, index: int) -> dict[str, Any]:
        wave, _ = read_audio(self.sources[index], self._archives, self.sampling_rate)
        if self.augment is not None:
            wave = self.augment.before_crop(wave)
        if self.clip_samples is not None:
            wave = crop(wave, self.clip_samples, random=self.random_crop)
        if self.augment is not None:
            wave = self.augment.after_crop(wave)
        item: dict[str, Any] = {"input_values": wave}
        if self.labels is not None:
            item["labels"] = self.labels[index]
        return item


def collate_labels(items: list[dict[str, Any]]) -> torch.Tensor:
    """Class ids as a tensor; token-id lists (speech recognition) padded with -100, the ignored index of the loss."""
    labels = [it["labels"] for it in items]
    if not isinstance(labels[0], list):
        return torch.tensor(labels)
    out = torch.full((len(labels), max(len(x) for x in labels)), -100, dtype=torch.long)
    for i, ids in enumerate(labels):
        out[i, : len(ids)] = torch.tensor(ids, dtype=torch.long)
    return out


class PadCollate:
    """Waveforms -> ``input_values`` ``(batch, samples)`` zero-padded to the longest, with ``attention_mask``."""

    def __call__(self, items: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        longest = max(len(it["input_values"]) for it in items)
        waves = torch.zeros(len(items), longest)
        mask = torch.zeros(len(items), longest, dtype=torch.long)
        for i, it in enumerate(items):
            n = len(it["input_values"])
            waves[i, :n] = torch.from_numpy(np.asarray(it["input_values"], dtype=np.float32))
            mask[i, :n] = 1
        batch = {"input_values": waves, "attention_mask": mask}
        if "labels" in items[0]:
            batch["labels"] = collate_labels(items)
        return batch


class FeatureExtractorCollate:
    """A Hugging Face feature extractor on a batch of waveforms (wav2vec2 / HuBERT normalisation, AST filter banks,
    Whisper log-mels), run in the DataLoader workers; its outputs plus ``labels``."""

    def __init__(self, extractor: Any, sampling_rate: int) -> None:
        self.extractor = extractor
        self.sampling_rate = sampling_rate

    def __call__(self, items: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        waves = [np.asarray(it["input_values"], dtype=np.float32) for it in items]
        batch = dict(self.extractor(waves, sampling_rate=self.sampling_rate, padding=True, return_attention_mask=True,
                                    return_tensors="pt"))
        if "labels" in items[0]:
            batch["labels"] = collate_labels(items)
        return batch


class AudioReading:
    """What every audio data module shares: the model's sampling rate and feature extractor, the checks of every file
    (unreadable, empty, silent, rate), the dataset of clips and the collation. Call :meth:`init_audio` in
    ``__init__``; rows are ``(file, label or None)`` pairs."""

    def init_audio(
        self, sampling_rate: int | None, resample: bool, clip_seconds: float | None, random_crop: bool,
        augment: WaveAugment | dict | None, feature_extractor: str | None, on_bad_audio: str, on_silent: str,
    ) -> None:
        if clip_seconds is not None and clip_seconds <= 0:
            raise PtftError(f"clip_seconds must be > 0 (or null for whole clips), got {clip_seconds}")
        self.given_rate = sampling_rate
        self.resample = resample
        self.clip_seconds = clip_seconds
        self.random_crop = random_crop
        self.augment = WaveAugment.coerce(augment)
        self.feature_extractor_name = feature_extractor
        self.on_bad_audio = on_bad_audio
        self.on_silent = on_silent
        self.model_rate: int | None = None
        self.extractor: Any = None

    def connect(self, model: L.LightningModule) -> None:
        """Takes the model's sampling rate and feature extractor (``model.sampling_rate``,
        ``model.feature_extractor_name``)."""
        self.model_rate = getattr(model, "sampling_rate", None)
        name = self.feature_extractor_name or getattr(model, "feature_extractor_name", None)
        if name is not None and self.extractor is None:
            from transformers import AutoFeatureExtractor

            from ptft.core.hub import load_pretrained, resolve_model_name

            self.extractor = load_pretrained(AutoFeatureExtractor.from_pretrained, resolve_model_name(name),
                                             "feature extractor")
        if self.extractor is not None:
            rate = getattr(self.extractor, "sampling_rate", None)
            if rate is not None and self.model_rate is not None and rate != self.model_rate:
                raise PtftError(f"the feature extractor expects {rate} Hz, the model {self.model_rate} Hz")
            self.model_rate = rate or self.model_rate
        if self.given_rate is not None and self.model_rate is not None and self.given_rate != self.model_rate:
            raise PtftError(
                f"sampling_rate={self.given_rate} but the model expects {self.model_rate} Hz: drop "
                "data.init_args.sampling_rate (clips are resampled to the model's rate)"
            )

    @property
    def sampling_rate(self) -> int:
        """The rate every clip is brought to."""
        rate = self.given_rate or self.model_rate
        if rate is None:
            raise PtftError("no sampling rate: set data.init_args.sampling_rate, or connect a model that has one")
        return rate

    def check(self, split: str, rows: list[tuple[FileSource, str | None]]) -> list[tuple[FileSource, str | None]]:
        sources = [f for f, _ in rows]
        rate = self.sampling_rate

        def problems() -> tuple[list[tuple[int, str]], list[int], tuple[int, int] | None]:
            bad, silent, mismatch = [], [], None
            for i, info in enumerate(audio_info(sources)):
                if isinstance(info, str):
                    bad.append((i, info))
                    continue
                if info[3] < SILENCE_PEAK:
                    silent.append(i)
                if mismatch is None and int(info[1]) != rate:
                    mismatch = (i, int(info[1]))
            return bad, silent, mismatch

        # One check for N processes: rank 0 decodes the files (or reads the cache), every rank gets the problems.
        bad, silent, mismatch = self.on_rank_zero(problems)
        if mismatch is not None and not self.resample:
            raise PtftError(
                f"{describe(sources[mismatch[0]])} is {mismatch[1]} Hz, the model expects {rate} Hz: set "
                "data.init_args.resample=true, or resample the files"
            )
        kept = drop_unreadable(rows, bad, lambda i: describe(sources[i]), split, self.on_bad_audio, "audio file",
                               "on_bad_audio")
        if not silent:
            return kept
        what = f"{len(silent)} silent clip(s) (peak below -80 dBFS) in {split}, first: {describe(sources[silent[0]])}"
        if self.on_silent == "error":
            raise PtftError(f"{what}; remove them or set data.init_args.on_silent=skip (or keep)")
        if self.on_silent == "keep" or split == "predict":
            rank_zero_warn(f"{what}; kept (data.init_args.on_silent=skip drops them)")
            return kept
        rank_zero_warn(f"skipping {what}")
        dropped = {i for i, _ in bad} | set(silent)
        return [row for i, row in enumerate(rows) if i not in dropped]

    def clips(self, split: str, sources: list[FileSource], labels: list[Any] | None) -> AudioDataset:
        """The dataset of a split: training clips cropped and augmented, the others whole."""
        training = split == "train"
        clip = round(self.clip_seconds * self.sampling_rate) if training and self.clip_seconds else None
        return AudioDataset(sources, labels, self.sampling_rate, clip, self.augment if training else None,
                            random_crop=self.random_crop)

    def collate_fn(self) -> Any:
        return FeatureExtractorCollate(self.extractor, self.sampling_rate) if self.extractor is not None else PadCollate()


class AudioClassificationDataModule(AudioReading, LabelledFileSplits, ClassificationDataModule):
    """Audio classification data, decoded with soundfile and resampled with soxr to the model's sampling rate.

    Each split is an audio-folder tree (``root/<label>/<clip>``: wav, flac, ogg, opus, mp3), a zip archive holding
    one (``data.zip`` or a folder inside it: ``data.zip/train``), or a CSV file of paths (relative to the CSV) and
    labels. Multi-channel files are mixed down to mono (the channels' mean).

    Training clips longer than ``clip_seconds`` are cropped at a random position, and augmented; evaluation and
    prediction clips are used whole. Every batch is padded to its longest clip with an ``attention_mask`` that keeps
    the padding out of normalisation and pooling, in training as in evaluation. Every file is decoded once before
    training (by rank 0 under DDP, in parallel, cached by file size and modification time): unreadable or empty
    files follow ``on_bad_audio``, silent ones ``on_silent``.

    Args:
        train: Training clips.
        val: Validation clips; held out from ``train`` when missing.
        test: Test clips (for ``ptft test``).
        predict: Clips to predict: a folder or a zip of audio files at any depth, or a CSV with the path column.
        labels: Class names in id order; discovered (sorted folder names / CSV labels) when not given.
        path_column: CSV column with file paths.
        label_column: CSV column with labels.
        sampling_rate: The rate clips are resampled to; ``None`` takes the model's (its feature extractor's, or the
            spectrogram model's ``sampling_rate``). A value different from the model's is refused.
        resample: Resample files whose rate differs; ``false`` stops with an error on the first such file instead.
        clip_seconds: Longest training clip (longer ones are randomly cropped); ``None`` trains on whole clips.
        random_crop: Crop training clips at a random position (``false``: centred).
        augment: Waveform augmentation of training clips (speed, shift, gain, noise): :class:`WaveAugment`.
        feature_extractor: Hugging Face feature extractor (hub name or folder) to run on batches; ``None`` takes the
            model's (Hugging Face audio models), and spectrogram models compute their features themselves.
        on_bad_audio: Unreadable or empty files: ``error`` (stop, naming the first) or ``skip`` (drop, warn).
        on_silent: Silent files (peak below -80 dBFS): ``keep`` (warn with the count), ``skip`` or ``error``.
        batch_size: Training batch size.
        eval_batch_size: Validation / test / predict batch size; defaults to ``batch_size``.
        val_fraction: Fraction of training clips held out for validation when ``val`` is missing.
        seed: Seed of the held-out split and of the batch order; by default the one of ``seed_everything``.
        num_workers: DataLoader worker processes decoding and augmenting clips.
        train_per_class: Few-shot training: keep this many training clips of every class (a stratified subset
            chosen by ``seed``, after the held-out split); ``None`` trains on every one.
    """

    file_suffixes = AUDIO_SUFFIXES
    file_kind = "audio files"

    def __init__(
        self,
        train: str | None = None,
        val: str | None = None,
        test: str | None = None,
        predict: str | None = None,
        labels: list[str] | None = None,
        path_column: str = "path",
        label_column: str = "label",
        sampling_rate: int | None = None,
        resample: bool = True,
        clip_seconds: float | None = 1.0,
        random_crop: bool = True,
        augment: WaveAugment | None = None,
        feature_extractor: str | None = None,
        on_bad_audio: Literal["error", "skip"] = "error",
        on_silent: Literal["keep", "skip", "error"] = "keep",
        batch_size: int = 32,
        eval_batch_size: int | None = None,
        val_fraction: float = 0.1,
        seed: int | None = None,
        num_workers: int = 2,
        train_per_class: int | None = None,
    ) -> None:
        super().__init__(batch_size, eval_batch_size, num_workers, labels, seed, val_fraction, train_per_class)
        self.save_hyperparameters(logger=False)
        if train is None and test is None and predict is None:
            raise PtftError("give train (and optionally val / test) audio")
        self.init_audio(sampling_rate, resample, clip_seconds, random_crop, augment, feature_extractor, on_bad_audio,
                        on_silent)
        self.list_splits(train, val, test, predict, path_column, label_column)

    # --- the base's hooks -----------------------------------------------------------------------------------
    def label_ids(self, rows: list[tuple[FileSource, str | None]]) -> list[int]:
        return encode_labels([label for _, label in rows], self.label_names, "training data")

    def build(self, split: str, rows: list[tuple[FileSource, str | None]]) -> AudioDataset:
        labels = None if split == "predict" else encode_labels([label for _, label in rows], self.label_names, split)
        return self.clips(split, [f for f, _ in rows], labels)
