"""Transfer from ptft's vision pre-training: CIFAR-10 classes 0-4 -> 50 labelled images per class of classes 5-9.

Pre-training (bounded by optimizer steps) sees only airplane, automobile, bird, cat, deer (classes 0-4):

- supervised: ``ImageClassifier`` on their 25,000 training images (recipes/vision/supervised-pretrain.yaml);
- self-supervised (each off by default on a 2-core CPU), on the same images, labels ignored: SimCLR
  (``--ssl-steps N``, recipes/vision/simclr.yaml), MoCo v2 (``--moco-steps N``, recipes/vision/moco.yaml), and MAE
  (``--mae-steps N``, recipes/vision/mae.yaml), which needs a ViT: timm's ``test_vit`` with 4-px patches, whose
  rows are compared with the same ViT from scratch.

Each backbone is exported without its head (``ptft.vision.pretrain.export_backbone``, timm ``model.safetensors``) and
fine-tuned through ``ImageClassifier(pretrained_file=...)`` on 50 training images per class of dog, frog, horse, ship,
truck (classes 5-9), then tested on 200 test images per class of those (1,000 images): from scratch vs the pre-trained
backbone (full fine-tune), and linear probe vs full fine-tune vs gradual unfreezing from the supervised backbone.
Every fine-tune runs for each seed (head initialisation and batch order); the table gives the mean and the spread.

    python bench/vision_transfer.py [--data ../shared/data/cifar10/cifar10-jpg.zip] [--pretrain-steps 300]
        [--ssl-steps 0] [--moco-steps 0] [--mae-steps 0] [--epochs 16] [--seeds 0 1]

Writes the table to docs/benchmarks.md (section "Vision transfer from pre-training").
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import zipfile
from pathlib import Path, PurePosixPath
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))
from _common import REPO, WORK, cifar_members, write_section

CIFAR10 = REPO.parent / "shared" / "data" / "cifar10" / "cifar10-jpg.zip"
CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
SOURCE, TARGET = CLASSES[:5], CLASSES[5:]
MODEL = "test_resnet"  # timm's tiny ResNet (0.37M parameters): the 2-core CPU budget allows nothing bigger
# MAE needs a ViT: timm's tiny one (0.3M parameters) with 4-px patches at 32 px (64 tokens); drop_rate as cifar10.yaml
VIT, VIT_KWARGS = "test_vit", "{img_size: 32, patch_size: 4}"
VIT_FINETUNE_KWARGS = "{img_size: 32, patch_size: 4, drop_rate: 0.1}"
QUIET = ["--trainer.enable_progress_bar=false", "--trainer.logger=false", "--trainer.enable_model_summary=false",
         "--trainer.enable_checkpointing=false", "--trainer.callbacks=[]", "--trainer.num_sanity_val_steps=0",
         "--data.init_args.num_workers=1",
         "--trainer.precision=32-true"]  # the recipes' precision: auto measures bf16 on a loaded CPU, and this table says fp32
# name -> (description, extra CLI arguments on top of recipes/vision/cifar10.yaml)
FINETUNES = {
    "full": ("full fine-tune (lr 1e-3)", []),
    "probe": ("linear probe (head only, lr 1e-2)", [
        "--trainer.callbacks+=ptft.core.LinearProbe", "--model.init_args.optimizer.lr=1e-2"]),
    "gradual": ("gradual unfreezing (1 layer group / 2 epochs, head lr 1e-2)", [
        "--trainer.callbacks+=ptft.core.GradualUnfreeze", "--trainer.callbacks.every_n_epochs=2",
        "--model.init_args.optimizer.head_lr=1e-2"]),
}


def extract(data: Path, per_class_train: int) -> dict[str, Path]:
    """Class folders in bench/.work/cifar-transfer: pre-training (0-4, all train), fine-tune (5-9, ``per_class_train``
    train images each, chosen by a seeded shuffle), test (5-9, 200 test images each)."""
    import random

    root = WORK / "cifar-transfer"
    folders = {"pretrain": root / "pretrain", "train": root / f"train-{per_class_train}", "test": root / "test-200"}
    if all(f.is_dir() for f in folders.values()):
        return folders
    if not data.is_file():
        raise SystemExit(f"CIFAR-10 zip not found at {data}; pass --data /path/cifar10-jpg.zip")
    with zipfile.ZipFile(data) as zf:
        by = cifar_members(zf)
        found = {c for _, c in by}
        if found != set(CLASSES):
            raise SystemExit(f"unexpected class folders in {data}: {sorted(found)}")

        def write(folder: Path, members: list[str]) -> None:
            for n in members:
                cls, file = PurePosixPath(n).parts[1:]
                (folder / cls).mkdir(parents=True, exist_ok=True)
                (folder / cls / file).write_bytes(zf.read(n))

        rng = random.Random(0)
        for cls in SOURCE:
            write(folders["pretrain"], by[("train", cls)])
        for cls in TARGET:
            train, test = by[("train", cls)], by[("test", cls)]
            rng.shuffle(train)
            rng.shuffle(test)
            write(folders["train"], train[:per_class_train])
            write(folders["test"], test[:200])
    return folders


def cli(args: list[str]):
    from ptft.cli import run_cli

    sys.argv = ["ptft"]
    return run_cli(args, run=False)


def pretrain_supervised(folders: dict[str, Path], steps: int, out: Path, model: str = MODEL) -> dict:
    from ptft.vision.pretrain import save_backbone

    c = cli(["--config", str(REPO / "recipes/vision/supervised-pretrain.yaml"), f"--model.init_args.model_name={model}",
             f"--data.init_args.train={folders['pretrain']}", "--data.init_args.test=null", "--data.init_args.val_fraction=0.02",
             f"--trainer.max_steps={steps}", f"--trainer.val_check_interval={steps}", "--trainer.check_val_every_n_epoch=null", "--trainer.max_epochs=-1",
             "--trainer.limit_val_batches=4", "--data.init_args.eval_batch_size=128", *QUIET])
    start = time.perf_counter()
    c.trainer.fit(c.model, c.datamodule)
    seconds = time.perf_counter() - start
    save_backbone(c.model.model, str(out))
    return {"seconds": seconds, "val_acc": c.trainer.callback_metrics["val/acc"].item(),
            "images": steps * c.datamodule.batch_size}


def pretrain_self_supervised(recipe: str, model: list[str], folders: dict[str, Path], steps: int, out: Path) -> tuple[Any, float]:
    """Pre-trains with ``recipe`` (SimCLR, MoCo, MAE) for ``steps`` steps on the pre-training images, saves the
    backbone to ``out``; returns the CLI object (its metrics, its model) and the training seconds."""
    c = cli(["--config", str(REPO / recipe), *model,
             f"--data.init_args.train={folders['pretrain']}", "--data.init_args.val_fraction=0.02",
             f"--trainer.max_steps={steps}", f"--trainer.val_check_interval={steps}", "--trainer.check_val_every_n_epoch=null", "--trainer.max_epochs=-1",
             "--trainer.limit_val_batches=2", "--data.init_args.batch_size=128", *QUIET])
    start = time.perf_counter()
    c.trainer.fit(c.model, c.datamodule)
    seconds = time.perf_counter() - start
    c.model.save_model(c.model.model, str(out))
    return c, seconds


def pretrain_simclr(folders: dict[str, Path], steps: int, out: Path) -> dict:
    c, seconds = pretrain_self_supervised("recipes/vision/simclr.yaml", [f"--model.init_args.model_name={MODEL}"],
                                          folders, steps, out)
    m = c.trainer.callback_metrics
    return {"seconds": seconds, "val_loss": m["val/loss"].item(), "val_pos_acc": m["val/pos_acc"].item(),
            "images": steps * c.datamodule.batch_size}


def pretrain_moco(folders: dict[str, Path], steps: int, out: Path) -> dict:
    c, seconds = pretrain_self_supervised("recipes/vision/moco.yaml", [f"--model.init_args.model_name={MODEL}"],
                                          folders, steps, out)
    m = c.trainer.callback_metrics
    return {"seconds": seconds, "val_loss": m["val/loss"].item(), "val_pos_acc": m["val/pos_acc"].item(),
            "queue": c.model.queue.shape[0]}


def pretrain_mae(folders: dict[str, Path], steps: int, out: Path, lr: float) -> dict:
    model = [f"--model.init_args.model_name={VIT}", f"--model.init_args.model_kwargs={VIT_KWARGS}",
             f"--model.init_args.optimizer.lr={lr}"]
    c, seconds = pretrain_self_supervised("recipes/vision/mae.yaml", model, folders, steps, out)
    return {"seconds": seconds, "val_loss": c.trainer.callback_metrics["val/loss"].item()}


def finetune(folders: dict[str, Path], backbone: Path | None, strategy: str, epochs: int, seed: int,
             vit: bool = False) -> float:
    weights = [f"--model.init_args.pretrained_file={backbone}"] if backbone else ["--model.init_args.pretrained=false"]
    model = [f"--model.init_args.model_name={VIT}", f"--model.init_args.model_kwargs={VIT_FINETUNE_KWARGS}"] if vit \
        else [f"--model.init_args.model_name={MODEL}"]
    c = cli(["--config", str(REPO / "recipes/vision/cifar10.yaml"), *model, *weights,
             f"--data.init_args.train={folders['train']}", f"--data.init_args.val={folders['test']}",
             f"--data.init_args.test={folders['test']}", "--data.init_args.batch_size=32",
             "--data.init_args.eval_batch_size=250", f"--trainer.max_epochs={epochs}", "--trainer.limit_val_batches=0",
             f"--seed_everything={seed}", f"--data.init_args.seed={seed}", *QUIET, *FINETUNES[strategy][1]])
    c.trainer.fit(c.model, c.datamodule)
    return c.trainer.test(c.model, c.datamodule, verbose=False)[0]["test/acc"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=CIFAR10)
    parser.add_argument("--pretrain-steps", type=int, default=400, help="supervised pre-training steps (batch 64)")
    parser.add_argument("--ssl-steps", type=int, default=0, help="SimCLR pre-training steps (batch 128); 0 skips it")
    parser.add_argument("--moco-steps", type=int, default=0, help="MoCo pre-training steps (batch 128); 0 skips it")
    parser.add_argument("--mae-steps", type=int, default=0, help="MAE pre-training steps of a ViT (batch 128); 0 skips it")
    parser.add_argument("--mae-lr", type=float, default=1.5e-4, help="MAE learning rate (recipe: 1.5e-4)")
    parser.add_argument("--epochs", type=int, default=16, help="fine-tuning epochs (250 images, batch 32)")
    parser.add_argument("--per-class", type=int, default=50, help="labelled fine-tuning images per class")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    args = parser.parse_args()
    os.environ.update(HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    import torch

    torch.set_num_threads(os.cpu_count() or 1)
    wall = time.perf_counter()
    folders = extract(args.data, args.per_class)
    print(f"data in {folders['pretrain'].parent}", flush=True)

    backbones: dict[str, Path] = {}
    notes: list[str] = []
    sup = pretrain_supervised(folders, args.pretrain_steps, WORK / "backbone-supervised")
    backbones["supervised"] = WORK / "backbone-supervised" / "model.safetensors"
    notes.append(f"supervised pre-training: {args.pretrain_steps} steps x 64 images ({sup['images']:,} images, "
                 f"{sup['images'] / 24500:.2f} epochs) in {sup['seconds'] / 60:.1f} min, held-out accuracy on "
                 f"classes 0-4: {sup['val_acc']:.3f}")
    print(notes[-1], flush=True)
    if args.ssl_steps:
        ssl = pretrain_simclr(folders, args.ssl_steps, WORK / "backbone-simclr")
        backbones["SimCLR"] = WORK / "backbone-simclr" / "model.safetensors"
        notes.append(f"SimCLR pre-training: {args.ssl_steps} steps x 128 images x 2 views in {ssl['seconds'] / 60:.1f} "
                     f"min, held-out val/loss {ssl['val_loss']:.3f}, positive-pair top-1 {ssl['val_pos_acc']:.3f} "
                     "(batches of 128: chance 1/255)")
        print(notes[-1], flush=True)
    if args.moco_steps:
        moco = pretrain_moco(folders, args.moco_steps, WORK / "backbone-moco")
        backbones["MoCo"] = WORK / "backbone-moco" / "model.safetensors"
        notes.append(f"MoCo pre-training: {args.moco_steps} steps x 128 images x 2 views in {moco['seconds'] / 60:.1f} "
                     f"min, held-out val/loss {moco['val_loss']:.3f}, positive top-1 among the queue "
                     f"{moco['val_pos_acc']:.3f} (queue {moco['queue']:,}: chance 1/{moco['queue'] + 1:,})")
        print(notes[-1], flush=True)
    vit_backbones: dict[str, Path] = {}
    if args.mae_steps:
        mae = pretrain_mae(folders, args.mae_steps, WORK / "backbone-mae", args.mae_lr)
        vit_backbones["MAE"] = WORK / "backbone-mae" / "model.safetensors"
        notes.append(f"MAE pre-training of `{VIT}` (4-px patches, 75% masked, lr {args.mae_lr:g}): {args.mae_steps} steps "
                     f"x 128 images in {mae['seconds'] / 60:.1f} min, held-out val/loss {mae['val_loss']:.3f} "
                     "(per-patch standardised pixels: predicting zeros scores about 1.0)")
        print(notes[-1], flush=True)

    # (row name, weights, strategy, ViT?)
    runs = [("scratch", None, "full", False)] + [(name, path, "full", False) for name, path in backbones.items()]
    runs += [("supervised", backbones["supervised"], s, False) for s in ("probe", "gradual")]
    runs += [(name, backbones[name], "probe", False) for name in ("SimCLR", "MoCo") if name in backbones]
    if vit_backbones:
        runs += [(f"scratch (`{VIT}`)", None, "full", True)]
        runs += [(f"MAE (`{VIT}`)", vit_backbones["MAE"], s, True) for s in ("full", "probe")]
    results = []
    for init, path, strategy, vit in runs:
        accs = []
        for seed in args.seeds:
            start = time.perf_counter()
            accs.append(finetune(folders, path, strategy, args.epochs, seed, vit))
            print(f"{init:>10} {strategy:>8} seed {seed}: test acc {accs[-1]:.4f} ({time.perf_counter() - start:.0f} s)",
                  flush=True)
        results.append((init, strategy, accs))

    lines = [
        "",
        "",
        (f"`python bench/vision_transfer.py --pretrain-steps {args.pretrain_steps} --ssl-steps {args.ssl_steps} "
        f"--moco-steps {args.moco_steps} --mae-steps {args.mae_steps}"
        f"{f' --mae-lr {args.mae_lr:g}' if args.mae_steps and args.mae_lr != 1.5e-4 else ''} "
        f"--epochs {args.epochs} --seeds {' '.join(map(str, args.seeds))}` — timm `{MODEL}` (0.37M parameters) at "
        f"32 px{f'; the MAE rows and their scratch baseline use timm `{VIT}` (0.3M parameters, 4-px patches) instead' if args.mae_steps else ''}. "
        "Pre-training sees CIFAR-10 classes 0-4 only (airplane, automobile, bird, cat, deer); the backbone "
        "is exported without its head and loaded by `ImageClassifier(pretrained_file=...)`. Fine-tuning: "
        f"{args.per_class} training images per class of classes 5-9 (dog, frog, horse, ship, truck), "
        f"{args.epochs} epochs, batch 32, recipes/vision/cifar10.yaml otherwise (AdamW, cosine, flip + crop "
        "augmentation, label smoothing 0.1); test = 200 test images per class of classes 5-9 (1,000 images, chance "
        f"0.20), accuracy after the last epoch. {len(args.seeds)} fine-tuning seed(s) (head initialisation, batch "
        f"order) per row, one pre-training run. {os.cpu_count()} shared CPU cores, fp32, whole run "
        f"{(time.perf_counter() - wall) / 60:.0f} min."),
        "",
        *[f"- {n}" for n in notes],
        "",
        "| backbone | fine-tuning | test acc (mean) | min-max over seeds |",
        "|---|---|---:|---:|",
    ]
    for init, strategy, accs in results:
        spread = f"{min(accs):.3f}-{max(accs):.3f}" if len(accs) > 1 else "-"
        lines.append(f"| {init} | {FINETUNES[strategy][0]} | {statistics.mean(accs):.3f} | {spread} |")
    table = "\n".join(lines)
    print(table)
    write_section(table + "\n", "Vision transfer from pre-training")


if __name__ == "__main__":
    main()
