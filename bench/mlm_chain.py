"""Continued MLM pre-training, then fine-tuning: does a short task-adaptive MLM step help SST-2?

(1) Continued masked-LM pre-training of all-MiniLM-L6-v2 (recipes/text/mlm.yaml) on unlabelled SST-2 training
sentences (labels dropped), bounded by optimizer steps; MLM perplexity on the SST-2 dev sentences before and after,
with the same seeded masks. (2) Classification fine-tuning (recipes/text/sst2.yaml) from that checkpoint
(``model_name: mlm.ckpt``) on a small labelled subset, against (3) the same fine-tune from the original MiniLM. Both
arms: same subset, 1 epoch, lr 1e-4, batch 16, 6% linear warmup, several seeds; dev = SST-2 dev (872).
Every stage runs in its own process.

    python bench/mlm_chain.py [--data ../shared/data/sst2] [--mlm-sentences 20000] [--mlm-steps 200] \
        [--cls-size 2000] [--seeds 0 1]

Writes the table to docs/benchmarks.md (section "Continued pre-training, then fine-tuning (MLM -> SST-2)").
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _common import (
    REPO,
    SST2,
    WORK,
    TrainTimer,
    model_dir,
    run_in_subprocess,
    sst2_subset,
    write_section,
)

TITLE = "Continued pre-training, then fine-tuning (MLM -> SST-2)"
QUIET = ["--trainer.enable_progress_bar=false", "--trainer.logger=false", "--trainer.enable_checkpointing=false",
         "--trainer.callbacks=[]", "--trainer.num_sanity_val_steps=0", "--trainer.accelerator=cpu"]


def sentences(tsv: Path) -> list[str]:
    """The text column of an SST-2 TSV (label first, then the sentence; the header names differ)."""
    return [line.split("\t", 1)[1] for line in tsv.read_text().splitlines()[1:]]


def mlm_files(data: Path, size: int, held_out_size: int) -> tuple[Path, Path]:
    """``size`` shuffled SST-2 training sentences (no labels) and the first ``held_out_size`` dev sentences, as .txt
    files in bench/.work."""
    WORK.mkdir(parents=True, exist_ok=True)
    train = sentences(data / "train.tsv")
    random.Random(1).shuffle(train)
    corpus, held_out = WORK / f"sst2-mlm-{size}.txt", WORK / f"sst2-dev-sentences-{held_out_size}.txt"
    corpus.write_text("\n".join(train[:size]) + "\n")
    held_out.write_text("\n".join(sentences(data / "dev.tsv")[:held_out_size]) + "\n")
    return corpus, held_out


def setup_cli(args: list[str]):
    os.environ.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    from ptft.cli import run_cli

    sys.argv = ["ptft"]
    return run_cli(args, run=False)


def run_mlm(corpus: Path, held_out: Path, steps: int, block_size: int, batch_size: int, ckpt: Path) -> dict:
    """Continued MLM pre-training for ``steps`` steps; perplexity on ``held_out`` before and after; the checkpoint."""
    from ptft.core.hub import resolve_model_name

    cli = setup_cli([
        "--config", str(REPO / "recipes/text/mlm.yaml"), f"--model.init_args.model_name={model_dir()}",
        f"--data.init_args.train_file={corpus}", f"--data.init_args.val_file={held_out}",
        f"--data.init_args.block_size={block_size}", f"--data.init_args.batch_size={batch_size}",
        f"--trainer.max_steps={steps}", "--trainer.max_epochs=-1", "--trainer.check_val_every_n_epoch=100000",
        "--seed_everything=0", *QUIET,
    ])
    trainer, model, dm = cli.trainer, cli.model, cli.datamodule
    start = time.perf_counter()
    before = trainer.validate(model, dm, verbose=False)[0]
    eval_s = time.perf_counter() - start
    timer = TrainTimer()
    trainer.callbacks.append(timer)
    start = time.perf_counter()
    trainer.fit(model, dm)
    fit_s = time.perf_counter() - start
    after = trainer.validate(model, dm, verbose=False)[0]
    trainer.save_checkpoint(str(ckpt))
    start = time.perf_counter()
    resolve_model_name(str(ckpt))  # the export every text module does for model_name: <.ckpt>, cached beside it
    export_s = time.perf_counter() - start
    return {
        "ppl_before": before["val/perplexity"], "ppl_after": after["val/perplexity"],
        "loss_before": before["val/loss"], "loss_after": after["val/loss"],
        "train_blocks": len(dm.datasets["train"]), "val_blocks": len(dm.datasets["val"]),
        "steps": trainer.global_step, "train_s": timer.seconds, "fit_s": fit_s, "eval_s": eval_s,
        "export_s": export_s,
    }


def run_cls(model_name: str, train_tsv: Path, dev_tsv: Path, seed: int, head: str) -> dict:
    """One epoch of SST-2 classification from ``model_name``, dev accuracy at the end."""
    cli = setup_cli([
        "--config", str(REPO / "recipes/text/sst2.yaml"), f"--model.init_args.model_name={model_name}",
        f"--model.init_args.head={head}",
        f"--data.init_args.train_file={train_tsv}", f"--data.init_args.val_file={dev_tsv}",
        "--trainer.max_epochs=1", "--model.init_args.optimizer.lr=1e-4", "--data.init_args.batch_size=16",
        f"--data.init_args.seed={seed}", f"--seed_everything={seed}", *QUIET,
    ])
    timer = TrainTimer()
    cli.trainer.callbacks.append(timer)
    start = time.perf_counter()
    cli.trainer.fit(cli.model, cli.datamodule)
    return {"dev_acc": cli.trainer.callback_metrics["val/acc"].item(), "train_s": timer.seconds,
            "fit_s": time.perf_counter() - start}


def spread(values: list[float]) -> str:
    mean = statistics.mean(values)
    return f"{mean:.4f} ({', '.join(f'{v:.4f}' for v in values)})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=SST2)
    parser.add_argument("--mlm-sentences", type=int, default=20000, help="unlabelled training sentences for MLM")
    parser.add_argument("--mlm-steps", type=int, default=200, help="MLM optimizer steps (the MLM budget)")
    parser.add_argument("--block-size", type=int, default=64)
    parser.add_argument("--mlm-batch-size", type=int, default=16)
    parser.add_argument("--held-out", type=int, default=872, help="dev sentences for the MLM perplexity")
    parser.add_argument("--cls-size", type=int, default=2000, help="labelled sentences for the classifier")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--head", default="mean", help="classifier head of both arms (mean: no pooler, the same start)")
    parser.add_argument("--reuse-mlm", action="store_true", help="reuse the MLM checkpoint and results of a previous run")
    parser.add_argument("--threads", type=int, default=0,
                        help="torch threads per process (0: torch's default); 1 is faster on a CPU shared with other jobs")
    parser.add_argument("--one", choices=["mlm", "cls"], help=argparse.SUPPRESS)
    parser.add_argument("--init", help=argparse.SUPPRESS)
    parser.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    ckpt = WORK / f"mlm-sst2-{args.mlm_sentences}-{args.mlm_steps}.ckpt"
    if args.one == "mlm":
        corpus, held_out = mlm_files(args.data, args.mlm_sentences, args.held_out)
        result = run_mlm(corpus, held_out, args.mlm_steps, args.block_size, args.mlm_batch_size, ckpt)
        print("RESULT " + json.dumps(result))
        return
    if args.one == "cls":
        train_tsv = sst2_subset(args.data, args.cls_size)
        print("RESULT " + json.dumps(run_cls(args.init, train_tsv, args.data / "dev.tsv", args.seed, args.head)))
        return

    common = ["--data", str(args.data), "--mlm-sentences", str(args.mlm_sentences), "--mlm-steps",
              str(args.mlm_steps), "--block-size", str(args.block_size), "--mlm-batch-size", str(args.mlm_batch_size),
              "--held-out", str(args.held_out), "--cls-size", str(args.cls_size), "--threads", str(args.threads),
              "--head", args.head]
    saved = ckpt.with_suffix(".json")
    if args.reuse_mlm and saved.exists() and ckpt.exists():
        mlm = json.loads(saved.read_text())
        print(f"MLM: reusing {ckpt}", flush=True)
    else:
        print(f"MLM: {args.mlm_steps} steps on {args.mlm_sentences:,} SST-2 sentences ...", flush=True)
        mlm = run_in_subprocess(__file__, [*common, "--one", "mlm"])
        saved.write_text(json.dumps(mlm))
    print(f"    perplexity {mlm['ppl_before']:.1f} -> {mlm['ppl_after']:.2f}, {mlm['train_s']:.0f} s", flush=True)
    arms = {"original MiniLM": model_dir(), "MiniLM after MLM": str(ckpt)}
    results: dict[str, list[dict]] = {name: [] for name in arms}
    for seed in args.seeds:
        for name, init in arms.items():
            print(f"classifier from {name}, seed {seed} ...", flush=True)
            one = run_in_subprocess(__file__, [*common, "--one", "cls", "--init", init, "--seed", str(seed)])
            results[name].append(one)
            print(f"    dev acc {one['dev_acc']:.4f}, {one['train_s']:.0f} s", flush=True)

    cls_train_s = statistics.mean(r["train_s"] for runs in results.values() for r in runs)
    tokens = mlm["steps"] * args.mlm_batch_size * args.block_size
    intro = (
        f"`python bench/mlm_chain.py --mlm-sentences {args.mlm_sentences} --mlm-steps {args.mlm_steps} "
        f"--cls-size {args.cls_size} --seeds {' '.join(map(str, args.seeds))}"
        f"{f' --threads {args.threads}' if args.threads else ''}` — (1) continued MLM pre-training of "
        f"all-MiniLM-L6-v2 (recipes/text/mlm.yaml: lr 1e-4, 6% linear warmup, 15% masking) on "
        f"{args.mlm_sentences:,} shuffled SST-2 training sentences, labels dropped, concatenated into blocks of "
        f"{args.block_size} tokens: {mlm['steps']} steps of {args.mlm_batch_size} blocks ({tokens:,} tokens, "
        f"{mlm['steps'] * args.mlm_batch_size / mlm['train_blocks']:.2f} passes over the {mlm['train_blocks']:,} "
        f"blocks). MLM perplexity on {args.held_out} SST-2 dev sentences ({mlm['val_blocks']} blocks, the same "
        "seeded masks before and after). (2) SST-2 classification (recipes/text/sst2.yaml) from the MLM checkpoint "
        "(`model_name: mlm.ckpt`) and (3) from the original MiniLM: the same "
        f"{args.cls_size:,}-sentence labelled subset, `head: {args.head}`, 1 epoch, lr 1e-4, batch 16, 6% linear "
        "warmup; dev accuracy "
        f"on SST-2 dev (872), seeds {', '.join(map(str, args.seeds))} (seed = initialisation of the classifier "
        f"head, dropout and batch order). {os.cpu_count()} CPU cores shared with other jobs"
        f"{f' ({args.threads} torch thread per process)' if args.threads else ''}, fp32: times are noisy, "
        "the ratios say more."
    )
    mlm_row = (
        f"| MLM pre-training, {mlm['steps']} steps | dev perplexity {mlm['ppl_before']:,.1f} -> "
        f"{mlm['ppl_after']:.2f} (loss {mlm['loss_before']:.2f} -> {mlm['loss_after']:.2f}) | "
        f"{mlm['train_s']:.0f} | {mlm['train_s'] / cls_train_s:.1f}x |"
    )
    export_row = (
        f"| export of the checkpoint for `model_name: mlm.ckpt` | save_pretrained + tokenizer | "
        f"{mlm['export_s']:.1f} | {mlm['export_s'] / cls_train_s:.2f}x |"
    )
    lines = ["", "", intro, "", "| stage | result | train time (s) | vs one classifier fine-tune |",
             "|---|---|---:|---:|", mlm_row, export_row]
    for name, runs in results.items():
        accs = [r["dev_acc"] for r in runs]
        train_s = statistics.mean(r["train_s"] for r in runs)
        lines.append(f"| classifier from {name} | dev acc {spread(accs)}, spread {max(accs) - min(accs):.4f} | "
                     f"{train_s:.0f} | {train_s / cls_train_s:.2f}x |")
    base = statistics.mean(r["dev_acc"] for r in results["original MiniLM"])
    after = statistics.mean(r["dev_acc"] for r in results["MiniLM after MLM"])
    notes = (
        f"Mean dev accuracy after MLM minus without: {after - base:+.4f}. The perplexity before MLM is that of a "
        "randomly initialised MLM head: sentence-transformers' MiniLM ships the encoder only (no `cls.predictions` "
        "transform), so transformers initialises it; the decoder is tied to the pretrained word embeddings. "
        + ("BERT's masked-LM model has no pooler: with `head: mean` neither arm uses one, so both classifiers start "
           "from the same kind of head on their encoders." if args.head == "mean" else
           "BERT's masked-LM model has no pooler, so with this head the classifier built from the MLM checkpoint "
           "starts with a new pooler while the original MiniLM's reuses MiniLM's: not the same start.")
    )
    lines += ["", notes]
    table = "\n".join(lines)
    print(table)
    write_section(table + "\n", TITLE)


if __name__ == "__main__":
    main()
