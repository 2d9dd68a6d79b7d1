"""Which parameters train when: freezing, linear probing, unfreezing schedules, BitFit, frozen BatchNorm.

One callback, :class:`FreezeSchedule`, with typed arguments; the presets below only change its defaults.
It is correct where Lightning's ``BaseFinetuning`` is not (see docs/strategies.md):

- every parameter that will ever train is in the optimizer from the start, so the optimizer's groups never change
  (resume works) and every scheduler covers every group (a group unfrozen later gets its scheduled ``lr``);
- the frozen / trainable state is a pure function of (epoch, global step), re-applied after a resume, never stored;
- under DDP or ``torch.compile`` a parameter's ``requires_grad`` never changes after the model is wrapped: layers
  waiting to be unfrozen compute (and all-reduce) gradients that are dropped before the optimizer step, so every
  replica unfreezes the same parameters at the same step and compiled graphs stay valid. On a single uncompiled
  process ``requires_grad`` is switched instead, so frozen layers cost no backward compute.
"""

from __future__ import annotations

import fnmatch
from typing import Any, Literal

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import nn

from ptft.core.errors import PtftError

_BN = (nn.modules.batchnorm._BatchNorm,)


def is_compiled(module: nn.Module) -> bool:
    """Whether ``module`` or a submodule was compiled with ``torch.compile`` (wrapper or in-place ``.compile()``)."""
    from torch._dynamo.eval_frame import OptimizedModule

    return any(isinstance(m, OptimizedModule) or getattr(m, "_compiled_call_impl", None) is not None for m in module.modules())


class FreezeSchedule(L.Callback):
    """Which layer groups of ``model`` train at each epoch / step.

    Layers come from the module's layer discovery (``ptft inspect-layers``): 0 = embeddings / stem, then one per
    block, the task head on top. At any time the top ``k`` layers train; ``k`` starts at ``train_layers`` and grows
    with the unfreezing options.

    Args:
        train_layers: Layer groups, counted from the top (the head is 1), that train from the start. ``-1`` trains all
            (no freezing); ``1`` trains the head only (linear probe); with a ``tower``, ``0`` freezes it (until an
            unfreezing option starts it).
        unfreeze_at_epoch: From this epoch on, every layer trains (freeze -> unfreeze; LP-FT).
        unfreeze_at_step: From this optimizer step on, every layer trains.
        unfreeze_every_n_epochs: Gradual unfreezing (ULMFiT): ``layers_per_unfreeze`` more layer groups, top-down,
            every n epochs.
        unfreeze_milestones: Epochs at which ``layers_per_unfreeze`` more layer groups start training.
        layers_per_unfreeze: Layer groups added by each gradual / milestone unfreezing step.
        biases_only: BitFit: within the layers that train, only biases train (and the whole head).
        freeze: Parameter-name patterns (``fnmatch``, on the model's names as ``ptft inspect-layers`` prints them)
            frozen for the whole run, e.g. ``["bert.embeddings.*", "bert.encoder.layer.[0-3].*"]``.
        freeze_bn: Which BatchNorm layers stop updating running statistics (eval mode): ``frozen`` (those of frozen
            layers), ``all`` or ``none``.
        tower: Apply the schedule to one tower of a multimodal module (``text``, ``vision``, ``projection``…; ``ptft
            inspect-layers`` lists them) and leave the other towers alone; layers then count within the tower (its
            top block is 1). One callback per tower gives each tower its own schedule.
    """

    def __init__(
        self,
        train_layers: int = -1,
        unfreeze_at_epoch: int | None = None,
        unfreeze_at_step: int | None = None,
        unfreeze_every_n_epochs: int | None = None,
        unfreeze_milestones: list[int] | None = None,
        layers_per_unfreeze: int = 1,
        biases_only: bool = False,
        freeze: list[str] | None = None,
        freeze_bn: Literal["frozen", "all", "none"] = "frozen",
        tower: str | None = None,
    ) -> None:
        if train_layers < -1 or (train_layers == 0 and tower is None):
            raise PtftError(f"train_layers must be -1 (all) or >= 1 (0 too with a tower: frozen), got {train_layers}")
        if unfreeze_every_n_epochs is not None and unfreeze_every_n_epochs < 1:
            raise PtftError("unfreeze_every_n_epochs must be >= 1")
        self.train_layers = train_layers
        self.unfreeze_at_epoch = unfreeze_at_epoch
        self.unfreeze_at_step = unfreeze_at_step
        self.unfreeze_every_n_epochs = unfreeze_every_n_epochs
        self.unfreeze_milestones = sorted(unfreeze_milestones or [])
        self.layers_per_unfreeze = layers_per_unfreeze
        self.biases_only = biases_only
        self.freeze_patterns = list(freeze or [])
        self.freeze_bn = freeze_bn
        self.tower = tower
        self.mask_gradients = False
        self._layers: dict[str, int] = {}
        self._top = 0
        self._params: dict[str, nn.Parameter] = {}
        self._frozen_by_module: set[str] = set()
        self._depth: int | None = None
        self._training: set[str] = set()  # names training at the current depth, recomputed when it changes

    @property
    def state_key(self) -> str:
        return self._generate_state_key(tower=self.tower)  # several schedules, one per tower, may run together

    # --- the schedule ---------------------------------------------------------------------------------------
    def depth(self, epoch: int, step: int) -> int:
        """How many layer groups, from the top, train at ``epoch`` / optimizer ``step``."""
        everything = self._top + 1
        if self.train_layers == -1:
            return everything
        if self.unfreeze_at_epoch is not None and epoch >= self.unfreeze_at_epoch:
            return everything
        if self.unfreeze_at_step is not None and step >= self.unfreeze_at_step:
            return everything
        steps = sum(m <= epoch for m in self.unfreeze_milestones)
        if self.unfreeze_every_n_epochs:
            steps += epoch // self.unfreeze_every_n_epochs
        return min(everything, self.train_layers + steps * self.layers_per_unfreeze)

    def _may_train(self, name: str) -> bool:
        """Whether ``name`` trains at some point of the run (the rest is frozen once, before the optimizer is built)."""
        if name in self._frozen_by_module:  # e.g. base weights under PEFT adapters
            return False
        if any(fnmatch.fnmatchcase(name, p) for p in self.freeze_patterns):
            return False
        if self.biases_only and self._layers[name] != self._top and not name.endswith("bias"):
            return False
        can_grow = (
            self.train_layers == -1
            or self.unfreeze_at_epoch is not None
            or self.unfreeze_at_step is not None
            or self.unfreeze_every_n_epochs is not None
            or self.unfreeze_milestones
        )
        return bool(can_grow) or self._layers[name] > self._top - self.train_layers

    def trains(self, name: str, depth: int) -> bool:
        """Whether parameter ``name`` trains when the top ``depth`` layer groups do."""
        return self._may_train(name) and self._layers[name] > self._top - depth

    # --- Lightning hooks ------------------------------------------------------------------------------------
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        if not hasattr(pl_module, "layer_ids"):
            raise PtftError(f"FreezeSchedule needs a ptft module with layer discovery, got {type(pl_module).__name__}")
        self._layers = pl_module.layer_ids()
        self._params = dict(pl_module.model.named_parameters())
        if self.tower is not None:
            names = tower_parameters(pl_module, self.tower)
            self._params = {n: p for n, p in self._params.items() if n in names}
            self._layers = {n: i for n, i in self._layers.items() if n in names}
        self._top = max(self._layers.values(), default=0)
        self._frozen_by_module = {n for n, p in self._params.items() if not p.requires_grad}
        self._given_requires_grad = {n: p.requires_grad for n, p in self._params.items()}
        if self.freeze_patterns:
            unmatched = [p for p in self.freeze_patterns if not any(fnmatch.fnmatchcase(n, p) for n in self._params)]
            if unmatched:
                raise PtftError(f"freeze pattern(s) {unmatched} match no parameter; see: ptft inspect-layers --config ...")
        # Parameters that never train are frozen before the optimizer and any DDP wrapper are built.
        for name, param in self._params.items():
            if not self._may_train(name):
                param.requires_grad_(False)
        self.mask_gradients = trainer.world_size > 1 or is_compiled(pl_module)

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        # The model leaves fit as it came: a second fit of the same object (a notebook) would otherwise take the
        # layers frozen at the end for layers frozen by the model itself (PEFT) and never train them.
        if stage == "fit":
            for name, flag in getattr(self, "_given_requires_grad", {}).items():
                self._params[name].requires_grad_(flag)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._depth = None
        self._apply(trainer, pl_module)

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._apply(trainer, pl_module)
        self._set_bn_modes(pl_module)

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int) -> None:
        if self.unfreeze_at_step is not None:
            self._apply(trainer, pl_module)

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: torch.optim.Optimizer) -> None:
        if self.mask_gradients:
            for name, param in self._params.items():
                if param.grad is not None and name not in self._training:
                    param.grad = None  # the optimizer skips it: no update, no weight decay, no moment

    def _apply(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        depth = self.depth(trainer.current_epoch, trainer.global_step)
        if depth == self._depth:
            return
        self._depth = depth
        self._training = {name for name in self._params if self.trains(name, depth)}
        if not self.mask_gradients:
            for name, param in self._params.items():
                if self._may_train(name):
                    param.requires_grad_(name in self._training)
        self._set_bn_modes(pl_module)
        training = sum(p.numel() for n, p in self._params.items() if n in self._training)
        total = sum(p.numel() for p in self._params.values())
        first = self._top + 1 - depth
        which = f"layers {max(first, 0)}-{self._top} of 0-{self._top} train" if depth > 0 else f"no layer of 0-{self._top} trains"
        where = f"tower {self.tower}, " if self.tower is not None else ""
        rank_zero_info(
            f"{where}epoch {trainer.current_epoch}, step {trainer.global_step}: {which}, {training:,} of {total:,} "
            f"parameters ({100 * training / max(total, 1):.1f}%)"
        )
        if trainer.logger is not None and trainer.is_global_zero:
            key = f"freeze/{self.tower}/trainable_fraction" if self.tower is not None else "freeze/trainable_fraction"
            trainer.logger.log_metrics({key: training / max(total, 1)}, step=trainer.global_step)

    def _set_bn_modes(self, pl_module: L.LightningModule) -> None:
        if self.freeze_bn == "none":
            return
        for prefix, module in pl_module.model.named_modules():
            if isinstance(module, _BN) and module.weight is not None:
                name = f"{prefix}.weight" if prefix else "weight"
                if name not in self._params:  # another tower's
                    continue
                frozen = self.freeze_bn == "all" or name not in self._training
                module.train(not frozen)


def tower_parameters(pl_module: L.LightningModule, tower: str) -> set[str]:
    """Names (in ``pl_module.model``) of the parameters of ``tower``, from the module's ``towers()`` prefixes."""
    towers = pl_module.towers() if hasattr(pl_module, "towers") else None
    if not towers:
        raise PtftError(f"tower={tower!r}: {type(pl_module).__name__} has no towers (multimodal modules have)")
    if tower not in towers:
        raise PtftError(f"tower={tower!r} does not exist; {type(pl_module).__name__} has towers {sorted(towers)}")
    prefixes = towers[tower]
    return {n for n, _ in pl_module.model.named_parameters() if any(n == p or n.startswith(p + ".") for p in prefixes)}


class LinearProbe(FreezeSchedule):
    """Trains the task head only (the backbone stays frozen, its BatchNorm statistics too)."""

    def __init__(self, freeze_bn: Literal["frozen", "all", "none"] = "frozen") -> None:
        super().__init__(train_layers=1, freeze_bn=freeze_bn)


class FreezeUnfreeze(FreezeSchedule):
    """Trains the head alone, then everything from ``unfreeze_at_epoch`` on. LP-FT (Kumar et al., 2022) with a
    probing phase of ``unfreeze_at_epoch`` epochs.

    Args:
        unfreeze_at_epoch: Epoch from which every layer trains.
        freeze_bn: BatchNorm layers kept in eval mode: ``frozen``, ``all`` or ``none``.
    """

    def __init__(self, unfreeze_at_epoch: int = 1, freeze_bn: Literal["frozen", "all", "none"] = "frozen") -> None:
        super().__init__(train_layers=1, unfreeze_at_epoch=unfreeze_at_epoch, freeze_bn=freeze_bn)


class GradualUnfreeze(FreezeSchedule):
    """ULMFiT's gradual unfreezing: the head first, then one more layer group, top-down, every n epochs.

    Args:
        every_n_epochs: Epochs between two unfreezing steps.
        layers_per_unfreeze: Layer groups added at each step.
        freeze_bn: BatchNorm layers kept in eval mode: ``frozen``, ``all`` or ``none``.
    """

    def __init__(
        self, every_n_epochs: int = 1, layers_per_unfreeze: int = 1, freeze_bn: Literal["frozen", "all", "none"] = "frozen"
    ) -> None:
        super().__init__(
            train_layers=1, unfreeze_every_n_epochs=every_n_epochs, layers_per_unfreeze=layers_per_unfreeze,
            freeze_bn=freeze_bn,
        )


class BitFit(FreezeSchedule):
    """BitFit (Ben Zaken et al., 2022): only the biases of the backbone train, plus the whole task head."""

    def __init__(self) -> None:
        super().__init__(train_layers=-1, biases_only=True)


class FreezeFeatureEncoder(FreezeSchedule):
    """Keeps the convolutional feature encoder of wav2vec2-style speech models (wav2vec2, HuBERT, WavLM, data2vec
    audio: ``*.feature_extractor.*``) frozen for the whole run, as their fine-tuning recipes do (transformers'
    ``freeze_feature_encoder()``); everything else trains, optionally on a schedule.

    Args:
        patterns: Parameter-name patterns of the feature encoder (``ptft inspect-layers`` shows the names).
        unfreeze_every_n_epochs: Gradual unfreezing of the rest (head first), as :class:`FreezeSchedule`.
        train_layers: Layer groups, counted from the top, that train from the start (``-1``: all but the encoder).
    """

    def __init__(
        self, patterns: list[str] | None = None, unfreeze_every_n_epochs: int | None = None, train_layers: int = -1
    ) -> None:
        super().__init__(
            train_layers=train_layers, unfreeze_every_n_epochs=unfreeze_every_n_epochs,
            freeze=patterns or ["*feature_extractor.*"],
        )
