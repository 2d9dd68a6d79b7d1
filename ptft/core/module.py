"""The fine-tuning base module every ptft task module builds on."""

from __future__ import annotations

import copy
import functools
import inspect
import io
from collections.abc import Mapping
from dataclasses import asdict, is_dataclass
from typing import Any, Literal

import lightning as L
from lightning.pytorch.core.mixins.hparams_mixin import _given_hyperparameters
import torch
from torch import nn
from torchmetrics import MetricCollection

from ptft.core.errors import PtftError
from ptft.core.optim import (
    OptimizerConfig,
    SchedulerConfig,
    as_dict,
    build_optimizer,
    build_param_groups,
    build_scheduler,
    model_no_weight_decay,
    no_weight_decay,
)
from ptft.core.grad_checkpointing import enable_gradient_checkpointing
from ptft.core.peft import PeftConfig, apply_peft, plain_name
from ptft.core.rng import rng_states, set_rng_states

STAGES = ("train", "val", "test")


class FineTuneModule(L.LightningModule):
    """Owns a network, its optimizer and schedule, regularisers, PEFT adapters and checkpoints: what every task shares.

    A task module builds its network and hands it to :meth:`set_model`, and implements :meth:`forward`,
    :meth:`step` (batch -> loss and outputs), :meth:`head_modules` (which submodules are newly initialised) and
    :meth:`discover_layers` (a depth index per parameter). Metrics come from :meth:`build_metrics` and
    :meth:`update_metrics`. :class:`ClassificationModule` is the classification case.

    Args:
        optimizer: Optimizer and per-group learning rates (layer-wise decay, head learning rate).
        scheduler: Learning-rate schedule (warmup, decay), applied to every parameter group.
        l1: L1 penalty strength on trainable weight matrices.
        l2_sp: L2-SP strength: ``l2_sp / 2 * ||w - w_pretrained||^2`` over the backbone's trainable weights pulls them
            towards their starting values (Li et al., 2018). The starting weights are kept in checkpoints.
        peft: Parameter-efficient fine-tuning with the PEFT library (LoRA, LoHa, IA3); ``None`` trains the weights.
        checkpoint_weights: ``all`` saves every weight; ``trainable`` saves only what trains (adapters, unfrozen
            layers, buffers) and rebuilds the rest from the pretrained model on load or resume.
        compile: ``torch.compile`` backend for the model (``inductor``, ``aot_eager``…); ``None`` runs eagerly.
        gradient_checkpointing: Recompute each block's activations in the backward pass instead of keeping them: less
            memory, slower steps. Non-reentrant, so blocks above frozen layers (embeddings, a frozen stem, PEFT's
            frozen base) still get their gradients. Hugging Face and timm models, or modules holding them.
    """

    #: The metric the CLI's default best checkpoint follows, and whether higher is better.
    checkpoint_monitor: tuple[str, Literal["min", "max"]] = ("val/loss", "min")

    def __init_subclass__(cls, **kwargs: Any) -> None:
        # Records the arguments of the constructor a user calls, before any __init__ body runs: _save_hparams saves
        # them as given, without Lightning's frame introspection (which walks the call stack for __init__ locals).
        # functools.wraps keeps the signature and docstring that LightningCLI / jsonargparse read for --help.
        super().__init_subclass__(**kwargs)
        init = cls.__dict__.get("__init__")
        if init is None or hasattr(init, "__wrapped__"):
            return

        @functools.wraps(init)
        def recording_init(self: FineTuneModule, *args: Any, **kwargs: Any) -> None:
            if "_init_arguments" not in self.__dict__:  # the outermost constructor: the one that was called
                object.__setattr__(self, "_init_arguments", constructor_arguments(type(self), args, kwargs))
            init(self, *args, **kwargs)

        cls.__init__ = recording_init

    def __init__(
        self,
        # Frozen dataclass instances as defaults: --print_config then shows every field.
        optimizer: OptimizerConfig = OptimizerConfig(),  # noqa: B008
        scheduler: SchedulerConfig = SchedulerConfig(),  # noqa: B008
        l1: float = 0.0,
        l2_sp: float = 0.0,
        peft: PeftConfig | None = None,
        checkpoint_weights: Literal["all", "trainable"] = "all",
        compile: str | None = None,
        gradient_checkpointing: bool = False,
    ) -> None:
        super().__init__()
        self.optimizer_config = OptimizerConfig.coerce(optimizer)
        self.scheduler_config = SchedulerConfig.coerce(scheduler)
        self.peft_config = PeftConfig(**peft) if isinstance(peft, dict) else peft
        if self.peft_config is not None and self.peft_config.base_weights == "nf4" and checkpoint_weights == "all":
            raise PtftError("peft.base_weights=nf4 needs checkpoint_weights: trainable (the 4-bit base is rebuilt "
                            "from the pretrained model; full checkpoints cannot reload 4-bit weights)")
        self.l1 = l1
        self.l2_sp = l2_sp
        self.checkpoint_weights = checkpoint_weights
        self.compile_backend = compile
        self.gradient_checkpointing = gradient_checkpointing
        # Trainable-only checkpoints lack the frozen weights: they come from the pretrained model instead.
        self.strict_loading = checkpoint_weights == "all"
        metrics = self.build_metrics()
        # Keyed "train_", "val_", "test_": a ModuleDict key "train" would shadow nn.Module.train.
        self.metrics = nn.ModuleDict(
            {} if metrics is None else {f"{stage}_": metrics.clone(prefix=f"{stage}/") for stage in STAGES}
        )
        self._head_names: set[str] = set()
        self._plain_layers: dict[str, int] = {}
        self._l2_sp_reference: dict[str, torch.Tensor] = {}
        self._no_decay: dict[str, bool] = {}  # plain parameter name -> exempt from weight decay (set_model)

    # --- building -------------------------------------------------------------------------------------------
    def set_model(self, model: nn.Module) -> None:
        """Installs the task network as ``self.model``; the shared work once a subclass has built it."""
        # from_pretrained returns eval mode and Lightning keeps submodules' modes: without this, dropout stays off.
        model.train()
        heads = self.head_modules(model)
        self._head_names = {n for n, _ in model.named_parameters() if any(n == h or n.startswith(h + ".") for h in heads)}
        self._plain_layers = self.discover_layers(model)
        if self.gradient_checkpointing:  # before PEFT wraps the model: the backends' own models take the switch
            enable_gradient_checkpointing(model)
        if self.peft_config is not None:
            model = apply_peft(model, self.peft_config, heads)
        self.model = model
        # Weight decay decided on the real shapes, now: under FSDP the optimizer is built from 1-D shards.
        skip = model_no_weight_decay(model)
        self._no_decay = {plain_name(n): no_weight_decay(n, p) or n in skip for n, p in model.named_parameters()}
        if self.l2_sp > 0:
            self._l2_sp_reference = {
                n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad and not self.is_head_parameter(n)
            }
        if self.compile_backend is not None:
            self.model.compile(backend=self.compile_backend)  # in place: parameter names and checkpoints unchanged

    def reset_l2_sp_reference(self) -> None:
        """Makes the current weights the ones L2-SP pulls towards (continuing from a previous fine-tune, whose
        weights were loaded after :meth:`set_model`); nothing when ``l2_sp`` is off."""
        if self._l2_sp_reference:
            params = dict(self.model.named_parameters())
            self._l2_sp_reference = {n: params[n].detach().clone() for n in self._l2_sp_reference}

    def _save_hparams(self, **overrides: Any) -> None:
        """Saves the constructor's arguments as plain values, so ``load_from_checkpoint`` works outside the CLI.

        Call it at the end of the task module's ``__init__``; ``overrides`` replace saved values in full
        checkpoints (``pretrained=False``: the weights are in the checkpoint). Not logged: the CLI logs the whole
        nested config once, and Lightning's flat copy would duplicate it.
        """
        hparams = {k: v for k, v in getattr(self, "_init_arguments", {}).items() if k not in ("optimizer", "scheduler", "peft")}
        # Built by LightningCLI: keep the class path and instantiator it passes, with which it parses a checkpoint's
        # hyperparameters again (test / predict --ckpt_path) and load_from_checkpoint rebuilds the class.
        given = _given_hyperparameters.get() or {}
        hparams.update({k: given[k] for k in ("_class_path", "_instantiator") if k in given})
        hparams.update(
            optimizer=as_dict(self.optimizer_config),
            scheduler=as_dict(self.scheduler_config),
            peft=None if self.peft_config is None else as_dict(self.peft_config),
        )
        if self.checkpoint_weights == "all":
            # A full checkpoint rebuilds the architecture without the pretrained weights (they are in it).
            hparams.update(overrides)
        # What save_hyperparameters(dict) ends with, minus its search of the call stack for __init__ locals.
        self._log_hyperparams = False
        self._hparams_name = "kwargs"
        self._set_hparams(hparams)
        self._hparams_initial = copy.deepcopy(self._hparams)

    # --- subclass hooks -------------------------------------------------------------------------------------
    def forward(self, batch: dict[str, torch.Tensor]) -> Any:
        """Runs the network on a batch (classification: logits of shape ``(batch, num_labels)``)."""
        raise NotImplementedError

    def step(self, batch: dict[str, Any], stage: str) -> tuple[torch.Tensor, Any]:
        """The loss of a batch and the outputs :meth:`update_metrics` needs (``stage``: train, val or test)."""
        raise NotImplementedError

    def build_metrics(self) -> MetricCollection | None:
        """The metrics of one stage; cloned per stage with ``train/``, ``val/``, ``test/`` prefixes."""
        return None

    def update_metrics(self, stage: str, outputs: Any, batch: dict[str, Any]) -> None:
        """Updates and logs ``self.metrics[f"{stage}_"]`` from :meth:`step`'s outputs."""

    def epoch_metrics(self, stage: str) -> dict[str, torch.Tensor] | None:
        """Scores computed once per evaluation epoch (QA, generation, retrieval, mAP), or ``None``.

        Override it for metrics that need the whole epoch: compute ``self.metrics[f"{stage}_"]`` (torchmetrics syncs
        every rank's states first) and return the values to log. The base logs them and resets the states. Tasks whose
        Metric objects are logged per step (classification) keep the default: Lightning computes and resets those.
        """
        return None

    def head_modules(self, model: nn.Module) -> list[str]:
        """Names of the submodules of ``model`` that form the newly initialised task head (none by default)."""
        return []

    def discover_layers(self, model: nn.Module) -> dict[str, int]:
        """Depth index of every parameter of ``model``: 0 = embeddings / stem, one per block, the head on top."""
        raise NotImplementedError

    # --- layers ---------------------------------------------------------------------------------------------
    def is_head_parameter(self, name: str) -> bool:
        """Whether parameter ``name`` of ``self.model`` belongs to the task head."""
        return plain_name(name) in self._head_names

    def layer_ids(self) -> dict[str, int]:
        """Depth index of every parameter of ``self.model`` (adapters take the index of the layer they adapt)."""
        ids = {}
        for name, _ in self.model.named_parameters():
            plain = plain_name(name)
            layer = self._plain_layers.get(plain)
            while layer is None and "." in plain:  # an adapter's weights: look up the module it sits in
                plain = plain.rsplit(".", 1)[0]
                layer = next((v for k, v in self._plain_layers.items() if k.startswith(plain + ".")), None)
            ids[name] = layer if layer is not None else 0
        return ids

    # --- steps ----------------------------------------------------------------------------------------------
    def penalty(self) -> torch.Tensor | None:
        """L1 and L2-SP penalties over the trainable weights, or ``None`` when both are off."""
        if not (self.l1 or self.l2_sp):
            return None
        total = torch.zeros((), device=self.device)
        for name, param in self.model.named_parameters():
            if not param.requires_grad:
                continue
            if self.l1 and not no_weight_decay(name, param):
                total = total + self.l1 * param.abs().sum()
            reference = self._l2_sp_reference.get(name)
            if self.l2_sp and reference is not None:
                if reference.device != param.device:
                    reference = self._l2_sp_reference[name] = reference.to(param.device)
                total = total + 0.5 * self.l2_sp * (param - reference).pow(2).sum()
        return total

    @staticmethod
    def batch_size_of(batch: Any) -> int:
        """Examples in a batch (the length of its first tensor), for logging averages."""
        # Mapping, not dict: a tokenizer's BatchEncoding is a UserDict, whose iteration gives its keys (a key's
        # letters were counted as examples, and evaluation losses were unweighted means of batch means).
        values = batch.values() if isinstance(batch, Mapping) else batch
        first = next(v for v in values if hasattr(v, "__len__"))
        return len(first)

    def _shared_step(self, batch: dict[str, Any], stage: str) -> torch.Tensor:
        loss, outputs = self.step(batch, stage)
        # Evaluation losses are epoch means over every rank's batches: the checkpoint and plateau monitors must agree.
        self.log(
            f"{stage}/loss", loss, prog_bar=stage != "test", batch_size=self.batch_size_of(batch), sync_dist=stage != "train"
        )
        self.update_metrics(stage, outputs, batch)
        return loss

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        loss = self._shared_step(batch, "train")
        if self._trainer is not None:
            from ptft.core.callbacks import TrainingLossCallback

            for callback in self.trainer.callbacks:
                if isinstance(callback, TrainingLossCallback):
                    loss = callback.training_loss(self, batch, loss)
        penalty = self.penalty()
        if penalty is not None:
            self.log("train/penalty", penalty, batch_size=self.batch_size_of(batch))
            loss = loss + penalty
        return loss

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._shared_step(batch, "val")

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._shared_step(batch, "test")

    def _log_epoch_metrics(self, stage: str) -> None:
        values = self.epoch_metrics(stage)
        if values is None:
            return
        # Already equal on every rank (computed from synced states): no sync_dist reduction needed.
        self.log_dict(values, prog_bar=stage == "val", sync_dist=False)
        with torch.inference_mode(False):  # states reset under inference mode could not be updated by a later fit
            self.metrics[f"{stage}_"].reset()

    def on_fit_start(self) -> None:
        # A trainer.validate() before fit() (a notebook's baseline) leaves metric states created under inference mode,
        # which fit's steps could not update in place: fresh states, outside inference mode.
        with torch.inference_mode(False):
            for metrics in self.metrics.values():
                metrics.reset()

    def on_validation_epoch_end(self) -> None:
        self._log_epoch_metrics("val")

    def on_test_epoch_end(self) -> None:
        self._log_epoch_metrics("test")

    def prediction_rows(self, outputs: Any) -> list[dict[str, Any]]:
        """One flat row per example of a :meth:`predict_step` output, for :class:`ptft.core.WritePredictions`."""
        raise NotImplementedError(f"{type(self).__name__} does not define prediction rows")

    # --- optimization ---------------------------------------------------------------------------------------
    def param_groups(self) -> list[dict[str, Any]]:
        """Parameter groups with a real ``lr`` each; see :func:`ptft.core.optim.build_param_groups`.

        Layer indices come from the whole model, so frozen parameters do not shift the decay of the others.
        """
        cfg = self.optimizer_config
        layers = self.layer_ids()
        skip = model_no_weight_decay(self.model)

        def no_decay(name: str, param: torch.Tensor) -> bool:
            known = self._no_decay.get(plain_name(name))  # decided in set_model, on the unsharded shapes
            if known is not None:
                return known
            if getattr(param, "_fsdp_flattened", False):  # added after set_model and already a 1-D FSDP shard
                raise PtftError(f"cannot tell whether FSDP-sharded parameter {name} takes weight decay: set "
                                "optimizer.weight_decay=0, or create it in set_model")
            return no_weight_decay(name, param) or name in skip

        return build_param_groups(
            self.model.named_parameters(),
            lr=cfg.lr,
            weight_decay=cfg.weight_decay,
            layer_of=layers.__getitem__,
            num_layers=max(layers.values(), default=0),
            layer_decay=cfg.layer_decay,
            head_lr=cfg.head_lr,
            no_decay=no_decay,
        )

    def configure_gradient_clipping(
        self, optimizer: torch.optim.Optimizer, gradient_clip_val: float | None = None,
        gradient_clip_algorithm: str | None = None,
    ) -> None:
        """Clips as Lightning does, also for fused optimizers under mixed precision.

        Lightning's ``MixedPrecision`` plugin refuses to clip when the optimizer "handles unscaling" itself (every
        fused optimizer: ``_step_supports_amp_scaling``), so ``precision: bf16-mixed`` (what ``auto`` picks on GPUs
        and bf16 CPUs) with the recipes' fused AdamW and ``gradient_clip_val`` stopped at the first step. bf16 has
        no loss scaler: its gradients are the true ones, and clipping them is correct. fp16's scaler unscales them
        here first; ``GradScaler.step`` then tells the fused kernel they are unscaled (``grad_scale=None``).
        """
        from lightning.pytorch.plugins.precision import MixedPrecision, Precision
        from lightning.pytorch.utilities.enums import GradClipAlgorithmType

        algorithm = GradClipAlgorithmType(gradient_clip_algorithm or GradClipAlgorithmType.NORM)
        if gradient_clip_val and algorithm == GradClipAlgorithmType.NORM and _is_fsdp(self.trainer.strategy):
            # The norm over every rank's shards, by the root FSDP module (torch's FSDP docs: clip_grad_norm_ over
            # the local parameters would clip each shard by its own norm). Lightning's FSDPPrecision refuses norm
            # clipping instead; it has already unscaled fp16 gradients (non-fused optimizers) by now.
            self.trainer.strategy.model.clip_grad_norm_(gradient_clip_val)
            return
        plugin = self.trainer.precision_plugin
        if not (isinstance(plugin, MixedPrecision) and gradient_clip_val and getattr(optimizer, "_step_supports_amp_scaling", False)):
            super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)
            return
        if plugin.scaler is not None:  # Lightning unscales only optimizers that do not handle it: never these
            plugin.scaler.unscale_(optimizer)
        Precision.clip_gradients(plugin, optimizer, gradient_clip_val, algorithm)

    def configure_optimizers(self) -> Any:
        if (self.l1 or self.l2_sp) and self._trainer is not None and _is_fsdp(self.trainer.strategy):
            # Each rank holds a shard: its penalty and the gradient FSDP averages over ranks would be 1/N of the truth.
            raise PtftError("l1 and l2_sp are not supported under FSDP (each process holds only a shard of the "
                            "weights): use DDP or DeepSpeed, or set them to 0")
        optimizer = build_optimizer(self.param_groups(), self.optimizer_config)
        scheduler = build_scheduler(optimizer, self.scheduler_config, self.trainer.estimated_stepping_batches)
        if scheduler is None:
            return optimizer
        return {"optimizer": optimizer, "lr_scheduler": scheduler}

    @property
    def lr(self) -> float:
        """Peak learning rate (``optimizer.lr``); settable, for Lightning's learning-rate finder."""
        return self.optimizer_config.lr

    @lr.setter
    def lr(self, value: float) -> None:
        from dataclasses import replace

        self.optimizer_config = replace(self.optimizer_config, lr=value)
        if "optimizer" in self.hparams:
            self.hparams["optimizer"] = as_dict(self.optimizer_config)

    # --- export ---------------------------------------------------------------------------------------------
    def export(self, folder: str) -> None:
        """Writes the model, adapters merged, as a plain folder its backend loads without ptft."""
        from ptft.core.peft import merge_adapters

        self.save_model(merge_adapters(self.model), folder)

    def save_model(self, model: nn.Module, folder: str) -> None:
        """Saves ``model`` in its backend's format (``save_pretrained``, timm's hub layout)."""
        raise NotImplementedError

    # --- checkpoints ----------------------------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if self.checkpoint_weights == "trainable":
            keep = {f"model.{n}" for n, p in self.model.named_parameters() if p.requires_grad}
            params = {f"model.{n}" for n, _ in self.model.named_parameters()}
            # A frozen parameter's own entries go too: the quantization state of a 4-bit weight (``<name>.absmax``…).
            frozen = params - keep

            def kept(key: str) -> bool:
                parts = key.split(".")
                owned = any(".".join(parts[:i]) in frozen for i in range(1, len(parts)))
                return key in keep or (key not in params and not owned)

            checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if kept(k)}
        if self._l2_sp_reference:
            checkpoint["l2_sp_reference"] = {k: v.cpu() for k, v in self._l2_sp_reference.items()}
        checkpoint["ptft_module"] = f"{type(self).__module__}.{type(self).__qualname__}"
        # Dropout and augmentation draw from these: a resumed run continues the same random streams, on every rank.
        states = rng_states()
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            # Every rank saves; rank 0's file keeps them all. Sent as torch.save bytes: all_gather_object's own
            # unpickler fails on tensor storages (torch 2.14: "UntypedStorage has no attribute dtype").
            buffer = io.BytesIO()
            torch.save(states, buffer)
            every_rank: list[Any] = [None] * torch.distributed.get_world_size()
            torch.distributed.all_gather_object(every_rank, buffer.getvalue())
            checkpoint["rng_states_per_rank"] = [torch.load(io.BytesIO(b), weights_only=True) for b in every_rank]
        checkpoint["rng_states"] = states

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if not hasattr(self, "training_aids"):
            # Modules a callback adds for training only (distillation's hidden-state projections): a checkpoint
            # written with them loads for test, predict or export without that callback.
            state = checkpoint.get("state_dict", {})
            for key in [k for k in state if k.startswith("training_aids.")]:
                del state[key]
        if "l2_sp_reference" in checkpoint:
            self._l2_sp_reference = dict(checkpoint["l2_sp_reference"])
        if self._trainer is None or self.trainer.state.fn != "fit" or "rng_states" not in checkpoint:
            return
        per_rank = checkpoint.get("rng_states_per_rank")
        rank = self.trainer.global_rank
        if per_rank is not None and rank < len(per_rank):
            set_rng_states(per_rank[rank])
        else:  # saved by one process, resumed by several: each rank starts from the saved streams
            set_rng_states(checkpoint["rng_states"])


def _is_fsdp(strategy: Any) -> bool:
    """Whether Lightning's strategy shards the model with FSDP (imported only when asked)."""
    from lightning.pytorch.strategies import FSDPStrategy

    return isinstance(strategy, FSDPStrategy)


def constructor_arguments(cls: type, args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, Any]:
    """The arguments of ``cls(*args, **kwargs)`` by name, with the defaults of ``cls`` and of the base classes its
    ``**kwargs`` reach (a task module forwards the shared arguments to :class:`FineTuneModule`).

    Dataclass values become dicts (checkpoints load with ``weights_only=True``).
    """
    arguments: dict[str, Any] = {}
    for klass in cls.__mro__:
        if klass is L.LightningModule:  # and above: not ptft's arguments
            break
        if "__init__" not in vars(klass):
            continue
        signature = inspect.signature(inspect.unwrap(klass.__init__))
        try:
            bound = signature.bind_partial(None, *args, **kwargs) if klass is cls else None
        except TypeError:
            bound = None
        if bound is not None:
            for name, value in bound.arguments.items():
                parameter = signature.parameters[name]
                if parameter.kind is parameter.VAR_KEYWORD:
                    arguments.update(value)
                elif parameter.kind is not parameter.VAR_POSITIONAL and name != "self":
                    arguments[name] = value
        for name, parameter in signature.parameters.items():
            if parameter.default is not parameter.empty:
                arguments.setdefault(name, parameter.default)
    return {k: asdict(v) if is_dataclass(v) and not isinstance(v, type) else v for k, v in arguments.items()}


def read_checkpoint(path: str, written_by_ptft: bool = True) -> dict[str, Any]:
    """A checkpoint's dict (``weights_only`` loading, on CPU), or a one-line error for a missing file or, with
    ``written_by_ptft``, a checkpoint no ptft module wrote (one without the module's class path). A sharded
    checkpoint folder (FSDP, DeepSpeed) is consolidated first: see :func:`ptft.core.sharded.consolidate`."""
    from pathlib import Path

    if Path(path).expanduser().is_dir():
        from ptft.core.sharded import consolidate

        checkpoint = consolidate(path)
    elif not Path(path).expanduser().is_file():
        raise PtftError(f"checkpoint {str(path)!r} does not exist")
    else:
        checkpoint = torch.load(Path(path).expanduser(), map_location="cpu", weights_only=True)
    class_path = checkpoint.get("ptft_module") or checkpoint.get("hyper_parameters", {}).get("_class_path")
    if written_by_ptft and ("state_dict" not in checkpoint or not class_path):
        raise PtftError(f"{path} was not written by a ptft module")
    return checkpoint


def load_checkpoint(path: str, map_location: Any = "cpu") -> FineTuneModule:
    """Loads any ptft checkpoint as the module class that saved it (``weights_only`` loading throughout)."""
    import importlib

    checkpoint = read_checkpoint(path)
    class_path = checkpoint.get("ptft_module") or checkpoint["hyper_parameters"]["_class_path"]
    module_name, _, class_name = class_path.rpartition(".")
    cls = getattr(importlib.import_module(module_name), class_name)
    from pathlib import Path

    source: Any = path
    if Path(path).expanduser().is_dir():  # a sharded folder: Lightning loads the dict consolidated above
        source = io.BytesIO()
        torch.save(checkpoint, source)
        source.seek(0)
    return cls.load_from_checkpoint(source, map_location=map_location)
