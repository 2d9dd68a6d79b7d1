"""Precision: fp32 vs bf16-mixed vs ``auto`` for text and vision fine-tuning, side by side in one run.

- text: all-MiniLM-L6-v2 on a shuffled SST-2 training subset (``recipes/text/sst2.yaml``), 1 epoch; SST-2 dev accuracy.
- vision: timm resnet18 (random init, no hub here) on a CIFAR-10 training subset at 32 px (``recipes/vision/cifar10.yaml``),
  a few epochs; accuracy on 2,000 CIFAR-10 test images.

Each run is its own process, one after the other; the table reports samples/s and the ratio to fp32 measured in the same
invocation, the final metric, and what ``auto`` chose on this machine (with its measured bf16 speed-up).

    python bench/precision.py [--text-size 2000] [--image-size 2000] [--epochs 2]

Prints a table and writes it to docs/benchmarks.md (section "Precision").
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import zipfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _common import REPO, SST2, WORK, TrainTimer, model_dir, run_in_subprocess, sst2_subset, write_section  # noqa: E402

CIFAR = REPO.parent / "shared" / "data" / "cifar10" / "cifar10-jpg.zip"
PRECISIONS = ["32-true", "bf16-mixed", "auto"]
SEED = 0


def cifar_subset(size: int, split: str, seed: int = 0) -> Path:
    """A class-balanced shuffled subset of CIFAR-10's ``split`` as image folders in bench/.work."""
    folder = WORK / f"cifar10-{split}-{size}-seed{seed}"
    if folder.exists():
        return folder
    if not CIFAR.exists():
        raise SystemExit(f"CIFAR-10 not found at {CIFAR}")
    with zipfile.ZipFile(CIFAR) as z:
        names = [n for n in z.namelist() if n.startswith(f"{split}/") and n.endswith(".jpg")]
        random.Random(seed).shuffle(names)
        for name in names[:size]:
            target = folder / name.split("/", 1)[1]
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(z.read(name))
    return folder


def run_text(precision: str, train_tsv: Path, dev_tsv: Path) -> dict:
    from ptft.cli import run_cli

    sys.argv = ["ptft"]
    cli = run_cli(
        ["--config", str(REPO / "recipes/text/sst2.yaml"), f"--model.init_args.model_name={model_dir()}",
         f"--data.init_args.train_file={train_tsv}", f"--data.init_args.val_file={dev_tsv}",
         # small-data settings, as in tests/test_integration.py (the recipe's 5e-5 / batch 32 suit all 67k sentences)
         "--model.init_args.optimizer.lr=1e-4", "--data.init_args.batch_size=16",
         f"--trainer.precision={precision}", "--trainer.max_epochs=1", "--trainer.num_sanity_val_steps=0",
         "--trainer.enable_progress_bar=false", "--trainer.enable_checkpointing=false", "--trainer.logger=false",
         "--trainer.callbacks=[]", f"--seed_everything={SEED}", f"--trainer.default_root_dir={WORK / 'precision'}"],
        run=False,
    )
    return _fit(cli, "val/acc")


def run_vision(precision: str, train: Path, test: Path, epochs: int) -> dict:
    from ptft.cli import run_cli

    sys.argv = ["ptft"]
    cli = run_cli(
        ["--config", str(REPO / "recipes/vision/cifar10.yaml"), "--model.init_args.model_name=resnet18",
         "--model.init_args.pretrained=false", f"--data.init_args.train={train}", f"--data.init_args.val={test}",
         "--data.init_args.test=null", "--data.init_args.num_workers=0",
         f"--trainer.precision={precision}", f"--trainer.max_epochs={epochs}", "--trainer.num_sanity_val_steps=0",
         "--trainer.enable_progress_bar=false", "--trainer.enable_checkpointing=false", "--trainer.logger=false",
         "--trainer.callbacks=[]", f"--seed_everything={SEED}", f"--trainer.default_root_dir={WORK / 'precision'}"],
        run=False,
    )
    return _fit(cli, "val/acc")


def _fit(cli, metric: str) -> dict:
    timer = TrainTimer()
    cli.trainer.callbacks.append(timer)
    cli.trainer.fit(cli.model, cli.datamodule)
    plugin = type(cli.trainer.precision_plugin).__name__
    chosen = getattr(cli.trainer.precision_plugin, "precision", plugin)
    return {"train_seconds": timer.seconds, "samples": timer.samples, "metric": cli.trainer.callback_metrics[metric].item(),
            "precision": str(chosen), "auto": os.environ.get("PTFT_AUTO_PRECISION")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--text-size", type=int, default=2000)
    parser.add_argument("--image-size", type=int, default=2000)
    parser.add_argument("--epochs", type=int, default=2, help="vision epochs")
    parser.add_argument("--tasks", nargs="+", default=["text", "vision"], choices=["text", "vision"])
    parser.add_argument("--one", nargs=2, metavar=("TASK", "PRECISION"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    os.environ.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
                      WANDB_MODE="disabled", PTFT_CACHE=str(WORK / "precision-cache"))

    if args.one:
        task, precision = args.one
        if task == "text":
            result = run_text(precision, sst2_subset(SST2, args.text_size, SEED), SST2 / "dev.tsv")
        else:
            result = run_vision(precision, cifar_subset(args.image_size, "train"), cifar_subset(2000, "test"),
                                args.epochs)
        print("RESULT " + json.dumps(result))
        return

    sst2_subset(SST2, args.text_size, SEED), cifar_subset(args.image_size, "train"), cifar_subset(2000, "test")
    results: dict[tuple[str, str], dict] = {}
    for task in args.tasks:
        for precision in PRECISIONS:
            print(f"{task} {precision} ...", flush=True)
            result = run_in_subprocess(__file__, ["--one", task, precision, "--text-size", str(args.text_size),
                                                  "--image-size", str(args.image_size), "--epochs", str(args.epochs)])
            result["samples_per_s"] = result["samples"] / result["train_seconds"]
            print(f"    {result['samples_per_s']:.1f} samples/s, metric {result['metric']:.4f}, ran {result['precision']}",
                  flush=True)
            results[(task, precision)] = result

    import platform

    import torch

    auto = next((json.loads(r["auto"]) for r in results.values() if r.get("auto")), None)
    described = {
        "text": f"text: all-MiniLM-L6-v2, {args.text_size:,} shuffled SST-2 training sentences, 1 epoch, "
                "`recipes/text/sst2.yaml` with lr 1e-4 and batch 16 (small-data settings), SST-2 dev accuracy (872)",
        "vision": f"vision: timm resnet18 from random init (no hub here), {args.image_size:,} CIFAR-10 training images "
                  f"at 32 px, {args.epochs} epoch(s), `recipes/vision/cifar10.yaml` defaults, accuracy on 2,000 CIFAR-10 "
                  "test images",
    }
    lines = [
        "",
        "",
        f"`python bench/precision.py --tasks {' '.join(args.tasks)} --text-size {args.text_size} --image-size "
        f"{args.image_size} --epochs {args.epochs}` — " + "; ".join(described[t] for t in args.tasks)
        + f". Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}. "
        "Ratios are to fp32 in the same invocation.",
        "",
        "| task | precision asked | ran as | train samples/s | vs fp32 | final accuracy |",
        "|---|---|---|---:|---:|---:|",
    ]
    for task in args.tasks:
        base = results[(task, "32-true")]["samples_per_s"]
        for precision in PRECISIONS:
            r = results[(task, precision)]
            lines.append(f"| {task} | `{precision}` | `{r['precision']}` | {r['samples_per_s']:.1f} | "
                         f"{r['samples_per_s'] / base:.2f}x | {r['metric']:.4f} |")
    if auto:
        lines += ["", f"`auto` on this machine: {auto['reason']}."]
    table = "\n".join(lines)
    print(table)
    write_section(table + "\n", "Precision: " + ", ".join(args.tasks))


if __name__ == "__main__":
    main()
