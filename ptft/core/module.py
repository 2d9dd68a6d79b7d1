"""The fine-tuning base module every ptft task module builds on."""

from __future__ import annotations

import inspect
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics import MetricCollection
from torchmetrics.classification import MulticlassAccuracy, MulticlassF1Score

from ptft.core.optim import (
    OptimizerConfig,
    SchedulerConfig,
    as_dict,
    build_optimizer,
    build_param_groups,
    build_scheduler,
)

STAGES = ("train", "val", "test")


class FineTuneModule(L.LightningModule):
    """Owns a backbone with its task head, the loss, metrics per stage, the optimizer and its schedule.

    Subclasses build ``self.model`` in ``__init__`` and implement :meth:`forward` (batch -> logits) and
    :meth:`is_head_parameter`. Batches are dicts holding the model inputs and ``labels``.

    Args:
        num_labels: Number of classes. Linked from the data module by the CLI.
        label_names: Class names in label-id order. Linked from the data module by the CLI.
        optimizer: Optimizer and per-group learning-rate settings.
        scheduler: Learning-rate schedule.
        label_smoothing: Cross-entropy label smoothing.
    """

    def __init__(
        self,
        num_labels: int = 2,
        label_names: list[str] | None = None,
        optimizer: OptimizerConfig = OptimizerConfig(),
        scheduler: SchedulerConfig = SchedulerConfig(),
        label_smoothing: float = 0.0,
    ) -> None:
        super().__init__()
        if label_names is not None and len(label_names) != num_labels:
            raise ValueError(f"{len(label_names)} label_names given for num_labels={num_labels}")
        self.num_labels = num_labels
        self.label_names = list(label_names) if label_names else [str(i) for i in range(num_labels)]
        self.optimizer_config = OptimizerConfig.coerce(optimizer)
        self.scheduler_config = SchedulerConfig.coerce(scheduler)
        self.label_smoothing = label_smoothing
        metrics = MetricCollection(
            {
                "acc": MulticlassAccuracy(num_classes=num_labels, average="micro"),
                "f1": MulticlassF1Score(num_classes=num_labels, average="macro"),
            }
        )
        # Keyed "train_", "val_", "test_": a ModuleDict key "train" would shadow nn.Module.train.
        self.metrics = nn.ModuleDict({f"{stage}_": metrics.clone(prefix=f"{stage}/") for stage in STAGES})

    def _save_hparams(self, **overrides: Any) -> None:
        """Saves the constructor arguments as plain values, so ``load_from_checkpoint`` works outside the CLI.

        ``logger=False``: the CLI logs the whole nested config once; Lightning's flat copy would duplicate it.
        """
        init_frame = inspect.currentframe().f_back  # the subclass __init__ whose arguments are saved
        self.save_hyperparameters(ignore=["optimizer", "scheduler"], frame=init_frame, logger=False)
        self.hparams["optimizer"] = as_dict(self.optimizer_config)
        self.hparams["scheduler"] = as_dict(self.scheduler_config)
        self.hparams["label_names"] = self.label_names
        self.hparams.update(overrides)

    # --- subclass hooks -------------------------------------------------------------------------------------
    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Returns class logits of shape ``(batch, num_labels)``."""
        raise NotImplementedError

    def is_head_parameter(self, name: str) -> bool:
        """Whether parameter ``name`` (of ``self.model``) belongs to the newly initialised task head."""
        raise NotImplementedError

    def layer_of(self, name: str) -> int:
        """Layer index of parameter ``name`` of ``self.model``: 0 for the backbone, 1 for the head."""
        return 1 if self.is_head_parameter(name) else 0

    # --- steps ----------------------------------------------------------------------------------------------
    def loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits, labels, label_smoothing=self.label_smoothing)

    def _shared_step(self, batch: dict[str, torch.Tensor], stage: str) -> torch.Tensor:
        logits = self(batch)
        labels = batch["labels"]
        loss = self.loss(logits, labels)
        batch_size = labels.shape[0]
        self.log(f"{stage}/loss", loss, prog_bar=stage != "test", batch_size=batch_size)
        metrics = self.metrics[f"{stage}_"]
        metrics.update(logits.detach(), labels)
        self.log_dict(metrics, prog_bar=stage == "val", batch_size=batch_size)
        return loss

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        return self._shared_step(batch, "train")

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self._shared_step(batch, "val")

    def test_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self._shared_step(batch, "test")

    def predict_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> dict[str, Any]:
        """Returns predicted label ids, their names and the class probabilities for each example."""
        probs = self(batch).float().softmax(dim=-1)
        ids = probs.argmax(dim=-1)
        return {
            "label_ids": ids,
            "labels": [self.label_names[i] for i in ids.tolist()],
            "probs": probs,
        }

    # --- optimization ---------------------------------------------------------------------------------------
    def param_groups(self) -> list[dict[str, Any]]:
        """Parameter groups with a real ``lr`` each; see :func:`ptft.core.optim.build_param_groups`."""
        cfg = self.optimizer_config
        return build_param_groups(
            self.model.named_parameters(),
            lr=cfg.lr,
            weight_decay=cfg.weight_decay,
            layer_of=self.layer_of,
            layer_decay=cfg.layer_decay,
            head_lr=cfg.head_lr,
        )

    def configure_optimizers(self) -> Any:
        optimizer = build_optimizer(self.param_groups(), self.optimizer_config)
        scheduler = build_scheduler(optimizer, self.scheduler_config, self.trainer.estimated_stepping_batches)
        if scheduler is None:
            return optimizer
        return {"optimizer": optimizer, "lr_scheduler": scheduler}
