"""Which parts of a sound an audio classifier listens to: input x gradient saliency over a spectrogram (Captum).

Explains :class:`ptft.audio.SpectrogramClassifier` (a timm CNN over the module's own spectrogram) and
:class:`ptft.audio.AudioClassifier` (Hugging Face audio models), as a ``(bins, frames)`` map shown over a
spectrogram. The measure is ``|input x d logit / d input|`` (Captum's ``InputXGradient``) in every case:

* ``SpectrogramClassifier``: w.r.t. the normalised spectrogram the CNN sees (``module.spectrogram``).
* ``AudioClassifier`` fed filter banks from its feature extractor (Whisper's ``input_features``, AST's 3-D
  ``input_values``): w.r.t. those features, laid out bins x frames.
* ``AudioClassifier`` fed raw waveforms (wav2vec2, HuBERT, WavLM: 2-D ``input_values``): a waveform has no frequency
  axis, so the model is fed ``istft(X)`` and attributed w.r.t. the STFT coefficients ``X`` of the waveform (25 ms
  windows every 10 ms; ``istft(stft(x)) == x``, so the model sees the same input). ``Re(X * conj(d logit / d X))`` is
  each time-frequency cell's first-order share of the logit: the cells sum to the waveform's own input x gradient
  (:func:`stft_input_x_gradient`). Their magnitudes are pooled into the 64 mel bands of the waveform's log-mel
  spectrogram (:class:`ptft.audio.features.Spectrogram`), the picture they are shown over.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from ptft.core.errors import PtftError
from ptft.interpret.common import explaining, target_ids

__all__ = ["input_x_gradient", "saliency_files", "saliency_maps", "stft_input_x_gradient"]

#: Rate assumed for the time / frequency axes of a waveform model whose rate is unknown (most HF speech models').
DEFAULT_RATE = 16000


@dataclass
class _Explained:
    """A batch's saliency, the spectrogram it is shown over (both ``(B, bins, frames)``, CPU) and each clip's
    number of frames (padding excluded)."""

    saliency: torch.Tensor
    spectrogram: torch.Tensor
    frames: list[int]
    bins_label: str
    measure: str


def input_x_gradient(forward: Callable[[torch.Tensor], torch.Tensor], inputs: torch.Tensor,
                     targets: Sequence[int]) -> torch.Tensor:
    """Captum ``InputXGradient``: ``inputs * d logit[target] / d inputs`` for each example (signed)."""
    from captum.attr import InputXGradient

    with torch.inference_mode(False):
        inputs = inputs.detach().clone().requires_grad_(True)
        target = torch.tensor(list(targets), device=inputs.device)
    return InputXGradient(forward).attribute(inputs, target=target).detach()


def stft_input_x_gradient(forward: Callable[[torch.Tensor], torch.Tensor], waves: torch.Tensor,
                          targets: Sequence[int], n_fft: int, hop: int, window: torch.Tensor) -> torch.Tensor:
    """Input x gradient of a waveform model in the time-frequency plane: ``(B, n_fft // 2 + 1, frames)`` signed
    shares of each target logit, one per STFT cell (``torch.stft`` with ``center=True``).

    ``forward`` takes ``(B, samples)`` waveforms; it is fed ``istft(X)`` and attributed w.r.t. ``X`` (as real and
    imaginary parts). The map ``X -> waveform`` is linear, so the cells sum to ``sum(waves * d logit / d waves)``.
    """
    samples = waves.shape[-1]
    spectrum = torch.stft(waves.detach().float(), n_fft, hop, window=window, center=True, return_complex=True)

    def from_spectrum(parts: torch.Tensor) -> torch.Tensor:
        wave = torch.istft(torch.view_as_complex(parts.contiguous()), n_fft, hop, window=window, center=True,
                           length=samples)
        return forward(wave.to(waves.dtype))

    return input_x_gradient(from_spectrum, torch.view_as_real(spectrum), targets).sum(-1)


def _lengths(batch: dict[str, Any], key: str) -> torch.Tensor:
    """Each clip's samples (``attention_mask``), or the padded length when the batch has no mask."""
    mask = batch.get("attention_mask")
    values = batch[key]
    return mask.sum(-1) if mask is not None else torch.full((len(values),), values.shape[-1], device=values.device)


def _spectrogram_classifier(module: Any, batch: dict[str, Any], targets: list[int]) -> _Explained:
    """Saliency w.r.t. the normalised spectrogram the CNN sees (computed once, without SpecAugment)."""
    spec = module.spectrogram(batch)  # explaining(): evaluation mode, no SpecAugment
    saliency = input_x_gradient(module.model, spec, targets).abs()[:, 0]
    frames = module.frontend.frames(_lengths(batch, "input_values")).clamp(max=spec.shape[-1])
    return _Explained(saliency.cpu(), spec[:, 0].detach().cpu(), frames.tolist(), "mel band",
                      "|spectrogram x d logit / d spectrogram|")


def _hf_config(module: Any) -> Any:
    model = module.model
    return getattr(model, "config", None) or model.encoder.config


def _bins_first(module: Any, features: torch.Tensor) -> bool:
    """Whether filter banks are ``(B, bins, frames)`` (Whisper) rather than ``(B, frames, bins)`` (AST), from
    the band count the model's config names."""
    config = _hf_config(module)
    bins = next((getattr(config, k) for k in ("num_mel_bins", "input_feat_per_channel", "feature_size")
                 if isinstance(getattr(config, k, None), int)), None)
    if features.dim() != 3 or bins is None or bins not in features.shape[1:]:
        raise PtftError(f"saliency cannot tell the frequency axis of the filter banks {tuple(features.shape)} "
                        f"({type(module.model).__name__}: its config names no num_mel_bins matching them)")
    return features.shape[1] == bins


def _hf_features(module: Any, batch: dict[str, Any], targets: list[int], key: str) -> _Explained:
    """Saliency w.r.t. the feature extractor's filter banks (``batch[key]``)."""
    others = {k: v for k, v in batch.items() if k not in ("labels", key)}
    features = batch[key]
    saliency = input_x_gradient(lambda x: module({**others, key: x}), features, targets).abs()
    if not _bins_first(module, features):
        features, saliency = features.transpose(1, 2), saliency.transpose(1, 2)
    frames = [features.shape[-1]] * len(features)  # feature extractors pad with silence-like values, no frame mask
    return _Explained(saliency.cpu(), features.detach().float().cpu(), frames, "feature bin",
                      f"|{key} x d logit / d {key}|")


def _waveform_rate(module: Any) -> int:
    rate = getattr(module, "sampling_rate", None) or getattr(_hf_config(module), "sampling_rate", None)
    return int(rate or DEFAULT_RATE)


def _hf_waveform(module: Any, batch: dict[str, Any], targets: list[int]) -> _Explained:
    """Input x gradient of the waveform's STFT cells, pooled into the mel bands of its log-mel spectrogram (see the
    module docstring)."""
    from ptft.audio.features import Spectrogram, SpectrogramConfig

    others = {k: v for k, v in batch.items() if k not in ("labels", "input_values")}
    waves = batch["input_values"]
    frontend = Spectrogram(SpectrogramConfig(), _waveform_rate(module)).to(waves.device)
    cells = stft_input_x_gradient(lambda x: module({**others, "input_values": x}), waves, targets, frontend.n_fft,
                                  frontend.hop, frontend.window)
    saliency = torch.einsum("bft,fm->bmt", cells.abs(), frontend.mel)
    with torch.no_grad():
        spec, _ = frontend(waves.detach().float(), batch.get("attention_mask"))
    frames = frontend.frames(_lengths(batch, "input_values")).clamp(max=spec.shape[-1])
    return _Explained(saliency.cpu(), spec[:, 0].cpu(), frames.tolist(), "mel band",
                      "|STFT cell x d logit / d cell| in mel bands")


def _explain(module: Any, batch: dict[str, Any], targets: torch.Tensor | Sequence[int]) -> _Explained:
    from ptft.audio.modules import AudioClassifier, SpectrogramClassifier

    if not isinstance(module, (SpectrogramClassifier, AudioClassifier)):
        raise PtftError(f"saliency explains ptft.audio.SpectrogramClassifier and AudioClassifier models, not "
                        f"{type(module).__name__}")
    key = "input_features" if "input_features" in batch else "input_values"
    if key not in batch:
        raise PtftError(f"saliency needs the batch's input_values or input_features (the collated audio), got keys "
                        f"{sorted(batch)}")
    ids = target_ids(targets, len(batch[key]), module.num_labels)
    with explaining(module):
        if isinstance(module, SpectrogramClassifier):
            return _spectrogram_classifier(module, batch, ids)
        if batch[key].dim() == 3:  # filter banks: Whisper's input_features, AST's input_values (frames, bins)
            return _hf_features(module, batch, ids, key)
        return _hf_waveform(module, batch, ids)


def saliency_maps(module: Any, batch: dict[str, Any], targets: torch.Tensor | Sequence[int]) -> torch.Tensor:
    """Input x gradient saliency of each clip's target logit over the spectrogram the model sees.

    Captum's ``InputXGradient`` (``|input x d logit / d input|``) rather than ``Saliency`` (``|d logit / d input|``):
    a normalised spectrogram's zero is the clip's mean level, the value SpecAugment fills masked bins with, i.e. the
    model's "nothing here"; input x gradient is each bin's first-order share of the logit against that. Plain
    gradients saturate on what the model has already found: on a spectrogram CNN trained to tell a 1 kHz burst from
    a 2.5 kHz one, ``|grad|`` was lower in the burst's frames than elsewhere while input x gradient was 5-8 times
    higher in the burst's time-frequency box than outside it. Raw waveforms (wav2vec2-like models) are attributed
    cell by cell of their STFT (module docstring).

    Args:
        module: A :class:`ptft.audio.SpectrogramClassifier` or :class:`ptft.audio.AudioClassifier`.
        batch: A collated batch on the module's device: ``input_values`` (waveforms, or AST's filter banks) or
            ``input_features``.
        targets: The class to explain for each clip.

    Returns:
        ``(B, bins, frames)`` non-negative saliency on the CPU, low frequencies first, zero on padded frames.
    """
    explained = _explain(module, batch, targets)
    saliency = explained.saliency.clone()
    for i, frames in enumerate(explained.frames):
        saliency[i, :, frames:] = 0
    return saliency


def saliency_files(module: Any, batch: dict[str, Any], targets: torch.Tensor | Sequence[int], folder: str | Path,
                   first_index: int) -> list[Path]:
    """Per clip ``{index:04d}-saliency.png`` in ``folder``: the spectrogram, and the saliency over it (padding cut),
    titled with the target class and its probability."""
    import matplotlib.pyplot as plt

    from ptft.interpret.output import save_figure
    from ptft.interpret.common import class_probabilities
    from ptft.interpret.vision import class_caption

    explained = _explain(module, batch, targets)
    ids = target_ids(targets, len(explained.saliency), module.num_labels)
    probs = class_probabilities(module, batch)
    paths = []
    for i, target in enumerate(ids):
        frames = max(1, explained.frames[i])
        spec = explained.spectrogram[i, :, :frames].numpy()
        heat = explained.saliency[i, :, :frames]
        heat = (heat / heat.max().clamp(min=1e-12)).numpy()
        figure, (top, bottom) = plt.subplots(2, 1, figsize=(6, 5), sharex=True)
        top.imshow(spec, origin="lower", aspect="auto", cmap="magma")
        top.set_title("spectrogram", fontsize=9)
        bottom.imshow(spec, origin="lower", aspect="auto", cmap="gray")
        bottom.imshow(heat, origin="lower", aspect="auto", cmap="jet", alpha=0.5, vmin=0, vmax=1)
        bottom.set_title(f"saliency {explained.measure}", fontsize=9)
        bottom.set_xlabel("frame")
        for axis in (top, bottom):
            axis.set_ylabel(explained.bins_label)
        figure.suptitle(class_caption(module, probs[i], target), fontsize=10)
        paths.append(save_figure(figure, Path(folder) / f"{first_index + i:04d}-saliency.png"))
    return paths
