"""Model soups (Wortsman et al., 2022): one model whose weights are the mean of several fine-tuned checkpoints'.

A soup costs one model at inference, where an ensemble costs N. Its ingredients must be fine-tuned from the same
pretrained weights, with one architecture and one label order (different seeds, few-shot subsets or
hyperparameters): only then do their weights lie close enough for the mean to be a good model. Keys, shapes, module
class and labels are checked; a common pretrained start cannot be checked from the weights, and a soup of unrelated
fine-tunes scores near chance (give ``--config`` to ``ptft soup --method uniform`` to see its held-out score).

* **uniform**: the mean of every ingredient.
* **greedy**: the ingredients sorted by held-out score, best first; each joins the soup when the soup's held-out
  score does not drop. It never scores below its best ingredient on the held-out data, since it starts from it.

The held-out data is the recipe's validation split (``val_file``, or ``val_fraction`` of training held out with the
data seed), scored by the task's checkpoint metric (``val/acc`` for classifiers). It must be held out from every
ingredient's training: give a validation file (or the same data seed) when the ingredients trained with
different seeds, or each one's held-out rows were another's training rows.

Every floating-point tensor is averaged, BatchNorm running means and variances included (as in the paper; they are
not re-estimated on data); integer buffers (BatchNorm's ``num_batches_tracked``) are the first ingredient's. The
soup is written as a ptft checkpoint that ``load_checkpoint``, ``ptft test --ckpt_path`` and ``ptft export`` read;
it carries no optimizer state (it lies on no run's trajectory), so it does not resume training.

    ptft soup --method greedy --config recipes/text/sst2.yaml --checkpoints a.ckpt b.ckpt c.ckpt --output soup.ckpt
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import lightning as L
import torch
from torch.optim.swa_utils import get_swa_multi_avg_fn

from ptft.core.data import FineTuneDataModule
from ptft.core.errors import PtftError
from ptft.core.module import FineTuneModule, load_checkpoint, read_checkpoint

__all__ = ["HeldOutScore", "Soup", "greedy_soup", "soup_command", "uniform_soup"]

#: Checkpoint entries of one training run that a soup does not inherit from its first ingredient.
RUN_STATE = ("optimizer_states", "lr_schedulers", "callbacks")
_running_mean = get_swa_multi_avg_fn()  # SWA's running mean: mean_{n+1} = lerp(mean_n, x, 1 / (n + 1)), in place


def check_ingredient(first: dict[str, Any], first_path: str, other: dict[str, Any], path: str) -> None:
    """One-line error when ``other`` cannot be averaged with ``first``: another module class, label order, weight
    names or shapes."""
    same = "soups need one architecture"
    if other.get("ptft_module") != first.get("ptft_module"):
        raise PtftError(f"{path} is a {other.get('ptft_module')}, {first_path} a {first.get('ptft_module')}: {same}")
    labels = [c.get("hyper_parameters", {}).get("label_names") for c in (first, other)]
    if labels[0] != labels[1]:
        raise PtftError(f"{path} has labels {labels[1]}, {first_path} has {labels[0]}: soup ingredients share one label order")
    a, b = first["state_dict"], other["state_dict"]
    differ = sorted(set(a) ^ set(b))
    if differ:
        more = f" and {len(differ) - 1} more" if len(differ) > 1 else ""
        raise PtftError(f"{path} and {first_path} have different weights ({differ[0]!r}{more}): {same}")
    for key, value in a.items():
        if b[key].shape != value.shape:
            raise PtftError(f"{key} is {tuple(b[key].shape)} in {path} but {tuple(value.shape)} in {first_path}: {same}")


def start_soup(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A soup of one ingredient: its tensors, floating-point ones in at least float32 (bf16 means drift otherwise)."""
    return {
        k: v.to(torch.promote_types(v.dtype, torch.float32)) if v.is_floating_point() else v for k, v in state.items()
    }


def add_ingredient(
    soup: dict[str, torch.Tensor], count: int, state: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """The soup of ``count`` ingredients with ``state`` added, as new tensors (``soup`` is kept for greedy's undo).

    Floating-point tensors (weights, BatchNorm running statistics) take the running mean; integer buffers
    (``num_batches_tracked``) stay the first ingredient's. N copies of one checkpoint give it back exactly.
    """
    keys = [k for k, v in soup.items() if v.is_floating_point()]
    mean = [soup[k].clone() for k in keys]
    _running_mean(mean, [state[k].to(soup[k].dtype) for k in keys], count)
    return {**soup, **dict(zip(keys, mean))}


def soup_checkpoint(template: dict[str, Any], soup: dict[str, torch.Tensor], info: dict[str, Any]) -> dict[str, Any]:
    """``template`` (an ingredient's checkpoint) with the soup's weights in the ingredient's dtypes, without its run
    state (optimizer, schedulers, callbacks), and ``ptft_soup``: how the soup was made."""
    checkpoint = {k: v for k, v in template.items() if k not in RUN_STATE}
    checkpoint["state_dict"] = {k: v.to(template["state_dict"][k].dtype) for k, v in soup.items()}
    checkpoint["ptft_soup"] = info
    return checkpoint


class HeldOutScore:
    """The held-out score of weights: the task's checkpoint metric (``val/acc`` for classifiers, ``val/loss``
    otherwise) of ``module`` with those weights, on the validation split of ``data``, by Lightning's ``validate``.

    Args:
        module: A module of the ingredients' class (e.g. the first ingredient, loaded); its weights are replaced.
        data: The data module whose validation split is held out from every ingredient's training.
        accelerator: Lightning accelerator (one device).
    """

    def __init__(self, module: FineTuneModule, data: FineTuneDataModule, accelerator: str = "auto") -> None:
        self.module = module
        self.data = data
        self.metric, self.mode = module.checkpoint_monitor
        self.trainer = L.Trainer(
            accelerator=accelerator, devices=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
            enable_model_summary=False,
        )

    def __call__(self, state: dict[str, torch.Tensor]) -> float:
        self.module.load_state_dict(state, strict=self.module.strict_loading)
        metrics = self.trainer.validate(self.module, datamodule=self.data, verbose=False)[0]
        if self.metric not in metrics:
            raise PtftError(f"validation logged no {self.metric} (it logged {sorted(metrics)}): cannot score soups")
        return float(metrics[self.metric])

    def at_least(self, score: float, reference: float) -> bool:
        """Whether ``score`` is as good as ``reference`` or better."""
        return score >= reference if self.mode == "max" else score <= reference


@dataclass
class Soup:
    """A soup and how it was made.

    Attributes:
        checkpoint: The soup as a ptft checkpoint dict (``torch.save`` it, or :meth:`save`).
        ingredients: The checkpoints in the soup, in the order they were added.
        scores: Held-out score of every candidate checkpoint (empty without held-out data).
        score: The soup's held-out score, or ``None`` without held-out data.
        metric: The metric of the scores.
    """

    checkpoint: dict[str, Any]
    ingredients: list[str]
    scores: dict[str, float] = field(default_factory=dict)
    score: float | None = None
    metric: str | None = None

    def save(self, path: str) -> None:
        """Writes the soup as a ``.ckpt`` file."""
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        torch.save(self.checkpoint, path)


def _info(method: str, ingredients: list[str], score: float | None, metric: str | None) -> dict[str, Any]:
    info: dict[str, Any] = {"method": method, "ingredients": [str(p) for p in ingredients]}
    if score is not None:
        info["held_out"] = {metric: score}
    return info


def uniform_soup(checkpoints: list[str]) -> Soup:
    """The mean of the weights of ``checkpoints`` (read one at a time: the memory of two models)."""
    if not checkpoints:
        raise PtftError("give the checkpoints to average: --checkpoints a.ckpt b.ckpt ...")
    first = read_checkpoint(checkpoints[0])
    soup = start_soup(first["state_dict"])
    for count, path in enumerate(checkpoints[1:], start=1):
        other = read_checkpoint(path)
        check_ingredient(first, checkpoints[0], other, path)
        soup = add_ingredient(soup, count, other["state_dict"])
    return Soup(soup_checkpoint(first, soup, _info("uniform", checkpoints, None, None)), list(checkpoints))


def score_checkpoints(checkpoints: list[str], score: HeldOutScore) -> dict[str, float]:
    """The held-out score of every checkpoint, checked against the first."""
    first = read_checkpoint(checkpoints[0])
    scores = {}
    for path in checkpoints:
        checkpoint = read_checkpoint(path)
        check_ingredient(first, checkpoints[0], checkpoint, path)
        scores[path] = score(checkpoint["state_dict"])
    return scores


def greedy_soup(checkpoints: list[str], data: FineTuneDataModule, accelerator: str = "auto") -> Soup:
    """Wortsman et al.'s greedy soup: candidates sorted by held-out score, each added when the soup's held-out score
    does not drop (ties join, as in the paper).

    Args:
        checkpoints: Candidate checkpoints of one architecture, fine-tuned from the same pretrained weights.
        data: The data module whose validation split scores the candidates and decides the order.
        accelerator: Lightning accelerator for the held-out evaluations (one device).
    """
    if not checkpoints:
        raise PtftError("give the candidate checkpoints: --checkpoints a.ckpt b.ckpt ...")
    score = HeldOutScore(load_checkpoint(checkpoints[0]), data, accelerator)
    scores = score_checkpoints(checkpoints, score)
    order = sorted(checkpoints, key=scores.__getitem__, reverse=score.mode == "max")  # stable: ties keep given order
    best = read_checkpoint(order[0])
    soup, soup_score, kept = start_soup(best["state_dict"]), scores[order[0]], [order[0]]
    for path in order[1:]:
        candidate = add_ingredient(soup, len(kept), read_checkpoint(path)["state_dict"])
        candidate_score = score(candidate)
        if score.at_least(candidate_score, soup_score):
            soup, soup_score = candidate, candidate_score
            kept.append(path)
    info = _info("greedy", kept, soup_score, score.metric)
    return Soup(soup_checkpoint(best, soup, info), kept, scores, soup_score, score.metric)


def soup_command(args: list[str]) -> Soup:
    """``ptft soup --checkpoints A.ckpt B.ckpt ... [--method uniform|greedy] [--config RECIPE] --output soup.ckpt``:
    averages fine-tuned checkpoints' weights into one checkpoint. ``greedy`` needs ``--config``: the recipe's
    validation split is the held-out data (other options such as ``--data.init_args.val_file=...`` go to the
    recipe); with ``uniform`` it is optional and scores the soup and its ingredients.
    """
    parser = argparse.ArgumentParser(prog="ptft soup", description=soup_command.__doc__)
    parser.add_argument("--checkpoints", nargs="+", required=True, help="fine-tuned ptft checkpoints (.ckpt)")
    parser.add_argument("--method", default="uniform", choices=["uniform", "greedy"],
                        help="uniform: mean of all; greedy: add by held-out score while it does not drop")
    parser.add_argument("--output", required=True, help="the soup's checkpoint (.ckpt)")
    own, rest = parser.parse_known_args(args)
    method: Literal["uniform", "greedy"] = own.method
    from ptft.transfer.ensemble import data_from_config, has_config

    if method == "greedy" and not has_config(rest):
        raise PtftError("a greedy soup needs held-out data: add --config RECIPE (its validation split scores the soup)")
    if rest and not has_config(rest):
        raise PtftError(f"unrecognised arguments {rest}: recipe options need the recipe, --config RECIPE")
    data = data_from_config(rest) if has_config(rest) else None
    if method == "greedy":
        soup = greedy_soup(own.checkpoints, data)
    else:
        soup = uniform_soup(own.checkpoints)
        if data is not None:
            score = HeldOutScore(load_checkpoint(own.checkpoints[0]), data)
            soup.scores = score_checkpoints(own.checkpoints, score)
            soup.score, soup.metric = score(soup.checkpoint["state_dict"]), score.metric
            soup.checkpoint["ptft_soup"] = _info("uniform", own.checkpoints, soup.score, soup.metric)
    soup.save(own.output)
    if soup.scores:
        print(f"held-out {soup.metric} (validation split of the config):")
        for path, value in soup.scores.items():
            print(f"  {value:.4f}  {path}{'  (in the soup)' if path in soup.ingredients else ''}")
        print(f"  {soup.score:.4f}  {method} soup of {len(soup.ingredients)}")
    print(f"wrote the {method} soup of {len(soup.ingredients)} checkpoint(s) to {own.output}")
    return soup
