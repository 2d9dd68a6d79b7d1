"""Random states in checkpoints: every process's torch (CPU and CUDA), Python and numpy streams."""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch


def rng_states() -> dict[str, Any]:
    """This process's torch (CPU and every CUDA device), Python and numpy random states, loadable with
    ``torch.load(weights_only=True)`` (numpy's key array as a tensor).

    Lightning's own ``_collect_rng_states`` holds the numpy state as a tuple with an ndarray, which weights-only
    loading refuses; hence this small pair.
    """
    _, keys, pos, has_gauss, gauss = np.random.get_state()  # timm's Mixup draws from numpy
    states: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": [torch.from_numpy(keys.copy()), pos, has_gauss, gauss],
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_rng_states(states: dict[str, Any]) -> None:
    """Restores what :func:`rng_states` returned (CUDA states only where the same number of devices is visible)."""
    torch.set_rng_state(states["torch"])
    random.setstate(states["python"])
    if "numpy" in states:
        keys, pos, has_gauss, gauss = states["numpy"]
        np.random.set_state(("MT19937", keys.numpy(), pos, has_gauss, gauss))
    cuda = states.get("cuda")
    if cuda is not None and torch.cuda.is_available():
        if len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda)
        else:
            from lightning.pytorch.utilities import rank_zero_warn

            rank_zero_warn(
                f"the checkpoint holds CUDA random states for {len(cuda)} device(s), this machine has "
                f"{torch.cuda.device_count()}: CUDA random streams (dropout on GPU) restart instead of continuing"
            )
