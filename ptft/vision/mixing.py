"""Mixup / CutMix of training batches with timm's ``Mixup``, and the soft-target loss that goes with it."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Literal

import torch

from ptft.core.errors import PtftError


@dataclass(frozen=True)
class MixupConfig:
    """Mixup / CutMix settings (``model.init_args.mixup`` in a recipe), passed to ``timm.data.Mixup``.

    Targets become soft (a mix of two one-hot labels, smoothed by the module's ``label_smoothing``) and the training
    loss is timm's ``SoftTargetCrossEntropy``. Validation and test batches are never mixed.
    """

    mixup_alpha: float = 0.8
    """Mixup's Beta(alpha, alpha) mixing coefficient; 0 disables mixup."""
    cutmix_alpha: float = 1.0
    """CutMix's Beta(alpha, alpha) box-area coefficient; 0 disables CutMix."""
    cutmix_minmax: tuple[float, float] | None = None
    """CutMix box size as a (min, max) fraction of the image instead of ``cutmix_alpha``."""
    prob: float = 1.0
    """Probability of mixing a batch (or an element / pair, see ``mode``)."""
    switch_prob: float = 0.5
    """Probability of CutMix instead of mixup when both are on."""
    mode: Literal["batch", "pair", "elem"] = "batch"
    """One draw per batch, per pair of examples, or per example."""

    @classmethod
    def coerce(cls, value: MixupConfig | dict[str, Any] | None) -> MixupConfig | None:
        """Accepts the dataclass or a plain dict (as stored in a checkpoint's hyperparameters)."""
        if isinstance(value, dict):
            value = dict(value)
            if value.get("cutmix_minmax") is not None:
                value["cutmix_minmax"] = tuple(value["cutmix_minmax"])
            value = cls(**value)
        if value is not None and value.mixup_alpha <= 0 and value.cutmix_alpha <= 0 and value.cutmix_minmax is None:
            raise PtftError("mixup: set mixup_alpha or cutmix_alpha above 0 (or mixup: null to turn mixing off)")
        return value

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


class BatchMixer:
    """timm's ``Mixup`` on a batch of images and integer labels, returning mixed images and soft targets.

    timm mixes an example with its mirror in the batch and needs an even batch; the last example of an odd batch (the
    end of an epoch) is left unmixed, with a smoothed one-hot target.
    """

    def __init__(self, config: MixupConfig, num_classes: int, label_smoothing: float) -> None:
        from timm.data import Mixup

        self.num_classes = num_classes
        self.label_smoothing = label_smoothing
        self.mixup = Mixup(
            mixup_alpha=config.mixup_alpha,
            cutmix_alpha=config.cutmix_alpha,
            cutmix_minmax=list(config.cutmix_minmax) if config.cutmix_minmax else None,
            prob=config.prob,
            switch_prob=config.switch_prob,
            mode=config.mode,
            label_smoothing=label_smoothing,
            num_classes=num_classes,
        )

    def __call__(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        from timm.data.mixup import mixup_target

        even = len(images) - len(images) % 2
        if even == len(images):
            return self.mixup(images.clone(), labels)  # clone: timm mixes in place
        rest = mixup_target(labels[even:], self.num_classes, 1.0, self.label_smoothing)
        if even == 0:
            return images, rest
        mixed, targets = self.mixup(images[:even].clone(), labels[:even])
        return torch.cat([mixed, images[even:]]), torch.cat([targets, rest])
