"""Small callbacks used by recipes."""

from __future__ import annotations

from functools import partial
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import EMAWeightAveraging
from lightning.pytorch.utilities import rank_zero_info


class TrainingLossCallback(L.Callback):
    """A callback that changes the training loss: distillation, EWC, any regulariser that needs a training run's state.

    :class:`ptft.core.FineTuneModule` calls :meth:`training_loss` of every such callback on the trainer, in callback
    order, after the task's own loss and before the L1 / L2-SP penalty. Lightning has no hook that returns a new loss
    (``on_before_backward`` only sees it), and a callback keeps what must stay out of the student's checkpoints and
    optimizer (a teacher, a previous model's weights) out of the LightningModule.
    """

    def training_loss(self, module: L.LightningModule, batch: Any, loss: torch.Tensor) -> torch.Tensor:
        """The loss to optimise for this training batch, given the task's ``loss``; log extra values with ``module.log``."""
        raise NotImplementedError


class BeforeAfterReport(L.Callback):
    """Prints a validation metric before fine-tuning and after it, best and last epoch.

    The "before" value comes from the sanity-check pass, so set ``trainer.num_sanity_val_steps: -1`` to measure
    it on the whole validation set.

    Args:
        monitor: The logged metric to report, e.g. ``val/acc``.
    """

    def __init__(self, monitor: str = "val/acc") -> None:
        self.monitor = monitor
        self.before: float | None = None
        self.history: list[float] = []

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        value = trainer.callback_metrics.get(self.monitor)
        if value is None:
            return
        if trainer.sanity_checking:
            self.before = float(value)
        else:
            self.history.append(float(value))

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self.history:
            return
        before = "n/a (set trainer.num_sanity_val_steps: -1)" if self.before is None else f"{self.before:.4f}"
        rank_zero_info(
            f"\n{self.monitor} before fine-tuning: {before}\n"
            f"{self.monitor} after fine-tuning:  {self.history[-1]:.4f} (best epoch {max(self.history):.4f})"
        )


class WritePredictions(L.Callback):
    """Writes ``ptft predict`` results to a file: one row per example, in input order.

    The module's ``prediction_rows`` decides the columns (classification: ``label``, ``label_id``, then one
    probability column per class, ``p_<name>``). When the examples are files (images, audio), a first ``file``
    column names each one as it was given.

    Args:
        path: Output file: ``.csv``, or ``.jsonl`` (one JSON object per line, for nested values such as entities).
    """

    def __init__(self, path: str = "predictions.csv") -> None:
        self.path = path
        self.rows: list[dict[str, object]] = []

    def on_predict_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.rows = []

    def on_predict_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: dict, batch: object, batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        self.rows.extend(pl_module.prediction_rows(outputs))

    def on_predict_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.world_size > 1:
            self.rows = gather_in_input_order(self.rows, trainer.world_size, _dataset_size(trainer))
        if not trainer.is_global_zero or not self.rows:
            return
        names = getattr(_dataset(trainer), "item_names", None)  # file datasets: in input order, as the rows
        if callable(names) and len(files := names()) == len(self.rows):
            self.rows = [{"file": file, **row} for file, row in zip(files, self.rows)]
        import csv
        import json
        from pathlib import Path

        Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "w", newline="") as f:
            if self.path.endswith(".jsonl"):
                f.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in self.rows)
            else:
                writer = csv.DictWriter(f, fieldnames=list(self.rows[0]))
                writer.writeheader()
                writer.writerows(self.rows)
        rank_zero_info(f"wrote {len(self.rows)} predictions to {self.path}")


def warmup_ema(averaged: torch.Tensor, current: torch.Tensor, num_averaged: torch.Tensor, decay: float, power: float) -> torch.Tensor:
    """One EMA update with timm's warmup: the decay of update ``t`` is ``min(decay, 1 - (1 + t) ** -power)``."""
    step_decay = (1 - (1 + num_averaged.to(torch.float32)) ** -power).clamp(max=decay)
    return averaged + (current - averaged) * (1 - step_decay).to(averaged.dtype)


class EMAWarmupWeightAveraging(EMAWeightAveraging):
    """Lightning's EMA of the weights, with timm's warmup (``ModelEmaV3(use_warmup=True)``).

    Without warmup, a short run's average is dominated by its first, untrained weights (measured on a 40-step toy run:
    0.67 accuracy with plain EMA at 0.999, 1.00 with warmup). Everything else is Lightning's callback.

    Args:
        decay: The largest decay, reached as training goes on.
        warmup_power: Warmup speed: 2/3 suits long runs, 3/4 short ones (timm's guidance).
        **kwargs: Lightning's ``EMAWeightAveraging`` arguments (``update_every_n_steps``, ``update_starting_at_step``…).
    """

    def __init__(self, decay: float = 0.9998, warmup_power: float = 2 / 3, **kwargs: Any) -> None:
        super().__init__(decay=decay, **kwargs)
        self._kwargs["avg_fn"] = partial(warmup_ema, decay=decay, power=warmup_power)


def _dataset(trainer: L.Trainer) -> Any:
    loaders = trainer.predict_dataloaders
    loader = loaders[0] if isinstance(loaders, list) else loaders
    return getattr(loader, "dataset", None)


def _dataset_size(trainer: L.Trainer) -> int | None:
    try:
        return len(_dataset(trainer))
    except TypeError:
        return None


def gather_in_input_order(rows: list[dict[str, Any]], world_size: int, size: int | None) -> list[dict[str, Any]]:
    """Every rank's prediction rows, back in input order.

    Under DDP, Lightning's ``DistributedSampler`` (no shuffling for prediction) gives rank ``r`` the examples
    ``r, r + world_size, r + 2 * world_size…``, so interleaving the ranks' rows restores the order. The sampler pads the
    last round with repeats of the first examples to make the ranks equal; with one row per dataset item (``size``)
    those are dropped.
    """
    import itertools

    import torch.distributed as dist

    gathered: list[list[dict[str, Any]] | None] = [None] * world_size
    dist.all_gather_object(gathered, rows)
    interleaved = [row for group in itertools.zip_longest(*gathered) for row in group if row is not None]
    padded = size is not None and size < len(interleaved) <= size + world_size - 1
    return interleaved[:size] if padded else interleaved
