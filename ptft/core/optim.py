"""Parameter groups, optimizers and learning-rate schedules.

Every optimizer ptft builds goes through :func:`build_param_groups`, so every strategy (layer-wise decay,
discriminative learning rates, frozen groups) ends up as a real ``lr`` per group that any scheduler scales.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from typing import Any, Literal

import torch
from torch import nn

from ptft.core.errors import PtftError

OptimizerName = Literal["adamw", "adam", "sgd", "rmsprop", "adagrad"]
SchedulerName = Literal["constant", "linear", "cosine", "step", "onecycle", "plateau"]


@dataclass(frozen=True)
class OptimizerConfig:
    """Optimizer settings (``model.init_args.optimizer`` in a recipe)."""

    name: OptimizerName = "adamw"
    """Which torch optimizer to use."""
    lr: float = 5e-5
    """Peak learning rate of the top layer group; lower groups get ``lr * layer_decay ** depth``."""
    weight_decay: float = 0.01
    """Decoupled weight decay. Never applied to 1-D parameters (biases, norm weights) nor embeddings' norms."""
    betas: tuple[float, float] = (0.9, 0.999)
    """Adam-family betas."""
    eps: float = 1e-8
    """Adam-family / RMSprop epsilon."""
    momentum: float = 0.9
    """SGD / RMSprop momentum."""
    nesterov: bool = False
    """Nesterov momentum for SGD."""
    fused: bool | None = None
    """Fused optimizer kernels (adamw, adam, sgd; adagrad on CPU only); ``None`` uses them where the parameters' device
    has them, ``true`` stops with an error where it does not.
    On CPU, fused AdamW steps MiniLM-L6's 22.7M parameters in 12 ms instead of 63 ms."""
    layer_decay: float = 1.0
    """Layer-wise learning-rate decay: layer ``i`` of ``L`` gets ``lr * layer_decay ** (L - i)``. 1.0 disables it."""
    head_lr: float | None = None
    """Learning rate of the task head (the top layer group); ``None`` uses ``lr``."""

    @classmethod
    def coerce(cls, value: OptimizerConfig | dict[str, Any] | None) -> OptimizerConfig:
        """Accepts the dataclass or a plain dict (as stored in a checkpoint's hyperparameters)."""
        if value is None:
            return cls()
        if isinstance(value, dict):
            value = dict(value)
            if "betas" in value:
                value["betas"] = tuple(value["betas"])
            return cls(**value)
        return value


@dataclass(frozen=True)
class SchedulerConfig:
    """Learning-rate schedule settings (``model.init_args.scheduler`` in a recipe). Steps are optimizer steps."""

    name: SchedulerName = "linear"
    """``constant``, ``linear`` / ``cosine`` decay after warmup, ``step`` decay, ``onecycle``, or ``plateau``."""
    warmup_ratio: float = 0.06
    """Fraction of the total optimizer steps spent warming up linearly from 0 (constant/linear/cosine)."""
    warmup_steps: int | None = None
    """Warmup in optimizer steps; overrides ``warmup_ratio`` when set."""
    step_size: int = 1
    """``step``: epochs between decays."""
    gamma: float = 0.1
    """``step``: multiplicative decay."""
    pct_start: float = 0.3
    """``onecycle``: fraction of the steps spent increasing the learning rate."""
    monitor: str = "val/loss"
    """``plateau``: the metric watched."""
    mode: Literal["min", "max"] = "min"
    """``plateau``: whether the monitored metric should go down or up."""
    factor: float = 0.1
    """``plateau``: multiplicative decay when the metric stalls."""
    patience: int = 2
    """``plateau``: validation epochs without improvement before decaying."""

    @classmethod
    def coerce(cls, value: SchedulerConfig | dict[str, Any] | None) -> SchedulerConfig:
        """Accepts the dataclass or a plain dict (as stored in a checkpoint's hyperparameters)."""
        if value is None:
            return cls()
        return cls(**value) if isinstance(value, dict) else value


def as_dict(config: OptimizerConfig | SchedulerConfig) -> dict[str, Any]:
    """Plain-dict form kept in checkpoints (loadable with ``torch.load(weights_only=True)``)."""
    d = asdict(config)
    if "betas" in d:
        d["betas"] = list(d["betas"])
    return d


def no_weight_decay(name: str, param: torch.Tensor) -> bool:
    """Biases, norm weights and other 1-D parameters are excluded from weight decay (timm and BERT convention)."""
    return param.ndim <= 1 or name.endswith(".bias")


def model_no_weight_decay(model: nn.Module) -> set[str]:
    """Parameter names (as in ``model.named_parameters()``) that the model's own ``no_weight_decay()`` excludes:
    timm models list position embeddings, class / distillation tokens and relative-position tables there.

    Looked up on every submodule, so a timm backbone inside a task wrapper or a PEFT model is found too.
    """
    names = {n for n, _ in model.named_parameters()}
    excluded: set[str] = set()
    for prefix, module in model.named_modules():
        method = getattr(type(module), "no_weight_decay", None)
        if not callable(method):
            continue
        for name in module.no_weight_decay():
            full = f"{prefix}.{name}" if prefix else name
            # timm names a parameter or a module whose parameters are all excluded (e.g. a relative-position table)
            excluded.update(n for n in names if n == full or n.startswith(full + "."))
    return excluded


def build_param_groups(
    named_parameters: Iterable[tuple[str, nn.Parameter]],
    lr: float,
    weight_decay: float,
    layer_of: Callable[[str], int] | None = None,
    num_layers: int | None = None,
    layer_decay: float = 1.0,
    head_lr: float | None = None,
    skip_weight_decay: set[str] | None = None,
    no_decay: Callable[[str, torch.Tensor], bool] | None = None,
) -> list[dict[str, Any]]:
    """Groups parameters by (layer, decay / no decay) and gives every group a real learning rate.

    Layer ``i`` of ``L`` (``num_layers``; layer ``L`` is the head) gets ``lr * layer_decay ** (L - i)``, the head gets
    ``head_lr`` when given. The rate is written into the group's ``lr`` (not an ``lr_scale`` that torch and Lightning
    schedulers would ignore). Parameters that do not require grad are left out here; strategies that unfreeze later
    keep them in with ``lr`` 0 instead.

    Args:
        named_parameters: ``(name, parameter)`` pairs, e.g. ``module.named_parameters()``.
        lr: Learning rate of the top layer.
        weight_decay: Weight decay for parameters with 2 or more dimensions.
        layer_of: Maps a parameter name to its layer index (0 = embeddings). ``None`` puts everything in layer 0.
        num_layers: Index of the top layer; defaults to the largest index ``layer_of`` returned.
        layer_decay: Multiplicative decay per layer below the top.
        head_lr: Learning rate of the top layer (the head) if it differs from ``lr``.
        skip_weight_decay: Further names without weight decay besides 1-D parameters (the model's
            ``no_weight_decay()``, see :func:`model_no_weight_decay`).
        no_decay: Decides per ``(name, parameter)`` instead of the shape rule and ``skip_weight_decay`` (a module
            that recorded the decisions before FSDP flattened its parameters).

    Returns:
        Parameter groups for a torch optimizer, each with ``params``, ``lr``, ``weight_decay``, ``layer`` and ``names``.
    """
    named = [(n, p) for n, p in named_parameters if p.requires_grad]
    if no_decay is None and weight_decay and any(getattr(p, "_fsdp_flattened", False) for _, p in named):  # FSDP's mark
        # FSDP (use_orig_params) has already replaced every parameter by a 1-D slice of its shard (or an empty one):
        # the ndim rule would silently exempt every weight matrix from weight decay.
        raise PtftError(
            "FSDP flattened the parameters before the optimizer was built, so weight matrices cannot be told from "
            "biases and norms for weight decay: set optimizer.weight_decay=0 (docs/scale.md, FSDP)"
        )
    layers = {n: (layer_of(n) if layer_of else 0) for n, _ in named}
    top = num_layers if num_layers is not None else max(layers.values(), default=0)
    groups: dict[tuple[int, bool], dict[str, Any]] = {}
    for name, param in named:
        layer = layers[name]
        exempt = no_decay(name, param) if no_decay else no_weight_decay(name, param) or name in (skip_weight_decay or ())
        decay = not exempt
        key = (layer, decay)
        if key not in groups:
            group_lr = head_lr if (head_lr is not None and layer == top) else lr * layer_decay ** (top - layer)
            groups[key] = {
                "params": [],
                "names": [],
                "lr": group_lr,
                "weight_decay": weight_decay if decay else 0.0,
                "layer": layer,
            }
        groups[key]["params"].append(param)
        groups[key]["names"].append(name)
    return [groups[k] for k in sorted(groups)]


def _fused_devices(name: str) -> set[str]:
    """Device types with fused kernels for optimizer ``name``: torch's list; Adagrad's fused kernel is CPU-only
    (torch's documentation of ``Adagrad(fused=...)``), RMSprop has none."""
    if name not in ("adamw", "adam", "sgd", "adagrad"):
        return set()
    if name == "adagrad":
        return {"cpu"}
    from torch.optim.optimizer import _get_fused_kernels_supported_devices

    return set(_get_fused_kernels_supported_devices())


def _use_fused(groups: list[dict[str, Any]], config: OptimizerConfig) -> bool:
    params = [p for g in groups for p in g["params"]]
    devices = _fused_devices(config.name)
    supported = bool(params) and all(p.device.type in devices and p.is_floating_point() for p in params)
    if config.fused and not supported:
        where = sorted({p.device.type for p in params})
        raise PtftError(
            f"optimizer.fused=true: torch has no fused {config.name} for parameters on {where} "
            f"(fused {config.name}: {sorted(devices) or 'none'}); set optimizer.fused=null to use it where it exists"
        )
    return supported if config.fused is None else config.fused


def build_optimizer(groups: list[dict[str, Any]], config: OptimizerConfig) -> torch.optim.Optimizer:
    """Builds the torch optimizer named in ``config`` over ``groups`` (each group keeps its own ``lr``)."""
    name = config.name
    fused = {"fused": True} if _use_fused(groups, config) else {}
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=config.lr, betas=config.betas, eps=config.eps, **fused)
    if name == "adam":
        return torch.optim.Adam(groups, lr=config.lr, betas=config.betas, eps=config.eps, **fused)
    if name == "sgd":
        return torch.optim.SGD(groups, lr=config.lr, momentum=config.momentum, nesterov=config.nesterov, **fused)
    if name == "rmsprop":
        return torch.optim.RMSprop(groups, lr=config.lr, momentum=config.momentum, eps=config.eps)
    if name == "adagrad":
        return torch.optim.Adagrad(groups, lr=config.lr, eps=config.eps, **fused)
    raise ValueError(f"unknown optimizer {name!r}; choose one of {OptimizerName.__args__}")


def warmup_steps(config: SchedulerConfig, total_steps: int) -> int:
    """Number of warmup steps for ``total_steps`` optimizer steps."""
    if config.warmup_steps is not None:
        return config.warmup_steps
    return math.ceil(config.warmup_ratio * total_steps)


def build_scheduler(
    optimizer: torch.optim.Optimizer, config: SchedulerConfig, total_steps: int
) -> dict[str, Any] | None:
    """Builds the schedule as a Lightning ``lr_scheduler`` dict, or ``None`` for a constant rate without warmup.

    Every schedule scales every parameter group of ``optimizer`` from that group's own ``lr``.
    Warmup / decay shapes are Hugging Face's (``transformers.get_scheduler``); the rest are torch's.
    """
    from transformers import get_scheduler

    name = config.name
    if name in ("constant", "linear", "cosine"):
        warmup = warmup_steps(config, total_steps)
        if name == "constant" and warmup == 0:
            return None
        hf_name = "constant_with_warmup" if name == "constant" else name
        scheduler = get_scheduler(hf_name, optimizer, num_warmup_steps=warmup, num_training_steps=total_steps)
        return {"scheduler": scheduler, "interval": "step"}
    if name == "step":
        scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=config.step_size, gamma=config.gamma)
        return {"scheduler": scheduler, "interval": "epoch"}
    if name == "onecycle":
        scheduler = torch.optim.lr_scheduler.OneCycleLR(
            optimizer,
            max_lr=[g["lr"] for g in optimizer.param_groups],
            total_steps=max(total_steps, 1),
            pct_start=config.pct_start,
        )
        return {"scheduler": scheduler, "interval": "step"}
    if name == "plateau":
        scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(
            optimizer, mode=config.mode, factor=config.factor, patience=config.patience
        )
        return {"scheduler": scheduler, "interval": "epoch", "monitor": config.monitor}
    raise ValueError(f"unknown scheduler {name!r}; choose one of {SchedulerName.__args__}")
