"""Spectrogram features of waveform batches, on the model's device: STFT, log-mel and MFCC in torch, SpecAugment.

The mel filter bank is transformers' (``transformers.audio_utils.mel_filter_bank``, the one its Whisper / CLAP /
SpeechT5 feature extractors use) and the DCT of MFCCs is scipy's; only the STFT (``torch.stft``) and the masks are
computed here. Features are computed in fp32 whatever the autocast precision (an STFT in bf16 loses the quiet bands).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Literal

import numpy as np
import torch
from torch import nn

from ptft.core.errors import PtftError


@dataclass(frozen=True)
class SpectrogramConfig:
    """How waveforms become the image a CNN sees (``model.init_args.features`` in a recipe).

    Defaults: 25 ms windows every 10 ms and 64 mel bands, the usual front end of audio CNNs (PANNs, AST use
    64-128 bands) at any sampling rate.
    """

    kind: Literal["logmel", "mfcc", "stft"] = "logmel"
    """``logmel`` (log mel-band energies), ``mfcc`` (their DCT) or ``stft`` (log power spectrogram)."""
    window_ms: float = 25.0
    """STFT window length in milliseconds (``n_fft`` follows from the sampling rate)."""
    hop_ms: float = 10.0
    """Hop between frames in milliseconds."""
    n_mels: int = 64
    """Mel bands (``logmel``, ``mfcc``)."""
    n_mfcc: int = 40
    """Cepstral coefficients kept (``mfcc``)."""
    f_min: float = 0.0
    """Lowest mel frequency in Hz."""
    f_max: float | None = None
    """Highest mel frequency in Hz; ``None`` is half the sampling rate."""
    normalize: bool | Literal["clip", "band"] = True
    """Scale each clip's features to zero mean and unit variance over its frames (padding excluded): over all bins
    (``true`` / ``clip``), or each bin on its own (``band``: cepstral mean and variance normalisation, which also
    removes a microphone's or a room's fixed colouring); ``false``: raw log energies."""

    @classmethod
    def coerce(cls, value: SpectrogramConfig | dict[str, Any] | None) -> SpectrogramConfig:
        if value is None:
            return cls()
        return cls(**value) if isinstance(value, dict) else value

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


class Spectrogram(nn.Module):
    """``(batch, samples)`` waveforms -> ``(batch, 1, bins, frames)`` features and a ``(batch, frames)`` frame mask.

    Args:
        config: Window, hop, bands and kind.
        sampling_rate: The waveforms' sampling rate in Hz.
    """

    def __init__(self, config: SpectrogramConfig, sampling_rate: int) -> None:
        super().__init__()
        from transformers.audio_utils import mel_filter_bank

        self.config = config
        self.n_fft = max(8, round(sampling_rate * config.window_ms / 1000))
        self.hop = max(1, round(sampling_rate * config.hop_ms / 1000))
        f_max = config.f_max or sampling_rate / 2
        if not 0 <= config.f_min < f_max <= sampling_rate / 2:
            raise PtftError(f"features: need 0 <= f_min < f_max <= {sampling_rate / 2:g} Hz (half the sampling rate), "
                            f"got f_min={config.f_min}, f_max={config.f_max}")
        self.register_buffer("window", torch.hann_window(self.n_fft), persistent=False)
        bank = mel_filter_bank(num_frequency_bins=self.n_fft // 2 + 1, num_mel_filters=config.n_mels,
                               min_frequency=config.f_min, max_frequency=f_max, sampling_rate=sampling_rate,
                               norm="slaney", mel_scale="slaney")
        self.register_buffer("mel", torch.tensor(bank, dtype=torch.float32), persistent=False)
        if config.kind == "mfcc":
            from scipy.fft import dct

            if config.n_mfcc > config.n_mels:
                raise PtftError(f"features: n_mfcc ({config.n_mfcc}) cannot exceed n_mels ({config.n_mels})")
            basis = dct(np.eye(config.n_mels), type=2, norm="ortho", axis=0)[: config.n_mfcc]
            self.register_buffer("dct", torch.tensor(basis, dtype=torch.float32), persistent=False)
        self.bins = {"logmel": config.n_mels, "mfcc": config.n_mfcc, "stft": self.n_fft // 2 + 1}[config.kind]

    def frames(self, samples: torch.Tensor) -> torch.Tensor:
        """Frames a clip of ``samples`` samples gives (``torch.stft`` with ``center=True``)."""
        return samples // self.hop + 1

    def forward(self, waves: torch.Tensor, attention_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.autocast(waves.device.type, enabled=False):
            spec = torch.stft(waves.float(), self.n_fft, self.hop, window=self.window, center=True,
                              return_complex=True).abs().pow(2)  # (batch, freq, frames)
            if self.config.kind == "stft":
                feats = torch.log(spec + 1e-10)
            else:
                feats = torch.log(torch.einsum("bft,fm->bmt", spec, self.mel) + 1e-6)
                if self.config.kind == "mfcc":
                    feats = torch.einsum("bmt,cm->bct", feats, self.dct)
            lengths = attention_mask.sum(-1) if attention_mask is not None else torch.full(
                (waves.shape[0],), waves.shape[-1], device=waves.device)
            mask = torch.arange(feats.shape[-1], device=waves.device) < self.frames(lengths).unsqueeze(-1)
            if self.config.normalize:
                weights = mask.unsqueeze(1).float()  # (batch, 1, frames)
                dims = (2,) if self.config.normalize == "band" else (1, 2)  # per bin, or over all bins
                count = weights.expand_as(feats).sum(dims, keepdim=True).clamp(min=1)
                mean = (feats * weights).sum(dims, keepdim=True) / count
                var = ((feats - mean) ** 2 * weights).sum(dims, keepdim=True) / count
                feats = (feats - mean) / var.clamp(min=1e-10).sqrt() * weights
            return feats.unsqueeze(1), mask


@dataclass(frozen=True)
class SpecAugmentConfig:
    """SpecAugment (Park et al., 2019) masks on training spectrograms (``model.init_args.spec_augment``).

    Each mask's width is drawn uniformly in [0, width]; masked bins are set to 0 (the normalised mean).
    """

    freq_masks: int = 2
    """Frequency masks per clip."""
    freq_width: int = 8
    """Largest frequency-mask width in bins."""
    time_masks: int = 2
    """Time masks per clip."""
    time_width: int = 10
    """Largest time-mask width in frames."""

    @classmethod
    def coerce(cls, value: SpecAugmentConfig | dict[str, Any] | None) -> SpecAugmentConfig | None:
        return cls(**value) if isinstance(value, dict) else value

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _masks(count: int, width: int, size: int, batch: int, device: torch.device) -> torch.Tensor:
    """``(batch, size)``: True inside any of ``count`` random spans of width <= ``width``."""
    if count == 0 or width == 0:
        return torch.zeros(batch, size, dtype=torch.bool, device=device)
    widths = torch.randint(0, min(width, size) + 1, (batch, count, 1), device=device)
    starts = (torch.rand(batch, count, 1, device=device) * (size - widths + 1)).long()
    positions = torch.arange(size, device=device)
    return ((positions >= starts) & (positions < starts + widths)).any(1)


def spec_augment(feats: torch.Tensor, config: SpecAugmentConfig) -> torch.Tensor:
    """``feats`` ``(batch, 1, bins, frames)`` with random frequency and time bands set to 0.

    A few tensor comparisons: torchaudio's ``FrequencyMasking`` / ``TimeMasking`` are the usual implementation and
    torchaudio is not a ptft dependency; transformers' ``_compute_mask_indices`` masks time steps of wav2vec2-style
    models only.
    """
    batch, _, bins, frames = feats.shape
    freq = _masks(config.freq_masks, config.freq_width, bins, batch, feats.device)
    time = _masks(config.time_masks, config.time_width, frames, batch, feats.device)
    keep = ~(freq.unsqueeze(-1) | time.unsqueeze(1))
    return feats * keep.unsqueeze(1)
