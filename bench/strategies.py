"""Fine-tuning strategies side by side: all-MiniLM-L6-v2 on a 4,000-sentence SST-2 subset, dev accuracy.

Every strategy gets the same budget: 4 "epochs" of 32 batches of 32 (4,096 samples, about one pass over the subset;
each epoch draws its batches from seed + epoch), dev evaluation after each, 6% linear warmup. Each runs in its own
process; the table reports dev accuracy (last epoch), training samples/s (validation excluded), peak RSS of the
process and trainable parameters, with time and memory ratios to full fine-tuning measured in the same run.

    python bench/strategies.py [--data ../shared/data/sst2] [--train-size 4000] [--only full lora]

Writes the table to docs/benchmarks.md (section "Fine-tuning strategies").
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

EPOCHS, BATCHES_PER_EPOCH, SEED = 4, 32, 0
# name -> (description, extra CLI arguments on top of recipes/text/sst2.yaml)
STRATEGIES = {
    "full": ("full fine-tune (lr 5e-5)", []),
    "probe": ("linear probe (head only, lr 1e-2)", [
        "--trainer.callbacks+=ptft.core.LinearProbe", "--model.init_args.optimizer.lr=1e-2"]),
    "freeze_unfreeze": ("freeze -> unfreeze at epoch 1 (LP-FT, head lr 1e-2)", [
        "--trainer.callbacks+=ptft.core.FreezeUnfreeze", "--trainer.callbacks.unfreeze_at_epoch=1",
        "--model.init_args.optimizer.head_lr=1e-2"]),
    "gradual": ("gradual unfreezing, 2 blocks / epoch", [
        "--trainer.callbacks+=ptft.core.GradualUnfreeze", "--trainer.callbacks.layers_per_unfreeze=2",
        "--model.init_args.optimizer.lr=1e-4"]),
    "llrd": ("LLRD 0.8 + head lr 5e-4", [
        "--model.init_args.optimizer.lr=1e-4", "--model.init_args.optimizer.layer_decay=0.8",
        "--model.init_args.optimizer.head_lr=5e-4"]),
    "lora": ("LoRA r=8 (query/key/value/dense), lr 5e-4", [
        "--model.init_args.peft.method=lora", "--model.init_args.peft.r=8", "--model.init_args.peft.dropout=0.0",
        "--model.init_args.peft.target_modules=[query,key,value,dense]", "--model.init_args.optimizer.lr=5e-4",
        "--model.init_args.checkpoint_weights=trainable"]),
    "l2sp": ("L2-SP (alpha 0.1)", ["--model.init_args.l2_sp=0.1"]),
}


def run_one(name: str, train_tsv: Path, dev_tsv: Path, memory_only: bool = False) -> dict:
    """Trains with strategy ``name``. ``memory_only``: 2 batches per epoch and no validation, for the memory column
    (run with MEASURE_MEMORY_ENV, which slows allocation-heavy steps, so time is measured in a separate run)."""
    os.environ.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    from ptft.cli import run_cli

    sys.argv = ["ptft"]
    cli = run_cli(
        ["--config", str(REPO / "recipes/text/sst2.yaml"), f"--model.init_args.model_name={model_dir()}",
         f"--data.init_args.train_file={train_tsv}", f"--data.init_args.val_file={dev_tsv}",
         f"--trainer.max_epochs={EPOCHS}", f"--trainer.limit_train_batches={BATCHES_PER_EPOCH}",
         "--trainer.num_sanity_val_steps=0", "--trainer.enable_progress_bar=false", "--trainer.logger=false",
         "--trainer.enable_checkpointing=false", "--trainer.callbacks=[]", f"--seed_everything={SEED}",
         *(["--trainer.limit_train_batches=2", "--trainer.limit_val_batches=0"] if memory_only else []),
         *STRATEGIES[name][1]],
        run=False,
    )
    timer, memory = TrainTimer(), TrainMemory()
    cli.trainer.callbacks += [timer, memory]
    cli.trainer.fit(cli.model, cli.datamodule)
    if memory_only:
        return {"train_mem_mb": memory.growth_mb}
    trainable = sum(p.numel() for p in cli.model.model.parameters() if p.requires_grad)
    return {
        "dev_acc": cli.trainer.callback_metrics["val/acc"].item(),
        "samples_per_s": timer.samples / timer.seconds,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "trainable": trainable,
        "total": sum(p.numel() for p in cli.model.model.parameters()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=SST2)
    parser.add_argument("--train-size", type=int, default=4000)
    parser.add_argument("--only", nargs="+", choices=list(STRATEGIES), default=list(STRATEGIES))
    parser.add_argument("--one", choices=list(STRATEGIES), help=argparse.SUPPRESS)
    parser.add_argument("--memory-only", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()

    train_tsv = sst2_subset(args.data, args.train_size)
    if args.one:
        print("RESULT " + json.dumps(run_one(args.one, train_tsv, args.data / "dev.tsv", args.memory_only)))
        return
    results = {}
    for name in args.only:
        print(f"{STRATEGIES[name][0]} ...", flush=True)
        one = ["--one", name, "--data", str(args.data), "--train-size", str(args.train_size)]
        results[name] = run_in_subprocess(__file__, one)
        results[name].update(run_in_subprocess(__file__, [*one, "--memory-only"], MEASURE_MEMORY_ENV))
        r = results[name]
        print(f"    dev acc {r['dev_acc']:.4f}, {r['samples_per_s']:.1f} samples/s, peak RSS {r['peak_rss_mb']:.0f} MB, "
              f"training memory {r['train_mem_mb']:.0f} MB, "
              f"trainable {r['trainable']:,}", flush=True)

    base = results.get("full")
    lines = [
        "",
        "",
        f"`python bench/strategies.py --train-size {args.train_size}` — all-MiniLM-L6-v2 (22.7M parameters) on "
        f"{args.train_size:,} shuffled SST-2 sentences, {EPOCHS} epochs x {BATCHES_PER_EPOCH} batches of 32 "
        f"(one pass), recipes/text/sst2.yaml otherwise (6% linear warmup); dev = SST-2 dev "
        f"(872), accuracy after the last epoch. {os.cpu_count()} CPU cores, fp32. Step time and memory ratios are "
        "to full fine-tuning in the same run. Training memory = peak RSS while training minus RSS just before "
        "training (activations, gradients, optimizer state), measured in a second run of the same schedule (2 "
        "batches per epoch, no validation) with `MALLOC_MMAP_THRESHOLD_=65536` so that freed buffers leave RSS "
        "(glibc otherwise keeps them and RSS shows memory long freed); that setting slows allocation, so time comes "
        "from the first run. Peak RSS is the first run's whole process (libraries, data, model "
        "and evaluation included). Trainable parameters are counted at the end of training.",
        "",
        "| strategy | dev acc | train samples/s | time/step vs full | training memory (MB) | vs full | peak RSS (MB) "
        "| trainable params |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, r in results.items():
        time_ratio = f"{base['samples_per_s'] / r['samples_per_s']:.2f}x" if base else "n/a"
        mem_ratio = f"{r['train_mem_mb'] / base['train_mem_mb']:.2f}x" if base else "n/a"
        lines.append(
            f"| {STRATEGIES[name][0]} | {r['dev_acc']:.4f} | {r['samples_per_s']:.1f} | {time_ratio} | "
            f"{r['train_mem_mb']:.0f} | {mem_ratio} | {r['peak_rss_mb']:.0f} | "
            f"{r['trainable']:,} ({100 * r['trainable'] / r['total']:.2f}%) |"
        )
    table = "\n".join(lines)
    print(table)
    write_section(table + "\n", "Fine-tuning strategies")


if __name__ == "__main__":
    main()
