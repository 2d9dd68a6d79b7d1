"""Memory options side by side: all-MiniLM-L6-v2 on SST-2 sentences, batches of 32, the same optimizer steps.

One row per option: fp32 baseline, gradient accumulation (4 x 8), gradient checkpointing (alone and above frozen
embeddings), LoRA r=8 (fp32 base, bf16 base under bf16-mixed, 4-bit NF4 base), bf16-mixed alone. Each option runs
twice in its own process: ``--steps`` optimizer steps for step time and training loss, then 3 steps with
``MALLOC_MMAP_THRESHOLD_=65536`` for memory (as bench/strategies.py; that setting slows allocation, so time comes from
the first run).

    python bench/memory.py [--data ../shared/data/sst2] [--steps 16] [--threads 1] [--only baseline lora]

Writes the table to docs/benchmarks.md (section "Memory").
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _common import MEASURE_MEMORY_ENV, REPO, SST2, TrainMemory, TrainTimer, model_dir, run_in_subprocess, sst2_subset, write_section  # noqa: E402

import lightning as L  # noqa: E402

TRAIN_SIZE, SEED, MEMORY_STEPS = 2000, 0, 3
LORA = ["--model.init_args.peft.method=lora", "--model.init_args.peft.r=8", "--model.init_args.peft.dropout=0.0",
        "--model.init_args.peft.target_modules=[query,key,value,dense]", "--model.init_args.optimizer.lr=5e-4",
        "--model.init_args.checkpoint_weights=trainable"]
CHECKPOINTING = ["--model.init_args.gradient_checkpointing=true"]
FROZEN_EMBEDDINGS = ["--trainer.callbacks+=ptft.core.FreezeSchedule", "--trainer.callbacks.freeze=[bert.embeddings.*]"]
BF16 = ["--trainer.precision=bf16-mixed"]
# name -> (description, CLI arguments on top of recipes/text/sst2.yaml, fp32 unless they say otherwise)
OPTIONS = {
    "baseline": ("fp32 full fine-tune, batch 32 (baseline)", []),
    "accumulate": ("gradient accumulation 4 x 8", ["--data.init_args.batch_size=8", "--trainer.accumulate_grad_batches=4"]),
    "checkpointing": ("gradient checkpointing", CHECKPOINTING),
    "checkpointing_frozen": ("gradient checkpointing + frozen embeddings", CHECKPOINTING + FROZEN_EMBEDDINGS),
    "frozen": ("frozen embeddings alone", FROZEN_EMBEDDINGS),
    "lora": ("LoRA r=8 (lr 5e-4)", LORA),
    "lora_bf16": ("LoRA r=8 + bf16 base, bf16-mixed", LORA + ["--model.init_args.peft.base_weights=bf16"] + BF16),
    "lora_nf4": ("LoRA r=8 + 4-bit NF4 base (bitsandbytes, CPU)", LORA + ["--model.init_args.peft.base_weights=nf4"]),
    "bf16": ("bf16-mixed alone", BF16),
}


class LossTail(L.Callback):
    """Training loss per example over the last quarter of the examples seen (each batch's mean, weighted by size)."""

    def __init__(self) -> None:
        self.losses: list[tuple[float, int]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        # Lightning hands back the loss divided by accumulate_grad_batches: undo it for a per-example mean
        self.losses.append((float(outputs["loss"]) * trainer.accumulate_grad_batches, len(batch["labels"])))

    def value(self) -> float:
        seen = sum(n for _, n in self.losses)
        tail, count, total = [], 0, 0.0
        for loss, n in reversed(self.losses):
            if count >= seen / 4:
                break
            tail.append(loss)
            count += n
            total += loss * n
        return total / count


def run_one(name: str, train_tsv: Path, steps: int, threads: int, memory_only: bool) -> dict:
    """Trains ``steps`` optimizer steps with option ``name``; ``memory_only``: a short run for the memory columns."""
    os.environ.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    import torch

    torch.set_num_threads(threads)
    from ptft.cli import run_cli

    sys.argv = ["ptft"]
    cli = run_cli(
        ["--config", str(REPO / "recipes/text/sst2.yaml"), f"--model.init_args.model_name={model_dir()}",
         f"--data.init_args.train_file={train_tsv}", f"--data.init_args.val_file={train_tsv}",
         "--trainer.precision=32-true", "--trainer.max_epochs=1",
         f"--trainer.max_steps={MEMORY_STEPS if memory_only else steps}", "--trainer.limit_val_batches=0",
         "--trainer.num_sanity_val_steps=0", "--trainer.enable_progress_bar=false", "--trainer.logger=false",
         "--trainer.enable_checkpointing=false", "--trainer.callbacks=[]", f"--seed_everything={SEED}",
         *OPTIONS[name][1]],
        run=False,
    )
    timer, memory, loss = TrainTimer(), TrainMemory(), LossTail()
    cli.trainer.callbacks += [timer, memory, loss]
    cli.trainer.fit(cli.model, cli.datamodule)
    if cli.trainer.global_step != (MEMORY_STEPS if memory_only else steps):
        raise SystemExit(f"{name}: {cli.trainer.global_step} optimizer steps")
    if memory_only:
        params = list(cli.model.model.parameters()) + list(cli.model.model.buffers())
        return {"train_mem_mb": memory.growth_mb, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                "weights_mb": sum(p.numel() * p.element_size() for p in params) / 2**20}
    return {"samples_per_s": timer.samples / timer.seconds, "train_loss": loss.value(),
            "precision": str(cli.trainer.precision)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=SST2)
    parser.add_argument("--steps", type=int, default=16, help="optimizer steps of the timed run")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads per run")
    parser.add_argument("--only", nargs="+", choices=list(OPTIONS), default=list(OPTIONS))
    parser.add_argument("--one", choices=list(OPTIONS), help=argparse.SUPPRESS)
    parser.add_argument("--memory-only", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()

    train_tsv = sst2_subset(args.data, TRAIN_SIZE)
    if args.one:
        print("RESULT " + json.dumps(run_one(args.one, train_tsv, args.steps, args.threads, args.memory_only)))
        return
    env = {"OMP_NUM_THREADS": str(args.threads)}
    results = {}
    for name in args.only:
        print(f"{OPTIONS[name][0]} ...", flush=True)
        one = ["--one", name, "--data", str(args.data), "--steps", str(args.steps), "--threads", str(args.threads)]
        results[name] = run_in_subprocess(__file__, one, env)
        results[name].update(run_in_subprocess(__file__, [*one, "--memory-only"], {**env, **MEASURE_MEMORY_ENV}))
        r = results[name]
        print(f"    weights {r['weights_mb']:.0f} MB, training memory {r['train_mem_mb']:.0f} MB, peak RSS "
              f"{r['peak_rss_mb']:.0f} MB, {r['samples_per_s']:.1f} samples/s, train loss {r['train_loss']:.4f}",
              flush=True)

    base = results.get("baseline")
    lines = [
        "",
        "",
        f"`python bench/memory.py --steps {args.steps} --threads {args.threads}` — all-MiniLM-L6-v2 (22.7M parameters, "
        f"11.7M of them in the embeddings) on shuffled SST-2 training sentences, {args.steps} optimizer steps of 32 "
        "sentences (the same sentences in the same order for every row), recipes/text/sst2.yaml otherwise (AdamW, "
        f"lr 5e-5, LoRA 5e-4, 6% warmup, dynamic padding), {args.threads} thread(s) of a {os.cpu_count()}-core CPU. "
        "Weights = the model's parameters and buffers after setup. Training memory = peak RSS while training minus "
        f"RSS just before (activations, gradients, optimizer state), from a separate {MEMORY_STEPS}-step run with "
        "`MALLOC_MMAP_THRESHOLD_=65536` (freed buffers leave RSS); peak RSS is that run's whole process (libraries, "
        "data, model loading included: the 4-bit row loads fp32 weights before quantizing them). Time per sample is "
        "from the first run; **other jobs shared this CPU while it ran: memory numbers hold, time ratios are only "
        "indicative**. Train loss = mean loss over the last quarter of the training sentences: every option still "
        "learns (LoRA rows at their own learning rate).",
        "",
        "| option | weights (MB) | training memory (MB) | vs baseline | weights + training vs baseline | peak RSS (MB) "
        "| time/sample vs baseline | train loss (last 25%) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, r in results.items():
        def ratio(value: float, reference: float) -> str:
            return f"{value / reference:.2f}x" if base else "n/a"

        total = r["weights_mb"] + r["train_mem_mb"]
        lines.append(
            f"| {OPTIONS[name][0]} | {r['weights_mb']:.0f} | {r['train_mem_mb']:.0f} | "
            f"{ratio(r['train_mem_mb'], base['train_mem_mb'] if base else 1)} | "
            f"{ratio(total, base['weights_mb'] + base['train_mem_mb'] if base else 1)} | {r['peak_rss_mb']:.0f} | "
            f"{ratio(base['samples_per_s'] if base else 1, r['samples_per_s'])} | {r['train_loss']:.4f} |"
        )
    table = "\n".join(lines)
    print(table)
    write_section(table + "\n", "Memory")


if __name__ == "__main__":
    main()
