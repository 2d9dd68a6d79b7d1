"""Image checks before training: the old serial check vs ptft's parallel, cached one.

    python bench/image_check.py                                   # CIFAR-10's 50,000 training images (zip)
    python bench/image_check.py --location data/train --repeats 3

Every image of a split is opened and verified before training. The old check did it serially, on every DDP rank;
``ptft.vision.data.image_sizes`` runs it in worker processes (one per CPU), caches the results by file path, size and
modification time, and the data modules run it on rank 0 only. The cache goes to a temporary folder here, so the
first run is a true first run.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

DEFAULT = Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10" / "cifar10-jpg.zip"


def old_serial_check(images: list) -> list[int]:
    """What ``ImageDataset.unreadable`` did before: open and verify every image, one after the other."""
    from ptft.vision.data import ImageDataset

    ds = ImageDataset(images, None, None)
    bad = []
    for i in range(len(ds)):
        try:
            ds.open(i).verify()
        except Exception:  # noqa: BLE001 - PIL raises many types for a broken file
            bad.append(i)
    return bad


def timed(fn, repeats: int) -> tuple[float, object]:
    best, result = float("inf"), None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - start)
    return best, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--location", default=f"{DEFAULT}/train", help="images: folder, zip or zip/folder")
    parser.add_argument("--repeats", type=int, default=1, help="runs of the old and the cached check (best kept)")
    args = parser.parse_args()

    os.environ["XDG_CACHE_HOME"] = tempfile.mkdtemp(prefix="ptft-bench-cache-")
    from ptft.core.data import _cpus
    from ptft.vision.data import image_sizes, list_images

    start = time.perf_counter()
    images = list_images(args.location, "location")
    listing = time.perf_counter() - start
    old, old_bad = timed(lambda: old_serial_check(images), args.repeats)
    start = time.perf_counter()
    first = image_sizes(images)
    first_s = time.perf_counter() - start
    cached, again = timed(lambda: image_sizes(images), args.repeats)
    new_bad = [i for i, s in enumerate(first) if isinstance(s, str)]
    assert new_bad == old_bad and again == first, "the checks disagree"

    n = len(images)
    print(f"{n} images in {args.location} (listed in {listing:.2f} s), {_cpus()} CPUs, {len(old_bad)} unreadable")
    print(f"| check | seconds | images/s | vs old |")
    print(f"|---|---:|---:|---:|")
    for name, seconds in (("old: serial, every rank", old), ("new: first run (parallel, writes cache)", first_s),
                          ("new: cached run", cached)):
        print(f"| {name} | {seconds:.2f} | {n / seconds:,.0f} | {old / seconds:.1f}x |")
    print("Under DDP the old check ran on each of N ranks; the new one runs on rank 0 and broadcasts the result.")


if __name__ == "__main__":
    main()
