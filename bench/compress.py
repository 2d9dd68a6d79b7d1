"""Compression of a fine-tuned MiniLM-L6 on SST-2: dynamic int8 (PyTorch), 50% pruning with and without recovery,
ONNX fp32 and int8 (onnxruntime), side by side: size on disk, CPU latency, dev accuracy, agreement with fp32.

1. fp32: the checkpoint (default: bench/distill_sst2.py's teacher, all-MiniLM-L6-v2 fine-tuned on SST-2).
2. int8 dynamic: :func:`ptft.compress.quantize_dynamic_int8` (torch.ao, per-channel int8 Linear weights).
3. pruned: ``--amount`` of every encoder Linear's weights zeroed by magnitude at once (:func:`ptft.compress.prune_module`),
   then the same pruning by the :class:`ptft.compress.Pruning` callback (``epochs: 1``: pruned at the first step)
   followed by ``--recover-steps`` steps of recipes/text/sst2.yaml on that many batches of shuffled SST-2 training
   sentences (one epoch). Its size is also given zipped: what unstructured sparsity buys on disk.
4. ONNX fp32 / int8: ``ptft export --format onnx-int8``'s files (:mod:`ptft.compress.onnx`), run by onnxruntime.

Inference: the model alone (no data loading) on the 872 SST-2 dev sentences in batches of 32 padded to their longest;
every model in one process, interleaved, the median of ``--repeats`` passes; torch threads and onnxruntime intra-op
threads = every core. Run the real measurement on a quiet machine.

    python bench/compress.py [--checkpoint bench/.work/distill/teacher.ckpt] [--amount 0.5] [--recover-steps 300]
                             [--repeats 5] [--threads N]
    python bench/compress.py --limit 64 --recover-steps 4 --repeats 1 --no-write     # smoke test

Writes docs/benchmarks.md section "Compression: MiniLM-L6 on SST-2" (not with ``--limit`` or ``--no-write``).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import statistics
import sys
import time
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))
from _common import REPO, SST2, WORK, sst2_subset, write_section

OUT = WORK / "compress"
TITLE = "Compression: MiniLM-L6 on SST-2"
BATCH_SIZE = 32
QUIET = ["--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false", "--trainer.logger=false",
         "--trainer.enable_checkpointing=false", "--trainer.num_sanity_val_steps=0", "--trainer.limit_val_batches=0"]


def dev_set(tokenizer: Any, limit: int | None) -> tuple[list[dict], list[int]]:
    """SST-2 dev in batches of 32 (padded to their longest, at most 128 tokens), and its labels."""
    rows = [line.split("\t", 1) for line in (SST2 / "dev.tsv").read_text().splitlines()[1:]][:limit]
    sentences, labels = [r[1] for r in rows], [int(r[0]) for r in rows]
    batches = [dict(tokenizer(sentences[i:i + BATCH_SIZE], padding=True, truncation=True, max_length=128,
                              return_tensors="pt")) for i in range(0, len(sentences), BATCH_SIZE)]
    return batches, labels


def recover(checkpoint: Path, amount: float, steps: int, target: Path) -> dict:
    """Fine-tunes ``checkpoint`` for ``steps`` steps with the Pruning callback (pruned at the first step); saves
    ``target``; returns the training seconds and precision."""
    from lightning.pytorch.callbacks import LearningRateMonitor

    from ptft.cli import run_cli
    from ptft.compress import Pruning

    train = sst2_subset(SST2, steps * BATCH_SIZE)  # one epoch of exactly ``steps`` batches
    sys.argv = ["ptft"]
    cli = run_cli(["--config", str(REPO / "recipes/text/sst2.yaml"), f"--model.init_args.model_name={checkpoint}",
                   f"--data.init_args.train_file={train}", f"--data.init_args.val_file={SST2 / 'dev.tsv'}",
                   f"--data.init_args.batch_size={BATCH_SIZE}", "--trainer.max_epochs=1",
                   f"--trainer.max_steps={steps}", "--seed_everything=0", *QUIET], run=False)
    cli.trainer.callbacks[:] = [c for c in cli.trainer.callbacks if not isinstance(c, LearningRateMonitor)]
    cli.trainer.callbacks.append(Pruning(amount=amount, epochs=1))
    start = time.perf_counter()
    cli.trainer.fit(cli.model, cli.datamodule)
    seconds = time.perf_counter() - start
    target.parent.mkdir(parents=True, exist_ok=True)
    cli.trainer.save_checkpoint(target)
    return {"seconds": seconds, "precision": str(cli.trainer.precision), "train_sentences": steps * BATCH_SIZE}


def torch_runner(module: Any) -> Callable[[dict], Any]:
    import torch

    module.eval()

    def run(batch: dict) -> Any:
        with torch.inference_mode():
            return module(batch).float().numpy()

    return run


def onnx_runner(path: Path, threads: int) -> Callable[[dict], Any]:
    from ptft.compress.onnx import onnx_session

    session = onnx_session(path, threads)
    names = [i.name for i in session.get_inputs()]

    def run(batch: dict) -> Any:
        return session.run(["logits"], {n: batch[n].numpy() for n in names})[0]

    return run


def measure(runners: dict[str, Callable[[dict], Any]], batches: list[dict], repeats: int) -> dict[str, dict]:
    """Predictions of every runner (a first pass, also the warm-up), then the median ms per batch over ``repeats``
    passes with the runners interleaved."""
    import numpy as np

    result = {name: {"preds": np.concatenate([run(b).argmax(-1) for b in batches])} for name, run in runners.items()}
    times: dict[str, list[float]] = {name: [] for name in runners}
    for _ in range(repeats):
        for name, run in runners.items():
            start = time.perf_counter()
            for batch in batches:
                run(batch)
            times[name].append((time.perf_counter() - start) / len(batches))
    for name in runners:
        result[name]["ms"] = 1000 * statistics.median(times[name])
    return result


def megabytes(path: Path) -> float:
    return path.stat().st_size / 2**20


def zipped_megabytes(path: Path) -> float:
    """Size of ``path`` deflated (zip, level 6): zeros compress, dense weights hardly."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED, compresslevel=6) as archive:
        archive.write(path, path.name)
    return len(buffer.getvalue()) / 2**20


def state_dict_megabytes(module: Any) -> float:
    """Bytes of ``torch.save(state_dict)`` (packed int8 weights): the in-process int8 model is not saved as a file."""
    import torch

    buffer = io.BytesIO()
    torch.save(module.state_dict(), buffer)
    return len(buffer.getvalue()) / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path, default=WORK / "distill" / "teacher.ckpt",
                        help="a TextClassifier fine-tuned on SST-2 (bench/distill_sst2.py writes the default)")
    parser.add_argument("--amount", type=float, default=0.5, help="fraction of encoder Linear weights pruned")
    parser.add_argument("--recover-steps", type=int, default=300, help="fine-tuning steps after pruning")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--limit", type=int, default=None, help="only the first N dev sentences (smoke test; no docs)")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                        help="torch threads while training (1 on a busy machine); inference uses every core")
    parser.add_argument("--no-write", action="store_true", help="print the table only, leave docs/benchmarks.md")
    args = parser.parse_args()
    if not args.checkpoint.is_file():
        raise SystemExit(f"{args.checkpoint} not found: run bench/distill_sst2.py first or pass --checkpoint")
    os.environ.update(HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    import numpy as np
    import torch

    from ptft.compress import export_onnx, prune_module, quantize_dynamic_int8, quantize_onnx_int8, sparsity
    from ptft.core.module import load_checkpoint

    OUT.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(args.threads)
    fp32 = load_checkpoint(str(args.checkpoint)).eval()
    batches, labels = dev_set(fp32.find_processor(), args.limit)
    gold = np.array(labels)

    # Pruning: one-shot (accuracy before recovery), then the callback's pruning + recovery, reused when unchanged.
    one_shot = prune_module(load_checkpoint(str(args.checkpoint)).eval(), args.amount)
    pruned_ckpt = OUT / f"pruned{args.amount:g}-{args.recover_steps}steps.ckpt"
    record = OUT / "recovery.json"
    key = {"checkpoint": str(args.checkpoint.resolve()), "amount": args.amount, "recover_steps": args.recover_steps,
           "mtime": args.checkpoint.stat().st_mtime}
    saved = json.loads(record.read_text()) if record.exists() else {}
    if saved.get("key") != key or not pruned_ckpt.exists():
        saved = {"key": key, **recover(args.checkpoint, args.amount, args.recover_steps, pruned_ckpt)}
        record.write_text(json.dumps(saved, indent=1))
    recovered = load_checkpoint(str(pruned_ckpt)).eval()
    print(f"pruned: sparsity {sparsity(one_shot):.3f} one-shot, {sparsity(recovered):.3f} after "
          f"{args.recover_steps} steps ({saved['seconds']:.0f} s)", flush=True)

    # Files: safetensors (ptft export), ONNX fp32 and int8 (ptft export --format onnx-int8's functions).
    fp32.export(str(OUT / "fp32"))
    recovered.export(str(OUT / "pruned"))
    onnx_path = export_onnx(fp32, batches[0], OUT / "onnx" / "model.onnx")
    int8_path = quantize_onnx_int8(onnx_path, OUT / "onnx" / "model.int8.onnx")
    int8 = quantize_dynamic_int8(fp32)

    threads = os.cpu_count() or 1
    torch.set_num_threads(threads)
    runners = {
        "fp32 (PyTorch)": torch_runner(fp32),
        "int8 dynamic (PyTorch)": torch_runner(int8),
        f"{args.amount:.0%} pruned, no recovery": torch_runner(one_shot),
        f"{args.amount:.0%} pruned + {args.recover_steps} steps": torch_runner(recovered),
        "ONNX fp32 (onnxruntime)": onnx_runner(onnx_path, threads),
        "ONNX int8 (onnxruntime)": onnx_runner(int8_path, threads),
    }
    results = measure(runners, batches, args.repeats)
    fp32_safetensors = OUT / "fp32" / "model.safetensors"
    pruned_safetensors = OUT / "pruned" / "model.safetensors"
    sizes = {
        "fp32 (PyTorch)": f"{megabytes(fp32_safetensors):.1f} (zip {zipped_megabytes(fp32_safetensors):.1f})",
        "int8 dynamic (PyTorch)": f"{state_dict_megabytes(int8):.1f} (not a file*)",
        f"{args.amount:.0%} pruned, no recovery": "as below",
        f"{args.amount:.0%} pruned + {args.recover_steps} steps":
            f"{megabytes(pruned_safetensors):.1f} (zip {zipped_megabytes(pruned_safetensors):.1f})",
        "ONNX fp32 (onnxruntime)": f"{megabytes(onnx_path):.1f}",
        "ONNX int8 (onnxruntime)": f"{megabytes(int8_path):.1f}",
    }
    reference = results["fp32 (PyTorch)"]
    lines = [
        "", "",
        (f"`python bench/compress.py --amount {args.amount:g} --recover-steps {args.recover_steps} --repeats "
         f"{args.repeats}{f' --limit {args.limit}' if args.limit else ''}` — {args.checkpoint.name}: all-MiniLM-L6-v2 "
         "fine-tuned on SST-2 (bench/distill_sst2.py's teacher). int8 dynamic: `ptft.compress.quantize_dynamic_int8` "
         "(torch.ao, per-channel int8 Linear weights, activations per batch). Pruned: "
         f"{args.amount:.0%} of every encoder Linear's weights by magnitude (head and embeddings dense); "
         f"\"no recovery\" = `prune_module` at once; recovered = the `Pruning` callback then {args.recover_steps} "
         f"steps of recipes/text/sst2.yaml on {saved['train_sentences']:,} shuffled SST-2 training sentences "
         f"({saved['seconds']:.0f} s, {saved['precision']}). ONNX: `ptft export --format onnx-int8`'s files "
         "(dynamo exporter; int8 = onnxruntime `quantize_dynamic`, per-channel). Size: safetensors / ONNX file, "
         "zipped in brackets (unstructured zeros are still stored densely: only compression or sparse storage "
         "shrinks them). Latency: the model alone on "
         f"{len(gold)} SST-2 dev sentences in batches of {BATCH_SIZE} padded to their longest, ms per batch, median "
         f"of {args.repeats} passes, every model interleaved in one process, {threads} CPU cores (torch threads = "
         "onnxruntime intra-op threads). * the in-process int8 model is rebuilt from the fp32 checkpoint "
         "(`torch.save` of its state dict measured; loading it needs an unsafe full unpickle)."),
        "",
        "| model | size MB | ms / batch of 32 | speed vs fp32 | dev acc | same class as fp32 |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name, result in results.items():
        lines.append(
            f"| {name} | {sizes[name]} | {result['ms']:.0f} | {reference['ms'] / result['ms']:.2f}x | "
            f"{(result['preds'] == gold).mean():.4f} | {(result['preds'] == reference['preds']).mean():.1%} |")
    table = "\n".join(lines)
    print(table)
    (OUT / "results.md").write_text(table + "\n")
    if args.no_write or args.limit:
        print("(docs/benchmarks.md left as it is: --no-write or --limit)")
    else:
        write_section(table + "\n", TITLE)


if __name__ == "__main__":
    main()
