"""Continual fine-tuning on CIFAR-10: classes 0-4 (task 1), then classes 5-9 (task 2), and how much of task 1 is kept.

Task 1 trains timm ``test_resnet`` from scratch on airplane, automobile, bird, cat, deer (recipes/vision/cifar10.yaml).
Task 2 continues from its checkpoint on dog, frog, horse, ship, truck with recipes/vision/cifar10-continual.yaml (the
classifier grows from 5 to 10 rows, the old ones kept) in four ways: plain fine-tuning, L2-SP towards the previous
model (head rows included), EWC with a Fisher from up to 1,000 task-1 training images, and replay of a tenth of the
task-1 training images. Every model is tested on the old classes' test images, the new ones' and all of them, over all 10
classes of the grown classifier (class-incremental: an old image called "dog" is wrong). Task 1 and task 2 run once per
seed; the table gives the mean and standard deviation over seeds.

    python bench/continual_cifar.py [--data ../shared/data/cifar10/cifar10-jpg.zip] [--per-class 200]
        [--test-per-class 100] [--epochs-old 6] [--epochs-new 3] [--seeds 0 1] [--l2-sp 1] [--ewc 10000]
        [--replay 0.1 0.5] [--only plain l2sp ewc replay]

Each run's result is kept in bench/.work/continual-results (by sizes, seed and method) and reused, so seeds or
methods can run in parallel processes (``--seeds 1 --only ewc``) and a last call assembles the table from them.
Writes the table to docs/benchmarks.md (section "Continual fine-tuning: CIFAR-10 classes 0-4, then 5-9").
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import time
import zipfile
from pathlib import Path, PurePosixPath

sys.path.insert(0, str(Path(__file__).parent))
from _common import REPO, WORK, cifar_members, write_section

CIFAR10 = REPO.parent / "shared" / "data" / "cifar10" / "cifar10-jpg.zip"
CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
OLD, NEW = CLASSES[:5], CLASSES[5:]
MODEL = "test_resnet"  # timm's tiny ResNet (0.37M parameters): what a 2-core CPU allows for 10 runs
SECTION = "Continual fine-tuning: CIFAR-10 classes 0-4, then 5-9"
QUIET = ["--trainer.enable_progress_bar=false", "--trainer.logger=false", "--trainer.enable_model_summary=false",
         "--trainer.enable_checkpointing=false", "--trainer.num_sanity_val_steps=0", "--trainer.limit_val_batches=0",
         "--trainer.callbacks=[]"]


def extract(data: Path, per_class: int, test_per_class: int) -> dict[str, Path]:
    """Class folders in bench/.work/cifar-continual: ``old`` (classes 0-4) and ``new`` (5-9), each with ``train``
    (``per_class`` images per class, a seeded draw) and ``test`` (``test_per_class`` test images per class)."""
    root = WORK / "cifar-continual" / f"{per_class}-{test_per_class}"
    folders = {f"{task}-{split}": root / task / split for task in ("old", "new") for split in ("train", "test")}
    if all(f.is_dir() for f in folders.values()):
        return folders
    if not data.is_file():
        raise SystemExit(f"CIFAR-10 zip not found at {data}; pass --data /path/cifar10-jpg.zip")
    rng = random.Random(0)
    with zipfile.ZipFile(data) as zf:
        by = cifar_members(zf)
        for cls in CLASSES:
            task = "old" if cls in OLD else "new"
            for split, count in (("train", per_class), ("test", test_per_class)):
                members = list(by[(split, cls)])
                rng.shuffle(members)
                folder = folders[f"{task}-{split}"] / cls
                folder.mkdir(parents=True, exist_ok=True)
                for member in members[:count]:
                    (folder / PurePosixPath(member).name).write_bytes(zf.read(member))
    return folders


def cli(args: list[str]):
    from ptft.cli import run_cli

    sys.argv = ["ptft"]
    return run_cli(args, run=False)


def image_args(prefix: str, train: Path, test: Path, batch_size: int) -> list[str]:
    return [f"{prefix}.train={train}", f"{prefix}.test={test}", f"{prefix}.batch_size={batch_size}",
            f"{prefix}.eval_batch_size=250", f"{prefix}.num_workers=1"]


def task_one(folders: dict[str, Path], epochs: int, seed: int, out: Path) -> float:
    """Trains the task-1 model, saves its checkpoint to ``out`` and returns its old-class test accuracy."""
    c = cli(["--config", str(REPO / "recipes/vision/cifar10.yaml"), f"--model.init_args.model_name={MODEL}",
             "--model.init_args.pretrained=false", f"--trainer.max_epochs={epochs}", f"--seed_everything={seed}",
             *image_args("--data.init_args", folders["old-train"], folders["old-test"], 64), *QUIET])
    c.trainer.fit(c.model, c.datamodule)
    c.trainer.save_checkpoint(out)
    return c.trainer.test(c.model, c.datamodule, verbose=False)[0]["test/acc"]


def task_two(folders: dict[str, Path], previous: Path, method: list[str], epochs: int, seed: int) -> dict[str, float]:
    from ptft.transfer.continual import evaluate_old_and_new

    data = "--data.init_args"
    c = cli(["--config", str(REPO / "recipes/vision/cifar10-continual.yaml"), f"--model.init_args.model_name={MODEL}",
             f"--trainer.max_epochs={epochs}", f"--seed_everything={seed}",
             *image_args(f"{data}.new.init_args", folders["new-train"], folders["new-test"], 64),
             *image_args(f"{data}.old.init_args", folders["old-train"], folders["old-test"], 64), *QUIET,
             "--trainer.callbacks+=ptft.transfer.continual.ContinueFrom", f"--trainer.callbacks.checkpoint={previous}",
             f"{data}.replay=0", *method])
    c.trainer.fit(c.model, c.datamodule)
    return evaluate_old_and_new(c.trainer, c.model, c.datamodule)


def mean_std(values: list[float]) -> str:
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.3f} ± {spread:.3f}"


def cached(folder: Path, key: str, compute) -> dict:
    """``compute()`` (a dict of results) with its seconds, stored as ``folder/key.json``; read back when present."""
    path = folder / f"{key}.json"
    if path.is_file():
        return json.loads(path.read_text())
    start = time.perf_counter()
    result = {**compute(), "seconds": 0.0}
    result["seconds"] = time.perf_counter() - start
    folder.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result))
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=CIFAR10)
    parser.add_argument("--per-class", type=int, default=200, help="training images per class")
    parser.add_argument("--test-per-class", type=int, default=100, help="test images per class")
    parser.add_argument("--epochs-old", type=int, default=6, help="task-1 epochs")
    parser.add_argument("--epochs-new", type=int, default=3, help="task-2 epochs")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--l2-sp", type=float, default=1.0, help="L2-SP strength towards the task-1 model")
    parser.add_argument("--ewc", type=float, default=10000.0, help="EWC strength (lambda)")
    parser.add_argument("--replay", type=float, nargs="+", default=[0.1, 0.5],
                        help="replayed task-1 training images (fractions), one row each")
    parser.add_argument("--only", nargs="+", choices=["plain", "l2sp", "ewc", "replay"],
                        help="run only these task-2 methods (and write no table)")
    args = parser.parse_args()
    os.environ.update(HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    import torch

    torch.set_num_threads(os.cpu_count() or 1)
    wall = time.perf_counter()
    folders = extract(args.data, args.per_class, args.test_per_class)
    results_dir = WORK / "continual-results" / f"{args.per_class}-{args.test_per_class}-{args.epochs_old}-{args.epochs_new}"
    data = "--data.init_args"
    old_rows = len(OLD) * args.per_class - round(0.1 * len(OLD) * args.per_class)  # the recipe holds out 10%
    methods = {  # name -> (kind, key, extra arguments)
        "plain fine-tuning": ("plain", "plain", []),
        f"L2-SP to the task-1 model (l2_sp {args.l2_sp:g}, head rows included)": (
            "l2sp", f"l2sp{args.l2_sp:g}", [f"--model.init_args.l2_sp={args.l2_sp}"]),
        f"EWC (lambda {args.ewc:g}, Fisher of {min(1000, old_rows):,} task-1 training images)": (
            "ewc", f"ewc{args.ewc:g}", ["--trainer.callbacks+=ptft.transfer.EWC",
                                        f"--trainer.callbacks.strength={args.ewc}"]),
        **{f"replay ({r:g} of the task-1 training images: {round(r * old_rows):,})": (
            "replay", f"replay{r:g}", [f"{data}.replay={r}"]) for r in args.replay},
    }
    first: list[dict] = []
    results: dict[str, list[dict]] = {name: [] for name in methods}
    for seed in args.seeds:
        previous = WORK / f"continual-task1-seed{seed}.ckpt"
        first.append(cached(results_dir, f"seed{seed}-task1",
                            lambda: {"test/old/acc": task_one(folders, args.epochs_old, seed, previous)}))
        print(f"seed {seed} task 1: old-class test acc {first[-1]['test/old/acc']:.4f} ({first[-1]['seconds']:.0f} s)",
              flush=True)
        for name, (kind, key, method) in methods.items():
            if args.only and kind not in args.only:
                continue
            r = cached(results_dir, f"seed{seed}-{key}",
                       lambda: task_two(folders, previous, method, args.epochs_new, seed))
            results[name].append(r)
            print(f"seed {seed} {name}: old {r['test/old/acc']:.4f} new {r['test/new/acc']:.4f} all "
                  f"{r['test/all/acc']:.4f} ({r['seconds']:.0f} s)", flush=True)
    if args.only:
        return

    compute = sum(r["seconds"] for runs in [first, *results.values()] for r in runs)
    old_count, new_count = args.per_class * len(OLD), args.per_class * len(NEW)
    lines = [
        "",
        "",
        (f"`python bench/continual_cifar.py --per-class {args.per_class} --test-per-class {args.test_per_class} "
         f"--epochs-old {args.epochs_old} --epochs-new {args.epochs_new} --seeds {' '.join(map(str, args.seeds))} "
         f"--l2-sp {args.l2_sp:g} --ewc {args.ewc:g} --replay {' '.join(f'{r:g}' for r in args.replay)}` — timm "
         f"`{MODEL}` (0.37M parameters) from scratch at 32 px. Task 1: {args.per_class} training images per class of "
         f"CIFAR-10 classes 0-4 ({old_count:,}, 10% held out), {args.epochs_old} epochs of recipes/vision/cifar10.yaml "
         f"(AdamW lr 1e-3, cosine, label smoothing 0.1, batch 64). Task 2: from task 1's checkpoint (`ContinueFrom`: "
         f"the classifier grows to 10 rows, the old 5 kept), {args.per_class} training images per class of classes "
         f"5-9 ({new_count:,}), {args.epochs_new} epochs of recipes/vision/cifar10-continual.yaml with the same "
         f"optimizer, the last epoch's model; strengths as given, not tuned. Test: {args.test_per_class} test images "
         f"per class; accuracy over all 10 classes of the grown classifier (class-incremental), old = classes 0-4, "
         f"new = 5-9, all = both (chance 0.10). Mean ± standard deviation over {len(args.seeds)} seeds (task 1 and "
         f"task 2 both reseeded). {os.cpu_count()} CPU cores shared with other jobs, fp32, {compute / 60:.0f} min of "
         "runs in all."),
        "",
        "| model | old classes acc | new classes acc | all 10 acc |",
        "|---|---:|---:|---:|",
        f"| task 1 (classes 0-4 only, 5-way classifier) | {mean_std([r['test/old/acc'] for r in first])} | - | - |",
    ]
    for name, runs in results.items():
        cells = [mean_std([r[f"test/{which}/acc"] for r in runs]) for which in ("old", "new", "all")]
        lines.append(f"| task 2: {name} | {' | '.join(cells)} |")
    table = "\n".join(lines)
    print(table)
    write_section(table + "\n", SECTION)
    print(f"{(time.perf_counter() - wall) / 60:.1f} min", flush=True)


if __name__ == "__main__":
    main()
