"""Reading video: files decoded with PyAV (FFmpeg's libraries, bundled in its wheels), or folders of frame images.

PyAV rather than torchvision.io (its video decoding is deprecated) or torchcodec (tied to one torch version): it
installs from wheels everywhere and decodes every container FFmpeg knows. A clip is one of

* a video file (``.mp4``, ``.avi``, ``.mkv``, ``.webm``, ``.mov``…), or
* a folder of frame images (``frame_0001.jpg``…), read in sorted name order (the layout of pre-extracted datasets:
  Something-Something, UCF-101 frame dumps).

Frames are chosen by :func:`sample_indices` (segments or a strided clip) and decoded on access.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import numpy as np
import torch

from ptft.core.data import cached_checks
from ptft.core.errors import PtftError
from ptft.core.files import FileSource, file_stamps

VIDEO_SUFFIXES = {".mp4", ".avi", ".mkv", ".webm", ".mov", ".m4v", ".mpg", ".mpeg", ".gif"}
FRAME_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp"}
Sampling = Literal["segments", "clip"]


def _av():
    try:
        import av
    except ImportError as err:  # the video extra is not installed
        raise PtftError("video files need PyAV: pip install 'ptft[video]' (frame folders need nothing more)") from err
    return av


def is_frame_folder(path: Path) -> bool:
    return path.is_dir() and any(p.suffix.lower() in FRAME_SUFFIXES for p in path.iterdir())


def frame_files(folder: Path) -> list[Path]:
    """The frame images of a frame folder, in sorted name order."""
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in FRAME_SUFFIXES)


def probe_videos(sources: list[FileSource]) -> list[list[float] | str]:
    """Each clip's ``[frames, height, width]``, or why it cannot be used. A file's frames are counted from its
    packets (no decoding) and its first frame is decoded; every image of a frame folder is opened. Runs in check
    workers (:func:`ptft.core.data.parallel_map`)."""
    from PIL import Image

    results: list[list[float] | str] = []
    for source in sources:
        path = source.root
        if not path.exists():
            results.append("does not exist")
            continue
        if path.is_dir():
            frames = frame_files(path)
            if not frames:
                results.append(f"is a folder without frame images ({', '.join(sorted(FRAME_SUFFIXES))})")
                continue
            try:
                sizes = set()
                for frame in frames:
                    with Image.open(frame) as image:
                        image.verify()
                        sizes.add(image.size)
            except Exception as err:  # noqa: BLE001 - PIL reports broken images as many error types
                results.append(f"has an unreadable frame {frame.name} ({type(err).__name__})")
                continue
            if len(sizes) > 1:
                results.append(f"has frames of different sizes {sorted(sizes)[:2]}")
                continue
            (width, height), = sizes
            results.append([len(frames), height, width])
            continue
        av = _av()
        try:
            with av.open(str(path)) as container:
                if not container.streams.video:
                    results.append("has no video stream")
                    continue
                stream = container.streams.video[0]
                count = sum(1 for packet in container.demux(stream) if packet.size)
                container.seek(0)
                first = next(container.decode(video=0), None)
        except Exception as err:  # noqa: BLE001 - FFmpeg reports broken files as many error types
            results.append(f"cannot be read ({type(err).__name__}: {(str(err).splitlines() or [''])[0]})")
            continue
        if first is None or count == 0:
            results.append("has no frames")
            continue
        results.append([count, first.height, first.width])
    return results


def video_info(sources: list[FileSource]) -> list[list[float] | str]:
    """:func:`probe_videos` of every clip: in parallel worker processes, cached by path, size and modification time
    (a second run over unchanged files reads the cache only)."""
    stamps = [None if s.root.is_dir() else stamp for s, stamp in zip(sources, file_stamps(sources, "video-v1"))]
    return cached_checks(sources, stamps, probe_videos)


def sample_indices(total: int, count: int, sampling: Sampling, stride: int, training: bool,
                   generator: torch.Generator | None = None) -> list[int]:
    """Which ``count`` of a clip's ``total`` frames a model sees.

    ``segments`` (TSN): the clip is cut into ``count`` equal segments and one frame is taken from each, at a random
    position in training and the middle in evaluation, so the whole clip is covered whatever its length. ``clip``
    (VideoMAE, X3D): ``count`` frames ``stride`` apart, from a random start in training and centred in evaluation; a
    clip shorter than that span is covered evenly instead. Short clips repeat frames rather than fail.
    """
    if sampling == "segments":
        edges = np.linspace(0, total, count + 1)
        if training:
            offsets = torch.rand(count, generator=generator).numpy()
            picks = edges[:-1] + offsets * (edges[1:] - edges[:-1])
        else:
            picks = (edges[:-1] + edges[1:]) / 2
        return [min(int(p), total - 1) for p in picks]
    span = (count - 1) * stride + 1
    if total < span:
        return [int(round(x)) for x in np.linspace(0, total - 1, count)]
    start = int(torch.randint(0, total - span + 1, (1,), generator=generator)) if training else (total - span) // 2
    return [start + i * stride for i in range(count)]


def read_frames(source: FileSource, indices: list[int]) -> torch.Tensor:
    """The frames at ``indices`` as a ``uint8`` tensor ``(T, 3, H, W)`` (RGB)."""
    from PIL import Image

    from ptft.vision.data import to_rgb

    path = source.root
    if path.is_dir():
        files = frame_files(path)
        frames = [np.asarray(to_rgb(Image.open(files[i]))) for i in indices]
    else:
        wanted = set(indices)
        decoded: dict[int, np.ndarray] = {}
        with _av().open(str(path)) as container:
            stream = container.streams.video[0]
            stream.thread_type = "AUTO"
            for i, frame in enumerate(container.decode(stream)):
                if i in wanted:
                    decoded[i] = frame.to_ndarray(format="rgb24")
                if i >= max(indices):
                    break
        if not decoded:
            raise PtftError(f"{path}: no frame could be decoded")
        last = max(decoded)  # fewer frames decoded than the container's packets promised (a truncated file)
        frames = [decoded.get(i, decoded[last]) if i <= last else decoded[last] for i in indices]
    return torch.from_numpy(np.stack(frames)).permute(0, 3, 1, 2).contiguous()
