"""Audio classification from LitData shards (``ptft convert --kind audio``): the files' stored bytes decoded with
soundfile at read time, resampled to the model's rate, cropped and augmented as
:class:`ptft.audio.AudioClassificationDataModule` does."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np

from ptft.audio.augment import WaveAugment, crop
from ptft.audio.data import AudioReading
from ptft.audio.io import AUDIO_SUFFIXES, _soundfile, audio_info, resample
from ptft.core.streaming import ConvertRows, StreamingDataModule, file_rows


def convert_rows(input: str, options: dict[str, Any]) -> ConvertRows:
    """``ptft convert --kind audio``: every clip of a class-folder tree, a zip of one or a CSV, each decoded first
    (unreadable, empty or NaN files are bad; silent ones are kept)."""
    return file_rows(input, options, AUDIO_SUFFIXES, "audio files", audio_info, "audio")


class DecodeAudio:
    """A stored sample -> ``input_values`` (mono float32 at ``sampling_rate``; training clips cropped and augmented),
    ``labels`` and ``index``."""

    def __init__(self, sampling_rate: int, clip_samples: int | None, augment: WaveAugment | None,
                 random_crop: bool) -> None:
        self.sampling_rate = sampling_rate
        self.clip_samples = clip_samples
        self.augment = augment
        self.random_crop = random_crop

    def __call__(self, sample: dict[str, Any]) -> dict[str, Any]:
        data, rate = _soundfile().read(io.BytesIO(sample["audio"]), dtype="float32", always_2d=True)
        wave = np.ascontiguousarray(data.mean(axis=1) if data.shape[1] > 1 else data[:, 0])  # as ptft.audio.io
        wave = resample(wave, rate, self.sampling_rate)
        if self.augment is not None:
            wave = self.augment.before_crop(wave)
        if self.clip_samples is not None:
            wave = crop(wave, self.clip_samples, random=self.random_crop)
        if self.augment is not None:
            wave = self.augment.after_crop(wave)
        return {"input_values": wave, "labels": sample["label"], "index": sample["index"]}


class StreamingAudioDataModule(AudioReading, StreamingDataModule):
    """Audio classification from shards written by ``ptft convert --kind audio``: clips resampled to the model's
    rate, training clips cropped to ``clip_seconds`` and augmented, batches padded with an ``attention_mask`` (or run
    through the model's feature extractor), as in :class:`ptft.audio.AudioClassificationDataModule`.

    Shuffling, seeding, the validation and test splits and mid-epoch resume come from
    :class:`ptft.core.streaming.StreamingDataModule`. Files were checked when converted.

    Args:
        data: The folder ``ptft convert --output`` wrote (``train/``, ``val/``, optionally ``test/``, ``labels.json``).
        sampling_rate: The rate clips are resampled to; ``None`` takes the model's.
        clip_seconds: Longest training clip (longer ones are cropped); ``None`` trains on whole clips.
        random_crop: Crop training clips at a random position (``false``: centred).
        augment: Waveform augmentation of training clips (speed, shift, gain, noise): :class:`ptft.audio.WaveAugment`.
        feature_extractor: Hugging Face feature extractor (hub name or folder) to run on batches; ``None`` takes the
            model's (Hugging Face audio models); spectrogram models compute their features themselves.
        shuffle: Shuffle training rows every epoch (LitData: chunk order, then rows inside each chunk).
        batch_size: Training batch size.
        eval_batch_size: Validation / test batch size; defaults to ``batch_size``.
        seed: Seed of the training order; by default the one of ``seed_everything``. Resuming needs the same seed,
            batch size, worker count and process count.
        num_workers: DataLoader worker processes decoding and augmenting clips.
    """

    kind = "audio"

    def __init__(
        self,
        data: str,
        sampling_rate: int | None = None,
        clip_seconds: float | None = 1.0,
        random_crop: bool = True,
        augment: WaveAugment | None = None,
        feature_extractor: str | None = None,
        shuffle: bool = True,
        batch_size: int = 32,
        eval_batch_size: int | None = None,
        seed: int | None = None,
        num_workers: int = 2,
    ) -> None:
        super().__init__(data, batch_size, eval_batch_size, num_workers, seed, shuffle)
        self.save_hyperparameters(logger=False)
        self.init_audio(sampling_rate, True, clip_seconds, random_crop, augment, feature_extractor, "error", "keep")

    def check(self, split: str, rows: Path) -> Path:
        return StreamingDataModule.check(self, split, rows)  # the files were decoded once, by ptft convert

    def decoder(self, split: str) -> DecodeAudio:
        training = split == "train"
        clip = round(self.clip_seconds * self.sampling_rate) if training and self.clip_seconds else None
        return DecodeAudio(self.sampling_rate, clip, self.augment if training else None, self.random_crop)
