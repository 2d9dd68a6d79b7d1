"""What every ptft data module shares: the model connection and seeded loaders; label discovery for classification."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from ptft.core.errors import PtftError


def existing_path(path: str | None, arg: str) -> Path | None:
    """``Path(path)`` after checking it exists; one-line error naming the argument otherwise."""
    if path is None:
        return None
    p = Path(path).expanduser()
    if not p.exists():
        raise PtftError(f"{arg}: {path!r} does not exist (working directory: {Path.cwd()})")
    return p


class EpochSeededSampler(Sampler[int]):
    """Random order from ``seed + epoch``: the same order whether a run is resumed or not.

    Lightning calls :meth:`set_epoch` before each training epoch. Optionally groups similar lengths into batches
    (Hugging Face's ``get_length_grouped_indices``: shuffled mega-batches, each sorted by length).
    """

    def __init__(self, size: int, seed: int, lengths: list[int] | None = None, batch_size: int = 1) -> None:
        self.size = size
        self.seed = seed
        self.lengths = lengths
        self.batch_size = batch_size
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.size

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        if self.lengths is None:
            return iter(torch.randperm(self.size, generator=generator).tolist())
        from transformers.trainer_pt_utils import get_length_grouped_indices

        return iter(get_length_grouped_indices(self.lengths, self.batch_size, generator=generator))


class FineTuneDataModule(L.LightningDataModule):
    """Base of every ptft data module: batch sizes, workers, seeded training order, the model connection.

    :meth:`connect` receives the model right after the CLI builds it, for values only the model knows (tokenizer,
    input size, normalisation).
    """

    def __init__(self, batch_size: int, eval_batch_size: int | None, num_workers: int, seed: int) -> None:
        super().__init__()
        self.seed = seed
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.num_workers = num_workers

    def connect(self, model: L.LightningModule) -> None:
        """Takes what the data needs from the model (tokenizer name, input size, normalisation)."""

    def _connect_from_trainer(self) -> None:
        if self.trainer is None or self.trainer.lightning_module is None:
            raise PtftError(f"{type(self).__name__} is not connected to a model: call connect(model) first")
        self.connect(self.trainer.lightning_module)

    def _loader(
        self, dataset: Dataset, train: bool, collate_fn: Any = None, lengths: list[int] | None = None
    ) -> DataLoader:
        """Training loaders shuffle with :class:`EpochSeededSampler` (by length when ``lengths`` are given)."""
        sampler = EpochSeededSampler(len(dataset), self.seed, lengths, self.batch_size) if train else None
        return DataLoader(
            dataset,
            batch_size=self.batch_size if train else self.eval_batch_size,
            sampler=sampler,
            drop_last=False,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            collate_fn=collate_fn,
        )


class LabelsMixin:
    """Label names for a data module: discovered from the training data on first access, or given.

    The CLI links :attr:`label_names` / :attr:`num_labels` into the model right after instantiation, so bad labels
    are reported before any model is built. Call :meth:`init_labels` in ``__init__`` and implement
    :meth:`discover_labels`.
    """

    def init_labels(self, labels: list[str] | None) -> None:
        self.given_labels = labels
        self._label_names: list[str] | None = None

    @property
    def label_names(self) -> list[str]:
        """Class names in label-id order."""
        if self._label_names is None:
            self._label_names = self.discover_labels()
        return self._label_names

    @property
    def num_labels(self) -> int:
        """Number of classes."""
        return len(self.label_names)

    def discover_labels(self) -> list[str]:
        """Reads the training labels (and checks the evaluation labels against them)."""
        raise NotImplementedError


class ClassificationDataModule(LabelsMixin, FineTuneDataModule):
    """Base of the classification data modules that are not text (see :class:`ptft.text.base.TextDataModule`)."""

    def __init__(
        self, batch_size: int, eval_batch_size: int | None, num_workers: int, labels: list[str] | None, seed: int
    ) -> None:
        super().__init__(batch_size, eval_batch_size, num_workers, seed)
        self.init_labels(labels)
