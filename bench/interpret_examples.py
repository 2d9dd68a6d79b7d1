"""The pictures of docs/interpret.md: every ``ptft explain`` method on real fine-tuned models, run as a user would.

1. Text: all-MiniLM-L6-v2 fine-tuned on SST-2 (``--text-checkpoint``, default the teacher of bench/distill_sst2.py;
   trained here with recipes/text/sst2.yaml on ``--train-size`` sentences when missing): ig, attention, shap, tsne
   (before vs after fine-tuning), errors on SST-2 dev.
2. Vision: a ResNet-18 and a small ViT trained from scratch (no hub here) on ``--per-class`` CIFAR-10 images per
   class with recipes/vision/cifar10.yaml: gradcam, gradcam++ (ResNet), attention (ViT rollout), tsne, errors.
3. Audio: recipes/audio/keyword-cnn.yaml from scratch on the Free Spoken Digit Dataset: saliency, errors.

Each ``ptft explain`` runs in its own process, as on the command line; its files land in bench/.work/interpret/, and
a selection is copied to docs/images/interpret/ (the pictures the docs show).

    python bench/interpret_examples.py [--threads 2] [--per-class 500] [--epochs 8]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
import zipfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _common import REPO, SST2, WORK, cifar_class_folders, model_dir, sst2_subset

OUT = WORK / "interpret"
DOCS = REPO / "docs" / "images" / "interpret"
FSDD = REPO.parent / "shared" / "data" / "fsdd" / "fsdd-recordings.zip"
QUIET = ["--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false", "--trainer.logger=false",
         "--trainer.enable_checkpointing=false", "--trainer.num_sanity_val_steps=0", "--trainer.callbacks=[]"]


def fit(args: list[str], ckpt: Path) -> float:
    """Fits in this process, saves ``ckpt``, returns the last validation accuracy."""
    from ptft.cli import run_cli

    sys.argv = ["ptft"]
    cli = run_cli([*args, *QUIET], run=False)
    start = time.perf_counter()
    cli.trainer.fit(cli.model, cli.datamodule)
    ckpt.parent.mkdir(parents=True, exist_ok=True)
    cli.trainer.save_checkpoint(ckpt)
    acc = float(cli.trainer.callback_metrics["val/acc"])
    print(f"trained {ckpt.name}: val acc {acc:.3f} ({time.perf_counter() - start:.0f} s)", flush=True)
    return acc


def explain(ckpt: Path, config: list[str], method: str, num_samples: int, *extra: str) -> Path:
    """``ptft explain`` in a subprocess; returns its output folder."""
    folder = OUT / ckpt.stem / method.replace("+", "p")
    command = [sys.executable, "-m", "ptft", "explain", "--ckpt_path", str(ckpt), "--method", method,
               "--num_samples", str(num_samples), "--output", str(folder), *config, *extra]
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(command)}\nfailed:\n{done.stderr[-3000:]}")
    print(f"{ckpt.stem} {method}: {done.stdout.strip().splitlines()[-1]} ({time.perf_counter() - start:.0f} s)",
          flush=True)
    return folder


def fsdd_csvs() -> tuple[Path, Path]:
    """FSDD ``path,label`` CSVs: speaker ``theo`` held out for validation."""
    root = OUT / "data" / "fsdd"
    if not (root / "recordings").is_dir():
        root.mkdir(parents=True, exist_ok=True)
        with zipfile.ZipFile(FSDD) as zf:
            zf.extractall(root)
    rows: dict[str, list[str]] = {"train": [], "val": []}
    for wav in sorted((root / "recordings").glob("*.wav")):
        digit, speaker, _ = wav.stem.split("_")
        rows["val" if speaker == "theo" else "train"].append(f"{wav.resolve()},{digit}")
    paths = []
    for split, lines in rows.items():
        path = root / f"{split}.csv"
        path.write_text("path,label\n" + "\n".join(lines) + "\n")
        paths.append(path)
    return paths[0], paths[1]


def keep(folder: Path, name: str, pattern: str = "*.png", count: int = 2) -> None:
    """Copies the first ``count`` files matching ``pattern`` to docs/images/interpret/ as ``name-N.png``."""
    DOCS.mkdir(parents=True, exist_ok=True)
    for i, path in enumerate(sorted(folder.glob(pattern))[:count]):
        shutil.copy(path, DOCS / f"{name}-{i}{path.suffix}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--text-checkpoint", type=Path, default=WORK / "distill" / "teacher.ckpt")
    parser.add_argument("--train-size", type=int, default=4000, help="SST-2 sentences when the text model is trained")
    parser.add_argument("--per-class", type=int, default=500, help="CIFAR-10 training images per class")
    parser.add_argument("--epochs", type=int, default=8, help="vision and audio training epochs")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--only", nargs="+", choices=["text", "vision", "audio"], default=["text", "vision", "audio"])
    args = parser.parse_args()
    os.environ.update(HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS=str(args.threads))
    import torch

    torch.set_num_threads(args.threads)
    if "text" in args.only:
        train = sst2_subset(SST2, args.train_size)
        config = ["--config", str(REPO / "recipes/text/sst2.yaml"), f"--data.init_args.train_file={train}",
                  f"--data.init_args.val_file={SST2 / 'dev.tsv'}"]
        ckpt = args.text_checkpoint
        if not ckpt.is_file():
            ckpt = OUT / "minilm-sst2.ckpt"
            if not ckpt.is_file():
                fit([*config, f"--model.init_args.model_name={model_dir()}", "--trainer.max_epochs=1"], ckpt)
        for method, n, extra, name, count in [("ig", 8, [], "text-ig", 2), ("attention", 4, [], "text-attention", 1),
                                              ("shap", 3, [], "text-shap", 1),
                                              ("tsne", 0, ["--before"], "text-tsne", 1),
                                              ("errors", 16, [], "text-errors", 1)]:
            keep(explain(ckpt, config, method, n, *extra), name, count=count)
    if "vision" in args.only:
        folders = cifar_class_folders(OUT / "data" / f"cifar-{args.per_class}-100", args.per_class, 100)
        data = [f"--data.init_args.train={folders['train']}", f"--data.init_args.val={folders['test']}",
                "--data.init_args.test=null", "--data.init_args.num_workers=1", "--data.init_args.batch_size=64"]
        config = ["--config", str(REPO / "recipes/vision/cifar10.yaml"), *data]
        models = {"resnet18-cifar": ["--model.init_args.model_name=resnet18"],
                  "vit-cifar": ["--model.init_args.model_name=vit_tiny_patch16_224",
                                "--model.init_args.model_kwargs={img_size: 32, patch_size: 4, depth: 6}",
                                "--model.init_args.optimizer.lr=5e-4"]}
        for name, model in models.items():
            ckpt = OUT / f"{name}.ckpt"
            if not ckpt.is_file():
                fit([*config, *model, "--model.init_args.pretrained=false", f"--trainer.max_epochs={args.epochs}"],
                    ckpt)
        resnet, vit = OUT / "resnet18-cifar.ckpt", OUT / "vit-cifar.ckpt"
        keep(explain(resnet, config, "gradcam", 8), "vision-gradcam", count=2)
        keep(explain(resnet, config, "gradcam++", 8), "vision-gradcampp", count=1)
        keep(explain(vit, config, "attention", 8), "vision-attention", count=1)
        explain(resnet, config, "tsne", 0)
        keep(explain(resnet, config, "errors", 16), "vision-mistakes", pattern="mistakes.png", count=1)
    if "audio" in args.only:
        train, val = fsdd_csvs()
        config = ["--config", str(REPO / "recipes/audio/keyword-cnn.yaml"), f"--data.init_args.train={train}",
                  f"--data.init_args.val={val}", "--data.init_args.test=null", "--data.init_args.num_workers=1",
                  "--model.init_args.sampling_rate=8000"]
        ckpt = OUT / "keyword-cnn-fsdd.ckpt"
        if not ckpt.is_file():
            fit([*config, "--model.init_args.pretrained=false", f"--trainer.max_epochs={args.epochs}"], ckpt)
        keep(explain(ckpt, config, "saliency", 6), "audio-saliency", count=1)
        explain(ckpt, config, "errors", 16)
    print(f"pictures in {DOCS}")


if __name__ == "__main__":
    main()
