"""``ptft explain``: explanations of a fine-tuned checkpoint's decisions, as files a person opens.

    ptft explain --ckpt_path runs/sst2/version_0/checkpoints/best.ckpt --method ig --num_samples 8
    ptft explain --config recipes/vision/cifar10.yaml --ckpt_path best.ckpt --method gradcam --output gradcam/

The data come from the recipe (``--config`` and ``--data.*`` overrides, as ``ptft fit``); without ``--config`` the
``config.yaml`` Lightning saved in the checkpoint's run folder is used. Files go to ``--output`` (default: the run
folder's ``explain/<method>``), with an ``index.html`` showing them all; ``--wandb_project`` also logs them to a W&B
run (offline when there are no credentials).
"""

from __future__ import annotations

import argparse
import html
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.utilities.apply_func import move_data_to_device

from ptft.core.errors import PtftError
from ptft.core.module import FineTuneModule, load_checkpoint
from ptft.interpret import EXAMPLE_METHODS, SPLIT_METHODS, method_function
from ptft.interpret.output import log_images

#: ``num_samples`` of the split methods when none is given: every example embedded, 16 mistakes shown.
SPLIT_DEFAULTS: dict[str, int | None] = {"tsne": None, "errors": 16}

__all__ = ["explain_command", "explain_examples", "default_output", "recipe_of_run", "saved_run_config", "write_index"]


def saved_run_config(ckpt_path: str | Path) -> Path | None:
    """The ``config.yaml`` LightningCLI saved in a checkpoint's run folder (``<run>/checkpoints/x.ckpt``), if any."""
    path = Path(ckpt_path).resolve()
    for folder in (path.parent, path.parent.parent):
        if (folder / "config.yaml").is_file():
            return folder / "config.yaml"
    return None


#: Keys of a saved ``fit`` config that belong to the subcommand, not to a recipe.
FIT_ONLY_KEYS = ("ckpt_path", "weights_only")


def recipe_of_run(saved: Path, folder: Path) -> Path:
    """The run's saved ``config.yaml`` as a recipe: without the ``fit`` subcommand's own keys (``ckpt_path``,
    ``weights_only``),
    written to ``folder`` (the explanations record which data they read)."""
    import yaml

    config = yaml.safe_load(saved.read_text())
    for key in FIT_ONLY_KEYS:
        config.pop(key, None)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "config.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def default_output(ckpt_path: str | Path, method: str) -> Path:
    """``<run folder>/explain/<method>`` for a checkpoint under ``<run>/checkpoints``, else next to the checkpoint."""
    path = Path(ckpt_path).resolve()
    run = path.parent.parent if path.parent.name == "checkpoints" else path.parent
    return run / "explain" / method.replace("+", "p")


def slice_batch(batch: dict[str, Any], start: int, stop: int) -> dict[str, Any]:
    """Rows ``start:stop`` of every per-example tensor / list of a collated batch (other entries kept as they are)."""
    size = len(batch["labels"]) if "labels" in batch else next(len(v) for v in batch.values() if hasattr(v, "__len__"))
    return {k: v[start:stop] if hasattr(v, "__len__") and not isinstance(v, str) and len(v) == size else v
            for k, v in batch.items()}


def batch_length(batch: dict[str, Any]) -> int:
    """Examples in a collated batch."""
    for key in ("labels", "input_ids", "pixel_values", "input_values", "input_features"):
        if key in batch:
            return len(batch[key])
    return len(next(v for v in batch.values() if isinstance(v, torch.Tensor)))


def explain_examples(
    module: FineTuneModule, loader: Any, method: str, folder: Path, num_samples: int, target: str = "predicted",
    device: torch.device | str = "cpu",
) -> list[Path]:
    """Runs a per-example method on the first ``num_samples`` examples of ``loader``; returns the files written.

    Args:
        module: A fine-tuned classification module.
        loader: The split's loader (collated batches).
        method: A name in :data:`ptft.interpret.EXAMPLE_METHODS`.
        folder: Where the files go.
        num_samples: How many examples to explain.
        target: Explain the ``predicted`` class or the ``label``.
        device: Where the module runs.
    """
    function, is_split = method_function(method)
    if is_split:
        raise PtftError(f"{method!r} looks at a whole split: call its function with the loader")
    if target not in ("predicted", "label"):
        raise PtftError(f"target must be 'predicted' or 'label', got {target!r}")
    module.eval().to(device)
    written: list[Path] = []
    done = 0
    for batch in loader:
        if done >= num_samples:
            break
        batch = slice_batch(batch, 0, min(batch_length(batch), num_samples - done))
        batch = move_data_to_device(batch, device)
        if target == "label":
            if "labels" not in batch:
                raise PtftError("--target label needs a split with labels; use --target predicted")
            targets = batch["labels"]
        else:
            with torch.no_grad():
                targets = module(batch).argmax(dim=-1)
        written += function(module, batch, targets, folder, done)
        done += batch_length(batch)
    if done == 0:
        raise PtftError("the split is empty: nothing to explain")
    return written


def write_index(folder: Path, files: list[Path], title: str) -> Path:
    """An ``index.html`` in ``folder`` showing every PNG and linking every other file."""
    items = []
    for path in sorted(files):
        name = html.escape(path.relative_to(folder).as_posix() if path.is_relative_to(folder) else str(path))
        if path.suffix == ".png":
            items.append(f'<figure><img src="{name}" style="max-width:100%"><figcaption>{name}</figcaption></figure>')
        else:
            items.append(f'<p><a href="{name}">{name}</a></p>')
    index = folder / "index.html"
    index.write_text(f"<!doctype html><meta charset='utf-8'><title>{html.escape(title)}</title>"
                     f"<h1>{html.escape(title)}</h1>\n" + "\n".join(items) + "\n")
    return index


def explain_command(args: list[str]) -> None:
    """``ptft explain [--config RECIPE] --ckpt_path CKPT --method METHOD [--num_samples N] [--output DIR]``."""
    methods = sorted(EXAMPLE_METHODS) + sorted(SPLIT_METHODS)
    parser = argparse.ArgumentParser(prog="ptft explain", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt_path", required=True, help="a ptft checkpoint of a classification module")
    parser.add_argument("--method", required=True, choices=methods, help="what to compute")
    parser.add_argument("--num_samples", type=int, default=None,
                        help="examples to explain (default 8); tsne: examples embedded (default: the whole split); "
                        "errors: mistakes shown (default 16; every example is scored)")
    parser.add_argument("--split", default="val", choices=["val", "test", "predict"], help="which split to read")
    parser.add_argument("--target", default="predicted", choices=["predicted", "label"],
                        help="explain the predicted class or the true label")
    parser.add_argument("--output", default=None, help="folder (default: the run folder's explain/<method>)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1 ...")
    parser.add_argument("--before", action="store_true",
                        help="tsne: also embed with the weights fine-tuning started from (one figure, two panels)")
    parser.add_argument("--wandb_project", default=None, help="also log the pictures to this W&B project")
    own, rest = parser.parse_known_args(args)
    if own.num_samples is not None and own.num_samples < 0:
        raise PtftError(f"--num_samples must be >= 0, got {own.num_samples}")
    if not Path(own.ckpt_path).is_file():
        raise PtftError(f"checkpoint not found: {own.ckpt_path}")
    from ptft.transfer.ensemble import data_from_config, has_config, split_loader

    function, is_split = method_function(own.method)  # unknown methods / missing extras fail before any work
    if not is_split and own.num_samples == 0:
        raise PtftError(f"--num_samples must be >= 1 for {own.method!r} (it explains single examples)")
    folder = Path(own.output) if own.output else default_output(own.ckpt_path, own.method)
    if not has_config(rest):
        saved = saved_run_config(own.ckpt_path)
        if saved is None:
            raise PtftError("give --config RECIPE (the recipe the checkpoint was trained with): no config.yaml was "
                            f"found in the run folder of {own.ckpt_path}")
        rest = ["--config", str(recipe_of_run(saved, folder)), *rest]
    module = load_checkpoint(own.ckpt_path)
    loader = split_loader(data_from_config(rest), own.split, module)
    folder.mkdir(parents=True, exist_ok=True)
    if is_split:
        module.eval().to(own.device)
        kwargs: dict[str, Any] = {}
        if own.method == "tsne":
            kwargs["before"] = "pretrained" if own.before else None
        count = own.num_samples if own.num_samples is not None else SPLIT_DEFAULTS.get(own.method)
        files = function(module, loader, folder, count, **kwargs)
    else:
        count = own.num_samples if own.num_samples is not None else 8
        files = explain_examples(module, loader, own.method, folder, count, own.target, own.device)
    index = write_index(folder, files, f"ptft explain --method {own.method}: {own.ckpt_path}")
    if own.wandb_project:
        log_to_wandb(own.wandb_project, own.method, files, folder)
    print(f"wrote {len(files)} files to {folder}; open {index}")


def log_to_wandb(project: str, method: str, files: list[Path], folder: Path) -> None:
    """Logs the PNGs to a W&B run (offline without credentials) and keeps its files next to the explanations."""
    from ptft.core.tracking import WandbLogger

    logger = WandbLogger(project=project, name=f"explain-{method}", save_dir=str(folder))
    log_images(logger, f"explain/{method}", [p for p in files if p.suffix == ".png"],
               captions=[p.stem for p in files if p.suffix == ".png"])
    logger.experiment.finish()
