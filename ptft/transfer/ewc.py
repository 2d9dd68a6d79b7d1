"""Elastic weight consolidation (Kirkpatrick et al., 2017) against forgetting when continuing a fine-tuned model:
``strength / 2 * sum F (w - w_old)^2`` with a diagonal Fisher ``F`` of the previous task (see
:mod:`ptft.transfer.continual` for continuing from a checkpoint and replay)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import lightning as L
import torch
from lightning.fabric.utilities.apply_func import move_data_to_device
from lightning.pytorch.utilities import rank_zero_info
from torch.utils.data import DataLoader, Dataset

from ptft.core.callbacks import TrainingLossCallback
from ptft.core.data import FineTuneDataModule
from ptft.core.errors import PtftError
from ptft.transfer.continual import ContinualDataModule, check_extends, example_subset

__all__ = ["EWC", "fisher_diagonal"]


def fisher_diagonal(
    module: L.LightningModule,
    dataset: Dataset,
    collate_fn: Callable[[list[Any]], Any] | None = None,
    num_classes: int | None = None,
    labels: Literal["sampled", "given"] = "sampled",
    seed: int = 0,
    trainer: L.Trainer | None = None,
) -> dict[str, torch.Tensor]:
    """Diagonal Fisher information of ``module``'s weights: the mean over examples of the squared gradient
    of each example's log-likelihood ``log p(y | x)``.

    Per-example gradients (batches of one example, any modality's collate) with ``torch.autograd.grad``, which
    leaves every ``.grad`` untouched; the module runs in eval mode (no dropout, batch-norm running statistics).
    Under DDP (``trainer``) each rank takes every ``world_size``-th example and the sums and counts are added up
    over ranks, so every rank holds the same Fisher, the one of all examples.

    Args:
        module: A classification module; ``module(batch)`` gives logits ``(rows, classes)``.
        dataset: The previous task's examples.
        collate_fn: The data's collate function.
        num_classes: Only the first ``num_classes`` logits are the previous model's (a grown classifier): the
            likelihood is over them, so the new rows get zero Fisher.
        labels: ``sampled``: ``y`` drawn from the model's own prediction (a Monte-Carlo estimate of the true Fisher,
            as Kirkpatrick et al.); ``given``: the data's labels (the "empirical" Fisher).
        seed: Seed of the sampled labels.
        trainer: The trainer, for the DDP ranks.
    """
    rank, world = (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)
    indices = list(range(rank, len(dataset), world))
    loader = DataLoader(torch.utils.data.Subset(dataset, indices), batch_size=1, collate_fn=collate_fn)
    params = dict(module.model.named_parameters())
    sums = {n: torch.zeros_like(p, dtype=torch.float32) for n, p in params.items()}
    generator = torch.Generator().manual_seed(seed + rank)
    was_training = module.training
    frozen = [p for p in params.values() if not p.requires_grad]
    # Every weight, frozen ones included: a freezing schedule may unfreeze them later in training.
    for p in frozen:
        p.requires_grad_(True)
    module.eval()
    try:
        with torch.enable_grad():
            for batch in loader:
                batch = move_data_to_device(batch, module.device)
                logits = module(batch)[:, :num_classes].float()
                log_probs = logits.log_softmax(dim=-1)  # rows: 1, or a long document's windows
                if labels == "sampled":
                    y = torch.multinomial(log_probs.detach().exp().cpu(), 1, generator=generator).squeeze(1)
                else:
                    y = batch["labels"].reshape(-1).cpu()
                likelihood = log_probs.gather(1, y.to(logits.device)[:, None]).mean()
                grads = torch.autograd.grad(likelihood, list(params.values()), allow_unused=True)
                for name, grad in zip(params, grads):
                    if grad is not None:
                        sums[name] += grad.float().pow(2)
    finally:
        module.train(was_training)
        for p in frozen:
            p.requires_grad_(False)
    count = torch.tensor([float(len(indices))], device=module.device)
    if world > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
        flat = torch.cat([count.to(torch.float32)] + [s.flatten().to(module.device) for s in sums.values()])
        torch.distributed.all_reduce(flat)  # one call for every tensor: sum over ranks
        count, rest = flat[:1], flat[1:]
        for name, part in zip(sums, rest.split([s.numel() for s in sums.values()])):
            sums[name] = part.view_as(sums[name])
    return {n: s / count.clamp(min=1) for n, s in sums.items()}


class EWC(TrainingLossCallback):
    """Elastic weight consolidation (Kirkpatrick et al., 2017): adds ``strength / 2 * sum_i F_i (w_i - w_old_i)^2``.

    ``F`` is the diagonal Fisher information of the model on the previous task's training data
    (:func:`fisher_diagonal`), ``w_old`` the weights when training starts: the previous model, with
    :class:`ContinueFrom`. Both are computed once, before the first training step, and kept in the callback's
    checkpoint state, so a resumed run does not recompute them. With a grown classifier the Fisher is the previous
    model's: the likelihood is over the previous classes' logits, so the new rows train freely.

    Args:
        strength: ``lambda``: how strongly weights important to the old task stay put.
        data: The previous task's data module: its training rows (``samples`` of them) with evaluation transforms,
            and its labels naming the previous classes. By default the ``old`` data of a :class:`ContinualDataModule`.
        fisher_file: A saved Fisher: read when the file exists (its rows are padded with zeros for new classes), else
            written once computed from ``data``, for the next run to reuse.
        samples: At most this many previous training examples (a seeded draw); ``None`` for all of them.
        labels: ``sampled``: labels drawn from the model's own prediction (the true Fisher, as in the paper);
            ``given``: the data's labels (the empirical Fisher).
        seed: Seed of the example draw and the sampled labels.
    """

    def __init__(
        self,
        strength: float = 100.0,
        data: FineTuneDataModule | None = None,
        fisher_file: str | None = None,
        samples: int | None = 1000,
        labels: Literal["sampled", "given"] = "sampled",
        seed: int = 0,
    ) -> None:
        if strength < 0:
            raise PtftError(f"EWC strength must be 0 or more, got {strength}")
        if labels not in ("sampled", "given"):
            raise PtftError(f"EWC labels must be sampled or given, got {labels!r}")
        self.strength = strength
        self.data = data
        self.fisher_file = fisher_file
        self.samples = samples
        self.labels = labels
        self.seed = seed
        self.fisher: dict[str, torch.Tensor] | None = None
        self.anchor: dict[str, torch.Tensor] | None = None

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # After every restore (a resume's callback state included) and before the first step.
        if self.fisher is None:
            self.fisher = self.load_or_compute(trainer, pl_module)
        if self.anchor is None:
            params = dict(pl_module.model.named_parameters())
            self.anchor = {n: params[n].detach().clone() for n in self.fisher}

    def load_or_compute(self, trainer: L.Trainer, module: L.LightningModule) -> dict[str, torch.Tensor]:
        """The Fisher from ``fisher_file`` when it exists, else computed from the previous task's data (and saved)."""
        params = dict(module.model.named_parameters())
        if self.fisher_file is not None and Path(self.fisher_file).is_file():
            saved = torch.load(self.fisher_file, map_location="cpu", weights_only=True)
            labels = getattr(module, "label_names", None)
            if saved.get("label_names") is not None and labels is not None:
                check_extends(saved["label_names"], labels, f"the Fisher in {self.fisher_file} is of another model")
            fisher = {n: pad_rows(f, params[n]) for n, f in saved["fisher"].items() if n in params}
            if not fisher:
                raise PtftError(f"{self.fisher_file} has no Fisher for this model's weights: compute it again from the data")
            rank_zero_info(f"EWC: Fisher read from {self.fisher_file}")
            return {n: f.to(params[n].device) for n, f in fisher.items()}
        data = self.data
        if data is None and isinstance(trainer.datamodule, ContinualDataModule):
            data = trainer.datamodule.old
        if data is None:
            raise PtftError("EWC needs the previous task's data (init_args.data, or a ContinualDataModule) or a fisher_file")
        old_labels = list(getattr(data, "label_names", []) or []) or None
        labels = getattr(module, "label_names", None)
        if old_labels is not None and labels is not None:
            check_extends(old_labels, labels, "EWC's data must be the previous task's")
        if data.trainer is None:
            data.trainer = trainer  # its checks run on rank 0
        dataset = example_subset(data, module, self.samples, self.seed, training=False, at_most=True)
        fisher = fisher_diagonal(module, dataset, data.collate_fn(), len(old_labels) if old_labels else None,
                                 self.labels, self.seed, trainer)
        rank_zero_info(f"EWC: Fisher computed on {len(dataset)} examples of the previous task")
        if self.fisher_file is not None and trainer.is_global_zero:
            Path(self.fisher_file).parent.mkdir(parents=True, exist_ok=True)
            torch.save({"fisher": {n: f.cpu() for n, f in fisher.items()}, "label_names": old_labels}, self.fisher_file)
        return fisher

    def penalty(self, module: L.LightningModule) -> torch.Tensor:
        """``strength / 2 * sum F (w - w_old)^2`` over the weights that have a Fisher."""
        if self.fisher is None or self.anchor is None:
            raise PtftError("EWC has no Fisher yet: it is computed when training starts")
        params = dict(module.model.named_parameters())
        total = torch.zeros((), device=module.device)
        for name, fisher in self.fisher.items():
            param = params[name]
            if not param.requires_grad:  # frozen: the penalty could not move it
                continue
            if fisher.device != param.device:
                fisher = self.fisher[name] = fisher.to(param.device)
                self.anchor[name] = self.anchor[name].to(param.device)
            total = total + (fisher * (param - self.anchor[name]).pow(2)).sum()
        return 0.5 * self.strength * total

    def training_loss(self, module: L.LightningModule, batch: Any, loss: torch.Tensor) -> torch.Tensor:
        penalty = self.penalty(module)
        module.log("train/ewc", penalty, batch_size=module.batch_size_of(batch))
        return loss + penalty

    def state_dict(self) -> dict[str, Any]:
        if self.fisher is None or self.anchor is None:
            return {}
        return {"fisher": {k: v.cpu() for k, v in self.fisher.items()}, "anchor": {k: v.cpu() for k, v in self.anchor.items()}}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if "fisher" in state_dict:
            self.fisher, self.anchor = dict(state_dict["fisher"]), dict(state_dict["anchor"])


def pad_rows(fisher: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """A saved Fisher for ``param``; zero rows appended where the classifier grew since it was computed."""
    if fisher.shape == param.shape:
        return fisher
    if fisher.shape[1:] == param.shape[1:] and fisher.shape[0] < param.shape[0]:
        return torch.cat([fisher, fisher.new_zeros((param.shape[0] - fisher.shape[0], *fisher.shape[1:]))])
    raise PtftError(f"the saved Fisher of a weight has shape {tuple(fisher.shape)}, the model's {tuple(param.shape)}: "
                    "compute it again for this model")

