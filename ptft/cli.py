"""The ``ptft`` command: Lightning's CLI with ptft's links, defaults, shipped recipes and one-line errors.

``ptft fit|validate|test|predict --config recipe.yaml [--key value ...]``, and ``ptft recipes``, ``ptft quickstart``,
``ptft inspect-layers``, ``ptft lr-find``, ``ptft export``. This module imports neither Lightning nor ``ptft.core``
(which imports Lightning) until a command needs them: ``ptft recipes`` and ``ptft --help`` answer at once; the
commands themselves live in :mod:`ptft.commands`.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import sys
import warnings
from pathlib import Path
from typing import Any

RECIPES = Path(__file__).resolve().parent / "recipes"
USAGE = """usage: ptft COMMAND [options]

  ptft fit --config RECIPE [--key=value ...]     train (also: validate, test, predict; ptft fit --help)
  ptft recipes [RECIPE [DEST]]                    list the shipped recipes, or copy one to edit
  ptft --version                                  the installed version
  ptft quickstart [--key=value ...]               fine-tune a small model on shipped reviews (CPU, minutes)
  ptft inspect-layers --config RECIPE             layer index and learning rate of every parameter
  ptft lr-find --config RECIPE                    learning-rate range test (keeps layer-decay / head-lr ratios)
  ptft export [--backbone] CKPT OUTPUT            a plain model folder (or a vision backbone) from a checkpoint;
              [--format onnx|onnx-int8]           or ONNX (+ int8) with an onnxruntime parity check
  ptft ensemble --config RECIPE --checkpoints A B  mean class probabilities of checkpoints (--split, --output)
  ptft soup --checkpoints A B --output SOUP        average fine-tuned weights (--method uniform|greedy --config)
  ptft explain --ckpt_path CKPT --method METHOD    why the model decides: gradcam, ig, attention, saliency, shap,
                                                  tsne, errors (--config, --num_samples, --output; files + W&B)
  ptft convert --kind KIND --input IN --output DIR  LitData shards of an image / audio folder or a text file, for
                                                  streaming data larger than memory (ptft convert --help)

RECIPE is a YAML file, or the name of a shipped recipe (text/sst2.yaml, recipes/text/sst2.yaml) when no such file
exists in the current folder. `ptft fit --ckpt_path last` resumes the newest last.ckpt of the recipe's runs.
"""


def user_error(message: str) -> Exception:
    """A :class:`ptft.core.errors.PtftError`, imported only when there is one to report."""
    from ptft.core.errors import PtftError

    return PtftError(message)


# --- shipped recipes ---------------------------------------------------------------------------------------------
def shipped_recipe(name: str) -> Path | None:
    """The packaged recipe ``name`` refers to (``text/sst2.yaml``, ``recipes/text/sst2.yaml``, ``text/sst2``)."""
    relative = name.removeprefix("recipes/")
    for candidate in (relative, f"{relative}.yaml"):
        path = RECIPES / candidate
        if path.is_file() and path.resolve().is_relative_to(RECIPES):
            return path
    return None


def resolve_config(name: str) -> str:
    """A ``--config`` value: the file if it exists here, else the shipped recipe of that name, else one error line."""
    if Path(name).exists():
        return name
    recipe = shipped_recipe(name)
    if recipe is None:
        raise user_error(f"--config {name}: no such file here, nor a shipped recipe of that name (see: ptft recipes)")
    return str(recipe)


def with_shipped_configs(args: list[str]) -> list[str]:
    """Command-line arguments with every ``--config`` / ``-c`` value resolved by :func:`resolve_config`."""
    out: list[str] = []
    expect_value = False
    for arg in args:
        if expect_value:
            out.append(resolve_config(arg))
            expect_value = False
        elif arg in ("--config", "-c"):
            out.append(arg)
            expect_value = True
        elif arg.startswith("--config="):
            out.append("--config=" + resolve_config(arg.split("=", 1)[1]))
        else:
            out.append(arg)
    return out


def first_comment(recipe: Path) -> str:
    """The recipe's headline: its first comment line."""
    for line in recipe.read_text().splitlines():
        if line.startswith("#"):
            return line.lstrip("#").strip()
    return ""


def recipes(args: list[str]) -> None:
    """``ptft recipes``: the shipped recipes with their headlines; ``ptft recipes NAME [DEST]`` copies one to edit."""
    import argparse

    parser = argparse.ArgumentParser(prog="ptft recipes", description=recipes.__doc__)
    parser.add_argument("name", nargs="?", help="a shipped recipe, e.g. text/sst2.yaml")
    parser.add_argument("dest", nargs="?", help="file or folder to write (default: the recipe's file name, here)")
    own = parser.parse_args(args)
    if own.name is None:
        print(f"Recipes shipped with ptft (in {RECIPES}):")
        for recipe in sorted(RECIPES.rglob("*.yaml")):
            print(f"  {recipe.relative_to(RECIPES).as_posix():32s} {first_comment(recipe)}")
        print("Run one with: ptft fit --config text/sst2.yaml   Copy one to edit: ptft recipes text/sst2.yaml [DEST]")
        return
    recipe = shipped_recipe(own.name)
    if recipe is None:
        raise user_error(f"no shipped recipe {own.name!r} (see: ptft recipes)")
    dest = Path(own.dest) if own.dest else Path(recipe.name)
    if dest.is_dir():
        dest = dest / recipe.name
    if dest.exists():
        raise user_error(f"{dest} exists; give another destination: ptft recipes {own.name} DEST")
    dest.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(recipe, dest)
    print(f"wrote {dest}; run it with: ptft fit --config {dest}")


# --- console -----------------------------------------------------------------------------------------------------
class DropMessages(logging.Filter):
    """Drops log records whose message contains one of ``fragments``; every other record passes."""

    def __init__(self, *fragments: str) -> None:
        super().__init__()
        self.fragments = fragments

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(fragment in message for fragment in self.fragments)


class ExpectedHeadReport(logging.Filter):
    """Drops transformers' load report when all it lists is the task head outside the base model.

    ptft asks for that head on purpose (a new classifier, or one re-sized to another label set), so "MISSING:
    newly initialized" is expected there. A report naming any weight of the base model (a wrong checkpoint, a
    renamed layer) still prints in full.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        message = re.sub(r"\x1b\[[0-9;]*m", "", record.getMessage())  # the report is coloured
        if " LOAD REPORT" not in message:
            return True
        import transformers

        model_class = getattr(transformers, message.split(" LOAD REPORT")[0].split()[-1], None)
        base = getattr(model_class, "base_model_prefix", None)
        rows = [line.split("|") for line in message.splitlines() if line.count("|") >= 2]
        rows = [(key.strip(), status.strip()) for key, status, *_ in rows[1:]]  # below the header row
        head_only = bool(base) and bool(rows) and all(
            status in ("MISSING", "MISMATCH", "UNEXPECTED") and not key.startswith(f"{base}.") for key, status in rows
        )
        return not head_only


#: Third-party log lines of a normal run that tell the user nothing to act on, by the logger that prints them.
NOISE_LOGS: dict[str, logging.Filter] = {
    # Lightning's advertisements ("💡 Tip: For seamless cloud ... try installing [litlogger] / [litmodels]").
    "lightning.pytorch.utilities.rank_zero": DropMessages("💡 Tip:"),
    "transformers.modeling_utils": ExpectedHeadReport(),
}
#: Third-party warnings with no action for a ptft user: (message regex, category, module regex).
NOISE_WARNINGS: list[tuple[str, type[Warning], str]] = [
    # Lightning 2.6 uses a torch pytree API that torch 2.10+ deprecates; nothing a user can change.
    (r"`isinstance\(treespec, LeafSpec\)` is deprecated", FutureWarning, r"lightning\.pytorch\.utilities\._pytree"),
    # validate / test / predict run without the checkpoint callback on purpose (they write no checkpoint); any
    # other callback a checkpoint names but the run lacks (EMA...) still warns.
    (r"Be aware that when using `ckpt_path`, .* Please add the following callbacks. \[(\"ModelCheckpoint\{[^}]*\}\"(, )?)+\]\.$",
     UserWarning, r"lightning\.pytorch\..*"),
]


def quiet_console() -> None:
    """Filters the known noise of a normal run (``NOISE_LOGS`` / ``NOISE_WARNINGS``); every other warning stays.

    jsonargparse's deprecation notices are about Lightning's own calls into it: its documented switch turns them off.
    """
    os.environ.setdefault("JSONARGPARSE_DEPRECATION_WARNINGS", "off")
    for logger, log_filter in NOISE_LOGS.items():
        logging.getLogger(logger).addFilter(log_filter)
    for message, category, module in NOISE_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category, module=module)


# --- entry point -------------------------------------------------------------------------------------------------
def run_cli(args: list[str] | None = None, run: bool = True) -> Any:
    """Runs the ptft CLI in-process (``args`` as on the command line, without the program name); see ptft.commands."""
    from ptft.commands import run_cli as _run_cli

    return _run_cli(args, run)


def export(args: list[str]) -> None:
    """``ptft export [--backbone] CKPT OUTPUT``; see :func:`ptft.commands.export`."""
    from ptft.commands import export as _export

    _export(args)


def main(argv: list[str] | None = None) -> None:
    """Entry point of the ``ptft`` console script."""
    args = sys.argv[1:] if argv is None else list(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if not args or args[0] in ("-h", "--help"):
        print(USAGE)
        return
    if args[0] in ("-V", "--version"):  # answered without importing torch or Lightning
        from ptft import __version__

        print(f"ptft {__version__}")
        return
    try:
        args = with_shipped_configs(args)
        if args[0] == "recipes":
            recipes(args[1:])
            return
        quiet_console()
        from ptft.commands import COMMANDS, no_argv

        if args[0] in COMMANDS:
            with no_argv():  # the command's own arguments replace the command line
                COMMANDS[args[0]](args[1:])
        else:
            with no_argv():  # LightningCLI warns when it gets args and sees a command line too
                run_cli(args)
    except Exception as err:
        from ptft.core.errors import find_user_error

        found = find_user_error(err)
        if found is None:
            raise
        print(f"ptft: error: {found}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
