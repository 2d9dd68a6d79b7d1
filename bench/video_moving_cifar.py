"""Video from real images: CIFAR-10 pictures sliding across a canvas, labelled by direction (down, left, right, up).

Each clip is ``--frames`` frames of a 64x64 noisy grey canvas with one CIFAR-10 image (32x32) moving along a random
segment, forwards or backwards, so a "left" clip holds the frames of a "right" one in reverse: a model that ignores
frame order sees the same frames for both (at best the axis: 0.5), and only a temporal model can tell the direction.
Clips are written as MPEG-4 files (decoded back with PyAV by the data module) from CIFAR-10 training images
(``--train-clips``) and test images (``--test-clips``).

recipes/video/frames-temporal.yaml with a timm ``--image-model`` from random weights (no hub here) on every frame;
three arms, same data, steps and seed: ``mean`` pooling of globally pooled frame features (order-blind), ``gru`` and
``transformer`` over frame features pooled to a 2x2 grid (``pool_grid: 2``, so each frame's features keep where the
image is).

    python bench/video_moving_cifar.py [--train-clips 1200] [--test-clips 400] [--epochs 6] [--image-model resnet18]

Writes the table to docs/benchmarks.md (section "Video: CIFAR-10 images moving across a canvas").
"""

from __future__ import annotations

import argparse
import io
import json
import random
import sys
import zipfile
from pathlib import Path, PurePosixPath

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from _common import REPO, WORK, fit_and_test, run_in_subprocess, write_section  # noqa: E402

CIFAR10 = REPO.parent / "shared" / "data" / "cifar10" / "cifar10-jpg.zip"
DIRECTIONS = ("down", "left", "right", "up")
CANVAS, SIDE = 64, 32
QUIET = ["--trainer.enable_progress_bar=false", "--trainer.logger=false", "--trainer.enable_model_summary=false",
         "--trainer.enable_checkpointing=false", "--trainer.callbacks=[]", "--trainer.num_sanity_val_steps=0"]
ARMS = {
    "mean": ("mean pooling over frames (order-blind)", ["--model.init_args.temporal=mean"]),
    "gru": ("GRU over frames, 2x2 grid features", ["--model.init_args.temporal=gru", "--model.init_args.pool_grid=2"]),
    "transformer": ("temporal transformer, 2x2 grid features",
                    ["--model.init_args.temporal=transformer", "--model.init_args.pool_grid=2"]),
}


def clip_frames(image: np.ndarray, direction: str, frames: int, rng: random.Random) -> np.ndarray:
    travel = CANVAS - SIDE
    start = rng.randint(0, travel // 4)
    path = np.linspace(start, start + 3 * travel // 4, frames).round().astype(int)
    if direction in ("left", "up"):
        path = path[::-1]
    fixed = rng.randint(0, travel)
    noise = np.random.default_rng(rng.randint(0, 2**31)).integers(90, 160, (CANVAS, CANVAS, 3))
    clip = np.repeat(noise[None].astype(np.uint8), frames, 0)
    for t, p in enumerate(path):
        y, x = (fixed, p) if direction in ("left", "right") else (p, fixed)
        clip[t, y : y + SIDE, x : x + SIDE] = image
    return clip


def write_mp4(path: Path, frames: np.ndarray) -> None:
    import av

    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=8)
        stream.width, stream.height, stream.pix_fmt = CANVAS, CANVAS, "yuv420p"
        stream.bit_rate = 2_000_000
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())


def build_clips(train_clips: int, test_clips: int, frames: int) -> dict[str, Path]:
    """``train`` / ``test`` class folders of mp4 clips under bench/.work, from seeded CIFAR-10 picks."""
    from PIL import Image

    root = WORK / f"moving-cifar-{train_clips}-{test_clips}-{frames}"
    folders = {"train": root / "train", "test": root / "test"}
    if (root / "done").exists():
        return folders
    if not CIFAR10.is_file():
        raise SystemExit(f"CIFAR-10 zip not found at {CIFAR10}")
    rng = random.Random(0)
    with zipfile.ZipFile(CIFAR10) as zf:
        names = sorted(n for n in zf.namelist() if n.endswith(".jpg"))
        for split, count in (("train", train_clips), ("test", test_clips)):
            picks = rng.sample([n for n in names if PurePosixPath(n).parts[0] == split], count)
            for i, name in enumerate(picks):
                direction = DIRECTIONS[i % len(DIRECTIONS)]
                image = np.asarray(Image.open(io.BytesIO(zf.read(name))).convert("RGB"))
                target = folders[split] / direction / f"{i:05d}.mp4"
                target.parent.mkdir(parents=True, exist_ok=True)
                write_mp4(target, clip_frames(image, direction, frames, rng))
    (root / "done").touch()
    return folders


def run_arm(arm: str, args: argparse.Namespace) -> dict:
    folders = build_clips(args.train_clips, args.test_clips, args.frames)
    result = fit_and_test(["--config", str(REPO / "recipes/video/frames-temporal.yaml"),
                          f"--model.init_args.model_name={args.image_model}", "--model.init_args.pretrained=false",
                          f"--model.init_args.num_frames={args.num_frames}", "--model.init_args.optimizer.lr=1.0e-3",
                          f"--data.init_args.train={folders['train']}", f"--data.init_args.test={folders['test']}",
                          f"--data.init_args.image_size={CANVAS}", "--data.init_args.hflip=0", "--data.init_args.scale=[0.8, 1.0]",
                          f"--data.init_args.num_workers={args.workers}", f"--data.init_args.batch_size={args.batch_size}",
                          f"--trainer.max_epochs={args.epochs}", f"--seed_everything={args.seed}",
                          f"--trainer.default_root_dir={WORK / 'moving-cifar-runs'}", *QUIET, *ARMS[arm][1]])
    return {"arm": arm, **result, "train_clips": result["train_examples"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--train-clips", type=int, default=1200, help="clips from CIFAR-10 training images")
    parser.add_argument("--test-clips", type=int, default=400, help="clips from CIFAR-10 test images")
    parser.add_argument("--frames", type=int, default=12, help="frames written per clip")
    parser.add_argument("--num-frames", type=int, default=6, help="frames sampled per clip (segments)")
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--image-model", default="resnet18", help="timm model on every frame, from random weights")
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--arms", nargs="+", default=list(ARMS))
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print("RESULT " + json.dumps(run_arm(args.one, args)))
        return
    build_clips(args.train_clips, args.test_clips, args.frames)
    forwarded = [f"--train-clips={args.train_clips}", f"--test-clips={args.test_clips}", f"--frames={args.frames}",
                 f"--num-frames={args.num_frames}", f"--epochs={args.epochs}", f"--batch-size={args.batch_size}",
                 f"--image-model={args.image_model}", f"--workers={args.workers}", f"--seed={args.seed}"]
    results = []
    for arm in args.arms:  # one after the other: the times are comparable
        print(f"{ARMS[arm][0]} ...", flush=True)
        result = run_in_subprocess(__file__, ["--one", arm, *forwarded])
        print(f"    test acc {result['test']['test/acc']:.3f}, training {result['train_seconds'] / 60:.1f} min", flush=True)
        results.append(result)
    base = results[0]["train_seconds"]
    rows = [f"| {ARMS[r['arm']][0]} | **{r['test']['test/acc']:.3f}** | {r['test']['test/f1']:.3f} | "
            f"{r['val'].get('val/acc', float('nan')):.3f} | {r['train_seconds'] / 60:.1f} | "
            f"{r['train_seconds'] / base:.2f}x |" for r in results]
    command = (f"python bench/video_moving_cifar.py --train-clips {args.train_clips} --test-clips {args.test_clips} "
               f"--epochs {args.epochs} --image-model {args.image_model}")
    table = "\n".join([
        "",
        "",
        f"`{command}` — recipes/video/frames-temporal.yaml: a timm `{args.image_model}` from random weights on every "
        f"frame (64 px), {args.num_frames} frames sampled from each {args.frames}-frame MPEG-4 clip (segments; decoded "
        f"with PyAV), {args.epochs} epochs, batch {args.batch_size}, AdamW lr 1e-3, the recipe's cosine schedule, no "
        f"flips. {results[0]['train_clips']:,} training clips (CIFAR-10 training images, 10% held out for "
        f"validation), {args.test_clips:,} test clips (CIFAR-10 test images); 4 directions, chance 0.25, order-blind "
        f"ceiling 0.5 (the axis). Precision: {results[0]['precision']} (`precision: auto`). 2 CPU cores, one arm at "
        f"a time, seed {args.seed}.",
        "",
        "| arm | test acc | test macro-F1 | val acc | training min | time vs mean |",
        "|---|---:|---:|---:|---:|---:|",
        *rows,
    ])
    print(table)
    write_section(table + "\n", "Video: CIFAR-10 images moving across a canvas")


if __name__ == "__main__":
    main()
