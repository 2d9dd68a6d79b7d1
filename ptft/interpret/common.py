"""Shared by the per-example explanations of every modality: evaluation mode with gradients that leaves no trace,
target class ids checked, and the module's class probabilities."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator, Sequence

import torch
from torch import nn

from ptft.core.errors import PtftError

__all__ = ["class_probabilities", "explaining", "target_ids"]


@contextmanager
def explaining(module: nn.Module) -> Iterator[None]:
    """Evaluation mode with gradients on (also inside Lightning's ``inference_mode``), leaving no trace: every
    submodule's training flag (a frozen BatchNorm stays in eval) and every parameter's ``.grad`` are restored."""
    modes = {m: m.training for m in module.modules()}
    grads = {p: p.grad for p in module.parameters()}
    module.eval()
    try:
        with torch.inference_mode(False), torch.enable_grad():
            yield
    finally:
        for m, training in modes.items():
            m.training = training
        for p, grad in grads.items():
            p.grad = grad


def target_ids(targets: torch.Tensor | Sequence[int], count: int, num_labels: int) -> list[int]:
    """``targets`` as ``count`` class ids in ``[0, num_labels)``; a one-line error otherwise."""
    ids = [int(t) for t in (targets.tolist() if isinstance(targets, torch.Tensor) else targets)]
    if len(ids) != count:
        raise PtftError(f"give one target class per example: {len(ids)} targets for {count} examples")
    bad = [t for t in ids if not 0 <= t < num_labels]
    if bad:
        raise PtftError(f"target class {bad[0]} is not in [0, {num_labels}) (the model's classes)")
    return ids


def class_probabilities(module: Any, batch: dict[str, Any]) -> torch.Tensor:
    """``(batch, classes)`` class probabilities of the module for ``batch`` (evaluation mode, as it predicts)."""
    with explaining(module), torch.no_grad():
        return module(batch).float().softmax(dim=-1).cpu()
