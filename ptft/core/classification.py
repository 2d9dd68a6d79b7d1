"""The labelled tasks' base modules: ``LabelledModule`` (the one home of ``num_labels`` / ``label_names``) and
``ClassificationModule`` (one label per example: cross-entropy, accuracy, macro-F1)."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torchmetrics import MetricCollection
from torchmetrics.classification import MulticlassAccuracy, MulticlassF1Score

from ptft.core.errors import PtftError
from ptft.core.module import FineTuneModule


class LabelledModule(FineTuneModule):
    """A task with named classes (classification, token tagging, detection): the one home of the label fields.

    ``num_labels`` and ``label_names`` are linked from the data module by the CLI, saved in the hyperparameters, and
    checked against a checkpoint's label order when one is loaded (a reordering would permute every prediction).

    Args:
        num_labels: Number of classes. Linked from the data module by the CLI.
        label_names: Class names in label-id order. Linked from the data module by the CLI.
        **kwargs: The shared fine-tuning arguments of :class:`FineTuneModule`.
    """

    def __init__(self, num_labels: int = 2, label_names: list[str] | None = None, **kwargs: Any) -> None:
        if label_names is not None and len(label_names) != num_labels:
            raise PtftError(f"{len(label_names)} label_names given for num_labels={num_labels}")
        self.num_labels = num_labels
        self.label_names = list(label_names) if label_names else [str(i) for i in range(num_labels)]
        super().__init__(**kwargs)  # after the labels: build_metrics needs them

    def _save_hparams(self, **overrides: Any) -> None:
        super()._save_hparams(**overrides)
        self.hparams.update(num_labels=self.num_labels, label_names=self.label_names)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        saved = checkpoint.get("hyper_parameters", {}).get("label_names")
        if saved is not None and list(saved) != self.label_names:  # e.g. ptft test --ckpt_path with other data
            raise PtftError(
                f"the checkpoint was trained with labels {list(saved)}, the data gives {self.label_names}: "
                "set data.init_args.labels to the checkpoint's order"
            )
        super().on_load_checkpoint(checkpoint)


class ClassificationModule(LabelledModule):
    """One label per example: cross-entropy, accuracy and macro-F1, class probabilities as predictions.

    Args:
        label_smoothing: Cross-entropy label smoothing.
        **kwargs: ``num_labels``, ``label_names`` (:class:`LabelledModule`) and the shared fine-tuning arguments of
            :class:`FineTuneModule`.
    """

    checkpoint_monitor = ("val/acc", "max")

    def __init__(self, label_smoothing: float = 0.0, **kwargs: Any) -> None:
        self.label_smoothing = label_smoothing
        super().__init__(**kwargs)

    def build_metrics(self) -> MetricCollection | None:
        return MetricCollection(
            {
                "acc": MulticlassAccuracy(num_classes=self.num_labels, average="micro"),
                "f1": MulticlassF1Score(num_classes=self.num_labels, average="macro"),
            }
        )

    def loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits, labels, label_smoothing=self.label_smoothing)

    def step(self, batch: dict[str, Any], stage: str) -> tuple[torch.Tensor, Any]:
        logits = self(batch)
        return self.loss(logits, batch["labels"]), (logits.detach(), batch["labels"])

    def update_metrics(self, stage: str, outputs: Any, batch: dict[str, Any]) -> None:
        logits, labels = outputs
        # Only the states here; the scores are computed and logged once per epoch (epoch_metrics). Logging the Metric
        # objects every step, as Lightning allows, cost ~2 ms per metric per step in Lightning's result collection
        # (it walks each Metric's attributes to move it to the value's device): 2% of a MiniLM step on CPU.
        self.metrics[f"{stage}_"].update(logits, labels)

    def epoch_metrics(self, stage: str) -> dict[str, torch.Tensor] | None:
        """Accuracy and F1 (or a subclass's metrics) of the epoch, from every rank's states; ``None`` without updates."""
        metrics = self.metrics[f"{stage}_"]
        if not any(metric.update_count for metric in metrics.values()):
            return None
        return metrics.compute()

    def on_train_epoch_end(self) -> None:
        self._log_epoch_metrics("train")

    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> dict[str, Any]:
        """Returns predicted label ids, their names and the class probabilities for each example."""
        probs = self(batch).float().softmax(dim=-1)
        ids = probs.argmax(dim=-1)
        return {
            "label_ids": ids,
            "labels": [self.label_names[i] for i in ids.tolist()],
            "probs": probs,
        }

    def prediction_rows(self, outputs: dict[str, Any]) -> list[dict[str, Any]]:
        """``label`` (the predicted name), ``label_id``, then one probability column per class (``p_<name>``)."""
        rows = []
        for label, label_id, probs in zip(outputs["labels"], outputs["label_ids"].tolist(), outputs["probs"].tolist()):
            rows.append({"label": label, "label_id": label_id, **{f"p_{n}": round(p, 6) for n, p in zip(self.label_names, probs)}})
        return rows
