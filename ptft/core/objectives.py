"""Several losses on one model: static weights, or weights learned from each loss's uncertainty.

Any task module with more than one objective (contrastive + matching + masked language modelling, multi-task heads)
sums its losses through :class:`WeightedObjectives` and logs each one. Ours because neither Lightning nor transformers
has one: ``learned`` is the homoscedastic-uncertainty weighting of Kendall, Gal and Cipolla (CVPR 2018), in the
form most implementations use (``exp(-s) * L + s`` per loss, ``s`` a learned log variance), which needs no tuning of
the weights by hand and cannot collapse to zero (the ``+ s`` term grows as a weight shrinks).
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

from ptft.core.errors import PtftError

Weighting = Literal["static", "learned"]


class WeightedObjectives(nn.Module):
    """The total of named losses.

    Args:
        weights: Static weight of each objective, by name (``{contrastive: 1.0, itm: 0.5}``); with ``learned``
            weighting they scale each loss's learned weight (1.0: the learned weight alone).
        weighting: ``static`` (``sum w_i * L_i``) or ``learned`` (``sum w_i * (exp(-s_i) * L_i + s_i)``, one learned
            log variance ``s_i`` per loss, starting at 0).
    """

    def __init__(self, weights: dict[str, float], weighting: Weighting = "static") -> None:
        super().__init__()
        if not weights:
            raise PtftError("give at least one objective")
        if weighting not in ("static", "learned"):
            raise PtftError(f"objective weighting must be static or learned, got {weighting!r}")
        negative = [name for name, w in weights.items() if w < 0]
        if negative:
            raise PtftError(f"objective weights must be >= 0, got {negative[0]}: {weights[negative[0]]}")
        self.weights = dict(weights)
        self.weighting = weighting
        self.log_vars = nn.ParameterDict(
            {name: nn.Parameter(torch.zeros(())) for name in weights} if weighting == "learned" else {})

    @property
    def names(self) -> list[str]:
        return list(self.weights)

    def effective_weights(self) -> dict[str, torch.Tensor]:
        """The weight each loss gets now (``w_i`` or ``w_i * exp(-s_i)``), for logging."""
        return {name: (w * torch.exp(-self.log_vars[name].detach()) if name in self.log_vars else torch.tensor(w))
                for name, w in self.weights.items()}

    def forward(self, losses: dict[str, torch.Tensor]) -> torch.Tensor:
        missing = set(self.weights) - set(losses)
        if missing:
            raise PtftError(f"objectives {sorted(missing)} were not computed")
        total = torch.zeros((), device=next(iter(losses.values())).device)
        for name, weight in self.weights.items():
            loss = losses[name].float()
            if name in self.log_vars:
                s = self.log_vars[name]
                loss = torch.exp(-s) * loss + s
            total = total + weight * loss
        return total
