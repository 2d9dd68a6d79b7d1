"""Test-time BatchNorm adaptation: the statistics of an unseen domain's inputs, not of the training data."""

from __future__ import annotations

from typing import Any, Literal

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import nn
from torch.utils.data import DataLoader

from ptft.core.errors import PtftError

Stage = Literal["test", "predict"]


def batch_norm_layers(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    """The BatchNorm layers (1d/2d/3d, synchronised) that keep running statistics."""
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]


def _fresh(loader: Any) -> Any:
    """A loader over the same batches that leaves ``loader``'s own iteration alone: the stage has already started
    iterating ``loader``, and a second ``iter()`` of a ``persistent_workers`` loader, or of the batch sampler Lightning
    wraps for prediction, would reset that iteration (the stage would then see only the batches left)."""
    if not isinstance(loader, DataLoader):
        return loader
    common = {"collate_fn": loader.collate_fn, "num_workers": loader.num_workers, "pin_memory": loader.pin_memory}
    batch_sampler = loader.batch_sampler
    # Lightning's prediction wrapper (_IndexBatchSamplerWrapper) keeps one shared iterator: use the sampler inside it
    batch_sampler = getattr(batch_sampler, "_batch_sampler", batch_sampler)
    if batch_sampler is not None:
        return DataLoader(loader.dataset, batch_sampler=batch_sampler, **common)
    return DataLoader(loader.dataset, batch_size=loader.batch_size, sampler=loader.sampler, **common)


class AdaptBatchNorm(L.Callback):
    """AdaBN (Li et al., 2016): before testing or predicting, every BatchNorm layer's running mean and variance are
    re-estimated on that stage's own inputs (labels unused), then the trained statistics come back when the stage ends,
    so checkpoints and later stages never see the adapted ones.

    Use it when the test data is a shifted domain that arrives as a set: a new speaker or microphone, another camera,
    scanner or stain. It is transductive (the statistics come from the data being scored), and only models with
    BatchNorm change (CNNs; not transformers). The adaptation pass runs the module in eval mode with only the
    BatchNorm layers in train mode, so training-time augmentation (SpecAugment, dropout) stays off, as in the
    scored pass. Under DDP the ranks' statistics are averaged, as one process averages its batches'.

    ``torch.optim.swa_utils.update_bn`` does the same re-estimation but puts the whole model in train mode (turning
    augmentation and dropout on), takes tensor batches only and does not average across ranks: hence this callback.

    Args:
        stages: The stages whose inputs the statistics are estimated from, before they are scored (``None``: test and
            predict).
        max_batches: Batches of that stage used for the estimate (``None``: all of them).
    """

    def __init__(self, stages: list[Stage] | None = None, max_batches: int | None = None) -> None:
        self.stages = list(stages) if stages is not None else ["test", "predict"]
        unknown = set(self.stages) - {"test", "predict"}
        if unknown:
            raise PtftError(f"AdaptBatchNorm: stages must be test and/or predict, got {sorted(unknown)}")
        if max_batches is not None and max_batches < 1:
            raise PtftError(f"AdaptBatchNorm: max_batches must be >= 1 or null, got {max_batches}")
        self.max_batches = max_batches
        self._saved: list[dict[str, Any]] | None = None

    def on_test_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if "test" in self.stages:
            self._adapt(trainer, pl_module, trainer.test_dataloaders)

    def on_test_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._restore(pl_module)

    def on_predict_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if "predict" in self.stages:
            self._adapt(trainer, pl_module, trainer.predict_dataloaders)

    def on_predict_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._restore(pl_module)

    @torch.no_grad()
    def _adapt(self, trainer: L.Trainer, pl_module: L.LightningModule, loaders: Any) -> None:
        layers = batch_norm_layers(pl_module)
        if not layers:
            raise PtftError(f"AdaptBatchNorm: {type(pl_module).__name__} has no BatchNorm layer with running "
                            "statistics to adapt; remove the callback")
        self._saved = [{"layer": m, "momentum": m.momentum,
                        "buffers": {k: v.clone() for k, v in m.named_buffers(recurse=False)}} for m in layers]
        modes = [(m, m.training, m.momentum) for m in layers]
        for m in layers:
            m.reset_running_stats()
            m.momentum = None  # a cumulative average over the batches, as update_bn
        was_training = pl_module.training
        pl_module.eval()
        for m in layers:
            m.train()
        seen = 0
        loaders = loaders if isinstance(loaders, (list, tuple)) else [loaders]
        try:
            with trainer.precision_plugin.forward_context():
                for index, loader in enumerate(loaders):
                    for batch in _fresh(loader):
                        if self.max_batches is not None and seen >= self.max_batches:
                            break
                        pl_module(trainer.strategy.batch_to_device(batch, dataloader_idx=index))
                        seen += 1
        except BaseException:
            self._restore(pl_module)  # never leave half-adapted statistics in a model that may be saved later
            raise
        finally:
            pl_module.train(was_training)
            for m, training, momentum in modes:  # each layer as it was (a frozen layer may have been in eval mode)
                m.train(training)
                m.momentum = momentum
        if seen == 0:
            self._restore(pl_module)
            raise PtftError("AdaptBatchNorm: the stage's dataloader gave no batch to estimate statistics from")
        if trainer.world_size > 1:  # each rank averaged its own batches: average the ranks, as one process would
            for m in layers:
                m.running_mean.copy_(trainer.strategy.reduce(m.running_mean.clone(), reduce_op="mean"))
                m.running_var.copy_(trainer.strategy.reduce(m.running_var.clone(), reduce_op="mean"))
        rank_zero_info(f"AdaptBatchNorm: {len(layers)} BatchNorm layers re-estimated on {seen} batches per rank")

    def _restore(self, pl_module: L.LightningModule) -> None:
        if self._saved is None:
            return
        for saved in self._saved:
            layer = saved["layer"]
            for name, value in saved["buffers"].items():
                getattr(layer, name).copy_(value)
            layer.momentum = saved["momentum"]
        self._saved = None
