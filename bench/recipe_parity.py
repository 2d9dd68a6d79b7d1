"""Recipe parity: each shipped recipe against the tool its users would otherwise pick, side by side, several seeds.

For every task with data here, ptft's shipped recipe (only the data paths, the model, the epochs and, where noted,
the batch size overridden) runs against a reference with its own defaults, on the same model, data, epochs and batch
size, one after the other in one invocation and interleaved by seed (the machine is noisy: compare ratios):

- ``sst2``: recipes/text/sst2.yaml vs Hugging Face Trainer with ``run_glue``'s defaults — all-MiniLM-L6-v2,
  a shuffled SST-2 training subset, 1 epoch, batch 32; dev accuracy on SST-2 dev (872 sentences).
- ``wnut17``: recipes/text/ner.yaml vs HF Trainer with ``run_ner``'s defaults — all-MiniLM-L6-v2, WNUT-17
  ``train.conll`` (3,394 sentences), 3 epochs, batch 32; seqeval entity F1 on ``dev.conll`` (1,009 sentences).
  ``ptft_grouped`` is the recipe with ``group_by_length: true`` (does length grouping cost accuracy on NER?),
  ``ptft_noclip`` the recipe without gradient clipping (what the recipe shipped before this benchmark).
- ``cifar10``: recipes/vision/cifar10.yaml vs a plain loop with timm ``train.py``'s defaults — timm ``resnet10t``
  pre-trained here on CIFAR-10 classes 0-4 (the hub's ImageNet weights are out of reach offline), fine-tuned on
  classes 5-9 (a per-class training subset), batch 128; accuracy on 200 test images per class.
- ``qa``, ``seq2seq``, ``sft`` (generated data, tiny randomly initialised models; bench/parity_generated.py): the
  recipes against HF Trainer with the example scripts' defaults, so that a regression in their defaults shows too.

Training samples/s exclude tokenisation and evaluation for every system; the metric is the last epoch's.

    python bench/recipe_parity.py [--tasks sst2 wnut17 cifar10 qa seq2seq sft] [--seeds 0 1 2]

Each finished run is stored as JSON in bench/results/parity/ (tracked in git, so the table can be rebuilt and extended
on another machine; ``--fresh`` reruns, ``--render`` only rebuilds the table); prints the table and writes it to
docs/benchmarks.md (section "Recipe parity"). Rows of tasks with no stored run are kept from the current section.
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
from _common import REPO, SST2, WORK, TrainTimer, model_dir, run_in_subprocess, sst2_subset, write_section  # noqa: E402

WNUT = REPO.parent / "shared" / "data" / "wnut17"
CIFAR10 = REPO.parent / "shared" / "data" / "cifar10" / "cifar10-jpg.zip"
CACHE = REPO / "bench" / "results" / "parity"  # tracked: the raw numbers behind the table
QUIET = ["--trainer.num_sanity_val_steps=0", "--trainer.enable_progress_bar=false", "--trainer.logger=false",
         "--trainer.enable_checkpointing=false", "--trainer.callbacks=[]", "--trainer.enable_model_summary=false"]

SST2_SIZE, SST2_EPOCHS = 4000, 1
NER_EPOCHS = 3
CIFAR_MODEL, CIFAR_PER_CLASS, CIFAR_EPOCHS, CIFAR_PRETRAIN_STEPS = "resnet10t", 200, 10, 400

# task -> (metric, {system: description}, higher is better); "ptft" is the shipped recipe, "ref" the reference
TASKS: dict[str, tuple[str, dict[str, str], bool]] = {
    "sst2": ("dev accuracy", {
        "ptft": "ptft `text/sst2.yaml`",
        "ptft_grouped": "ptft `text/sst2.yaml`, `group_by_length: true`",
        "ptft_auto": "ptft `text/sst2.yaml`, the recipe's `precision: auto`",
        "ref": "HF Trainer, `run_glue` defaults",
    }, True),
    "wnut17": ("dev entity F1", {
        "ptft": "ptft `text/ner.yaml`",
        "ptft_grouped": "ptft `text/ner.yaml`, `group_by_length: true`",
        "ptft_noclip": "ptft `text/ner.yaml`, no gradient clipping",
        "ptft_auto": "ptft `text/ner.yaml`, the recipe's `precision: auto`",
        "ref": "HF Trainer, `run_ner` defaults",
    }, True),
    "cifar10": ("test accuracy", {
        "ptft": "ptft `vision/cifar10.yaml`",
        "ref": "timm `train.py` defaults (plain loop)",
    }, True),
}


def ptft_cli(args: list[str]):
    from ptft.cli import run_cli

    sys.argv = ["ptft"]
    return run_cli(args, run=False)


def ptft_fit(args: list[str], metric: str, epochs: int | None = None, precision: str = "32-true") -> dict:
    """Fits a recipe (CLI arguments), timing the training batches; the metric after the last epoch. With ``epochs``,
    trains that many and validates only after the last (as the references evaluate once, at the end).

    ``precision`` is fp32 by default, as the references train (HF Trainer and timm's ``train.py`` enable mixed
    precision only when asked): the recipes' ``precision: auto`` picks bf16-mixed on CPUs with native bf16, which
    would compare bf16 against fp32. The ``ptft_auto`` systems run the recipe's own ``auto``."""
    if epochs is not None:
        args = [*args, f"--trainer.max_epochs={epochs}", f"--trainer.check_val_every_n_epoch={epochs}"]
    cli = ptft_cli([*args, *QUIET, f"--trainer.precision={precision}"])
    timer = TrainTimer()
    cli.trainer.callbacks.append(timer)
    cli.trainer.fit(cli.model, cli.datamodule)
    return {"seconds": timer.seconds, "samples": timer.samples, "metric": cli.trainer.callback_metrics[metric].item(),
            "precision": str(cli.trainer.precision)}


def precision_of(variant: str) -> str:
    return "auto" if variant == "ptft_auto" else "32-true"


# --- SST-2 -----------------------------------------------------------------------------------------------------
def read_tsv(path: Path) -> tuple[list[str], list[int]]:
    _, *rows = path.read_text().splitlines()
    labels, texts = zip(*(row.split("\t", 1) for row in rows))
    return list(texts), [int(x) for x in labels]


def sst2_ptft(seed: int, variant: str) -> dict:
    extra = {"ptft": [], "ptft_auto": [], "ptft_grouped": ["--data.init_args.group_by_length=true"]}[variant]
    train = sst2_subset(SST2, SST2_SIZE, seed=0)
    return ptft_fit(["--config", str(REPO / "recipes/text/sst2.yaml"), f"--model.init_args.model_name={model_dir()}",
                     f"--data.init_args.train_file={train}", f"--data.init_args.val_file={SST2 / 'dev.tsv'}",
                     f"--seed_everything={seed}", f"--trainer.default_root_dir={WORK / 'ptft'}", *extra], "val/acc",
                    SST2_EPOCHS, precision_of(variant))


def hf_args(seed: int, epochs: int, **extra):
    """TrainingArguments at their defaults (what HF's example scripts use), but the shared epochs and batch size."""
    from transformers import TrainingArguments

    return TrainingArguments(output_dir=str(WORK / "hf"), per_device_train_batch_size=32, per_device_eval_batch_size=64,
                             num_train_epochs=epochs, seed=seed, report_to=[], save_strategy="no", eval_strategy="no",
                             logging_strategy="no", disable_tqdm=True, use_cpu=True, **extra)


def hf_train(trainer) -> float:
    start = time.perf_counter()
    trainer.train()
    return time.perf_counter() - start


def sst2_ref(seed: int) -> dict:
    """``run_glue.py`` with its defaults, except dynamic padding (``--pad_to_max_length false``: faster, same result)."""
    import datasets
    import numpy as np
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, Trainer, set_seed

    set_seed(seed)  # run_glue seeds before building the model: the classifier's initialisation follows the seed
    tokenizer = AutoTokenizer.from_pretrained(model_dir())

    def build(path: Path):
        texts, labels = read_tsv(path)
        ds = datasets.Dataset.from_dict({"sentence": texts, "label": labels})
        return ds.map(lambda b: tokenizer(b["sentence"], truncation=True, max_length=128), batched=True,
                      remove_columns=["sentence"])

    train, dev = build(sst2_subset(SST2, SST2_SIZE, seed=0)), build(SST2 / "dev.tsv")
    model = AutoModelForSequenceClassification.from_pretrained(model_dir(), num_labels=2)
    trainer = Trainer(model=model, args=hf_args(seed, SST2_EPOCHS), train_dataset=train, processing_class=tokenizer)
    seconds = hf_train(trainer)
    out = trainer.predict(dev)
    return {"seconds": seconds, "samples": len(train) * SST2_EPOCHS,
            "metric": float((np.argmax(out.predictions, -1) == out.label_ids).mean())}


# --- WNUT-17 NER ---------------------------------------------------------------------------------------------
def ner_ptft(seed: int, variant: str) -> dict:
    extra = {"ptft": [], "ptft_auto": [], "ptft_grouped": ["--data.init_args.group_by_length=true"],
             "ptft_noclip": ["--trainer.gradient_clip_val=null"]}[variant]
    return ptft_fit(["--config", str(REPO / "recipes/text/ner.yaml"), f"--model.init_args.model_name={model_dir()}",
                     f"--data.init_args.train_file={WNUT / 'train.conll'}", f"--data.init_args.val_file={WNUT / 'dev.conll'}",
                     "--data.init_args.test_file=null", f"--seed_everything={seed}",
                     f"--trainer.default_root_dir={WORK / 'ptft'}", *extra], "val/f1", NER_EPOCHS, precision_of(variant))


def read_conll(path: Path) -> tuple[list[list[str]], list[list[str]]]:
    sentences, tags, words, labels = [], [], [], []
    for line in [*path.read_text().splitlines(), ""]:
        if line.strip():
            word, tag = line.split("\t")
            words.append(word)
            labels.append(tag)
        elif words:
            sentences.append(words)
            tags.append(labels)
            words, labels = [], []
    return sentences, tags


def ner_ref(seed: int) -> dict:
    """``run_ner.py`` with its defaults: first sub-token labelled, dynamic padding, seqeval's overall F1."""
    import datasets
    import numpy as np
    from seqeval.metrics import f1_score
    from transformers import AutoModelForTokenClassification, AutoTokenizer, DataCollatorForTokenClassification, Trainer, set_seed

    set_seed(seed)
    tokenizer = AutoTokenizer.from_pretrained(model_dir())
    train_words, train_tags = read_conll(WNUT / "train.conll")
    dev_words, dev_tags = read_conll(WNUT / "dev.conll")
    names = sorted({t for row in train_tags for t in row})
    index = {n: i for i, n in enumerate(names)}

    def build(words, tags):
        enc = tokenizer(words, is_split_into_words=True, truncation=True)
        labels = []
        for i, row in enumerate(tags):
            previous, ids = None, []
            for w in enc.word_ids(i):
                ids.append(-100 if w is None or w == previous else index[row[w]])
                previous = w
            labels.append(ids)
        return datasets.Dataset.from_dict({**enc, "labels": labels})

    train, dev = build(train_words, train_tags), build(dev_words, dev_tags)
    model = AutoModelForTokenClassification.from_pretrained(model_dir(), num_labels=len(names))
    trainer = Trainer(model=model, args=hf_args(seed, NER_EPOCHS), train_dataset=train, processing_class=tokenizer,
                      data_collator=DataCollatorForTokenClassification(tokenizer))
    seconds = hf_train(trainer)
    out = trainer.predict(dev)
    predicted = np.argmax(out.predictions, -1)
    true = [[names[t] for t in row if t != -100] for row in out.label_ids]
    pred = [[names[p] for p, t in zip(prow, trow) if t != -100] for prow, trow in zip(predicted, out.label_ids)]
    return {"seconds": seconds, "samples": len(train) * NER_EPOCHS, "metric": float(f1_score(true, pred))}


# --- CIFAR-10 ------------------------------------------------------------------------------------------------
def cifar_data() -> tuple[dict[str, Path], Path]:
    """Class folders (vision_transfer's split) and a resnet10t backbone pre-trained on classes 0-4 with ptft."""
    import vision_transfer

    folders = vision_transfer.extract(CIFAR10, CIFAR_PER_CLASS)
    out = WORK / f"backbone-{CIFAR_MODEL}-{CIFAR_PRETRAIN_STEPS}"
    if not (out / "model.safetensors").exists():
        print(f"pre-training {CIFAR_MODEL} on CIFAR-10 classes 0-4 ({CIFAR_PRETRAIN_STEPS} steps) ...", flush=True)
        result = vision_transfer.pretrain_supervised(folders, CIFAR_PRETRAIN_STEPS, out, model=CIFAR_MODEL)
        (out / "pretrain.json").write_text(json.dumps(result))
    return folders, out / "model.safetensors"


def cifar_ptft(seed: int, variant: str) -> dict:
    folders, backbone = cifar_data()
    return ptft_fit(["--config", str(REPO / "recipes/vision/cifar10.yaml"), f"--model.init_args.model_name={CIFAR_MODEL}",
                     f"--model.init_args.pretrained_file={backbone}", f"--data.init_args.train={folders['train']}",
                     f"--data.init_args.val={folders['test']}", "--data.init_args.test=null",
                     f"--seed_everything={seed}", f"--trainer.default_root_dir={WORK / 'ptft'}"], "val/acc", CIFAR_EPOCHS)


def cifar_ref(seed: int) -> dict:
    """timm ``train.py``'s defaults as a plain loop (train.py is not part of the timm package): SGD with Nesterov
    momentum 0.9, lr 0.1 x batch / 256, weight decay 2e-5 (not on biases / norms), cosine per epoch with 5 warmup
    epochs from 1e-5, label smoothing 0.1, RandomResizedCrop (0.08-1, random interpolation), flip 0.5, colour jitter
    0.4; evaluation at the full 32 px (``crop_pct 1.0``, as ptft's recipe: timm's 0.875 would crop CIFAR's border)."""
    import timm
    import torch
    from timm.data import create_transform, resolve_data_config
    from timm.loss import LabelSmoothingCrossEntropy
    from timm.optim import create_optimizer_v2
    from timm.scheduler import create_scheduler_v2
    from torchvision.datasets import ImageFolder

    torch.manual_seed(seed)
    folders, backbone = cifar_data()
    from safetensors.torch import load_file

    model = timm.create_model(CIFAR_MODEL, num_classes=5)
    missing, unexpected = model.load_state_dict(load_file(backbone), strict=False)
    assert not unexpected and set(missing) == {"fc.weight", "fc.bias"}, (missing, unexpected)  # new head only
    config = resolve_data_config({"input_size": (3, 32, 32)}, model=model)
    train_tf = create_transform(32, is_training=True, mean=config["mean"], std=config["std"], interpolation="random",
                                hflip=0.5, color_jitter=0.4, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3))
    eval_tf = create_transform(32, mean=config["mean"], std=config["std"], crop_pct=1.0)
    train, test = ImageFolder(folders["train"], train_tf), ImageFolder(folders["test"], eval_tf)
    batch = 128
    loader = torch.utils.data.DataLoader(train, batch_size=batch, shuffle=True, num_workers=2, drop_last=True,
                                         persistent_workers=True, generator=torch.Generator().manual_seed(seed))
    optimizer = create_optimizer_v2(model, "sgd", lr=0.1 * batch / 256, weight_decay=2e-5, momentum=0.9)
    scheduler, _ = create_scheduler_v2(optimizer, "cosine", num_epochs=CIFAR_EPOCHS, warmup_epochs=5, warmup_lr=1e-5)
    criterion = LabelSmoothingCrossEntropy(0.1)
    seconds, samples = 0.0, 0
    for epoch in range(CIFAR_EPOCHS):
        model.train()
        start = time.perf_counter()
        for images, labels in loader:
            loss = criterion(model(images), labels)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            samples += len(labels)
        seconds += time.perf_counter() - start
        scheduler.step(epoch + 1)
    model.eval()
    correct = 0
    with torch.inference_mode():
        for images, labels in torch.utils.data.DataLoader(test, batch_size=250, num_workers=2):
            correct += (model(images).argmax(-1) == labels).sum().item()
    return {"seconds": seconds, "samples": samples, "metric": correct / len(test)}


RUNNERS = {"sst2": (sst2_ptft, sst2_ref), "wnut17": (ner_ptft, ner_ref), "cifar10": (cifar_ptft, cifar_ref)}


def run_one(task: str, system: str, seed: int) -> dict:
    os.environ.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false", WANDB_MODE="disabled")
    if task in RUNNERS:
        ours, reference = RUNNERS[task]
        return reference(seed) if system == "ref" else ours(seed, system)
    import parity_generated

    return parity_generated.run(task, system, seed)


def all_tasks() -> dict[str, tuple[str, dict[str, str], bool]]:
    import parity_generated

    return {**TASKS, **parity_generated.TASKS}


def available(task: str) -> str | None:
    """Why a task cannot run here (its data is missing), or None."""
    needs = {"sst2": SST2 / "dev.tsv", "wnut17": WNUT / "dev.conll", "cifar10": CIFAR10}
    return f"{needs[task]} not found" if task in needs and not needs[task].exists() else None


def busy_cpu_seconds() -> float:
    """CPU seconds every process on the machine has used (Linux ``/proc/stat``), to tell whether a run had the CPU
    to itself."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + fields[4]  # idle + iowait
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def cpu_name() -> str:
    """The CPU model (``/proc/cpuinfo``), to keep apart runs made on different machines."""
    from ptft.core.precision import _machine

    import torch

    return _machine(torch.device("cpu"))


def speed_of(runs: list[dict]) -> float | None:
    """Mean training samples/s of the runs that had the CPU to themselves (``shared_cpu`` runs count for the metric
    only: another job slowed them)."""
    clean = [r["samples"] / r["seconds"] for r in runs if not r.get("shared_cpu")]
    return statistics.mean(clean) if clean else None


#: Where the rows measured before results were stored in git ran.
EARLIER_MACHINE = "a 2-core AMD EPYC without AVX-512 (no native bf16: `precision: auto` is fp32 there)"


def earlier_rows(task: str) -> list[str]:
    """The rows of ``task`` in the current "Recipe parity" section of docs/benchmarks.md: runs made before results were
    stored in git (or on another machine) stay in the table until the task is rerun here."""
    path = REPO / "docs" / "benchmarks.md"
    section = path.read_text().split("## Recipe parity", 1)[-1].split("\n## ", 1)[0] if path.exists() else ""
    return [line for line in section.splitlines() if line.startswith(f"| {task}: ")]


def mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def main() -> None:
    tasks = all_tasks()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", nargs="+", default=list(tasks), choices=list(tasks))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--systems", nargs="+", help="run only these systems (default: every system of each task)")
    parser.add_argument("--fresh", action="store_true", help="rerun runs stored in bench/results/parity")
    parser.add_argument("--render", action="store_true", help="run nothing: the table from the cached runs")
    parser.add_argument("--one", nargs=3, metavar=("TASK", "SYSTEM", "SEED"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        task, system, seed = args.one
        print("RESULT " + json.dumps(run_one(task, system, int(seed))))
        return

    CACHE.mkdir(parents=True, exist_ok=True)
    wall = time.perf_counter()
    for task in [] if args.render else args.tasks:
        if (why := available(task)) is not None:
            print(f"skipping {task}: {why}", flush=True)
            continue
        systems = [s for s in tasks[task][1] if not args.systems or s in args.systems]
        for seed in args.seeds:
            for system in systems:
                path = CACHE / f"{task}-{system}-seed{seed}.json"
                if path.exists() and not args.fresh:
                    continue
                print(f"{task} {system} seed {seed} ...", flush=True)
                start, busy = time.perf_counter(), busy_cpu_seconds()
                children = os.times().children_user + os.times().children_system
                result = run_in_subprocess(__file__, ["--one", task, system, str(seed)])
                result["wall_seconds"] = time.perf_counter() - start
                ours = os.times().children_user + os.times().children_system - children
                others = (busy_cpu_seconds() - busy - ours) / result["wall_seconds"]
                result["cpu"] = cpu_name()
                result["shared_cpu"] = others > 0.15  # other jobs used > 15% of a core: the time is not clean
                path.write_text(json.dumps(result))
                print(f"    {tasks[task][0]} {result['metric']:.4f}, {result['samples'] / result['seconds']:.1f} "
                      f"samples/s ({result['wall_seconds']:.0f} s{', CPU shared with other jobs' if result['shared_cpu'] else ''})",
                      flush=True)
    print(f"runs took {(time.perf_counter() - wall) / 60:.1f} min", flush=True)
    table = render(tasks, args.seeds)  # every task: the rows of tasks not run now are kept, not dropped
    print(table)
    write_section(table + "\n", "Recipe parity")


def render(tasks: dict[str, tuple[str, dict[str, str], bool]], seeds: list[int]) -> str:
    """The parity table from every cached run of the given seeds."""
    import platform

    import torch

    rows, kept, cpus = [], [], set()
    for task, (metric, systems, higher_better) in tasks.items():
        runs = {s: [json.loads(p.read_text()) for seed in seeds if (p := CACHE / f"{task}-{s}-seed{seed}.json").exists()]
                for s in systems}
        if not runs["ref"] or not runs["ptft"]:
            kept += [task] if (earlier := earlier_rows(task)) else []
            rows += earlier
            continue
        cpus |= {r["cpu"] for rs in runs.values() for r in rs if "cpu" in r}
        ref_mean, ref_std = mean_std([r["metric"] for r in runs["ref"]])
        ref_speed = speed_of(runs["ref"])
        for system, description in systems.items():
            if not runs[system]:
                continue
            precisions = sorted({r.get("precision", "32-true") for r in runs[system]} - {"32-true"})
            if precisions:  # precision auto's choice on this machine
                description = f"{description} -> {', '.join(precisions)}"
            m, s = mean_std([r["metric"] for r in runs[system]])
            speed = speed_of(runs[system])
            at_parity = m >= ref_mean - ref_std if higher_better else m <= ref_mean + ref_std
            verdict = "reference" if system == "ref" else ("yes" if at_parity else "**no**")
            values = ", ".join(f"{r['metric']:.3f}" for r in runs[system])
            ratio = f"{speed / ref_speed:.2f}x" if speed and ref_speed else "n/a"
            rows.append(f"| {task}: {metric} | {description} | {m:.3f} ± {s:.3f} ({values}) | "
                        f"{f'{speed:.1f}' if speed else 'n/a'} | {ratio} | {verdict} |")
    return "\n".join([
        "",
        "",
        f"`python bench/recipe_parity.py --seeds {' '.join(map(str, seeds))}` — each shipped recipe against the tool "
        "its users would otherwise pick, same model, data, epochs and batch size, a task's systems interleaved by "
        f"seed in one invocation; {len(seeds)} seeds each (model-head initialisation, dropout, batch order). Mean ± standard "
        "deviation of the task metric after the last epoch (each seed's value in brackets); training samples/s "
        "exclude tokenisation and evaluation; \"at parity\" = mean >= the reference's mean minus one standard "
        "deviation (<= mean plus one for losses). "
        f"CPU: {os.cpu_count()} cores, fp32 unless a row names another precision, torch {torch.__version__}, "
        f"Python {platform.python_version()}.",
        "",
        "| task | system | metric: mean ± std (per seed) | train samples/s | vs reference | at parity |",
        "|---|---|---|---:|---:|---|",
        *rows,
        "",
        f"- sst2: {SST2_SIZE:,} shuffled SST-2 training sentences, {SST2_EPOCHS} epoch, batch 32, all-MiniLM-L6-v2. The "
        "reference pads each batch to its longest sentence (`run_glue`'s default pads every sentence to 128 "
        "tokens: slower, same accuracy), so its speed is the stronger one.",
        f"- wnut17: all of `train.conll`, {NER_EPOCHS} epochs, batch 32, all-MiniLM-L6-v2; seqeval entity F1 on `dev.conll` "
        "(default matching, as `run_ner`).",
        f"- cifar10: timm `{CIFAR_MODEL}` pre-trained by ptft's `vision/supervised-pretrain.yaml` on CIFAR-10 classes 0-4 "
        f"({CIFAR_PRETRAIN_STEPS} steps of 64 images, once), fine-tuned on {CIFAR_PER_CLASS} training images per class "
        f"of classes 5-9 for {CIFAR_EPOCHS} epochs, batch 128, both from the same backbone; accuracy on 200 test "
        "images per class of classes 5-9. The reference is `train.py`'s defaults in a loop (SGD + Nesterov, "
        "lr 0.05, wd 2e-5, 5 warmup epochs, RandomResizedCrop 0.08-1, label smoothing 0.1), as `--epochs 10`.",
        "- qa, seq2seq, sft: bench/parity_generated.py's docstring (generated data; the random tiny models get the "
        "same higher learning rate on both sides).",
        "- The other rows change one default of the recipe (named in the row): the default it shipped with before "
        "this benchmark, or a probe of one that differs from the reference's.",
        "- Training samples/s only from runs that had the CPU to themselves (the script checks the machine's other "
        "CPU use); `n/a` where none did.",
        *([f"- Machines: {'; '.join(sorted(cpus))} (the runs stored in bench/results/parity)."] if cpus else []),
        *([f"- The {', '.join(kept)} rows are kept from an earlier run on {EARLIER_MACHINE}."] if kept else []),
    ])


if __name__ == "__main__":
    main()
