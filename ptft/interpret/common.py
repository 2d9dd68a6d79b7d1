"""Shared by the per-example explanations of every modality: evaluation mode with gradients that leaves no trace,
target class ids checked, the module's class probabilities, and attention rollout (text and ViTs)."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator, Sequence

import torch
from torch import nn

from ptft.core.errors import PtftError

__all__ = ["class_probabilities", "explaining", "rollout", "target_ids"]


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


def rollout(attentions: Sequence[torch.Tensor], head_fusion: str = "mean", discard_ratio: float = 0.0,
            mask: torch.Tensor | None = None) -> torch.Tensor:
    """Attention rollout (Abnar & Zuidema, 2020) of per-layer ``(B, heads, N, N)`` attention: heads fused (``mean``,
    ``max`` or ``min``), the residual path added as the identity, rows renormalised, layers multiplied from the first
    to the last. Returns ``(B, N, N)``: row ``i`` is how much each input token flows into output token ``i``.

    Args:
        attentions: Each layer's attention probabilities, first layer first.
        head_fusion: How the heads are combined.
        discard_ratio: Fraction of each fused matrix's weakest entries zeroed (never token 0 attending to itself),
            as jacobgil/vit-explain does to sharpen the maps.
        mask: ``(B, N)`` real-token mask: padding keys get no flow, so rows sum to 1 over the real tokens.
    """
    fuse = {"mean": lambda a: a.mean(1), "max": lambda a: a.amax(1), "min": lambda a: a.amin(1)}
    if head_fusion not in fuse:
        raise PtftError(f"head_fusion must be one of {sorted(fuse)}, got {head_fusion!r}")
    if not 0.0 <= discard_ratio < 1.0:
        raise PtftError(f"discard_ratio must be in [0, 1), got {discard_ratio}")
    if not attentions:
        raise PtftError("the model has no attention blocks to roll out")
    keys = None if mask is None else mask.to(attentions[0].device, torch.float32)[:, None, :]
    result = None
    for attention in attentions:
        fused = fuse[head_fusion](attention.float())
        batch, tokens, _ = fused.shape
        if discard_ratio > 0:
            flat = fused.flatten(1)
            weakest = flat.topk(int(flat.shape[1] * discard_ratio), dim=1, largest=False).indices
            kept = flat[:, :1].clone()
            flat = flat.scatter(1, weakest, 0.0)
            flat[:, :1] = kept
            fused = flat.view(batch, tokens, tokens)
        step = fused + torch.eye(tokens, device=fused.device)
        if keys is not None:
            step = step * keys
        step = step / step.sum(-1, keepdim=True).clamp_min(1e-12)
        result = step if result is None else step @ result
    return result
