"""Prediction ensembles: the mean class probabilities of several fine-tuned checkpoints over one data split.

Members are checkpoints of one classification task with one label order: different seeds (few-shot subsets,
initialisations), epochs, or backbones. They read the data through one pipeline, the recipe's data module connected
to the first member (its tokenizer, image transform or feature extractor), so members must share the preprocessing:
backbones with different tokenizers or input normalisation need one ensemble run per pipeline, which is not
supported. Members are loaded one at a time, so an ensemble needs the memory of one model.

    ptft ensemble --config recipes/text/sst2.yaml --checkpoints a.ckpt b.ckpt c.ckpt --split test --output preds.csv
"""

from __future__ import annotations

import argparse
import csv
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.utilities.apply_func import move_data_to_device
from lightning.pytorch.utilities import rank_zero_warn
from torch.utils.data import DataLoader

from ptft.core.data import FineTuneDataModule
from ptft.core.errors import PtftError
from ptft.core.module import FineTuneModule, load_checkpoint

__all__ = ["EnsemblePredictions", "data_from_config", "has_config", "ensemble_command", "ensemble_predictions", "predict_probs"]


def has_config(args: list[str]) -> bool:
    """Whether command-line ``args`` give a ``--config``."""
    return any(a in ("--config", "-c") or a.startswith("--config=") for a in args)


def data_from_config(args: list[str]) -> FineTuneDataModule:
    """The data module of a recipe (``--config`` plus ``--data.*`` and ``--seed_everything`` overrides), built
    without the recipe's model or trainer: the checkpoints are the models. ``seed_everything`` is applied, so the
    held-out split is the one a ``ptft fit`` of the recipe draws."""
    from jsonargparse import ArgumentParser, Namespace

    from ptft.commands import PtftCLI
    from ptft.core.precision import Trainer

    class DataOnlyCLI(PtftCLI):
        def instantiate_classes(self) -> None:
            # The recipe's model would load its pretrained weights for nothing (and needs the hub for a hub name).
            parser = ArgumentParser(exit_on_error=False)
            parser.add_subclass_arguments(FineTuneDataModule, "data", fail_untyped=False)
            self.datamodule = parser.instantiate(Namespace(data=self.config.data)).data
            self.model = self.trainer = None

    cli = DataOnlyCLI(
        FineTuneModule, FineTuneDataModule, subclass_mode_model=True, subclass_mode_data=True, trainer_class=Trainer,
        save_config_callback=None, seed_everything_default=42, auto_configure_optimizers=False, args=args, run=False,
        parser_kwargs={"default_env": False, "exit_on_error": False, "allow_abbrev": False},
    )
    return cli.datamodule


#: The evaluation splits and the stage that builds each.
EVAL_STAGES = {"val": "validate", "test": "test", "predict": "predict"}


def split_loader(data: FineTuneDataModule, split: str, model: FineTuneModule) -> DataLoader:
    """The loader of an evaluation split (``val``, ``test``, ``predict``), the data connected to ``model``."""
    if split not in EVAL_STAGES:
        raise PtftError(f"split must be one of {sorted(EVAL_STAGES)}, got {split!r}")
    data.connect(model)
    data.setup(EVAL_STAGES[split])
    return getattr(data, f"{split}_dataloader")()


def batch_labels(batch: dict[str, Any]) -> torch.Tensor | None:
    """A batch's class ids, one per example: long documents split into windows keep their first window's."""
    labels = batch.get("labels")
    if labels is None or "doc_ids" not in batch:
        return labels
    doc_ids = batch["doc_ids"]
    first = torch.ones_like(doc_ids, dtype=torch.bool)
    first[1:] = doc_ids[1:] != doc_ids[:-1]
    return labels[first]


@torch.inference_mode()
def predict_probs(
    module: FineTuneModule, loader: DataLoader, device: torch.device | str = "cpu"
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Class probabilities ``(rows, classes)`` of every row of ``loader`` (the module's ``predict_step``, on CPU as
    float32), and the rows' class ids when the batches carry labels."""
    module.eval().to(device)
    probs, labels = [], []
    for index, batch in enumerate(loader):
        batch = move_data_to_device(batch, device)
        out = module.predict_step(batch, index)
        if not isinstance(out, dict) or "probs" not in out:
            raise PtftError(f"{type(module).__name__} does not predict class probabilities: ensembles need a classifier")
        probs.append(out["probs"].float().cpu())
        ids = batch_labels(batch)
        if ids is not None:
            labels.append(ids.cpu())
    return torch.cat(probs), torch.cat(labels) if labels else None


@dataclass
class EnsemblePredictions:
    """What :func:`ensemble_predictions` returns.

    Attributes:
        probs: The ensemble's class probabilities ``(rows, classes)``: the mean of the members'.
        member_probs: Each member's class probabilities, in checkpoint order.
        labels: The rows' class ids, or ``None`` when the split has no labels.
        label_names: Class names in id order (every member's).
        checkpoints: The members' checkpoint paths.
    """

    probs: torch.Tensor
    member_probs: list[torch.Tensor]
    labels: torch.Tensor | None
    label_names: list[str]
    checkpoints: list[str]

    def accuracy(self, probs: torch.Tensor | None = None) -> float | None:
        """Accuracy of ``probs`` (the ensemble's by default) on the labels, or ``None`` without labels."""
        if self.labels is None:
            return None
        probs = self.probs if probs is None else probs
        return (probs.argmax(-1) == self.labels).float().mean().item()


def ensemble_predictions(
    checkpoints: list[str], data: FineTuneDataModule, split: str = "test", device: torch.device | str | None = None
) -> EnsemblePredictions:
    """Averages the class probabilities of ``checkpoints`` over a split of ``data``.

    Args:
        checkpoints: ptft classification checkpoints with one label order.
        data: The data module (its ``split`` is built once, connected to the first checkpoint's model).
        split: ``test``, ``val`` (given or held out) or ``predict``.
        device: Where the models run; the first GPU when there is one, else the CPU.
    """
    if not checkpoints:
        raise PtftError("give at least one checkpoint: --checkpoints a.ckpt b.ckpt ...")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    member_probs: list[torch.Tensor] = []
    names: list[str] = []
    labels = loader = first_model = None
    for path in checkpoints:
        module = load_checkpoint(path)
        own, model_name = getattr(module, "label_names", None), getattr(module, "model_name", None)
        if own is None:
            raise PtftError(f"{path} holds a {type(module).__name__}: ensembles average classifiers' probabilities")
        if loader is None:  # the first member: the data is prepared for it, its labels are the reference
            names, first_model = list(own), model_name
            data_names = getattr(data, "label_names", None)
            if data_names is not None and list(data_names) != names:
                raise PtftError(
                    f"{path} was trained with labels {names}, the data gives {list(data_names)}: "
                    "set data.init_args.labels to the checkpoints' order"
                )
            loader = split_loader(data, split, module)
        elif list(own) != names:
            raise PtftError(
                f"{path} has labels {list(own)}, {checkpoints[0]} has {names}: members must share the label order"
            )
        elif model_name != first_model:
            rank_zero_warn(
                f"{path} starts from {model_name!r}, {checkpoints[0]} from {first_model!r}: every member reads the data "
                "prepared for the first (its tokenizer / transform); make sure they share it"
            )
        probs, labels = predict_probs(module, loader, device)
        member_probs.append(probs)
        del module  # one model in memory at a time
    return EnsemblePredictions(torch.stack(member_probs).mean(0), member_probs, labels, names, list(checkpoints))


def write_predictions(result: EnsemblePredictions, data: FineTuneDataModule, split: str, path: str) -> None:
    """One CSV row per example in the split's order: ``file`` (file datasets), ``target`` (when labelled), the
    predicted ``label`` and ``label_id``, and one probability column per class (``p_<name>``)."""
    ids = result.probs.argmax(-1).tolist()
    rows: list[dict[str, Any]] = [
        {"label": result.label_names[i], "label_id": i, **{f"p_{n}": round(p, 6) for n, p in zip(result.label_names, row)}}
        for i, row in zip(ids, result.probs.tolist())
    ]
    if result.labels is not None:
        rows = [{"target": result.label_names[t], **row} for t, row in zip(result.labels.tolist(), rows)]
    names = getattr(data.datasets.get(split), "item_names", None)
    if callable(names) and len(files := names()) == len(rows):
        rows = [{"file": file, **row} for file, row in zip(files, rows)]
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def ensemble_command(args: list[str]) -> EnsemblePredictions:
    """``ptft ensemble --config RECIPE --checkpoints A.ckpt B.ckpt ... [--split test] [--output preds.csv]``: the
    mean class probabilities of the checkpoints over a split of the recipe's data; prints each member's accuracy and
    the ensemble's when the split has labels. Other options (``--data.init_args.test_file=...``,
    ``--seed_everything``) go to the recipe as in ``ptft test``.
    """
    parser = argparse.ArgumentParser(prog="ptft ensemble", description=ensemble_command.__doc__)
    parser.add_argument("--checkpoints", nargs="+", required=True, help="ptft classification checkpoints (.ckpt)")
    parser.add_argument("--split", default="test", choices=sorted(EVAL_STAGES),
                        help="the data split to predict (val: the recipe's validation data, given or held out)")
    parser.add_argument("--output", default=None, help="CSV of the ensemble's predictions, in the split's order "
                        "(text evaluation splits are sorted by length: use --split predict for input order)")
    own, rest = parser.parse_known_args(args)
    if not has_config(rest):
        raise PtftError("ptft ensemble reads the data of a recipe: add --config RECIPE (the checkpoints' recipe)")
    data = data_from_config(rest)
    result = ensemble_predictions(own.checkpoints, data, own.split)
    print(f"ensemble of {len(own.checkpoints)} on {own.split} ({len(result.probs)} examples)")
    if result.labels is not None:
        for path, probs in zip(own.checkpoints, result.member_probs):
            print(f"  {result.accuracy(probs):.4f}  {path}")
        print(f"  {result.accuracy():.4f}  ensemble (mean probabilities)")
    if own.output:
        write_predictions(result, data, own.split, own.output)
        print(f"wrote {len(result.probs)} predictions to {own.output}")
    return result
