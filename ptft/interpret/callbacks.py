"""Interpretation during training: error analysis of every validation (and test) epoch, and explanations of a few
validation examples as the model learns.

Both write files into the run folder (``<log dir>/errors/…``, ``<log dir>/explain/…``) and log them to W&B when the
run logs there. Neither runs during Lightning's sanity check.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import lightning as L
import torch
from torch.utils.data import DataLoader

from ptft.core.errors import PtftError
from ptft.interpret.common import explaining
from ptft.interpret.errors import (
    Predictions,
    batch_index_lists,
    example_probs,
    fetch_example,
    to_device,
    write_error_report,
)
from ptft.interpret.output import log_images, log_table, run_folder

__all__ = ["ErrorAnalysis", "ExplainCallback"]

STAGES = ("validate", "test")


def _loaders(trainer: L.Trainer, which: str) -> list[DataLoader]:
    """The loaders of a stage (``validate``, ``test``, ``train``) as a list, as the trainer holds them."""
    loaders = {"validate": trainer.val_dataloaders, "test": trainer.test_dataloaders,
               "train": trainer.train_dataloader}[which]
    if loaders is None:
        return []
    if isinstance(loaders, dict):
        return list(loaders.values())
    return list(loaders) if isinstance(loaders, (list, tuple)) else [loaders]


def _gather(trainer: L.Trainer, pl_module: L.LightningModule, tensor: torch.Tensor) -> torch.Tensor:
    """Every rank's rows of ``tensor`` concatenated in rank order (ranks may hold different numbers of rows: each pads
    to the longest before ``all_gather``, and the padding is cut off after)."""
    if trainer.world_size == 1:
        return tensor
    sizes = pl_module.all_gather(torch.tensor([tensor.shape[0]], device=tensor.device)).flatten().tolist()
    padded = tensor.new_zeros((max(sizes), *tensor.shape[1:]))
    padded[: tensor.shape[0]] = tensor
    gathered = pl_module.all_gather(padded)
    return torch.cat([gathered[rank, :size] for rank, size in enumerate(sizes)])


def _first_of_each(indices: torch.Tensor) -> torch.Tensor:
    """Positions of the first occurrence of each value of ``indices``, by value: a distributed sampler repeats examples
    to give every rank as many, and they must be counted once."""
    order = torch.argsort(indices, stable=True)
    ordered = indices[order]
    first = torch.ones_like(ordered, dtype=torch.bool)
    first[1:] = ordered[1:] != ordered[:-1]
    return order[first]


class ErrorAnalysis(L.Callback):
    """Confusion matrix, per-class precision / recall / F1 and the most confident mistakes of each validation (and test)
    epoch of a :class:`ptft.core.ClassificationModule`.

    Writes ``confusion.png``, ``per_class.csv``, ``mistakes.png`` and ``mistakes.csv`` into
    ``<run folder>/errors/<stage>-epoch<N>`` and logs ``errors/<stage>/confusion`` and ``errors/<stage>/mistakes``
    images and an ``errors/<stage>/per_class`` table to W&B.

    The probabilities come from the logits the validation step already computes (a forward hook on the module keeps
    the output of its last call per batch): no second forward pass. A module whose step does not call the module
    itself gets one extra forward pass per batch. Each example is kept as its dataset index, not its input; on several
    processes the probabilities, labels and indices are gathered, examples a distributed sampler repeated are counted
    once, and rank 0 fetches the inputs of the mistakes it draws from the dataset. Evaluation loaders must therefore be
    unshuffled (as Lightning builds them). Long documents split into windows count once, their windows combined as the
    module's metrics combine them.

    Args:
        every_n_epochs: Analyse every n-th validation epoch of a fit (``trainer.validate`` and ``test`` always).
        top_k: Mistakes drawn and listed, most confident first.
        stages: ``validate`` and / or ``test``.
    """

    def __init__(self, every_n_epochs: int = 1, top_k: int = 16, stages: list[str] | None = None) -> None:
        stages = list(STAGES) if stages is None else list(stages)
        unknown = sorted(set(stages) - set(STAGES))
        if unknown or every_n_epochs < 1:
            raise PtftError(f"ErrorAnalysis: stages must be among {list(STAGES)} (got {unknown}) and every_n_epochs >= 1")
        if top_k < 1:
            raise PtftError(f"ErrorAnalysis: top_k (mistakes shown) must be >= 1, got {top_k}")
        self.every_n_epochs = every_n_epochs
        self.top_k = top_k
        self.stages = stages
        self._active = False
        self._captured: torch.Tensor | None = None
        self._hook: Any = None
        self._collected: dict[int, dict[str, Any]] = {}

    # --- collecting -------------------------------------------------------------------------------------------
    def _due(self, trainer: L.Trainer, stage: str) -> bool:
        if trainer.sanity_checking or stage not in self.stages:
            return False
        if stage == "validate" and trainer.state.fn == "fit":
            return (trainer.current_epoch + 1) % self.every_n_epochs == 0
        return True

    def _capture(self, module: L.LightningModule, args: Any, output: Any) -> None:
        if isinstance(output, torch.Tensor) and output.ndim == 2 and output.shape[-1] == module.num_labels:
            self._captured = output.detach()

    def _start(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._stop()
        self._active = self._due(trainer, stage)
        if not self._active:
            return
        if not hasattr(pl_module, "num_labels") or not hasattr(pl_module, "label_names"):
            raise PtftError(f"ErrorAnalysis needs a classification module, got {type(pl_module).__name__}")
        self._hook = pl_module.register_forward_hook(self._capture)

    def _stop(self) -> None:
        if self._hook is not None:
            self._hook.remove()
        self._hook, self._captured, self._collected = None, None, {}

    def _collect(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int,
                 dataloader_idx: int, stage: str) -> None:
        if not self._active:
            return
        logits, self._captured = self._captured, None
        if logits is None:
            logits = pl_module(batch)
        probs, labels = example_probs(pl_module, logits, batch)
        state = self._collected.get(dataloader_idx)
        if state is None:
            loader = _loaders(trainer, stage)[dataloader_idx]
            state = self._collected[dataloader_idx] = {
                "batches": batch_index_lists(loader, "ErrorAnalysis"), "probs": [], "labels": [], "indices": []}
        indices = state["batches"][batch_idx]
        if len(indices) != probs.shape[0]:
            raise PtftError(f"ErrorAnalysis: {probs.shape[0]} predictions for a batch of {len(indices)} examples")
        state["probs"].append(probs.float())
        state["labels"].append(labels.long())
        state["indices"].append(torch.tensor(indices, device=probs.device))

    # --- writing ----------------------------------------------------------------------------------------------
    def _finish(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if not self._active:
            return
        collected, self._active = self._collected, False
        self._stop()
        root = run_folder(trainer)  # every rank: trainer.log_dir broadcasts
        loaders = _loaders(trainer, stage)
        for idx, loader in enumerate(loaders):  # every rank takes part in every gather, batches or not
            state = collected.get(idx, {"probs": [], "labels": [], "indices": []})
            empty = torch.empty(0, device=pl_module.device)
            probs = _gather(trainer, pl_module, torch.cat(state["probs"]) if state["probs"]
                            else empty.new_zeros((0, pl_module.num_labels)))
            labels = _gather(trainer, pl_module, torch.cat(state["labels"]) if state["labels"] else empty.long())
            indices = _gather(trainer, pl_module, torch.cat(state["indices"]) if state["indices"] else empty.long())
            if not trainer.is_global_zero or indices.numel() == 0:
                continue
            keep = _first_of_each(indices)
            predictions = Predictions(probs[keep].cpu(), labels[keep].cpu(), indices[keep].cpu())
            name = f"{stage}-epoch{trainer.current_epoch}" + (f"-loader{idx}" if len(loaders) > 1 else "")
            paths = write_error_report(pl_module, predictions, lambda i, loader=loader: fetch_example(loader, i),
                                       root / "errors" / name, self.top_k)
            self._log(trainer, stage, paths)

    def _log(self, trainer: L.Trainer, stage: str, paths: dict[str, Path]) -> None:
        import csv

        step = trainer.global_step
        log_images(trainer.loggers, f"errors/{stage}/confusion", [paths["confusion"]], step=step)
        log_images(trainer.loggers, f"errors/{stage}/mistakes", [paths["mistakes"]], step=step)
        with open(paths["per_class"], newline="") as handle:
            columns, *rows = list(csv.reader(handle))
        rows = [[row[0], *map(float, row[1:4]), int(row[4])] for row in rows]
        log_table(trainer.loggers, f"errors/{stage}/per_class", columns, rows, step=step)

    # --- Lightning hooks --------------------------------------------------------------------------------------
    def on_validation_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._start(trainer, pl_module, "validate")

    def on_test_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._start(trainer, pl_module, "test")

    def on_validation_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                                batch_idx: int, dataloader_idx: int = 0) -> None:
        self._collect(trainer, pl_module, batch, batch_idx, dataloader_idx, "validate")

    def on_test_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                          batch_idx: int, dataloader_idx: int = 0) -> None:
        self._collect(trainer, pl_module, batch, batch_idx, dataloader_idx, "test")

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._finish(trainer, pl_module, "validate")

    def on_test_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._finish(trainer, pl_module, "test")


def _plain_loader(loader: DataLoader) -> DataLoader:
    """A sequential loader over ``loader``'s whole dataset (no distributed sampler: rank 0 sees every example)."""
    batch_size = loader.batch_size or getattr(loader.batch_sampler, "batch_size", None) or 1
    return DataLoader(loader.dataset, batch_size=batch_size, collate_fn=loader.collate_fn, num_workers=loader.num_workers)


class ExplainCallback(L.Callback):
    """Explains the model's decisions on a few validation examples after every n-th validation epoch, to watch what it
    learns to look at.

    A per-example method (``gradcam``, ``ig``, ``attention``…) explains the predicted class of the first
    ``num_samples`` examples of the split; a split method (``errors``, ``tsne``) looks at the whole split, with
    ``num_samples`` as its own argument (mistakes shown, examples embedded). Files go to
    ``<run folder>/explain/<method>-epoch<N>``; the PNGs are logged to W&B as ``explain/<method>``.

    Runs on rank 0 only, in eval mode, at the end of the validation loop, outside its inference mode and with
    gradients enabled (attribution methods differentiate), with the global random state and the parameters'
    gradients restored afterwards. The examples come from the dataset directly (a sequential loader over the whole
    split, not the distributed one). Not during the sanity check.

    Args:
        method: A method of :data:`ptft.interpret.EXAMPLE_METHODS` or :data:`ptft.interpret.SPLIT_METHODS`.
        num_samples: Examples explained (per-example methods); passed to split methods.
        every_n_epochs: Explain after every n-th validation epoch of a fit (``trainer.validate`` always).
        split: ``val`` (the validation loader) or ``train`` (the training loader's dataset, augmentation included).
    """

    def __init__(self, method: str, num_samples: int = 8, every_n_epochs: int = 1,
                 split: Literal["val", "train"] = "val") -> None:
        from ptft import interpret

        if method not in interpret.EXAMPLE_METHODS and method not in interpret.SPLIT_METHODS:
            interpret.method_function(method)  # the registry's one-line error for unknown names
        if split not in ("val", "train") or every_n_epochs < 1 or num_samples < 1:
            raise PtftError("ExplainCallback: split must be 'val' or 'train', every_n_epochs and num_samples >= 1")
        self.method = method
        self.num_samples = num_samples
        self.every_n_epochs = every_n_epochs
        self.split = split

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        from ptft import interpret

        interpret.method_function(self.method)  # a missing optional library fails now, not after the first epoch

    def _due(self, trainer: L.Trainer) -> bool:
        if trainer.sanity_checking:
            return False
        return trainer.state.fn != "fit" or (trainer.current_epoch + 1) % self.every_n_epochs == 0

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self._due(trainer):
            return
        root = run_folder(trainer)  # every rank: trainer.log_dir broadcasts
        if not trainer.is_global_zero:
            return
        loaders = _loaders(trainer, "validate" if self.split == "val" else "train")
        if not loaders:
            raise PtftError(f"ExplainCallback: the trainer has no {self.split} loader")
        folder = root / "explain" / f"{self.method}-epoch{trainer.current_epoch}"
        # The validation loop's inference mode (or no_grad) is still on here: attribution needs gradients.
        with torch.random.fork_rng(devices=[]), explaining(pl_module):  # gradients on, modes and .grad restored
            paths = self.explain(pl_module, loaders[0], folder)
        pngs = [p for p in paths if Path(p).suffix == ".png"]
        log_images(trainer.loggers, f"explain/{self.method}", pngs, step=trainer.global_step)

    def explain(self, pl_module: L.LightningModule, loader: DataLoader, folder: Path) -> list[Path]:
        """Runs the method on the split of ``loader``; the files it wrote."""
        from ptft import interpret

        function, is_split = interpret.method_function(self.method)
        if is_split:  # t-SNE without "before": rebuilding the pretrained model every epoch would cost a model load
            extra = {"before": None} if self.method == "tsne" else {}
            return list(function(pl_module, _plain_loader(loader), folder, self.num_samples, **extra))
        count = min(self.num_samples, len(loader.dataset))
        batch = to_device(loader.collate_fn([loader.dataset[i] for i in range(count)]), pl_module.device)
        with torch.no_grad():
            targets = pl_module(batch).argmax(dim=-1)
        return list(function(pl_module, batch, targets, folder, 0))
