"""Waveform augmentation of training clips (gain, noise at an SNR, time shift, speed), and the crop to a longest training length.

These run per example in the DataLoader workers, on 1-D float32 numpy waveforms, drawing from torch's random stream
(Lightning seeds each worker's). The common audio augmentation libraries (audiomentations, torch-audiomentations)
either pull in torchaudio or a large dependency tree for what is a few array operations here; speed perturbation
resamples with soxr, as :func:`ptft.audio.io.resample` does. Mixup of waveforms and SpecAugment masks act on batches,
in the model (:mod:`ptft.audio.features`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch

from ptft.core.errors import PtftError


def _uniform(low: float, high: float) -> float:
    return low + (high - low) * float(torch.rand(()))


def _range(value: Any, name: str) -> tuple[float, float] | None:
    if value is None:
        return None
    low, high = (float(v) for v in value)
    if low > high:
        raise PtftError(f"augment.{name}: give [low, high] with low <= high, got {list(value)}")
    return low, high


@dataclass(frozen=True)
class WaveAugment:
    """Training-clip augmentation (``data.init_args.augment`` in a recipe); each is off when ``None`` / 0.

    Applied in this order: speed, then the crop to ``clip_seconds``, time shift, gain, noise.
    """

    speed: tuple[float, float] | None = None
    """Speed-perturbation factor range, e.g. ``[0.9, 1.1]`` (Kaldi's 0.9 / 1.0 / 1.1): resampling changes tempo and
    pitch together."""
    shift: float = 0.0
    """Largest time shift as a fraction of the clip (0.1: up to 10% either way), zero-filled, not wrapped around."""
    gain_db: tuple[float, float] | None = None
    """Gain range in dB, e.g. ``[-6, 6]``."""
    noise_snr_db: tuple[float, float] | None = None
    """White noise at a signal-to-noise ratio drawn from this range in dB, e.g. ``[10, 40]``."""
    prob: float = 1.0
    """Probability of applying each enabled augmentation to a clip."""

    def __post_init__(self) -> None:
        for name in ("speed", "gain_db", "noise_snr_db"):
            object.__setattr__(self, name, _range(getattr(self, name), name))
        if self.speed is not None and self.speed[0] <= 0:
            raise PtftError(f"augment.speed: factors must be > 0, got {list(self.speed)}")
        if not 0 <= self.shift < 1:
            raise PtftError(f"augment.shift: a fraction of the clip in [0, 1), got {self.shift}")

    @classmethod
    def coerce(cls, value: WaveAugment | dict[str, Any] | None) -> WaveAugment | None:
        """Accepts the dataclass or a plain dict (as stored in hyperparameters)."""
        return cls(**value) if isinstance(value, dict) else value

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def _on(self) -> bool:
        return self.prob >= 1 or float(torch.rand(())) < self.prob

    def before_crop(self, wave: np.ndarray) -> np.ndarray:
        """Speed perturbation (changes the length, so it comes before the crop)."""
        if self.speed is None or not self._on():
            return wave
        factor = _uniform(*self.speed)
        if abs(factor - 1) < 1e-3:
            return wave
        import soxr

        # Played ``factor`` times faster: the samples of ``len / factor`` at the same rate.
        return soxr.resample(wave, 1_000_000, round(1_000_000 / factor), quality="HQ").astype(np.float32, copy=False)

    def after_crop(self, wave: np.ndarray) -> np.ndarray:
        """Time shift, gain and noise of a cropped clip."""
        if self.shift > 0 and self._on():
            steps = round(_uniform(-self.shift, self.shift) * len(wave))
            if steps:
                shifted = np.zeros_like(wave)
                if steps > 0:
                    shifted[steps:] = wave[:-steps]
                else:
                    shifted[:steps] = wave[-steps:]
                wave = shifted
        if self.gain_db is not None and self._on():
            wave = wave * np.float32(10 ** (_uniform(*self.gain_db) / 20))
        if self.noise_snr_db is not None and self._on():
            power = float(np.mean(wave**2))
            if power > 0:
                noise_power = power / 10 ** (_uniform(*self.noise_snr_db) / 10)
                noise = torch.randn(len(wave)).numpy() * np.float32(np.sqrt(noise_power))
                wave = wave + noise.astype(np.float32)
        return wave


def crop(wave: np.ndarray, length: int, random: bool) -> np.ndarray:
    """At most ``length`` samples: a random (training) or centred window of a longer clip; a shorter clip is returned
    whole. It is not padded here: the batch collation pads it and masks the padding out (spectrogram normalisation,
    HF attention masks), so a short training clip looks exactly as it does in evaluation."""
    if len(wave) > length:
        start = int(torch.randint(0, len(wave) - length + 1, ())) if random else (len(wave) - length) // 2
        return wave[start : start + length]
    return wave
