"""Layer discovery: a depth index for every parameter, from embeddings (0) to the task head (top).

Used by layer-wise learning-rate decay, discriminative learning rates and gradual unfreezing.
"""

from __future__ import annotations

import re
from collections.abc import Callable

from torch import nn

from ptft.core.errors import PtftError

# Repeated blocks of Hugging Face models: bert.encoder.layer.3, gpt2 h.3, t5 block.3, bart/llama layers.3, vit blocks.3
_BLOCK = re.compile(r"(?:^|\.)(?:layer|layers|h|block|blocks)\.(\d+)\.")


def hf_layer_ids(model: nn.Module, is_head: Callable[[str], bool]) -> dict[str, int]:
    """Layer index per parameter of a Hugging Face model.

    Parameters before the first block (embeddings) are layer 0; each block (in registration order, so an
    encoder's blocks come before a decoder's) is one layer; parameters between or after blocks (a final norm, the
    pooler) join the block before them; the task head (``is_head``) is the top layer.
    """
    ids: dict[str, int] = {}
    block_ids: dict[tuple[str, str], int] = {}
    current = 0
    head: list[str] = []
    for name, _ in model.named_parameters():
        if is_head(name):
            head.append(name)
            continue
        match = _BLOCK.search(name)
        if match:
            key = (name[: match.start(1)], match.group(1))  # (path of the block list, index)
            if key not in block_ids:
                block_ids[key] = len(block_ids) + 1
            current = block_ids[key]
        ids[name] = current
    top = max(ids.values(), default=0) + 1
    ids.update({name: top for name in head})
    return ids


def timm_layer_ids(model: nn.Module) -> dict[str, int]:
    """Layer index per parameter of a timm model, from the model's own ``group_matcher`` (fine-grained).

    Unmatched parameters (the head, a final norm) take the top index, as in timm's ``param_groups_layer_decay``.
    A model without ``group_matcher`` gets timm's own fallback, ``auto_group_layers`` (parameters in registration
    order, 12 per layer, the classifier on top), with a warning: its layers are chunks, not the model's blocks.
    A model whose parameters form a single layer (nothing to decay or unfreeze by depth) stops with one line.
    """
    from timm.models import group_parameters

    if hasattr(model, "group_matcher"):
        return group_parameters(model, model.group_matcher(coarse=False), reverse=True)
    from lightning.pytorch.utilities import rank_zero_warn
    from timm.optim import auto_group_layers

    ids = auto_group_layers(model)
    if len(set(ids.values())) < 2:
        raise PtftError(
            f"{type(model).__name__} has no group_matcher and its parameters form a single layer: layer-wise decay, "
            "head learning rates and freezing by depth cannot apply; use a timm model with group_matcher"
        )
    rank_zero_warn(
        f"{type(model).__name__} has no group_matcher: using timm's auto_group_layers, {max(ids.values())} layers "
        "of 12 parameters each in registration order (the classifier on top); check them with ptft inspect-layers"
    )
    return ids


def describe_layers(model: nn.Module, layer_ids: dict[str, int], groups: list[dict] | None = None) -> str:
    """A readable table: layer index, parameter count, learning rate(s) and the parameter names it covers."""
    by_layer: dict[int, list[tuple[str, nn.Parameter]]] = {}
    params = dict(model.named_parameters())
    for name, layer in layer_ids.items():
        by_layer.setdefault(layer, []).append((name, params[name]))
    lrs: dict[str, float] = {}
    for group in groups or []:
        for name in group["names"]:
            lrs[name] = group["lr"]
    lines = [f"{'layer':>5}  {'params':>10}  {'trainable':>9}  {'lr':>9}  names"]
    for layer in sorted(by_layer):
        items = by_layer[layer]
        count = sum(p.numel() for _, p in items)
        trainable = sum(p.numel() for _, p in items if p.requires_grad)
        layer_lrs = sorted({lrs[n] for n, _ in items if n in lrs})
        lr = "-" if not layer_lrs else (f"{layer_lrs[0]:.2e}" if len(layer_lrs) == 1 else "mixed")
        names = _summarise([n for n, _ in items])
        lines.append(f"{layer:>5}  {count:>10,}  {trainable:>9,}  {lr:>9}  {names}")
    return "\n".join(lines)


def _summarise(names: list[str], limit: int = 3) -> str:
    """Common prefixes of the parameter names: ``bert.encoder.layer.0.*`` rather than 16 names."""
    prefixes: list[str] = []
    for name in names:
        prefix = name.rsplit(".", 2)[0] + ".*" if name.count(".") >= 2 else name
        if prefix not in prefixes:
            prefixes.append(prefix)
    shown = ", ".join(prefixes[:limit])
    return shown + (f", … (+{len(prefixes) - limit})" if len(prefixes) > limit else "")
