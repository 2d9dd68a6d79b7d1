"""Where explanations go: PNG / HTML / CSV files a person opens, in the run folder, and the same figures as W&B
images and tables when the run logs to W&B.

Every interpretation method writes files first (``save_figure``) and logs them second (``log_images`` /
``log_table``): a run without W&B keeps everything in its logger's folder.
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any, Sequence

__all__ = ["run_folder", "save_figure", "log_images", "log_table", "write_csv"]


def run_folder(trainer: Any) -> Path:
    """The folder a person looks in after a run: the logger's version folder, else the trainer's root folder.

    Call it on every rank: ``trainer.log_dir`` broadcasts (rank 0 alone would wait for the others forever)."""
    from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

    folder = getattr(trainer, "log_dir", None) or getattr(trainer, "default_root_dir", None) or "."
    logger = getattr(trainer, "logger", None)
    if logger is not None and not isinstance(logger, (CSVLogger, TensorBoardLogger)) and logger.save_dir is not None:
        # W&B and other loggers: Lightning's log_dir is their bare save_dir (every run would share it); use
        # <save_dir>/<name>/<version>, where the run's checkpoints go, as rank 0 names it.
        version = logger.version if isinstance(logger.version, str) else f"version_{logger.version}"
        folder = trainer.strategy.broadcast(str(Path(logger.save_dir) / str(logger.name) / version))
    return Path(folder)


def save_figure(figure: Any, path: str | Path, dpi: int = 120) -> Path:
    """Saves a matplotlib figure (PNG unless ``path`` says otherwise), closes it and returns the path."""
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=dpi, bbox_inches="tight")
    plt.close(figure)
    return path


def _wandb_loggers(loggers: Any) -> list[Any]:
    from lightning.pytorch.loggers import WandbLogger

    if loggers is None:
        return []
    if not isinstance(loggers, (list, tuple)):
        loggers = [loggers]
    return [logger for logger in loggers if isinstance(logger, WandbLogger)]


def log_images(loggers: Any, key: str, paths: Sequence[str | Path], captions: Sequence[str] | None = None,
               step: int | None = None) -> None:
    """Logs image files under ``key`` to every W&B logger among ``loggers`` (a logger, a list, or ``trainer.loggers``);
    other loggers keep the files only."""
    if not paths:
        return
    for logger in _wandb_loggers(loggers):
        kwargs: dict[str, Any] = {"caption": list(captions)} if captions else {}
        logger.log_image(key=key, images=[str(p) for p in paths], step=step, **kwargs)


def log_table(loggers: Any, key: str, columns: list[str], rows: list[list[Any]], step: int | None = None) -> None:
    """Logs a table to every W&B logger among ``loggers`` (cells may be ``wandb.Image``-able file paths: pass
    ``wandb.Image(path)`` yourself where a cell is a picture)."""
    for logger in _wandb_loggers(loggers):
        logger.log_table(key=key, columns=columns, data=rows, step=step)


def write_csv(path: str | Path, columns: list[str], rows: list[list[Any]]) -> Path:
    """Writes ``rows`` under a header line; returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(columns)
        writer.writerows(rows)
    return path
