"""Multi-task fine-tuning: one shared backbone, one head per task, each task with its own data and metrics.

``MultiTaskModule`` runs a Hugging Face text encoder or a timm image model once per task batch and hands its states
to the task's head: ``sequence`` (one label per text, pooled token states), ``token`` (one tag per word) or
``image`` (one label per image, timm's pooled features). Each task has its own loss, weighted statically or learned
(:class:`ptft.core.WeightedObjectives`, one per task so a step may hold any subset of the tasks), its own metrics
(``val/<task>/acc``, ``val/<task>/f1``…) and the checkpoint follows ``val/mean_score``, the mean of the tasks' main
metrics. The data comes from :class:`ptft.transfer.MultiTaskDataModule`.

:meth:`MultiTaskModule.export` writes one folder per task that its single-task module loads (backbone and trained
head): :func:`ptft.transfer.multitask_export.load_task_module` rebuilds a ``TextClassifier``, ``TokenClassifier`` or ``ImageClassifier`` from it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics import MeanMetric, MetricCollection
from torchmetrics.classification import MulticlassAccuracy, MulticlassF1Score

from ptft.core.errors import PtftError
from ptft.core.module import FineTuneModule, STAGES
from ptft.core.objectives import Weighting, WeightedObjectives

TaskKind = Literal["sequence", "token", "image"]
#: Heads of each kind; the first is the default.
HEADS = {"sequence": ("mean", "attention", "lstm", "gru"), "token": ("linear", "lstm", "gru"), "image": ("linear",)}
#: The metric of each kind that ``<stage>/mean_score`` averages.
MAIN_METRIC = {"sequence": "acc", "token": "f1", "image": "acc"}


@dataclass(frozen=True)
class TaskHead:
    """One task's head (``model.init_args.tasks.<name>`` in a recipe)."""

    kind: TaskKind = "sequence"
    """``sequence``: one label per text; ``token``: one tag per word (NER, POS); ``image``: one label per image."""
    head: str | None = None
    """``sequence``: ``mean`` (default), ``attention``, ``lstm`` or ``gru`` pooling; ``token``: ``linear`` (default,
    Hugging Face's token-classification head), ``lstm`` or ``gru``; ``image``: ``linear`` (timm's classifier)."""
    dropout: float = 0.1
    """Dropout before the classifier."""
    weight: float = 1.0
    """Weight of the task's loss (with ``weighting: learned``: a factor on the learned weight)."""
    label_smoothing: float = 0.0
    """Cross-entropy label smoothing."""

    @classmethod
    def coerce(cls, value: TaskHead | dict[str, Any] | str) -> TaskHead:
        """Accepts the dataclass, a dict (a checkpoint's hyperparameters) or just the kind."""
        head = cls(kind=value) if isinstance(value, str) else cls(**value) if isinstance(value, dict) else value
        if head.kind not in HEADS:
            raise PtftError(f"task kind must be one of {sorted(HEADS)}, got {head.kind!r}")
        if head.head is None:
            return cls(**{**asdict(head), "head": HEADS[head.kind][0]})
        if head.head not in HEADS[head.kind]:
            raise PtftError(f"a {head.kind} task's head must be one of {list(HEADS[head.kind])}, got {head.head!r}")
        return head


class LinearHead(nn.Module):
    """Dropout and a linear classifier: per token on a text encoder's states, per image on timm's pooled features
    (the layout of Hugging Face's token-classification head and of timm's classifier, so exports map one to one)."""

    def __init__(self, hidden_size: int, num_labels: int, dropout: float) -> None:
        super().__init__()
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(hidden_size, num_labels)

    def forward(self, states: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.classifier(self.dropout(states))


def build_head(spec: TaskHead, hidden_size: int, num_labels: int) -> nn.Module:
    from ptft.text.heads import SequenceHead, TokenHead

    if spec.kind == "sequence":
        return SequenceHead(spec.head, hidden_size, num_labels, spec.dropout)
    if spec.head in ("lstm", "gru"):
        return TokenHead(spec.head, hidden_size, num_labels, spec.dropout)
    return LinearHead(hidden_size, num_labels, spec.dropout)


class MultiTaskNetwork(nn.Module):
    """The shared ``backbone``, the task ``heads`` and the loss ``objectives`` (learned weights live there)."""

    def __init__(self, backbone: nn.Module, heads: dict[str, nn.Module], objectives: dict[str, WeightedObjectives],
                 modality: Literal["text", "image"]) -> None:
        super().__init__()
        self.backbone = backbone
        self.heads = nn.ModuleDict(heads)
        self.objectives = nn.ModuleDict(objectives)
        self.modality = modality

    def features(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Token states and their mask (text), or pooled image features and ``None``."""
        if self.modality == "image":
            pooled = self.backbone.forward_head(self.backbone.forward_features(batch["pixel_values"]), pre_logits=True)
            return pooled, None
        mask = batch.get("attention_mask")
        if mask is None:
            mask = torch.ones_like(batch["input_ids"])
        inputs = {k: batch[k] for k in ("input_ids", "token_type_ids") if k in batch}
        return self.backbone(**inputs, attention_mask=mask).last_hidden_state, mask

    def forward(self, task: str, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Logits of ``task``'s head on ``batch``."""
        states, mask = self.features(batch)
        return self.heads[task](states, mask)


def text_backbone(name: str, pretrained: bool, config: dict[str, Any] | None) -> nn.Module:
    """A Hugging Face encoder (``AutoModel``) whose token states the heads read. BERT-family poolers are removed:
    nothing reads them, and their parameters would get no gradient (DDP's unused-parameter error)."""
    from transformers import AutoModel

    from ptft.core.hf import build_hf_model

    model = build_hf_model(AutoModel, name, pretrained, config)
    if getattr(model, "pooler", None) is not None:
        model.pooler = None
    return model


class MultiTaskModule(FineTuneModule):
    """One shared backbone fine-tuned on several tasks at once, one head per task.

    ``backbone`` is a Hugging Face encoder (``sequence`` / ``token`` tasks) or a timm model (``image`` tasks); the
    tasks' kinds decide which. Each step's loss is the weighted sum over the tasks in its batch (every task under
    ``round_robin`` sampling, one drawn task otherwise). Validation logs ``val/<task>/<metric>`` and ``val/<task>/loss``
    per task, ``val/loss`` (the weighted total) and ``val/mean_score``: the mean of each task's main metric (``acc``
    for sequence and image tasks, entity ``f1`` for token tasks), which the best checkpoint follows. Layers: the
    backbone's own depths, every head (and the learned loss weights) on top, so layer-wise decay, ``head_lr`` and the
    freezing schedules work as for a single task.

    Args:
        backbone: Hugging Face model name or folder (``sentence-transformers/all-MiniLM-L6-v2``; text tasks) or timm
            model name (``resnet18.a1_in1k``; image tasks). Also the default tokenizer of the text tasks' data.
        tasks: Each task's head by task name, the same names as the data's tasks: ``{sst2: {kind: sequence},
            ner: {kind: token}}`` (:class:`TaskHead`: kind, head, dropout, weight, label_smoothing).
        label_names: Each task's label names in id order. Linked from the data module by the CLI.
        pretrained: Load the backbone's pretrained weights; ``False`` builds it with random weights.
        backbone_config: Hugging Face config overrides (``{hidden_dropout_prob: 0.2}``); a dict holding
            ``model_type`` is a complete config (full checkpoints store the architecture so).
        backbone_kwargs: Extra ``timm.create_model`` arguments (``{drop_path_rate: 0.1}``).
        pretrained_file: Local weights file of a timm backbone (offline).
        weighting: ``static`` (``sum w_i * L_i``) or ``learned`` (each task's weight learned from its loss's
            uncertainty, Kendall et al. 2018: ``w_i * (exp(-s_i) * L_i + s_i)``).
        **kwargs: The shared fine-tuning arguments of :class:`ptft.core.FineTuneModule` (``optimizer``,
            ``scheduler``, ``l1``, ``l2_sp``, ``peft``, ``checkpoint_weights``, ``compile``,
            ``gradient_checkpointing``).
    """

    checkpoint_monitor = ("val/mean_score", "max")

    def __init__(
        self,
        backbone: str,
        tasks: dict[str, TaskHead],
        label_names: dict[str, list[str]] | None = None,
        pretrained: bool = True,
        backbone_config: dict[str, Any] | None = None,
        backbone_kwargs: dict[str, Any] | None = None,
        pretrained_file: str | None = None,
        weighting: Weighting = "static",
        **kwargs: Any,
    ) -> None:
        if not tasks:
            raise PtftError("give at least one task: model.init_args.tasks={name: {kind: sequence}}")
        self.tasks = {name: TaskHead.coerce(spec) for name, spec in tasks.items()}
        label_names = {k: list(v) for k, v in (label_names or {}).items()}
        missing = sorted(set(self.tasks) - set(label_names))
        if missing:
            raise PtftError(f"no label names for tasks {missing} (linked from data.init_args.tasks by the CLI; in "
                            "Python give label_names={task: [...]})")
        extra = sorted(set(label_names) - set(self.tasks))
        if extra:
            raise PtftError(f"the data has tasks {extra} that model.init_args.tasks lacks ({sorted(self.tasks)})")
        kinds = {spec.kind for spec in self.tasks.values()}
        if "image" in kinds and kinds != {"image"}:
            raise PtftError("one backbone reads one modality: give only image tasks (timm) or only sequence / token "
                            "tasks (Hugging Face)")
        self.label_names = {name: label_names[name] for name in self.tasks}
        super().__init__(**kwargs)
        self.model_name = backbone  # the text tasks' default tokenizer (TextDataModule.connect)
        self.modality: Literal["text", "image"] = "image" if kinds == {"image"} else "text"
        self.backbone_kwargs = dict(backbone_kwargs or {})
        if self.modality == "image":
            import timm.data

            from ptft.vision.modules import create_timm_model

            encoder = create_timm_model(backbone, pretrained, pretrained_file, num_classes=0, **self.backbone_kwargs)
            self._data_config = timm.data.resolve_data_config(model=encoder)
            hidden = encoder.num_features
        else:
            encoder = text_backbone(backbone, pretrained, backbone_config)
            self._data_config = {}
            hidden = encoder.config.hidden_size
        heads = {name: build_head(spec, hidden, len(self.label_names[name])) for name, spec in self.tasks.items()}
        # One WeightedObjectives per task: a step holding only some tasks sums only theirs (an absent task's learned
        # "+ s" term would otherwise pull its log variance down on every step it is not drawn).
        objectives = {name: WeightedObjectives({name: spec.weight}, weighting) for name, spec in self.tasks.items()}
        self.weighting = weighting
        self.set_model(MultiTaskNetwork(encoder, heads, objectives, self.modality))
        self.task_metrics = nn.ModuleDict({
            f"{stage}_": nn.ModuleDict({name: self._task_metrics(name).clone(prefix=f"{stage}/{name}/")
                                        for name in self.tasks})
            for stage in STAGES
        })
        self.task_losses = nn.ModuleDict({
            f"{stage}_": nn.ModuleDict({name: MeanMetric() for name in self.tasks}) for stage in ("val", "test")
        })
        self._evaluated: dict[str, set[str]] = {"val": set(), "test": set()}
        overrides: dict[str, Any] = {"pretrained": False, "pretrained_file": None}
        if self.modality == "text":
            overrides["backbone_config"] = encoder.config.to_dict()  # full checkpoints rebuild without the hub
        self._save_hparams(**overrides)
        self.hparams.update(tasks={name: asdict(spec) for name, spec in self.tasks.items()}, label_names=self.label_names)

    # --- what the data modules read -----------------------------------------------------------------------------
    @property
    def task_names(self) -> list[str]:
        return list(self.tasks)

    def data_config(self) -> dict[str, Any]:
        """The image backbone's preprocessing (input size, mean, std) as timm resolves it."""
        return dict(self._data_config)

    def check_task_data(self, task: str, data: Any) -> None:
        """One line when a task's data module does not give what its head reads (a token task fed sentences…)."""
        from ptft.core.data import ClassificationDataModule
        from ptft.text.data import TextClassificationDataModule
        from ptft.text.token import TokenClassificationDataModule

        expected = {"sequence": TextClassificationDataModule, "token": TokenClassificationDataModule,
                    "image": ClassificationDataModule}[self.tasks[task].kind]
        if not isinstance(data, expected):
            raise PtftError(f"task {task!r} is a {self.tasks[task].kind} task, but its data is a {type(data).__name__}: "
                            f"give a {expected.__name__}")

    # --- layers -------------------------------------------------------------------------------------------------
    def head_modules(self, model: nn.Module) -> list[str]:
        return ["heads", "objectives"]

    def discover_layers(self, model: nn.Module) -> dict[str, int]:
        """The backbone's depths (embeddings / stem 0, one per block), every head and loss weight one above."""
        from ptft.core.layers import hf_layer_ids, timm_layer_ids

        inner = timm_layer_ids(model.backbone) if model.modality == "image" else hf_layer_ids(model.backbone, lambda _: False)
        ids = {f"backbone.{name}": layer for name, layer in inner.items()}
        top = max(ids.values(), default=0) + 1
        for name, _ in model.named_parameters():
            ids.setdefault(name, top)
        return ids

    # --- metrics ------------------------------------------------------------------------------------------------
    def _task_metrics(self, task: str) -> MetricCollection:
        n = len(self.label_names[task])
        if self.tasks[task].kind != "token":
            return MetricCollection({"acc": MulticlassAccuracy(n, average="micro"),
                                     "f1": MulticlassF1Score(n, average="macro")})
        from ptft.text.token_data import IGNORE, EntityScore

        scores = {s: EntityScore(self.label_names[task], s) for s in ("precision", "recall", "f1")}
        return MetricCollection({**scores, "acc": MulticlassAccuracy(n, average="micro", ignore_index=IGNORE)})

    @staticmethod
    def batch_size_of(batch: Any) -> int:
        """Examples in a step's batch (``{task: batch}``): every task's labels added up. By the labels: a text batch
        is a ``BatchEncoding``, a mapping but no ``dict``, which the base would count by its first key's letters."""
        return sum(len(task_batch["labels"]) for task_batch in batch.values())

    # --- steps --------------------------------------------------------------------------------------------------
    def forward(self, task: str, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Logits of ``task``'s head: ``(batch, labels)``, or ``(batch, time, labels)`` for token tasks."""
        return self.model(task, batch)

    def task_loss(self, task: str, batch: dict[str, Any]) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """``task``'s loss on its batch and the (predictions, targets) its metrics take."""
        spec = self.tasks[task]
        logits = self(task, batch)
        labels = batch["labels"]
        if spec.kind != "token":
            loss = F.cross_entropy(logits.float(), labels, label_smoothing=spec.label_smoothing)
            return loss, (logits.detach(), labels)
        from ptft.text.token_data import IGNORE, first_subtokens

        loss = F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=IGNORE,
                               label_smoothing=spec.label_smoothing)
        # metrics score words: the first sub-token of each, as TokenClassifier
        target = labels.masked_fill(~first_subtokens(batch["word_ids"]), IGNORE)
        return loss, (logits.detach().argmax(dim=-1), target)

    def objective(self, losses: dict[str, torch.Tensor]) -> torch.Tensor:
        """The weighted total of the tasks' losses (static or learned weights)."""
        return torch.stack([self.model.objectives[task]({task: loss}) for task, loss in losses.items()]).sum()

    def step(self, batch: dict[str, Any], stage: str) -> tuple[torch.Tensor, Any]:
        unknown = sorted(set(batch) - set(self.tasks))
        if unknown:
            raise PtftError(f"batch of unknown tasks {unknown}; the model's tasks are {sorted(self.tasks)}")
        losses, outputs = {}, {}
        for task, task_batch in batch.items():
            losses[task], outputs[task] = self.task_loss(task, task_batch)
        return self.objective(losses), (losses, outputs)

    def update_metrics(self, stage: str, outputs: Any, batch: dict[str, Any]) -> None:
        losses, predictions = outputs
        for task, (preds, target) in predictions.items():
            size = len(batch[task]["labels"])
            metrics = self.task_metrics[f"{stage}_"][task]
            metrics.update(preds, target)
            if stage == "train":
                self.log(f"train/{task}/loss", losses[task], batch_size=size)
                # per epoch: a Metric logged after update() (not forward()) has no per-step value
                self.log_dict(metrics, on_step=False, on_epoch=True, batch_size=size)
                if self.weighting == "learned":
                    self.log(f"train/{task}/weight", self.model.objectives[task].effective_weights()[task], batch_size=size)
            else:
                # token tasks: weighted by labelled tokens (their loss is a mean over tokens), so the epoch's value is
                # the mean over every token, however the sentences were batched or sharded over processes
                weight = (batch[task]["labels"] != -100).sum() if self.tasks[task].kind == "token" else size
                self.task_losses[f"{stage}_"][task].update(losses[task].detach(), weight=weight)
                self._evaluated[stage].add(task)

    def _eval_task(self, stage: str, dataloader_idx: int) -> str:
        trainer = self._trainer
        datamodule = getattr(trainer, "datamodule", None) if trainer is not None else None
        names = getattr(datamodule, "eval_tasks", {}).get(stage) or self.task_names
        return names[dataloader_idx]

    def _eval_step(self, batch: dict[str, Any], stage: str, dataloader_idx: int) -> None:
        task = self._eval_task(stage, dataloader_idx)
        _, outputs = self.step({task: batch}, stage)
        self.update_metrics(stage, outputs, {task: batch})

    def validation_step(self, batch: dict[str, Any], batch_idx: int, dataloader_idx: int = 0) -> None:
        self._eval_step(batch, "val", dataloader_idx)

    def test_step(self, batch: dict[str, Any], batch_idx: int, dataloader_idx: int = 0) -> None:
        self._eval_step(batch, "test", dataloader_idx)

    def task_scores(self, stage: str) -> dict[str, torch.Tensor]:
        """Every evaluated task's metrics and loss, ``<stage>/loss`` and ``<stage>/mean_score``, from states synced
        over every process (torchmetrics); the states are reset."""
        values: dict[str, torch.Tensor] = {}
        scores, losses = [], {}
        for task in self.task_names:  # the same order and the same tasks on every rank: compute() syncs collectively
            if task not in self._evaluated[stage]:
                continue
            values.update(self.task_metrics[f"{stage}_"][task].compute())
            losses[task] = self.task_losses[f"{stage}_"][task].compute()
            values[f"{stage}/{task}/loss"] = losses[task]
            scores.append(values[f"{stage}/{task}/{MAIN_METRIC[self.tasks[task].kind]}"])
        if scores:
            values[f"{stage}/mean_score"] = torch.stack(scores).mean()
            with torch.no_grad():
                values[f"{stage}/loss"] = self.objective(losses)
        with torch.inference_mode(False):  # states reset under inference mode could not be updated by a later fit
            for task in self.task_names:
                self.task_metrics[f"{stage}_"][task].reset()
                self.task_losses[f"{stage}_"][task].reset()
        self._evaluated[stage].clear()
        return values

    def _log_task_scores(self, stage: str) -> None:
        values = self.task_scores(stage)
        # Already equal on every rank (computed from synced states): no sync_dist reduction needed.
        self.log_dict({k: v for k, v in values.items() if "/" in k[len(stage) + 1:]}, sync_dist=False)
        self.log_dict({k: v for k, v in values.items() if "/" not in k[len(stage) + 1:]}, prog_bar=stage == "val",
                      sync_dist=False)

    def on_validation_epoch_end(self) -> None:
        self._log_task_scores("val")

    def on_test_epoch_end(self) -> None:
        self._log_task_scores("test")

    def on_fit_start(self) -> None:
        super().on_fit_start()
        from lightning.pytorch.strategies import DDPStrategy

        with torch.inference_mode(False):
            for stage in self.task_metrics.values():
                for metrics in stage.values():
                    metrics.reset()
        strategy = self.trainer.strategy
        one_task = getattr(self.trainer.datamodule, "sampling", None) in ("sequential", "proportional", "temperature")
        if (one_task and isinstance(strategy, DDPStrategy) and self.trainer.world_size > 1
                and not strategy._ddp_kwargs.get("find_unused_parameters")):
            raise PtftError("one task per step leaves the other heads without gradients, which DDP refuses: set "
                            "trainer.strategy=ddp_find_unused_parameters_true (or data.init_args.sampling=round_robin)")

    # --- export -------------------------------------------------------------------------------------------------
    def export(self, folder: str) -> None:
        """Writes ``folder/<task>/`` for every task, each a folder its single-task module loads; see
        :func:`ptft.transfer.multitask_export.export_tasks`."""
        from ptft.transfer.multitask_export import export_tasks

        export_tasks(self, folder)
