"""Loading models by hub name or local path, with one-line errors when neither works."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from ptft.core.errors import PtftError

T = TypeVar("T")


def is_offline() -> bool:
    """Whether the Hugging Face Hub is switched off by the environment (``HF_HUB_OFFLINE`` / ``TRANSFORMERS_OFFLINE``)."""
    return any(os.environ.get(v, "").lower() in ("1", "true", "yes", "on") for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def load_pretrained(loader: Callable[..., T], name: str, what: str = "model", **kwargs: Any) -> T:
    """Calls a Hugging Face ``from_pretrained`` with ``trust_remote_code=False``; turns failures into one line.

    Args:
        loader: e.g. ``AutoModelForSequenceClassification.from_pretrained`` or ``AutoTokenizer.from_pretrained``.
        name: A hub name (``org/model``) or a local folder.
        what: Used in the error message (``model``, ``tokenizer``, ``config``).
        **kwargs: Passed to ``loader``.
    """
    kwargs.setdefault("trust_remote_code", False)
    try:
        return loader(name, **kwargs)
    except (OSError, ValueError) as err:
        if Path(name).expanduser().exists():
            raise PtftError(f"cannot load {what} from local path {name!r}: {str(err).splitlines()[0]}") from err
        hint = "the Hugging Face Hub is unreachable (offline)" if is_offline() else "it is not on the Hugging Face Hub or the hub is unreachable"
        raise PtftError(
            f"cannot load {what} {name!r}: it is not a local folder and {hint}. "
            f"Point the recipe at a local folder with config.json and weights (written by save_pretrained), "
            f"e.g. --model.init_args.model_name=/path/to/model"
        ) from err


def resolve_model_name(name: str) -> str:
    """``name`` itself, or for a ptft checkpoint file (``.ckpt``) a folder holding its exported model.

    This is how one run's result becomes the next run's starting point (continued pre-training, then
    fine-tuning): ``model_name: runs/mlm/checkpoints/last.ckpt``. The export (adapters merged, ``save_pretrained``
    layout plus tokenizer) is cached beside the checkpoint, keyed by its size and modification time.
    """
    path = Path(name).expanduser()
    if path.suffix != ".ckpt":
        return name
    if not path.is_file():
        raise PtftError(f"checkpoint {name!r} does not exist")
    stat = path.stat()
    folder = path.with_name(f"{path.stem}.exported-{stat.st_size}-{int(stat.st_mtime)}")
    if not (folder / "config.json").exists():
        from ptft.core.module import load_checkpoint

        # Each process (every DDP rank builds the model) exports to its own folder; the first rename wins.
        tmp = folder.with_name(f"{folder.name}.tmp{os.getpid()}")
        load_checkpoint(str(path)).export(str(tmp))
        try:
            tmp.replace(folder)  # never a half-written folder under the final name
        except OSError:  # another process got there first: its export is the same
            import shutil

            shutil.rmtree(tmp, ignore_errors=True)
    return str(folder)
