"""Start-up time of the ``ptft`` command, side by side with importing torch and Lightning alone.

Each command runs in a fresh process (the console script, as a user types it), the commands interleaved within each
repeat, the median of ``--repeats`` wall times. What the issue asks: ``ptft --help``, ``--version`` and ``recipes``
answer in under 2 s without importing torch; ``ptft fit --help`` costs no more than ``import lightning`` + 1.5 s.

    python bench/startup.py [--repeats 5]

Writes docs/benchmarks.md section "Start-up".
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _common import write_section

BIN = Path(sys.executable).parent
COMMANDS = {
    "ptft --version": [str(BIN / "ptft"), "--version"],
    "ptft --help": [str(BIN / "ptft"), "--help"],
    "ptft recipes": [str(BIN / "ptft"), "recipes"],
    "python -c 'import torch'": [sys.executable, "-c", "import torch"],
    "python -c 'import lightning'": [sys.executable, "-c", "import lightning"],
    "ptft fit --help": [str(BIN / "ptft"), "fit", "--help"],
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    times: dict[str, list[float]] = {name: [] for name in COMMANDS}
    for _ in range(args.repeats):
        for name, command in COMMANDS.items():
            start = time.perf_counter()
            subprocess.run(command, check=True, capture_output=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
            times[name].append(time.perf_counter() - start)
    median = {name: statistics.median(values) for name, values in times.items()}
    lightning = median["python -c 'import lightning'"]
    lines = [
        "", "",
        (f"`python bench/startup.py --repeats {args.repeats}` — wall time of each command in a fresh process (the "
         f"console script as typed), commands interleaved, median of {args.repeats}, {os.cpu_count()} CPU cores, "
         "warm file cache. Targets: under 2 s without torch for the first three; `ptft fit --help` at most "
         "`import lightning` + 1.5 s."),
        "",
        "| command | median s | min s | max s | vs `import lightning` |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, values in times.items():
        lines.append(f"| `{name}` | {median[name]:.2f} | {min(values):.2f} | {max(values):.2f} | "
                     f"{median[name] - lightning:+.2f} s |")
    table = "\n".join(lines)
    print(table)
    write_section(table + "\n", "Start-up")


if __name__ == "__main__":
    main()
