"""Self-supervised pre-training, then few-label fine-tuning, against training from scratch: spoken digits (FSDD).

A small wav2vec2 (from its config: no hub here) is pre-trained with recipes/audio/wav2vec2-pretrain.yaml on the
unlabelled clips of five speakers (wav2vec 2.0's masked contrastive task). Then recipes/audio/wav2vec2-classification.yaml
fine-tunes it on a few labelled clips of the same speakers (``--per-digit`` clips of each digit), and trains the same
architecture from random weights on the same clips with the same settings and number of steps; both are tested on
every clip of the sixth speaker (chance 0.10). Writes "Audio: pre-training, then few labels (FSDD)" in
docs/benchmarks.md.

    python bench/audio_pretrain_fsdd.py [--pretrain-epochs 30] [--per-digit 25] [--epochs 40] [--holdout george]
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _common import REPO, WORK, TrainTimer, run_in_subprocess, write_section  # noqa: E402
from audio_fsdd import FSDD, QUIET, fold_csvs  # noqa: E402

#: 4 pre-LN transformer layers of width 128 over a 4-layer convolutional encoder striding 80 samples (10 ms at 8 kHz).
ARCHITECTURE = dict(
    hidden_size=128, num_hidden_layers=4, num_attention_heads=4, intermediate_size=256, conv_dim=(64, 64, 64, 64),
    conv_kernel=(10, 8, 4, 4), conv_stride=(5, 4, 2, 2), num_feat_extract_layers=4, num_conv_pos_embeddings=32,
    num_conv_pos_embedding_groups=4, feat_extract_norm="layer", do_stable_layer_norm=True, num_codevectors_per_group=64,
    num_codevector_groups=2, codevector_dim=64, proj_codevector_dim=64, num_negatives=20, mask_time_length=5,
    layerdrop=0.0, classifier_proj_size=64,
)


def model_folder() -> Path:
    from transformers import Wav2Vec2Config, Wav2Vec2FeatureExtractor

    folder = WORK / "wav2vec2-small-8k"
    folder.mkdir(parents=True, exist_ok=True)
    Wav2Vec2Config(**ARCHITECTURE).save_pretrained(folder)
    Wav2Vec2FeatureExtractor(sampling_rate=8000, return_attention_mask=True).save_pretrained(folder)
    return folder


def few_labels(train_csv: Path, per_digit: int) -> Path:
    """``per_digit`` random clips of each digit (over the five speakers) from a fold's training CSV."""
    lines = train_csv.read_text().splitlines()
    by_digit: dict[str, list[str]] = {}
    for line in lines[1:]:
        by_digit.setdefault(line.split(",")[1], []).append(line)
    rng = random.Random(0)
    picked = [line for digit in sorted(by_digit) for line in rng.sample(by_digit[digit], per_digit)]
    path = train_csv.with_name(f"{train_csv.stem}-{per_digit}-per-digit.csv")
    path.write_text("\n".join([lines[0], *picked]) + "\n")
    return path


def pretrain(holdout: str, epochs: int) -> dict:
    from ptft.cli import run_cli

    train, _, _ = fold_csvs(holdout)
    sys.argv = ["ptft"]
    out = WORK / f"pretrain-fsdd-{holdout}"
    cli = run_cli(["--config", str(REPO / "recipes/audio/wav2vec2-pretrain.yaml"),
                   f"--model.init_args.model_name={model_folder()}", "--model.init_args.mask_time_length=5",
                   f"--data.init_args.train={train}", "--data.init_args.clip_seconds=null", "--data.init_args.batch_size=32",
                   f"--trainer.max_epochs={epochs}", "--seed_everything=0", f"--trainer.default_root_dir={out}",
                   *QUIET], run=False)
    timer = TrainTimer()
    cli.trainer.callbacks.append(timer)
    cli.trainer.fit(cli.model, cli.datamodule)
    ckpt = out / "pretrained.ckpt"
    cli.trainer.save_checkpoint(ckpt)
    metrics = {k: float(v) for k, v in cli.trainer.callback_metrics.items()}
    return {"checkpoint": str(ckpt), "train_seconds": timer.seconds, "val_loss": metrics["val/loss"],
            "steps": cli.trainer.global_step,
            "precision": str(cli.trainer.precision)}


def finetune(holdout: str, start: str, per_digit: int, epochs: int) -> dict:
    from ptft.cli import run_cli

    train, test, _ = fold_csvs(holdout)
    labelled = few_labels(train, per_digit)
    sys.argv = ["ptft"]
    scratch = start == "scratch"
    cli = run_cli(["--config", str(REPO / "recipes/audio/wav2vec2-classification.yaml"),
                   f"--model.init_args.model_name={model_folder() if scratch else start}",
                   f"--model.init_args.pretrained={'false' if scratch else 'true'}", "--model.init_args.head=mean",
                   "--model.init_args.optimizer.lr=5e-4", f"--data.init_args.train={labelled}",
                   f"--data.init_args.test={test}", "--data.init_args.val=null", "--data.init_args.batch_size=16",
                   f"--trainer.max_epochs={epochs}", "--seed_everything=0",
                   f"--trainer.default_root_dir={WORK / 'finetune-fsdd'}", *QUIET], run=False)
    timer = TrainTimer()
    cli.trainer.callbacks.append(timer)
    cli.trainer.fit(cli.model, cli.datamodule)
    val_acc = float(cli.trainer.callback_metrics["val/acc"])
    test_acc = float(cli.trainer.test(cli.model, cli.datamodule, verbose=False)[0]["test/acc"])
    return {"test_acc": test_acc, "val_acc": val_acc,
            "train_seconds": timer.seconds, "steps": cli.trainer.global_step,
            "clips": len(labelled.read_text().splitlines()) - 1}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pretrain-epochs", type=int, default=30)
    parser.add_argument("--per-digit", type=int, default=25, help="labelled clips of each digit (25: 250 of 2,500)")
    parser.add_argument("--epochs", type=int, default=40, help="fine-tuning epochs, both starts")
    parser.add_argument("--holdout", default="george")
    parser.add_argument("--step", help=argparse.SUPPRESS)
    parser.add_argument("--start", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.step == "pretrain":
        print("RESULT " + json.dumps(pretrain(args.holdout, args.pretrain_epochs)))
        return
    if args.step == "finetune":
        print("RESULT " + json.dumps(finetune(args.holdout, args.start, args.per_digit, args.epochs)))
        return
    if not FSDD.exists():
        sys.exit(f"{FSDD} not found")
    common = [f"--holdout={args.holdout}", f"--per-digit={args.per_digit}", f"--epochs={args.epochs}",
              f"--pretrain-epochs={args.pretrain_epochs}"]
    print("pre-training ...", flush=True)
    pre = run_in_subprocess(__file__, ["--step=pretrain", *common])
    print(f"    {pre['train_seconds'] / 60:.1f} min, val loss {pre['val_loss']:.3f}", flush=True)
    results = {}
    for start in (pre["checkpoint"], "scratch"):
        name = "scratch" if start == "scratch" else "pre-trained"
        print(f"fine-tuning from {name} ...", flush=True)
        results[name] = run_in_subprocess(__file__, ["--step=finetune", f"--start={start}", *common])
        print(f"    test acc {results[name]['test_acc']:.3f}", flush=True)
    command = "python bench/audio_pretrain_fsdd.py" + "".join(
        f" --{k}={v}" for k, v, d in (("pretrain-epochs", args.pretrain_epochs, 30), ("per-digit", args.per_digit, 25),
                                      ("epochs", args.epochs, 40), ("holdout", args.holdout, "george")) if v != d)
    rows = [f"| {name} | {r['clips']} | {r['steps']} | {r['val_acc']:.3f} | **{r['test_acc']:.3f}** | "
            f"{r['train_seconds'] / 60:.1f} |" for name, r in results.items()]
    table = "\n".join([
        "",
        "",
        f"`{command}` — a wav2vec2 of 4 pre-LN layers, width 128, 10 ms frames at 8 kHz, built from its config. "
        f"Pre-training: recipes/audio/wav2vec2-pretrain.yaml ({args.pretrain_epochs} epochs, whole clips, batch 32, "
        "mask span 5 frames) on the unlabelled clips of the five speakers other than "
        f"{args.holdout} ({pre['train_seconds'] / 60:.1f} min, validation loss {pre['val_loss']:.3f}). Fine-tuning: "
        f"recipes/audio/wav2vec2-classification.yaml (mean-pooling head, lr 5e-4, {args.epochs} epochs, batch 16, "
        f"feature encoder not frozen) on {args.per_digit} labelled clips per digit of those speakers (10% of them for "
        f"validation), from the pre-trained checkpoint or from random weights, same steps. Test: every clip of "
        f"{args.holdout} (unseen speaker, chance 0.10). Precision: {pre['precision']} (`precision: auto`). 2 CPU cores.",
        "",
        "| start | labelled clips | steps | val acc | test acc (unseen speaker) | fine-tuning min |",
        "|---|---:|---:|---:|---:|---:|",
        *rows,
    ])
    print(table)
    write_section(table + "\n", "Audio: pre-training, then few labels (FSDD)")


if __name__ == "__main__":
    main()
