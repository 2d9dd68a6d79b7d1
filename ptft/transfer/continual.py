"""Continual fine-tuning: continue a fine-tuned ptft model on new data or new classes, and limit forgetting.

::

    ptft fit --config recipes/vision/cifar10-continual.yaml

Four pieces, each usable alone, for every classification module (text, vision, audio):

* :class:`ContinueFrom` starts fitting from a previous ptft checkpoint. When the labels extend the previous ones (old
  names first, in their order), the classifier grows: the old classes' rows are kept exactly, the new rows keep the
  module's fresh initialisation. The module's ``l2_sp`` then pulls towards the previous model, head rows included.
* :class:`ptft.transfer.ewc.EWC`: elastic weight consolidation (Kirkpatrick et al., 2017) with a diagonal Fisher
  from the old task (its own module).
* :class:`ContinualDataModule`: the new task's data with the old task's: replay of old training examples, validation
  on every class seen, and the old, new or joint test set.
* :func:`evaluate_old_and_new`: test metrics on the old classes, the new ones and all of them, side by side.

Continuing is a callback rather than a constructor argument of the modules: every task module already builds its
network for the label set the data gives, so loading the previous weights into it afterwards (at ``setup``, before
the optimizer exists) works for any module unchanged, and keeps the previous checkpoint's path out of the new model's
hyperparameters (its own checkpoints then load without the old file).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import nn
from torch.utils.data import ConcatDataset, DataLoader, Dataset

from ptft.core.callbacks import TrainingLossCallback
from ptft.core.data import FineTuneDataModule, select
from ptft.core.errors import PtftError
from ptft.core.module import read_checkpoint

__all__ = [
    "ContinualDataModule",
    "ContinueFrom",
    "example_subset",
    "find_head",
    "load_previous",
    "evaluate_old_and_new",
]


# --- continuing from a checkpoint ------------------------------------------------------------------------------
def check_extends(old: Sequence[str], new: Sequence[str], fix: str) -> None:
    """One-line error unless ``new`` starts with ``old`` in the same order (new classes may follow)."""
    old, new = list(old), list(new)
    if new[: len(old)] != old:
        missing = [name for name in old if name not in new]
        why = f"drops {missing}" if missing else "reorders them"
        raise PtftError(f"the labels {new} must start with the previous ones {old} in that order, but {why}: {fix}")


def find_head(model: nn.Module, num_labels: int, heads: Sequence[str] = ()) -> str:
    """Name of the classifier of ``model``: the last ``nn.Linear`` with ``num_labels`` outputs, within the submodules
    ``heads`` (a module's ``head_modules``) when given; one-line error when there is none."""

    def in_head(name: str) -> bool:
        return not heads or any(name == h or name.startswith(h + ".") for h in heads)

    found = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and m.out_features == num_labels and in_head(n)]
    if not found:
        where = f"the head ({', '.join(heads)})" if heads else "the model"
        raise PtftError(
            f"cannot find the classifier: no nn.Linear with {num_labels} outputs in {where}; growing the label set "
            "needs a linear classifier"
        )
    return found[-1]


def load_previous(module: L.LightningModule, checkpoint: str) -> dict[str, torch.Tensor]:
    """Loads a previous ptft checkpoint's weights into ``module.model``, growing the classifier for new classes.

    Every weight and buffer must exist with the same shape, except the classifier's (:func:`find_head` within the
    module's ``head_modules``) when the module's labels extend the checkpoint's: its first rows (weight and bias)
    become the previous ones, the others keep their fresh initialisation. The module's L2-SP reference becomes the
    previous weights, so ``l2_sp`` pulls towards the previous model instead of the pretrained one.

    Args:
        module: A ptft module built for the new data (its ``label_names`` from the data).
        checkpoint: The previous model's ptft checkpoint.

    Returns:
        The classifier's previous rows by parameter name (empty when the classifier cannot be told).
    """
    if getattr(module, "peft_config", None) is not None:
        raise PtftError("continuing from a checkpoint with peft adapters is not supported: train the weights "
                        "(model.init_args.peft=null), or merge the adapters first with ptft export")
    saved = read_checkpoint(checkpoint, written_by_ptft=False)  # the weights and labels are all it needs
    hparams = saved.get("hyper_parameters", {})
    state = {k[len("model."):]: v for k, v in saved.get("state_dict", {}).items() if k.startswith("model.")}
    if not state:
        raise PtftError(f"{checkpoint} holds no model weights: give a checkpoint written by a ptft fit")
    own = module.model.state_dict()
    unexpected = sorted(set(state) - set(own))
    missing = sorted(set(own) - set(state))
    if unexpected or (missing and hparams.get("checkpoint_weights", "all") == "all"):
        first = unexpected[0] if unexpected else missing[0]
        raise PtftError(
            f"{checkpoint} is another architecture ({len(unexpected)} unknown, {len(missing)} missing weights, first: "
            f"{first}): build the model as the previous run did (model_name {hparams.get('model_name')!r})"
        )
    old_labels, new_labels = hparams.get("label_names"), getattr(module, "label_names", None)
    head_rows: set[str] = set()
    old_count = 0
    if old_labels is not None and new_labels is not None:
        check_extends(old_labels, new_labels, "list the previous classes first in the data's labels")
        old_count = len(old_labels)
        try:
            head = find_head(module.model, len(new_labels), module.head_modules(module.model))
        except PtftError:
            if len(new_labels) > old_count:
                raise
        else:
            head_rows = {f"{head}.weight", f"{head}.bias"} & set(state)
    previous_rows: dict[str, torch.Tensor] = {}
    with torch.no_grad():  # state_dict() tensors share their storage with the parameters and buffers
        for name, value in state.items():
            target = own[name]
            if name in head_rows and value.shape[0] == old_count and value.shape[1:] == target.shape[1:]:
                target[:old_count].copy_(value)
                previous_rows[name] = value.detach().clone()
            elif value.shape == target.shape:
                target.copy_(value)
            else:
                raise PtftError(
                    f"{checkpoint}: {name} has shape {tuple(value.shape)}, the model's {tuple(target.shape)}: build "
                    f"the model as the previous run did (model_name {hparams.get('model_name')!r})"
                )
    module.reset_l2_sp_reference()  # l2_sp > 0: the starting weights are now the previous model's
    return previous_rows


class ContinueFrom(TrainingLossCallback):
    """Starts fitting from a previous ptft checkpoint of the same architecture, on new data or new classes.

    At ``setup``, before the optimizer exists, the previous weights replace the module's (:func:`load_previous`).
    When the data's labels extend the previous ones (list the previous classes first, in their order), the classifier
    grows: the old classes' rows, weight and bias, are copied exactly; the new rows keep the module's fresh
    initialisation. Labels that drop or reorder previous classes are an error. The module's ``l2_sp`` then pulls the
    backbone towards the previous model rather than the pretrained one, and with ``l2_sp_head`` the classifier's old
    rows towards their previous values (same strength; the base L2-SP leaves heads out). A resumed run restores its
    own weights over the previous ones.

    Args:
        checkpoint: The previous model's ptft checkpoint, e.g. ``runs/cifar10-old/version_0/checkpoints/last.ckpt``.
        l2_sp_head: Include the classifier's old-class rows in the module's L2-SP penalty.
    """

    def __init__(self, checkpoint: str, l2_sp_head: bool = True) -> None:
        self.checkpoint = checkpoint
        self.l2_sp_head = l2_sp_head
        self.head_reference: dict[str, torch.Tensor] = {}

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        self.head_reference = load_previous(pl_module, self.checkpoint)
        labels = getattr(pl_module, "label_names", None)
        rows = next(iter(self.head_reference.values()), None)
        grown = f", {len(labels) - len(rows)} new classes" if labels is not None and rows is not None else ""
        rank_zero_info(f"continuing from {self.checkpoint}{grown}")

    def training_loss(self, module: L.LightningModule, batch: Any, loss: torch.Tensor) -> torch.Tensor:
        strength = getattr(module, "l2_sp", 0.0)
        if not (self.l2_sp_head and strength and self.head_reference):
            return loss
        params = dict(module.model.named_parameters())
        penalty = torch.zeros((), device=loss.device)
        for name, previous in self.head_reference.items():
            param = params[name]
            if previous.device != param.device:
                previous = self.head_reference[name] = previous.to(param.device)
            penalty = penalty + (param[: len(previous)] - previous).pow(2).sum()
        penalty = 0.5 * strength * penalty
        module.log("train/l2_sp_head", penalty, batch_size=module.batch_size_of(batch))
        return loss + penalty

    def state_dict(self) -> dict[str, Any]:
        return {"head_reference": {k: v.cpu() for k, v in self.head_reference.items()}}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.head_reference = dict(state_dict.get("head_reference", {}))


# --- old examples ----------------------------------------------------------------------------------------------
def example_subset(data: FineTuneDataModule, module: L.LightningModule | None, count: float | None, seed: int,
                   training: bool, at_most: bool = False) -> Dataset:
    """Part of ``data``'s training rows as a dataset: ``count`` rows (a fraction when below 1; all for ``None``) drawn
    with ``seed``, built with the training transforms (``training``) or the evaluation ones. ``at_most``: fewer rows
    than ``count`` is all of them rather than an error."""
    if module is not None:
        data.connect(module)
    data.setup("validate")  # what building needs (a tokenizer) and the checks; the held-out rows stay out of `rows`
    rows = data.split_rows("train")
    size = len(rows)
    if count is None:
        chosen = list(range(size))
    else:
        wanted = round(count * size) if 0 < count < 1 else int(count)
        if at_most:
            wanted = min(wanted, size)
        if count >= 1 and count != int(count):
            raise PtftError(f"give a whole number of old examples or a fraction below 1, got {count}")
        if not 0 < wanted <= size:
            raise PtftError(f"asked for {wanted} of the old task's {size} training examples: give 1 to {size} or a fraction")
        chosen = sorted(torch.randperm(size, generator=torch.Generator().manual_seed(seed))[:wanted].tolist())
    return data.build("train" if training else "val", select(rows, chosen))


class ContinualDataModule(FineTuneDataModule):
    """The new task's data together with the previous task's: replay, validation and testing on both.

    * Training: the new training set, plus ``replay`` examples of the old training set (drawn once with the new data's
      seed, augmented as the old data module augments), shuffled together every epoch.
    * Validation (``validate_on: all``): the new and old validation sets together, so the best checkpoint is the
      best on every class seen, not the one that forgot most; ``new``: the new task's alone.
    * Test (``test_on``): ``all`` (both test sets: accuracy over every class seen), ``new`` or ``old``;
      :func:`evaluate_old_and_new` reports the three side by side.

    The new data's labels must start with the old data's, in their order (``labels: [old..., new...]``), so that an old
    example's label id is the same in both and the model's classifier grows by appending rows (:class:`ContinueFrom`).
    Any ptft data module works for either part, whatever the modality; loaders take the new data's batch sizes,
    workers, seed and collate function.

    Args:
        new: The new task's data module.
        old: The previous task's data module (its labels are the previous model's).
        replay: Old training examples mixed into the training set: a count, or a fraction of the old training rows
            when below 1. 0 trains on the new data alone.
        validate_on: ``all``: validate on the new and old validation sets together; ``new``: on the new one alone.
        test_on: The test set ``ptft test`` reads: ``all`` (old and new), ``new`` or ``old``.
    """

    def __init__(
        self,
        new: FineTuneDataModule,
        old: FineTuneDataModule,
        replay: float = 0.0,
        validate_on: Literal["all", "new"] = "all",
        test_on: Literal["all", "new", "old"] = "all",
    ) -> None:
        super().__init__(batch_size=new.batch_size, eval_batch_size=new.eval_batch_size, num_workers=new.num_workers,
                         seed=new.given_seed)
        if replay < 0:
            raise PtftError(f"replay must be 0 or more (a count, or a fraction below 1), got {replay}")
        if validate_on not in ("all", "new") or test_on not in ("all", "new", "old"):
            raise PtftError(f"validate_on must be all or new, test_on all, new or old; got {validate_on!r}, {test_on!r}")
        self.new = new
        self.old = old
        self.replay = replay
        self.validate_on = validate_on
        self.test_on = test_on

    @property
    def label_names(self) -> list[str]:
        """The new data's class names in id order (the old data's first)."""
        new = list(self.new.label_names)
        check_extends(self.old.label_names, new, "list them first in data.init_args.new.init_args.labels")
        return new

    @property
    def num_labels(self) -> int:
        """Number of classes, old and new."""
        return len(self.label_names)

    def connect(self, model: L.LightningModule) -> None:
        self.new.connect(model)
        self.old.connect(model)

    def setup(self, stage: str) -> None:
        for data in (self.new, self.old):
            data.trainer = self.trainer  # their file checks run on rank 0 alone
        model = self.trainer.lightning_module if self.trainer is not None else None
        if model is not None:
            self.connect(model)
        if stage != "test" or self.test_on != "old":
            self.new.setup(stage)
        if stage == "fit" and self.replay and "train" not in self.old.datasets:
            # The old module's training set is the replay buffer: its train_lengths() then describe it.
            self.old.datasets["train"] = example_subset(self.old, model, self.replay, self.seed, training=True)
        if (stage in ("fit", "validate") and self.validate_on == "all") or (stage == "test" and self.test_on != "new"):
            self.old.setup("validate" if stage == "fit" else stage)

    def _joined(self, split: str, which: str) -> Dataset:
        datasets = [data._built(split) for data in {"new": [self.new], "old": [self.old], "all": [self.new, self.old]}[which]]
        return datasets[0] if len(datasets) == 1 else ConcatDataset(datasets)

    def train_dataloader(self) -> DataLoader:
        if not self.replay:
            return self._loader(self.new._built("train"), True, self.new.collate_fn(), self.new.train_lengths())
        lengths = [self.new.train_lengths(), self.old.train_lengths()]
        joined = lengths[0] + lengths[1] if None not in lengths else None
        return self._loader(self._joined("train", "all"), True, self.new.collate_fn(), joined)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self._joined("val", self.validate_on), train=False, collate_fn=self.new.collate_fn())

    def test_dataloader(self) -> DataLoader:
        return self._loader(self._joined("test", self.test_on), train=False, collate_fn=self.new.collate_fn())

    def predict_dataloader(self) -> DataLoader:
        return self.new.predict_dataloader()


def evaluate_old_and_new(trainer: L.Trainer, module: L.LightningModule, data: ContinualDataModule,
                     ckpt_path: str | None = None) -> dict[str, float]:
    """Tests ``module`` on the old task's test set, the new task's and both: ``test/old/acc``, ``test/new/acc``,
    ``test/all/acc`` (every test metric the module logs, renamed so).

    One ``trainer.test`` per set: a module's test metrics are one set per stage, so separate runs keep them apart
    with any module unchanged. Old-class accuracy is over all the classifier's classes (class-incremental: the model
    must also not mistake an old example for a new class).
    """
    chosen = data.test_on
    results: dict[str, float] = {}
    try:
        for which in ("old", "new", "all"):
            data.test_on = which
            metrics = trainer.test(module, datamodule=data, ckpt_path=ckpt_path, verbose=False)[0]
            results.update({f"test/{which}/{k.removeprefix('test/')}": float(v) for k, v in metrics.items()})
    finally:
        data.test_on = chosen
    rank_zero_info("  ".join(f"{k} {v:.4f}" for k, v in results.items() if k.endswith("/acc")))
    return results
