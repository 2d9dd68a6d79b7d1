"""``precision: auto``: bf16-mixed where this machine computes bf16 natively and measurably faster, fp32 elsewhere.

Whether bf16 pays depends on the chip, not on a flag list: a CPU with AVX-512 BF16 ran MiniLM training steps 1.85x
faster under bf16 autocast, one with AMX only 1.06x, and a CPU without either emulates bf16 and runs slower. So the
choice is a short measurement: forward and backward passes of the model's own largest layers, in fp32 and under bf16
autocast, on the device the run uses. The result is cached per machine, torch version, device and layer shapes, so it is
measured once.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import lightning as L
import torch
from lightning.fabric.connector import _PRECISION_INPUT
from torch import nn

#: bf16 must be at least this much faster to be chosen: smaller gains are within timing noise and not worth bf16's
#: coarser rounding.
MIN_SPEEDUP = 1.15
#: Rows of the activations the probe layers see (a batch of 16 sequences of 128 tokens).
PROBE_ROWS = 2048
#: The choice of the launching process, inherited by the processes Lightning starts for DDP: every rank must train in
#: the same precision, and a second measurement on a busy machine could differ.
ENV = "PTFT_AUTO_PRECISION"


@dataclass(frozen=True)
class PrecisionChoice:
    """What ``auto`` chose, and why."""

    precision: str
    """``bf16-mixed`` or ``32-true``."""
    speedup: float | None
    """Measured bf16 / fp32 speed ratio (``None`` when nothing was measured)."""
    device: str
    """The device the choice was made for (``cpu``, ``cuda:0``, ``mps``…)."""
    reason: str
    """One line for the console and the run's config."""


def probe_layers(model: nn.Module | None, limit: int = 3) -> list[nn.Module]:
    """The model's largest distinct Linear / Conv2d layers (fresh copies at their shapes), or a generic set."""
    seen: dict[tuple, nn.Module] = {}
    for module in (model.modules() if model is not None else ()):
        if isinstance(module, nn.Linear):
            key = ("linear", module.in_features, module.out_features)
            seen.setdefault(key, nn.Linear(module.in_features, module.out_features))
        elif isinstance(module, nn.Conv2d) and module.groups == 1:
            key = ("conv", module.in_channels, module.out_channels, module.kernel_size, module.stride)
            seen.setdefault(key, nn.Conv2d(module.in_channels, module.out_channels, module.kernel_size,
                                           module.stride, module.padding))
    if not seen:  # no model (or none of these layers): a transformer-sized default
        return [nn.Linear(384, 1536), nn.Linear(1536, 384)]
    ranked = sorted(seen.values(), key=lambda m: sum(p.numel() for p in m.parameters()), reverse=True)
    return ranked[:limit]


def _probe_input(layer: nn.Module, device: torch.device) -> torch.Tensor:
    # GPUs need full-sized work (small matmuls are launch-bound and hide bf16's gain); CPUs a quarter of it, so that
    # an emulated bf16 (10-15x slower) costs a second, not a minute.
    scale = 1 if device.type == "cuda" else 4
    if isinstance(layer, nn.Linear):
        return torch.randn(PROBE_ROWS // scale, layer.in_features, device=device)
    # Conv: the spatial size a mid-network block sees.
    side = 32 if device.type == "cuda" else 8
    return torch.randn(8, layer.in_channels, side, side, device=device)


def _once(layers: list[nn.Module], inputs: list[torch.Tensor], device: torch.device, bf16: bool) -> float:
    start = time.perf_counter()
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
        for layer, x in zip(layers, inputs):
            layer(x).float().square().mean().backward()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def measure_bf16_speedup(layers: list[nn.Module], device: torch.device, repeats: int = 3) -> float:
    """fp32 time / bf16-autocast time of forward + backward through ``layers`` (best of ``repeats`` after a warm-up).

    When bf16's warm-up alone is 3x slower than fp32 (an emulated bf16), that answer is final: no more repeats.
    """
    layers = [layer.to(device) for layer in layers]
    inputs = [_probe_input(layer, device) for layer in layers]
    _once(layers, inputs, device, bf16=False)  # warm-up: kernels, allocator
    fp32 = min(_once(layers, inputs, device, bf16=False) for _ in range(repeats))
    warm = _once(layers, inputs, device, bf16=True)
    if warm > 3 * fp32:
        return fp32 / warm
    bf16 = min(_once(layers, inputs, device, bf16=True) for _ in range(repeats))
    return fp32 / bf16


def _machine(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    return f"{cpu} ({torch.get_num_threads()} threads)"


def _cache_file() -> Path:
    root = os.environ.get("PTFT_CACHE") or os.path.join(os.environ.get("XDG_CACHE_HOME", "~/.cache"), "ptft")
    return Path(root).expanduser() / "precision.json"


def run_device(accelerator: str) -> torch.device:
    """The device a Trainer with ``accelerator`` trains on (first device of the kind)."""
    if accelerator in ("cuda", "gpu") or (accelerator == "auto" and torch.cuda.is_available()):
        return torch.device("cuda", torch.cuda.current_device() if torch.cuda.is_available() else 0)
    if accelerator == "mps" or (accelerator == "auto" and torch.backends.mps.is_available()):
        return torch.device("mps")
    return torch.device("cpu")


def choose_precision(model: nn.Module | None = None, accelerator: str = "auto", cache: bool = True) -> PrecisionChoice:
    """Decides ``precision: auto`` for ``model`` on ``accelerator``: bf16-mixed if bf16 runs natively and its measured
    speed-up is at least :data:`MIN_SPEEDUP`, else 32-true."""
    inherited = os.environ.get(ENV)
    if inherited:
        return PrecisionChoice(**json.loads(inherited))
    # The probe layers' initialisation and inputs draw random numbers: the run's seeded streams must not move.
    cuda = [torch.cuda.current_device()] if torch.cuda.is_available() and torch.cuda.is_initialized() else []
    with torch.random.fork_rng(devices=cuda):
        choice = _choose(model, accelerator, cache)
    os.environ[ENV] = json.dumps(asdict(choice))
    return choice


def _choose(model: nn.Module | None, accelerator: str, cache: bool) -> PrecisionChoice:
    device = run_device(accelerator)
    if device.type == "cuda" and not torch.cuda.is_bf16_supported(including_emulation=False):
        return PrecisionChoice("32-true", None, str(device), f"{_machine(device)} has no native bf16: fp32")
    if device.type not in ("cuda", "cpu"):
        return PrecisionChoice("32-true", None, str(device), f"no bf16 measurement for {device.type}: fp32")
    layers = probe_layers(model)
    shapes = [tuple(p.shape) for layer in layers for p in layer.parameters()]
    key = hashlib.sha1(json.dumps([_machine(device), torch.__version__, str(device), shapes]).encode()).hexdigest()
    path = _cache_file()
    stored: dict[str, dict] = {}
    if cache and path.is_file():
        try:
            stored = json.loads(path.read_text())
        except (OSError, ValueError):
            stored = {}
    if key in stored:
        return PrecisionChoice(**stored[key])
    speedup = measure_bf16_speedup(layers, device)
    faster = speedup >= MIN_SPEEDUP
    choice = PrecisionChoice(
        "bf16-mixed" if faster else "32-true",
        round(speedup, 3),
        str(device),
        f"bf16 measured {speedup:.2f}x fp32 on {_machine(device)}: "
        + ("bf16-mixed" if faster else f"fp32 (bf16-mixed needs >= {MIN_SPEEDUP}x)"),
    )
    if cache:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            stored[key] = asdict(choice)
            path.write_text(json.dumps(stored, indent=1))
        except OSError:
            pass  # a read-only home: measure again next time
    return choice


def resolve_precision(precision: Any, model: nn.Module | None, accelerator: Any) -> tuple[Any, PrecisionChoice | None]:
    """``precision`` unchanged, or for ``"auto"`` the measured choice (printed in one line, on rank 0)."""
    if precision != "auto":
        return precision, None
    choice = choose_precision(model, accelerator if isinstance(accelerator, str) else "auto")
    from lightning.pytorch.utilities import rank_zero_info

    rank_zero_info(f"ptft: precision auto -> {choice.precision} ({choice.reason})")
    return choice.precision, choice


class Trainer(L.Trainer):
    """Lightning's ``Trainer`` that also takes ``precision: auto`` (the CLI's trainer).

    ``auto`` is bf16-mixed where the run's device computes bf16 natively and a short measurement shows it at least
    :data:`MIN_SPEEDUP` faster, and 32-true elsewhere (see :mod:`ptft.core.precision`). An explicit precision
    (``32-true``, ``bf16-mixed``, ``16-mixed``…) is used as given. The ptft CLI decides ``auto`` with the model's
    own layer shapes before the Trainer is built; built directly, it measures generic transformer-sized layers.

    Args:
        precision: ``auto``, or any precision Lightning's ``Trainer`` accepts.
        **kwargs: Lightning's ``Trainer`` arguments.
    """

    def __init__(self, *, precision: _PRECISION_INPUT | Literal["auto"] | None = None, **kwargs: Any) -> None:
        precision, _ = resolve_precision(precision, None, kwargs.get("accelerator", "auto"))
        super().__init__(precision=precision, **kwargs)
