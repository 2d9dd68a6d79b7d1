"""Generated clips for the video tests: a bright square sliding across a noisy canvas, labelled by direction.

Each clip traverses a random segment forwards or backwards, so the frames of a "left" clip are those of a "right"
one in reverse: a model that ignores frame order sees the same frames for both (the mean image is the same), and
only a temporal model can tell them apart.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

DIRECTIONS = ("down", "left", "right", "up")


def frames_of(direction: str, count: int, size: int, rng: np.random.Generator) -> np.ndarray:
    side = size // 4
    travel = size - side
    start, fixed = rng.integers(0, travel // 3), rng.integers(0, travel)
    path = np.linspace(start, start + 2 * travel // 3, count).round().astype(int)
    if direction in ("left", "up"):
        path = path[::-1]
    base = rng.integers(0, 60, (size, size, 3))
    colour = rng.integers(150, 256, 3)
    clip = np.repeat(base[None], count, 0).astype(np.uint8)
    for t, p in enumerate(path):
        y, x = (fixed, p) if direction in ("left", "right") else (p, fixed)
        clip[t, y : y + side, x : x + side] = colour
    return clip


def write_clip(path: Path, frames: np.ndarray, as_folder: bool) -> None:
    if as_folder:
        from PIL import Image

        path.mkdir(parents=True)
        for t, frame in enumerate(frames):
            Image.fromarray(frame).save(path / f"frame_{t:04d}.png")
        return
    import av

    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=8)
        stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
        stream.bit_rate = 2_000_000
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())


def write_clips(root: Path, per_class: int, seed: int = 0, frames: int = 12, size: int = 32,
                folders: str = "mixed") -> str:
    """``root/<direction>/<i>.mp4`` clips, or frame folders ``root/<direction>/<i>/`` (``folders``: ``none``,
    ``all``, or ``mixed``: every other clip)."""
    rng = np.random.default_rng(seed)
    for direction in DIRECTIONS:
        (root / direction).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            as_folder = folders == "all" or (folders == "mixed" and i % 2 == 1)
            name = f"{i:03d}" if as_folder else f"{i:03d}.mp4"
            write_clip(root / direction / name, frames_of(direction, frames, size, rng), as_folder)
    return str(root)


COLOURS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220)}


def write_colour_clips(root: Path, per_class: int, seed: int = 0, frames: int = 6, size: int = 32) -> str:
    """``root/<colour>/<i>.mp4``: clips of a square sliding over a noisy canvas of the class's colour (video-text)."""
    rng = np.random.default_rng(seed)
    for name, rgb in COLOURS.items():
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            clip = frames_of(DIRECTIONS[i % 4], frames, size, rng)
            canvas = (clip < 150).any(-1)  # all but the square (whose channels are all >= 150)
            tint = np.array(rgb) + rng.integers(-40, 40, (frames, size, size, 3))
            clip[canvas] = np.clip(tint, 0, 255).astype(np.uint8)[canvas]
            write_clip(root / name / f"{i:03d}.mp4", clip, as_folder=False)
    return str(root)
