"""Framework overhead: a shipped ptft recipe against a hand-written PyTorch loop doing the same work, per step.

Both systems train the same model from the same initial weights on the same fixed-shape batches, with the same
optimizer (the recipe's AdamW: fused where torch has it, no weight decay on biases / norms), the same schedule and
the same gradient clipping; the loop has nothing else. ptft runs the recipe as a user would (its logger, callbacks,
metrics, progress bar), fed the batches through ``trainer.fit(train_dataloaders=...)``. Only steps after a warm-up
are timed (data fetching included); validation and checkpointing come after the timed window. Each repeat runs
both systems in fresh processes at the same time, each pinned to its own core with one thread (cores swapped between
repeats): the machine's other load then slows both alike, where runs one after the other (``--sequential``) differed
by up to 30% from minute to minute on a shared VM. The table reports each run's median step time (robust to
bursts), each repeat's ratio to the loop run beside it, and their geometric mean (compare ratios, not times).

- ``text``: recipes/text/sst2.yaml, all-MiniLM-L6-v2 (22.7M parameters), batches of 32 x 64 tokens.
- ``vision``: recipes/vision/cifar10.yaml, timm ``resnet18`` (11.2M parameters, random weights: the hub is out of
  reach), batches of 128 x 3 x 32 x 32.

Precision is fp32 for both (the recipes' ``precision: auto`` may choose bf16 on a CPU with native bf16, which
would compare different arithmetic); ``--precision`` changes it for both.

    python bench/overhead.py [--tasks text vision] [--steps 40] [--warmup 5] [--repeats 4] [--sequential [--threads N]]

Prints the table and writes it to docs/benchmarks.md (section "Framework overhead").
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _common import REPO, WORK, model_dir, run_in_subprocess, write_section  # noqa: E402

TASKS = {
    "text": {"recipe": "recipes/text/sst2.yaml", "batch": 32, "length": 64, "clip": 1.0},
    "vision": {"recipe": "recipes/vision/cifar10.yaml", "batch": 128, "size": 32, "clip": None, "model": "resnet18"},
}
SYSTEMS = {"plain": "hand-written PyTorch loop", "ptft": "ptft, the recipe as shipped"}
SEED = 0


def fixed_batches(task: str, count: int) -> list[dict]:
    """``count`` batches of one shape, the same for every system (seeded)."""
    import torch

    spec = TASKS[task]
    gen = torch.Generator().manual_seed(SEED)
    if task == "text":
        return [{"input_ids": torch.randint(1000, 30000, (spec["batch"], spec["length"]), generator=gen),
                 "attention_mask": torch.ones(spec["batch"], spec["length"], dtype=torch.long),
                 "labels": torch.randint(0, 2, (spec["batch"],), generator=gen)} for _ in range(count)]
    return [{"pixel_values": torch.randn(spec["batch"], 3, spec["size"], spec["size"], generator=gen),
             "labels": torch.randint(0, 10, (spec["batch"],), generator=gen)} for _ in range(count)]


def placeholder_data(task: str) -> list[str]:
    """Tiny files for the recipe's data module to point at (it checks its paths when built); the batches that train
    are :func:`fixed_batches`, given to ``trainer.fit`` directly."""
    root = WORK / "overhead" / "data"
    if task == "text":
        root.mkdir(parents=True, exist_ok=True)
        (root / "tiny.tsv").write_text("label\tsentence\n0\ta placeholder\n1\tanother one\n")
        return [f"--data.init_args.train_file={root / 'tiny.tsv'}", f"--data.init_args.val_file={root / 'tiny.tsv'}"]
    from PIL import Image

    for label in range(10):  # the recipe's number of classes, as CIFAR-10's folders give it
        (root / "images" / f"class{label}").mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (32, 32)).save(root / "images" / f"class{label}" / "0.png")
    return [f"--data.init_args.train={root / 'images'}", "--data.init_args.test=null"]


def recipe_cli(task: str, precision: str):
    """The recipe's model and trainer, built by ptft's CLI as ``ptft fit --config RECIPE`` would (not run)."""
    from ptft.cli import run_cli

    spec = TASKS[task]
    args = ["--config", str(REPO / spec["recipe"]), *placeholder_data(task), f"--trainer.precision={precision}",
            f"--trainer.default_root_dir={WORK / 'overhead'}", f"--seed_everything={SEED}",
            f"--trainer.logger.init_args.save_dir={WORK / 'overhead' / 'runs'}"]
    if task == "text":
        args.append(f"--model.init_args.model_name={model_dir()}")
    else:
        args += [f"--model.init_args.model_name={spec['model']}", "--model.init_args.pretrained=false"]
    sys.argv = ["ptft"]
    return run_cli(args, run=False)


class StepClock:
    """Each step's wall time (from the end of the previous step to the end of this one: data fetching included),
    for the steps after ``warmup``."""

    def __init__(self, warmup: int) -> None:
        self.warmup = warmup
        self.previous = 0.0
        self.steps: list[float] = []

    def tick(self, index: int) -> None:
        now = time.perf_counter()
        if index >= self.warmup:
            self.steps.append(now - self.previous)
        self.previous = now

    def result(self) -> dict:
        """Median and mean step time: the median of a run's steps is robust to bursts of other load on the
        machine (a shared VM's neighbours), the mean is what a whole run costs."""
        return {"median_step": statistics.median(self.steps), "mean_step": statistics.mean(self.steps),
                "steps": len(self.steps)}


def run_ptft(task: str, steps: int, warmup: int, precision: str) -> dict:
    import lightning as L
    from torch.utils.data import DataLoader

    cli = recipe_cli(task, precision)
    clock = StepClock(warmup)

    class Clock(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            clock.tick(batch_idx)

    batches = fixed_batches(task, warmup + steps)
    cli.trainer.callbacks.append(Clock())
    cli.trainer.fit_loop.max_epochs = 1
    # one epoch of exactly these batches, then a one-batch validation (the recipe's monitors need val/acc)
    train = DataLoader(batches, batch_size=None)
    val = DataLoader(batches[:1], batch_size=None)
    cli.trainer.fit(cli.model, train_dataloaders=train, val_dataloaders=val)
    return {**clock.result(), "precision": str(cli.trainer.precision),
            "loss": float(cli.trainer.callback_metrics["train/loss"])}


def run_plain(task: str, steps: int, warmup: int, precision: str) -> dict:
    """The same model, optimizer, schedule and clipping as the recipe, in a loop; nothing else."""
    import torch
    from torch.utils.data import DataLoader

    from ptft.core.optim import build_optimizer, build_scheduler

    # The recipe's model, built the same way (same seed: same initial weights), then only its network is used.
    cli = recipe_cli(task, precision)
    module = cli.model
    model = module.model
    model.train()
    optimizer = build_optimizer(module.param_groups(), module.optimizer_config)
    scheduler = build_scheduler(optimizer, module.scheduler_config, total_steps=warmup + steps)["scheduler"]
    clip = TASKS[task]["clip"]
    smoothing = getattr(module, "label_smoothing", 0.0) or 0.0
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision.startswith("bf16"))
    clock = StepClock(warmup)
    loader = DataLoader(fixed_batches(task, warmup + steps), batch_size=None)
    for index, batch in enumerate(loader):
        with autocast:
            if task == "text":
                logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            else:
                logits = model(batch["pixel_values"])
        loss = torch.nn.functional.cross_entropy(logits.float(), batch["labels"], label_smoothing=smoothing)
        loss.backward()
        if clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        clock.tick(index)
    return {**clock.result(), "precision": precision, "loss": loss.item()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", nargs="+", default=list(TASKS), choices=list(TASKS))
    parser.add_argument("--steps", type=int, default=40, help="timed steps per run")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps first")
    parser.add_argument("--repeats", type=int, default=4, help="even: each system runs as often on either core")
    parser.add_argument("--precision", default="32-true")
    parser.add_argument("--threads", type=int, help="torch threads per run (default: torch's; 1 with --paired)")
    parser.add_argument("--sequential", action="store_true",
                        help="run the systems one after the other with every core, instead of at the same time "
                             "on one core each (--paired, the default)")
    parser.add_argument("--core", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--one", nargs=2, metavar=("TASK", "SYSTEM"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        if args.core is not None:
            os.sched_setaffinity(0, {args.core})
        import torch

        if args.threads:
            torch.set_num_threads(args.threads)
        task, system = args.one
        os.environ.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", WANDB_MODE="disabled")
        runner = run_ptft if system == "ptft" else run_plain
        print("RESULT " + json.dumps(runner(task, args.steps, args.warmup, args.precision)), flush=True)
        return

    paired = not args.sequential
    if paired and (os.cpu_count() or 1) < 2:
        raise SystemExit("--paired needs 2 cores: use --sequential")
    if paired:
        args.threads = 1
    extra = [f"--steps={args.steps}", f"--warmup={args.warmup}", f"--precision={args.precision}",
             *([f"--threads={args.threads}"] if args.threads else [])]
    results: dict[tuple[str, str], list[dict]] = {}
    for repeat in range(args.repeats):
        for task in args.tasks:
            order = list(SYSTEMS) if repeat % 2 == 0 else list(reversed(SYSTEMS))  # neither always goes first / on core 0
            if paired:
                got = run_side_by_side([["--one", task, system, f"--core={core}", *extra] for core, system in enumerate(order)])
            else:
                got = [run_in_subprocess(__file__, ["--one", task, system, *extra]) for system in order]
            for system, result in zip(order, got):
                results.setdefault((task, system), []).append(result)
                print(f"repeat {repeat}: {task} {system}: median {1000 * result['median_step']:.1f} ms/step, "
                      f"mean {1000 * result['mean_step']:.1f}, loss {result['loss']:.4f}", flush=True)
    table = render(results, args)
    print(table)
    write_section(table + "\n", "Framework overhead")


def run_side_by_side(arguments: list[list[str]]) -> list[dict]:
    """Runs ``overhead.py ARGS`` for each argument list at the same time (one core each) and returns their results:
    whatever else slows the machine down slows both alike, which sequential runs minutes apart cannot promise."""
    import subprocess

    WORK.mkdir(parents=True, exist_ok=True)
    procs = [subprocess.Popen([sys.executable, __file__, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, cwd=WORK) for args in arguments]
    results = []
    for args, proc in zip(arguments, procs):
        out, err = proc.communicate()
        line = next((ln for ln in out.splitlines() if ln.startswith("RESULT ")), None)
        if line is None:
            raise SystemExit(f"{' '.join(args)} failed:\n{err[-3000:]}")
        results.append(json.loads(line[len("RESULT "):]))
    return results


def render(results: dict[tuple[str, str], list[dict]], args: argparse.Namespace) -> str:
    import platform

    import torch

    rows = []
    for task in args.tasks:
        loop_runs = results[(task, "plain")]
        for system, description in SYSTEMS.items():
            runs = results[(task, system)]
            median = statistics.median(r["median_step"] for r in runs)
            mean = statistics.median(r["mean_step"] for r in runs)
            # each repeat's ratio to the loop run beside it (same time, other core), then their geometric mean: the
            # cores swap every repeat, so with an even number of repeats a faster core favours neither system
            paired = [r["median_step"] / p["median_step"] for r, p in zip(runs, loop_runs)]
            each = ", ".join(f"{x:.3f}" for x in paired)
            rows.append(f"| {task} (`{TASKS[task]['recipe']}`) | {description} | {1000 * median:.1f} | "
                        f"{1000 * mean:.1f} | {each} | **{statistics.geometric_mean(paired):.3f}x** | "
                        f"{runs[-1]['loss']:.4f} |")
    threads = args.threads or torch.get_num_threads()
    return "\n".join([
        "",
        "",
        f"`python bench/overhead.py --steps {args.steps} --warmup {args.warmup} --repeats {args.repeats}"
        f"{' --sequential' if args.sequential else ''}"
        f"{f' --threads {args.threads}' if args.threads and args.sequential else ''}` — per-step time of the shipped "
        "recipe run by ptft against a hand-written loop doing the same work (same model and initial weights, same "
        "fixed-shape batches, the recipe's AdamW, schedule, label smoothing and clipping), each run in a fresh process; "
        + ("the two systems run at the same time, each pinned to its own core with one thread (swapping cores "
           "between repeats), so that the machine's other load (a shared VM's neighbours moved sequential runs by "
           "up to 30% here) slows both alike; " if not args.sequential else
           "systems one after the other within each repeat; ")
        + f"{args.steps} timed steps after {args.warmup} untimed ones. Per run, the median "
        "step time (robust to bursts of other load on a shared machine) and the mean; the table gives the median over "
        f"{args.repeats} runs of each. {os.cpu_count()} CPU cores, {threads} torch thread(s), precision {args.precision}, "
        f"torch {torch.__version__}, Python {platform.python_version()}. The last column is the last step's training "
        "loss of the last run: equal within a system's noise when both did the same work.",
        "",
        "| task | system | median step (ms) | mean step (ms) | vs the loop run beside it, per repeat | vs loop (geometric mean) | last loss |",
        "|---|---|---:|---:|---|---:|---:|",
        *rows,
        "",
        "- text: all-MiniLM-L6-v2, batches of 32 x 64 random tokens; vision: timm `resnet18` (random weights), "
        "batches of 128 x 3 x 32 x 32 random images.",
        "- ptft includes everything a user's run does per step: the recipe's CSV logger, learning-rate monitor, "
        "training metrics, progress bar and callbacks.",
    ])


if __name__ == "__main__":
    main()
