"""Sharded checkpoints (FSDP, DeepSpeed) as one ordinary checkpoint dict, for ``ptft export`` and ``load_checkpoint``.

Lightning writes a checkpoint as a folder when the strategy shards it:

- ``FSDPStrategy(state_dict_type="sharded")``: ``torch.distributed.checkpoint`` files (``.metadata``,
  ``__<rank>_0.distcp``) holding ``{"model": ..., "optimizer_0": ...}``, plus ``meta.pt`` with everything else
  (hyperparameters, epoch, callbacks' states). Lightning's own consolidation (what
  ``python -m lightning.pytorch.utilities.consolidate_checkpoint`` runs) reads it into the usual layout.
- ``DeepSpeedStrategy``: DeepSpeed's ZeRO files under ``<folder>/checkpoint/`` and a ``latest`` tag file. Lightning's
  ``convert_zero_checkpoint_to_fp32_state_dict`` (DeepSpeed's ``zero_to_fp32``) gathers the fp32 weights.

Both are used as they are; nothing here reads the shard formats itself.
"""

from __future__ import annotations

import tempfile
import warnings
from pathlib import Path
from typing import Any, Literal

import torch

from ptft.core.errors import PtftError

ShardedKind = Literal["fsdp", "deepspeed"]


def sharded_kind(folder: Path) -> ShardedKind | None:
    """Which strategy wrote checkpoint folder ``folder``, or ``None`` when it is no sharded checkpoint."""
    from lightning.fabric.utilities.load import _METADATA_FILENAME

    if (folder / _METADATA_FILENAME).is_file() and (folder / ".metadata").is_file():
        return "fsdp"
    if (folder / "latest").is_file():
        return "deepspeed"
    return None


def consolidate(folder: str | Path) -> dict[str, Any]:
    """The checkpoint dict of a sharded checkpoint folder, as one process would have saved it (``state_dict`` with
    whole tensors on CPU, hyperparameters, loops' and callbacks' states).

    The whole model must fit in CPU memory. FSDP folders are read with ``weights_only`` loading (Lightning's
    ``meta.pt`` and torch's distributed-checkpoint files hold plain tensors and containers). DeepSpeed's own files
    are pickled objects: converting them unpickles them (DeepSpeed's ``zero_to_fp32`` does), so convert only
    checkpoints you trust; the result is then read back with ``weights_only`` loading.

    Args:
        folder: A checkpoint folder written by Lightning's ``FSDPStrategy(state_dict_type="sharded")`` or
            ``DeepSpeedStrategy``.

    Raises:
        PtftError: The folder is neither, or DeepSpeed is not installed for a DeepSpeed folder.
    """
    folder = Path(folder).expanduser()
    kind = sharded_kind(folder)
    if kind == "fsdp":
        return _consolidate_fsdp(folder)
    if kind == "deepspeed":
        return _consolidate_deepspeed(folder)
    raise PtftError(
        f"checkpoint {str(folder)!r} is a folder but not a sharded checkpoint (FSDP: meta.pt and .metadata; "
        "DeepSpeed: a 'latest' file): give a .ckpt file or the folder Lightning wrote"
    )


def _consolidate_fsdp(folder: Path) -> dict[str, Any]:
    from lightning.fabric.utilities.load import _load_distributed_checkpoint
    from lightning.pytorch.utilities.consolidate_checkpoint import _format_checkpoint

    # Lightning's `python -m lightning.pytorch.utilities.consolidate_checkpoint FOLDER`, without the file in between.
    return _format_checkpoint(_load_distributed_checkpoint(folder))


def _consolidate_deepspeed(folder: Path) -> dict[str, Any]:
    import importlib.util

    if importlib.util.find_spec("deepspeed") is None:
        raise PtftError(f"{folder} is a DeepSpeed checkpoint: reading it needs DeepSpeed (pip install deepspeed)")
    from lightning.pytorch.utilities.deepspeed import convert_zero_checkpoint_to_fp32_state_dict

    warnings.warn(
        f"{folder}: converting a DeepSpeed checkpoint unpickles DeepSpeed's files (not weights_only): only convert "
        "checkpoints you trust", stacklevel=3,
    )
    with tempfile.TemporaryDirectory() as tmp:
        output = Path(tmp) / "consolidated.ckpt"
        convert_zero_checkpoint_to_fp32_state_dict(folder, output)
        return torch.load(output, map_location="cpu", weights_only=True)
