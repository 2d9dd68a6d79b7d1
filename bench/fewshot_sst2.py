"""Few-shot SST-2: single models over seeds, their prediction ensemble, and uniform and greedy model soups.

all-MiniLM-L6-v2 fine-tuned with recipes/text/sst2-fewshot.yaml (fp32, its other settings unchanged) on k = 8, 16, 64
training sentences per class; one run per seed, the seed drawing both the k-shot subset and the head's
initialisation. Per k, on SST-2 dev (872 sentences):

- single: the mean ± standard deviation of dev accuracy over the seeds (the weights after the recipe's 100 steps,
  no selection);
- ensemble: the mean of the seeds' class probabilities (``ptft ensemble``);
- uniform soup: the mean of the seeds' weights (``ptft soup --method uniform``);
- greedy soup: ``ptft soup --method greedy``, its order and ingredients decided on a held-out slice of SST-2 *train*
  (``HELD_OUT`` sentences drawn with a fixed seed and removed from the pool the k-shot subsets come from), never on dev.

Dev is used only for the reported numbers: no run validates or selects on it.

    python bench/fewshot_sst2.py [--ks 8 16 64] [--seeds 0 1 2]

Prints the table and writes docs/benchmarks.md (section "Few-shot: SST-2 with seeds, ensembles and soups").
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _common import REPO, SST2, WORK, model_dir, write_section  # noqa: E402

RECIPE = REPO / "recipes/text/sst2-fewshot.yaml"
TITLE = "Few-shot: SST-2 with seeds, ensembles and soups"
HELD_OUT = 500
QUIET = ["--trainer.logger=false", "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false",
         "--trainer.enable_checkpointing=false", "--trainer.callbacks=[]", "--trainer.num_sanity_val_steps=0",
         "--trainer.precision=32-true"]


def split_train(data: Path) -> tuple[Path, Path]:
    """SST-2 train without a held-out slice (the pool k-shot subsets are drawn from), and the slice, as TSVs."""
    header, *rows = (data / "train.tsv").read_text().splitlines()
    random.Random(0).shuffle(rows)
    WORK.mkdir(parents=True, exist_ok=True)
    pool, held_out = WORK / "sst2-fewshot-pool.tsv", WORK / f"sst2-fewshot-heldout-{HELD_OUT}.tsv"
    held_out.write_text("\n".join([header, *rows[:HELD_OUT]]) + "\n")
    pool.write_text("\n".join([header, *rows[HELD_OUT:]]) + "\n")
    return pool, held_out


def data_args(pool: Path, held_out: Path, k: int) -> list[str]:
    return [f"--data.init_args.train_file={pool}", f"--data.init_args.val_file={held_out}",
            f"--data.init_args.test_file={SST2 / 'dev.tsv'}", f"--data.init_args.train_per_class={k}"]


def fine_tune(data: list[str], seed: int, path: Path) -> float:
    """One run of the recipe, its last weights saved to ``path``; the seconds it took."""
    from ptft.cli import run_cli

    sys.argv = ["ptft"]
    # No validation during training: the reported model is the last one, chosen by nothing.
    cli = run_cli(["--config", str(RECIPE), *data, *QUIET, f"--model.init_args.model_name={model_dir()}",
                   f"--seed_everything={seed}", "--trainer.limit_val_batches=0"], run=False)
    start = time.perf_counter()
    cli.trainer.fit(cli.model, cli.datamodule)
    cli.trainer.save_checkpoint(path)
    return time.perf_counter() - start


def dev_accuracy(state: dict, template: str, data) -> float:
    """Dev accuracy of weights ``state`` in the module of checkpoint ``template``."""
    from ptft.core.module import load_checkpoint
    from ptft.transfer.ensemble import predict_probs, split_loader

    module = load_checkpoint(template)
    module.load_state_dict(state)
    probs, labels = predict_probs(module, split_loader(data, "test", module))
    return (probs.argmax(-1) == labels).float().mean().item()


def run_k(k: int, seeds: list[int], pool: Path, held_out: Path) -> dict:
    from ptft.transfer.ensemble import data_from_config, ensemble_predictions
    from ptft.transfer.soup import greedy_soup, uniform_soup

    data = data_args(pool, held_out, k)
    folder = WORK / "fewshot"
    folder.mkdir(parents=True, exist_ok=True)
    checkpoints, seconds = [], []
    for seed in seeds:
        path = folder / f"k{k}-seed{seed}.ckpt"
        seconds.append(fine_tune(data, seed, path))
        checkpoints.append(str(path))
    config = ["--config", str(RECIPE), *data]
    dev = data_from_config(config)
    ensemble = ensemble_predictions(checkpoints, dev, "test")
    singles = [ensemble.accuracy(p) for p in ensemble.member_probs]
    uniform = uniform_soup(checkpoints)
    greedy = greedy_soup(checkpoints, data_from_config(config))  # ordered on the held-out slice (val_file)
    result = {
        "k": k, "seeds": seeds, "single": singles, "ensemble": ensemble.accuracy(),
        "uniform": dev_accuracy(uniform.checkpoint["state_dict"], checkpoints[0], dev),
        "greedy": dev_accuracy(greedy.checkpoint["state_dict"], checkpoints[0], dev),
        "greedy_ingredients": len(greedy.ingredients), "held_out": {Path(p).stem: s for p, s in greedy.scores.items()},
        "greedy_held_out": greedy.score, "fit_seconds": seconds,
    }
    print(f"RESULT {result}", flush=True)
    return result


def render(results: list[dict], seeds: list[int]) -> str:
    rows = [
        "| k per class (train sentences) | single model, mean ± std | ensemble | uniform soup | greedy soup "
        "(ingredients) |",
        "|---|---|---|---|---|",
    ]
    for r in results:
        single = f"{statistics.mean(r['single']):.3f} ± {statistics.stdev(r['single']):.3f}" if len(r["single"]) > 1 \
            else f"{r['single'][0]:.3f}"
        rows.append(f"| {r['k']} ({2 * r['k']}) | {single} | {r['ensemble']:.3f} | {r['uniform']:.3f} | "
                    f"{r['greedy']:.3f} ({r['greedy_ingredients']} of {len(r['single'])}) |")
    return (
        f"\n\nSST-2 dev accuracy (872 sentences) of all-MiniLM-L6-v2 fine-tuned with `recipes/text/sst2-fewshot.yaml` "
        f"(fp32) on k training sentences per class, seeds {', '.join(map(str, seeds))} (each seed draws the subset and "
        "the head's initialisation); the weights after the recipe's 100 steps, no selection on dev. The ensemble "
        "averages the seeds' class probabilities; the uniform soup averages their weights; the greedy soup adds them "
        "best first while "
        f"the accuracy on a held-out slice of SST-2 *train* ({HELD_OUT} sentences, removed from the pool the subsets "
        "are drawn from) does not drop. Measured by `python bench/fewshot_sst2.py`.\n\n" + "\n".join(rows) + "\n"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ks", type=int, nargs="+", default=[8, 16, 64])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--no-write", action="store_true", help="print the table without updating docs/benchmarks.md")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    args = parser.parse_args()
    import torch

    # On a shared machine a second intra-op thread mostly spin-waits for a core (tests/conftest.py measured ~20x
    # slower steps under load); batches of 8 short sentences gain little from it anyway.
    torch.set_num_threads(args.threads)
    if not (SST2 / "dev.tsv").exists():
        raise SystemExit(f"SST-2 not found in {SST2} (train.tsv, dev.tsv)")
    pool, held_out = split_train(SST2)
    results = [run_k(k, args.seeds, pool, held_out) for k in args.ks]
    section = render(results, args.seeds)
    print(section)
    if not args.no_write:
        write_section(section, TITLE)


if __name__ == "__main__":
    main()
