"""Helpers shared by tests, importable by name (also from DDP worker processes)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
import torch


def trainer(root: Path, **kwargs: Any) -> L.Trainer:
    """A quiet CPU trainer for tests."""
    defaults = dict(
        accelerator="cpu", devices=1, logger=False, enable_progress_bar=False, enable_model_summary=False,
        enable_checkpointing=False, num_sanity_val_steps=0, default_root_dir=str(root), deterministic=True,
    )
    return L.Trainer(**{**defaults, **kwargs})


def weights(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def changed(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor], atol: float = 0.0) -> set[str]:
    """Names of tensors that differ between two state dicts."""
    return {k for k in before if k in after and not torch.allclose(before[k], after[k], atol=atol, rtol=0)}


class SaveRankWeights(L.Callback):
    """Writes each rank's model weights at the end of training (to compare DDP replicas)."""

    def __init__(self, folder: str) -> None:
        self.folder = folder

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        torch.save(weights(pl_module.model), Path(self.folder) / f"rank{trainer.global_rank}.pt")


class RecordLrs(L.Callback):
    """Records, before every optimizer step, each group's lr and whether it got gradients."""

    def __init__(self) -> None:
        self.lrs: list[list[float]] = []
        self.updated: list[list[bool]] = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        self.lrs.append([g["lr"] for g in optimizer.param_groups])
        self.updated.append([any(p.grad is not None for p in g["params"]) for g in optimizer.param_groups])
