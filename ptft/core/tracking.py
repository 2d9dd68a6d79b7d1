"""Experiment tracking: Weights & Biases that works with no account."""

from __future__ import annotations

import os
from typing import Any

from lightning.pytorch.loggers import WandbLogger as _LightningWandbLogger


def wandb_credentials_available() -> bool:
    """Whether W&B can log online: an API key in the environment or in ``~/.netrc`` (written by ``wandb login``)."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        import netrc

        auth = netrc.netrc().authenticators(os.environ.get("WANDB_BASE_URL", "api.wandb.ai").split("://")[-1])
        return bool(auth and auth[2])
    except (OSError, netrc.NetrcParseError):
        return False


class WandbLogger(_LightningWandbLogger):
    """Lightning's ``WandbLogger`` that runs offline on its own when there are no W&B credentials.

    The CLI logs the full nested recipe as the run's config once (model hyperparameters are not logged again
    flat). W&B prints the ``wandb sync`` command of an offline run when it ends. With ``log_model``, an offline run
    keeps the checkpoints as artifacts in the run folder, and ``wandb sync`` uploads them with the rest (Lightning
    refuses ``log_model`` offline; W&B itself stores offline artifacts).

    Args:
        project: W&B project.
        name: Run name; W&B picks one when ``None``.
        save_dir: Folder for the run files (``wandb/`` under it).
        offline: Force offline mode; ``None`` decides from ``WANDB_MODE`` and whether credentials exist.
        log_model: Upload checkpoints as W&B artifacts (``False``, ``True`` at the end, or ``"all"``).
        tags: Run tags.
        **kwargs: Passed to ``wandb.init`` (``entity``, ``group``, ``notes``…).
    """

    def __init__(
        self,
        project: str = "ptft",
        name: str | None = None,
        save_dir: str = ".",
        offline: bool | None = None,
        log_model: bool | str = False,
        tags: list[str] | None = None,
        **kwargs: Any,
    ) -> None:
        if offline is None:
            mode = os.environ.get("WANDB_MODE", "").lower()
            offline = mode in ("offline", "dryrun") or (mode != "online" and not wandb_credentials_available())
        # Lightning's check that log_model is off offline is passed with offline=False, then restored: the run
        # itself is offline either way (Lightning only sets WANDB_MODE from it).
        super().__init__(
            project=project, name=name, save_dir=save_dir, offline=offline and not log_model, log_model=log_model,
            tags=tags, **kwargs,
        )
        self._offline = offline
