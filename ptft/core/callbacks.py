"""Small callbacks used by recipes."""

from __future__ import annotations

import lightning as L
from lightning.pytorch.utilities import rank_zero_info


class BeforeAfterReport(L.Callback):
    """Prints a validation metric before fine-tuning and after it, best and last epoch.

    The "before" value comes from the sanity-check pass, so set ``trainer.num_sanity_val_steps: -1`` to measure
    it on the whole validation set.

    Args:
        monitor: The logged metric to report, e.g. ``val/acc``.
    """

    def __init__(self, monitor: str = "val/acc") -> None:
        self.monitor = monitor
        self.before: float | None = None
        self.history: list[float] = []

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        value = trainer.callback_metrics.get(self.monitor)
        if value is None:
            return
        if trainer.sanity_checking:
            self.before = float(value)
        else:
            self.history.append(float(value))

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self.history:
            return
        before = "n/a (set trainer.num_sanity_val_steps: -1)" if self.before is None else f"{self.before:.4f}"
        rank_zero_info(
            f"\n{self.monitor} before fine-tuning: {before}\n"
            f"{self.monitor} after fine-tuning:  {self.history[-1]:.4f} (best epoch {max(self.history):.4f})"
        )
