"""Distillation on SST-2: all-MiniLM-L6-v2 fine-tuned as the teacher, then 3- and 2-layer students initialised from
its blocks, trained with and without the teacher (recipes/text/sst2-distill.yaml), side by side.

1. Teacher: recipes/text/sst2.yaml on ``--train-size`` shuffled SST-2 training sentences, ``--teacher-epochs``.
2. Students: ``keep_layers`` [0, 2, 5] and [0, 5] of the fine-tuned teacher (embeddings and classifier included),
   ``--epochs`` on the same sentences, each with the Distillation callback (recipe defaults: T=2, alpha=0.5, teacher
   logits cached) and without it (the same recipe, callback removed), for each seed.
   With ``--unlabelled N``, the smallest student is also distilled with ``alpha: 1`` (no label enters the loss) on the same
   sentences plus the next N shuffled SST-2 training sentences with their labels blanked: the teacher labels them
   (task-specific distillation on a larger transfer set, as DistilBERT / TinyBERT).
3. Inference: every model on the 872 SST-2 dev sentences in batches of 32 (and one by one for the first 200), models
   interleaved, the median of ``--repeats`` passes: CPU throughput ratios to the teacher. ``--speed-only`` re-measures
   from the saved checkpoints (run it on a quiet machine: the ratios are what counts). A rerun with the same sizes reuses the teacher and every
run already in bench/.work/distill/results.json.

    python bench/distill_sst2.py [--train-size 12000] [--teacher-epochs 2] [--epochs 2] [--seeds 0 1]
                                 [--unlabelled 59000] [--speed-only]

Writes docs/benchmarks.md section "Distillation: SST-2, MiniLM-L6 -> 3 and 2 layers".
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _common import REPO, SST2, WORK, model_dir, sst2_subset, write_section

OUT = WORK / "distill"
STUDENTS = {"3 layers": [0, 2, 5], "2 layers": [0, 5]}
SMALLEST = "2 layers"
QUIET = ["--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false", "--trainer.logger=false",
         "--trainer.enable_checkpointing=false", "--trainer.num_sanity_val_steps=0"]


def data_args(train: Path) -> list[str]:
    return [f"--data.init_args.train_file={train}", f"--data.init_args.val_file={SST2 / 'dev.tsv'}"]


def fit(args: list[str], ckpt: Path, distil: bool = True) -> dict:
    """Fits in this process; returns dev accuracy after the last epoch and the training seconds; saves ``ckpt``."""
    from ptft.cli import run_cli
    from ptft.transfer import Distillation

    sys.argv = ["ptft"]
    cli = run_cli([*args, *QUIET], run=False)
    from lightning.pytorch.callbacks import LearningRateMonitor

    drop = (LearningRateMonitor,) if distil else (LearningRateMonitor, Distillation)  # no logger here
    cli.trainer.callbacks[:] = [c for c in cli.trainer.callbacks if not isinstance(c, drop)]
    start = time.perf_counter()
    cli.trainer.fit(cli.model, cli.datamodule)
    seconds = time.perf_counter() - start
    acc = float(cli.trainer.callback_metrics["val/acc"])
    ckpt.parent.mkdir(parents=True, exist_ok=True)
    cli.trainer.save_checkpoint(ckpt)
    return {"acc": acc, "seconds": seconds, "precision": str(cli.trainer.precision)}


def unlabelled_transfer_set(train_size: int, extra: int) -> Path:
    """The ``train_size`` training sentences plus the next ``extra`` of the same shuffle, every label blanked to 0."""
    source = sst2_subset(SST2, train_size + extra)
    header, *rows = source.read_text().splitlines()
    column = header.split("\t").index("label")
    blanked = []
    for row in rows:
        cells = row.split("\t")
        cells[column] = "0"
        blanked.append("\t".join(cells))
    path = OUT / f"sst2-transfer-{train_size}+{extra}-unlabelled.tsv"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join([header, *blanked]) + "\n")
    return path


def dev_batches(batch_size: int) -> list[dict]:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir())
    sentences = [line.split("\t", 1)[1] for line in (SST2 / "dev.tsv").read_text().splitlines()[1:]]
    if batch_size == 1:
        sentences = sentences[:200]
    return [dict(tokenizer(sentences[i:i + batch_size], padding=True, truncation=True, max_length=128,
                           return_tensors="pt")) for i in range(0, len(sentences), batch_size)]


def inference_speed(checkpoints: dict[str, Path], repeats: int) -> dict[str, dict[str, float]]:
    """Sentences per second of each model on the dev set, the models interleaved within each repeat."""
    import torch

    from ptft.core.module import load_checkpoint

    models = {name: load_checkpoint(str(path)).eval() for name, path in checkpoints.items()}
    result: dict[str, dict[str, float]] = {name: {} for name in models}
    for batch_size in (32, 1):
        batches = dev_batches(batch_size)
        count = sum(len(b["input_ids"]) for b in batches)
        times: dict[str, list[float]] = {name: [] for name in models}
        with torch.inference_mode():
            for name, module in models.items():  # warm-up
                module.model(**batches[0])
            for _ in range(repeats):
                for name, module in models.items():
                    start = time.perf_counter()
                    for batch in batches:
                        module.model(**batch)
                    times[name].append(time.perf_counter() - start)
        for name in models:
            result[name][f"batch{batch_size}"] = count / statistics.median(times[name])
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--train-size", type=int, default=12000)
    parser.add_argument("--teacher-epochs", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--unlabelled", type=int, default=0,
                        help="also distil each student (alpha 1) on this many more training sentences, labels blanked")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--speed-only", action="store_true", help="re-measure inference from the saved checkpoints")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                        help="torch threads while training (1 on a busy machine); inference uses every core")
    args = parser.parse_args()
    os.environ.update(HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    import torch

    torch.set_num_threads(args.threads)
    results_file = OUT / "results.json"
    if args.speed_only:
        saved = json.loads(results_file.read_text())
    else:
        sizes = {k: getattr(args, k) for k in ("train_size", "teacher_epochs", "epochs")}
        saved = json.loads(results_file.read_text()) if results_file.exists() else {}
        if any(saved.get("args", {}).get(k) != v for k, v in sizes.items()):
            saved = {}  # other sizes: start over
        train = sst2_subset(SST2, args.train_size)
        teacher_ckpt = OUT / "teacher.ckpt"
        if saved and teacher_ckpt.exists():
            teacher = saved["teacher"]
        else:
            teacher = fit(["--config", str(REPO / "recipes/text/sst2.yaml"),
                           f"--model.init_args.model_name={model_dir()}", *data_args(train),
                           f"--trainer.max_epochs={args.teacher_epochs}", "--seed_everything=0"], teacher_ckpt)
            teacher["ckpt"] = str(teacher_ckpt)
            saved = {}
        print(f"teacher: dev acc {teacher['acc']:.4f} ({teacher['seconds']:.0f} s)", flush=True)
        for r in saved.get("runs", []):  # results written before the modes had names
            if "distil" in r:
                r["mode"] = "distilled" if r.pop("distil") else "no teacher"
        done = {(r["student"], r["mode"], r["seed"]): r for r in saved.get("runs", []) if Path(r["ckpt"]).exists()}
        runs = []
        for student, layers in STUDENTS.items():
            modes = ["distilled", "no teacher"]
            if args.unlabelled and student == SMALLEST:
                modes.append(f"distilled +{args.unlabelled:,} unlabelled")
            for mode in modes:
                for seed in args.seeds:
                    if (student, mode, seed) in done:
                        runs.append(done[(student, mode, seed)])
                        continue
                    tag = {"distilled": "kd", "no teacher": "plain"}.get(mode, f"kd-unlabelled{args.unlabelled}")
                    ckpt = OUT / f"{student.replace(' ', '')}-{tag}-seed{seed}.ckpt"
                    extra = []
                    if mode.startswith("distilled +"):
                        transfer = unlabelled_transfer_set(args.train_size, args.unlabelled)
                        extra = [f"--data.init_args.train_file={transfer}", "--trainer.callbacks.alpha=1.0"]
                    run = fit(["--config", str(REPO / "recipes/text/sst2-distill.yaml"),
                               f"--model.init_args.model_name={teacher_ckpt}",
                               f"--model.init_args.keep_layers={json.dumps(layers)}",
                               f"--trainer.callbacks.teacher={teacher_ckpt}",
                               f"--trainer.callbacks.cache_dir={OUT / 'teacher-logits'}",
                               *data_args(train), *extra, f"--trainer.max_epochs={args.epochs}",
                               f"--seed_everything={seed}"],
                              ckpt, mode != "no teacher")
                    runs.append({"student": student, "mode": mode, "seed": seed, "ckpt": str(ckpt), **run})
                    print(f"{student} {mode} seed {seed}: dev acc {run['acc']:.4f} ({run['seconds']:.0f} s)",
                          flush=True)
                    saved = {"args": {**sizes, "seeds": args.seeds, "unlabelled": args.unlabelled,
                                      "threads": args.threads}, "teacher": teacher, "runs": runs}
                    results_file.write_text(json.dumps(saved, indent=1))  # after every run: a rerun resumes
        saved = {"args": {**sizes, "seeds": args.seeds, "unlabelled": args.unlabelled, "threads": args.threads},
                 "teacher": teacher, "runs": runs}
        results_file.write_text(json.dumps(saved, indent=1))
    checkpoints = {"teacher": Path(saved["teacher"]["ckpt"])}
    for student in STUDENTS:
        checkpoints[student] = Path(next(r["ckpt"] for r in saved["runs"] if r["student"] == student))
    torch.set_num_threads(os.cpu_count() or 1)
    speed = inference_speed(checkpoints, args.repeats)
    a = saved["args"]
    teacher_acc = saved["teacher"]["acc"]
    unlabelled = a.get("unlabelled", 0)
    lines = [
        "", "",
        (f"`python bench/distill_sst2.py --train-size {a['train_size']} --teacher-epochs {a['teacher_epochs']} "
         f"--epochs {a['epochs']} --seeds {' '.join(map(str, a['seeds']))}"
         f"{f' --unlabelled {unlabelled}' if unlabelled else ''}` — teacher: all-MiniLM-L6-v2 fine-tuned "
         f"with recipes/text/sst2.yaml on {a['train_size']:,} shuffled SST-2 training sentences for "
         f"{a['teacher_epochs']} epochs (seed 0). Students: `keep_layers` of that fine-tuned teacher (its embeddings, "
         "blocks and classifier: DistilBERT's initialisation), recipes/text/sst2-distill.yaml on the same sentences "
         f"for {a['epochs']} epochs, with the teacher (T=2, alpha=0.5, teacher logits cached) and without it (the "
         "same recipe, callback removed), seeds as listed (seed = dropout and batch order). Dev = SST-2 dev (872), "
         "accuracy after the last epoch. Inference: the model alone (no data loading) on the 872 dev sentences, "
         "batches of 32 padded to their longest, and one by one for the first 200; every model in one process, "
         f"interleaved, median of {args.repeats} passes, {os.cpu_count()} CPU cores, fp32 "
         f"(training precision: {saved['teacher']['precision']})."
         + (f" \"distilled +{unlabelled:,} unlabelled\": the same student with `alpha: 1` (no label enters the loss) "
            f"on those sentences plus the next {unlabelled:,} of the same shuffle, their labels blanked: the teacher "
            "labels them (task-specific distillation on a larger transfer set, as DistilBERT / TinyBERT)."
            if unlabelled else "")),
        "",
        "| model | blocks | dev acc (mean ± std) | per seed | of teacher | inference, batch 32 | batch 1 |",
        "|---|---|---:|---:|---:|---:|---:|",
        (f"| teacher | 6 | {teacher_acc:.4f} | - | 100% | {speed['teacher']['batch32']:.0f} sent/s (1.00x) | "
         f"{speed['teacher']['batch1']:.0f} sent/s (1.00x) |"),
    ]
    for student, layers in STUDENTS.items():
        modes = dict.fromkeys(r["mode"] for r in saved["runs"] if r["student"] == student)
        for mode in modes:
            accs = [r["acc"] for r in saved["runs"] if r["student"] == student and r["mode"] == mode]
            mean = statistics.mean(accs)
            std = statistics.stdev(accs) if len(accs) > 1 else 0.0
            s = speed[student]
            lines.append(
                f"| {student}, {mode} | {layers} | {mean:.4f} ± {std:.4f} | "
                f"{', '.join(f'{x:.4f}' for x in accs)} | {mean / teacher_acc:.1%} | "
                f"{s['batch32']:.0f} sent/s ({s['batch32'] / speed['teacher']['batch32']:.2f}x) | "
                f"{s['batch1']:.0f} sent/s ({s['batch1'] / speed['teacher']['batch1']:.2f}x) |")
    table = "\n".join(lines)
    print(table)
    write_section(table + "\n", "Distillation: SST-2, MiniLM-L6 -> 3 and 2 layers")


if __name__ == "__main__":
    main()
