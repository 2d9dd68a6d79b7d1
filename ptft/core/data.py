"""What every ptft data module shares, whatever the modality: splits, the held-out validation split, the seed,
input checks that run once for N processes, and the four loaders.

A modality's data module subclasses :class:`FineTuneDataModule` and adds reading and transforms only:

* :meth:`~FineTuneDataModule.load_split` -- a split's rows as given (a list, a ``datasets.Dataset``, …) or ``None``;
* :meth:`~FineTuneDataModule.check` -- optional: one-line errors for bad rows (or the rows to keep);
* :meth:`~FineTuneDataModule.build` -- rows -> the ``Dataset`` the loader reads (decoding, tokenising, transforms);
* :meth:`~FineTuneDataModule.collate_fn` -- optional: how items become a batch;
* :meth:`~FineTuneDataModule.label_ids` -- classification only: the class of each row, for ``train_per_class``.

The base's :meth:`~FineTuneDataModule.setup` asks for the splits a stage needs, holds out ``val_fraction`` of the
training rows when no validation split is given, keeps ``train_per_class`` training rows of every class when asked
(few-shot), and builds each split once.
"""

from __future__ import annotations

import json
import math
import multiprocessing
import os
import sqlite3
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Subset, random_split

from ptft.core.errors import PtftError

SPLITS = ("train", "val", "test", "predict")
#: The data seed when neither the data module's ``seed`` nor ``seed_everything`` gives one.
DEFAULT_SEED = 42
#: The splits each Trainer stage reads.
STAGE_SPLITS = {"fit": ("train", "val"), "validate": ("val",), "test": ("test",), "predict": ("predict",)}
_VERBS = {"train": "fitting", "val": "validating", "test": "testing", "predict": "predicting"}

T = TypeVar("T")
R = TypeVar("R")


def existing_path(path: str | None, arg: str) -> Path | None:
    """``Path(path)`` after checking it exists; one-line error naming the argument otherwise."""
    if path is None:
        return None
    p = Path(path).expanduser()
    if not p.exists():
        raise PtftError(f"{arg}: {path!r} does not exist (working directory: {Path.cwd()})")
    return p


# --- one seed ---------------------------------------------------------------------------------------------------
def resolve_seed(seed: int | None) -> int:
    """The data seed: ``seed`` when given, else the one ``seed_everything`` set, else :data:`DEFAULT_SEED`.

    ``seed_everything`` (the CLI's ``seed_everything: 42``) records its seed in the ``PL_GLOBAL_SEED`` environment
    variable, which DDP processes inherit, so every rank resolves the same value.
    """
    if seed is not None:
        return int(seed)
    env = os.environ.get("PL_GLOBAL_SEED")
    return int(env) if env is not None else DEFAULT_SEED


# --- held-out split ---------------------------------------------------------------------------------------------
def hold_out_indices(size: int, fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Row indices ``(train, val)``: ``round(fraction * size)`` rows (at least one) drawn for validation by
    ``torch.utils.data.random_split`` with a generator seeded by ``seed``; each part keeps the rows' given order."""
    if not 0 < fraction < 1:
        raise PtftError(f"val_fraction must be between 0 and 1 (exclusive), got {fraction}")
    n_val = max(1, round(fraction * size))
    if n_val >= size:
        raise PtftError(
            f"val_fraction={fraction} of {size} training row(s) leaves none for training: give a validation split"
        )
    train, val = random_split(range(size), [size - n_val, n_val], generator=torch.Generator().manual_seed(seed))
    return sorted(train.indices), sorted(val.indices)


def select(rows: Any, indices: list[int]) -> Any:
    """The rows at ``indices``: ``rows.select`` where it exists (``datasets.Dataset``), a list for sequences,
    else a ``torch.utils.data.Subset``."""
    if hasattr(rows, "select"):
        return rows.select(indices)
    if isinstance(rows, Sequence):
        return [rows[i] for i in indices]
    return Subset(rows, indices)


# --- few-shot subsets ------------------------------------------------------------------------------------------
def per_class_indices(
    label_ids: Sequence[int], per_class: int, seed: int, label_names: Sequence[str] | None = None,
    after: str = "",
) -> list[int]:
    """Indices of ``per_class`` rows of every class, in the rows' given order: the first ``per_class`` rows of each
    class in one random permutation of all rows, seeded by ``seed``.

    One permutation for all classes makes the subsets nested: with the same seed, the rows drawn for k per class are
    among those drawn for any larger k, so a sweep over k adds examples instead of drawing new ones.

    Args:
        label_ids: The class id of every row.
        per_class: Rows to keep per class.
        seed: Seed of the permutation (the data seed: the same on every rank).
        label_names: Class names in id order: every class must have ``per_class`` rows, and errors name it. Without
            them, the classes are the ids present.
        after: Where the rows come from, appended to the error message (`` after holding out validation``).
    """
    if per_class < 1:
        raise PtftError(f"train_per_class must be at least 1 (or null for every training row), got {per_class}")
    classes = range(len(label_names)) if label_names is not None else sorted(set(label_ids))
    kept: dict[int, list[int]] = {c: [] for c in classes}
    for i in torch.randperm(len(label_ids), generator=torch.Generator().manual_seed(seed)).tolist():
        chosen = kept.get(label_ids[i])
        if chosen is not None and len(chosen) < per_class:
            chosen.append(i)
    short = next((c for c, chosen in kept.items() if len(chosen) < per_class), None)
    if short is not None:
        name = label_names[short] if label_names is not None else short
        raise PtftError(
            f"train_per_class={per_class}, but class {name!r} has only {len(kept[short])} training row(s){after}: "
            "lower train_per_class or add examples of that class"
        )
    return sorted(i for chosen in kept.values() for i in chosen)


# --- training order ---------------------------------------------------------------------------------------------
class EpochSeededSampler(DistributedSampler):
    """Random order from ``seed + epoch``, sharded across DDP processes: the same order whether a run is resumed or
    not, and a new one every epoch.

    It is a ``DistributedSampler`` so that Lightning calls :meth:`set_epoch` on it directly instead of wrapping it in
    ``DistributedSamplerWrapper``, which forwards ``set_epoch`` only since Lightning 2.6.1 (pytorch-lightning#21454):
    under 2.6.0 a wrapped sampler repeated epoch 0's order every epoch. Like ``DistributedSampler``, every process
    draws the same permutation, pads it to a multiple of the process count with its first indices, and takes every
    ``num_replicas``-th index from its rank. Optionally groups similar lengths into batches (Hugging Face's
    ``get_length_grouped_indices``: shuffled mega-batches, each sorted by length).

    Args:
        size: Number of rows.
        seed: Base seed; Lightning calls :meth:`set_epoch` before each training epoch.
        lengths: Per-row lengths for length-grouped batches, or ``None`` for a plain shuffle.
        batch_size: Per-process batch size (length grouping forms batches of ``batch_size * num_replicas``).
        num_replicas: Number of data-parallel processes.
        rank: This process's data-parallel rank.
    """

    def __init__(
        self, size: int, seed: int, lengths: list[int] | None = None, batch_size: int = 1, num_replicas: int = 1,
        rank: int = 0,
    ) -> None:
        super().__init__(range(size), num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed, drop_last=False)
        self.size = size
        self.lengths = lengths
        self.batch_size = batch_size

    def order(self) -> list[int]:
        """Every process's indices of the current epoch, before sharding and padding."""
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        if self.lengths is None:
            return torch.randperm(self.size, generator=generator).tolist()
        from transformers.trainer_pt_utils import get_length_grouped_indices

        return get_length_grouped_indices(self.lengths, self.batch_size * self.num_replicas, generator=generator)

    def __iter__(self) -> Iterator[int]:
        order = self.order()
        padding = self.total_size - len(order)
        order += (order * math.ceil(padding / max(len(order), 1)))[:padding]
        return iter(order[self.rank : self.total_size : self.num_replicas])


# --- checks at scale --------------------------------------------------------------------------------------------
def cache_dir() -> Path:
    """ptft's cache folder: ``$XDG_CACHE_HOME/ptft`` (``~/.cache/ptft`` when unset)."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "ptft"


class CheckCache:
    """Results of file checks by ``(key, stamp)`` in a SQLite file: a key whose stamp changed is checked again.

    Callers key a file by its absolute path (an archive member by archive path and member name) and stamp it with
    size and modification time, so an edited, replaced or touched file is checked anew. SQLite serialises
    concurrent runs that share the cache. A cache that cannot be opened or written is reported with a warning and
    then not used (the checks still run).

    Args:
        path: The SQLite file; defaults to ``checks.sqlite`` in :func:`cache_dir`.
    """

    def __init__(self, path: Path | None = None) -> None:
        self.path = path or cache_dir() / "checks.sqlite"

    def _connect(self) -> sqlite3.Connection:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        db = sqlite3.connect(self.path, timeout=60)
        db.execute("CREATE TABLE IF NOT EXISTS checks (key TEXT PRIMARY KEY, stamp TEXT NOT NULL, result TEXT NOT NULL)")
        return db

    def get(self, keys: Sequence[tuple[str, str]]) -> dict[str, Any]:
        """Cached results of the ``(key, stamp)`` pairs whose stamp matches, by key."""
        wanted = dict(keys)
        found: dict[str, Any] = {}
        try:
            with self._connect() as db:
                names = list(wanted)
                for start in range(0, len(names), 500):  # SQLite's limit on query parameters
                    chunk = names[start : start + 500]
                    rows = db.execute(
                        f"SELECT key, stamp, result FROM checks WHERE key IN ({','.join('?' * len(chunk))})", chunk
                    )
                    found.update({k: json.loads(r) for k, s, r in rows if wanted[k] == s})
            db.close()
        except (sqlite3.Error, OSError) as err:
            rank_zero_warn(f"file-check cache {self.path} unreadable ({err}); checking every file")
        return found

    def put(self, entries: Sequence[tuple[str, str, Any]]) -> None:
        """Stores ``(key, stamp, result)`` entries (results must be JSON values)."""
        try:
            with self._connect() as db:
                db.executemany(
                    "INSERT OR REPLACE INTO checks VALUES (?, ?, ?)", [(k, s, json.dumps(r)) for k, s, r in entries]
                )
            db.close()
        except (sqlite3.Error, OSError) as err:
            rank_zero_warn(f"file-check cache {self.path} not writable ({err}); the next run checks every file again")


def _cpus() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def parallel_map(fn: Callable[[list[T]], list[R]], items: Sequence[T], chunk_size: int = 256) -> list[R]:
    """``fn(items)`` computed chunk by chunk in worker processes, one per CPU (at most 32), in order.

    File checks are mostly Python-level header parsing, which threads cannot run in parallel. Workers are forked (as
    DataLoader workers are on Linux): a spawned worker would first re-import torch and Lightning, which costs more
    than it saves. Small inputs, single-CPU machines and platforms without ``fork`` run in this process.
    """
    items = list(items)
    chunks = [items[i : i + chunk_size] for i in range(0, len(items), chunk_size)]
    workers = min(_cpus(), len(chunks), 32)
    if workers < 2 or "fork" not in multiprocessing.get_all_start_methods():
        return fn(items)
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork")) as pool:
        return [r for part in pool.map(fn, chunks) for r in part]


def cached_checks(
    items: Sequence[T], stamps: Sequence[tuple[str, str] | None], probe: Callable[[list[T]], list[Any]],
    cache: CheckCache | None = None,
) -> list[Any]:
    """``probe`` results for ``items``, from the cache where an item's ``(key, stamp)`` is known, else computed with
    :func:`parallel_map` and stored. Items whose stamp is ``None`` (e.g. a missing file) are probed every time.

    Args:
        items: What to check (e.g. image locations).
        stamps: ``(key, stamp)`` of each item; keys should name the probe (``image:/data/a.jpg``) so that two
            kinds of check on one file do not share results.
        probe: Picklable function checking a list of items; returns one JSON value per item.
        cache: Where results are kept; the default :class:`CheckCache`.
    """
    cache = cache or CheckCache()
    known = cache.get([s for s in stamps if s is not None])
    todo = [i for i, s in enumerate(stamps) if s is None or s[0] not in known]
    fresh = parallel_map(probe, [items[i] for i in todo]) if todo else []
    by_index = dict(zip(todo, fresh))
    new = [(stamps[i][0], stamps[i][1], r) for i, r in by_index.items() if stamps[i] is not None]
    if new:
        cache.put(new)
    return [by_index[i] if i in by_index else known[s[0]] for i, s in enumerate(stamps)]


# --- the base data module ---------------------------------------------------------------------------------------
class FineTuneDataModule(L.LightningDataModule):
    """Base of every ptft data module: splits, the held-out validation split, the seed, checks, loaders.

    :meth:`connect` receives the model right after the CLI builds it (and again at setup), for values only the model
    knows (tokenizer, input size, normalisation). Subclasses implement :meth:`load_split` and :meth:`build`, and
    optionally :meth:`check`, :meth:`collate_fn` and :meth:`train_lengths`.

    The held-out split is one rule for every modality: when no validation split is given, ``val_fraction`` of the
    training rows (``round(val_fraction * rows)``, at least one) are drawn by ``torch.utils.data.random_split``
    seeded with :attr:`seed`, each part keeping the rows' given order. Few-shot training is one rule too:
    ``train_per_class`` keeps that many training rows of every class (:func:`per_class_indices`, seeded with
    :attr:`seed`), drawn after the held-out split so that validation is the same whatever the k; classification data
    modules implement :meth:`label_ids` for it.

    Args:
        batch_size: Training batch size (per process).
        eval_batch_size: Validation / test / predict batch size; defaults to ``batch_size``.
        num_workers: DataLoader worker processes.
        seed: Seed of the held-out split, of the few-shot subset and of the training order; ``None`` takes the seed of
            ``seed_everything`` (the CLI's ``seed_everything``), or 42 when none was set.
        val_fraction: Fraction of the training rows held out for validation when no validation split is given.
        train_per_class: Few-shot training: keep this many training rows of every class (a stratified subset chosen
            by ``seed``, after the held-out split); ``None`` trains on every row.
    """

    def __init__(
        self, batch_size: int, eval_batch_size: int | None, num_workers: int, seed: int | None = None,
        val_fraction: float = 0.1, train_per_class: int | None = None,
    ) -> None:
        super().__init__()
        if train_per_class is not None and train_per_class < 1:
            raise PtftError(f"train_per_class must be at least 1 (or null for every training row), got {train_per_class}")
        self.given_seed = seed
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.num_workers = num_workers
        self.val_fraction = val_fraction
        self.train_per_class = train_per_class
        self.datasets: dict[str, Dataset] = {}
        self._rows: dict[str, Any] = {}

    @property
    def seed(self) -> int:
        """The data seed (:func:`resolve_seed` of the ``seed`` argument), read when used."""
        return resolve_seed(self.given_seed)

    # --- modality hooks ---------------------------------------------------------------------------------------
    def load_split(self, split: str) -> Any:
        """The rows of ``split`` (``train``, ``val``, ``test``, ``predict``) as given, or ``None`` if not given.

        Rows are anything :func:`select` can subset: a list, a ``datasets.Dataset``, an object with ``select``.
        """
        raise NotImplementedError

    def check(self, split: str, rows: Any) -> Any:
        """Checks a split's rows before training (one-line ``PtftError`` for bad input); returns the rows to use."""
        return rows

    def build(self, split: str, rows: Any) -> Dataset:
        """The dataset the loader reads from a split's rows: augmented for ``train``, deterministic otherwise."""
        raise NotImplementedError

    def collate_fn(self) -> Callable[[list[Any]], Any] | None:
        """Items -> batch; ``None`` uses PyTorch's default collation. Return a picklable function."""
        return None

    def train_lengths(self) -> list[int] | None:
        """Per-row lengths of the training set for length-grouped batches, or ``None`` for plain shuffling."""
        return None

    def label_ids(self, rows: Any) -> list[int]:
        """The class id of every row of a split, for ``train_per_class``: classification data modules implement it."""
        raise PtftError(f"train_per_class: {type(self).__name__} has no classes to draw training rows from")

    def source_hint(self, split: str) -> str:
        """What to set to give ``split``, for error messages."""
        return f"data.init_args.{split}"

    def connect(self, model: L.LightningModule) -> None:
        """Takes what the data needs from the model (tokenizer name, input size, normalisation)."""

    # --- shared work ------------------------------------------------------------------------------------------
    def _connect_from_trainer(self) -> None:
        if self.trainer is None or self.trainer.lightning_module is None:
            raise PtftError(f"{type(self).__name__} is not connected to a model: call connect(model) first")
        self.connect(self.trainer.lightning_module)

    def rows(self, split: str) -> Any:
        """The checked rows of ``split`` (:meth:`load_split` then :meth:`check`, once), or ``None``."""
        if split not in self._rows:
            rows = self.load_split(split)
            self._rows[split] = None if rows is None else self.check(split, rows)
        return self._rows[split]

    def split_rows(self, split: str) -> Any:
        """The rows a split is built from: as given, or the held-out part of training for a missing ``val``;
        ``train_per_class`` rows of each class of the rest for ``train`` when it is set."""
        if split not in ("train", "val"):
            rows = self.rows(split)
            if rows is None:
                raise PtftError(f"{_VERBS[split]} needs {split} data: set {self.source_hint(split)}")
            return rows
        val = self.rows("val")
        if split == "val" and val is not None:
            return val
        train = self.rows("train")
        if train is None:
            also = f"{self.source_hint('val')} or " if split == "val" else ""
            raise PtftError(f"{_VERBS[split]} needs training data: set {also}{self.source_hint('train')}")
        if val is None:
            train_idx, val_idx = hold_out_indices(len(train), self.val_fraction, self.seed)
            if split == "val":
                return select(train, val_idx)
            train = select(train, train_idx)
        if self.train_per_class is None:
            return train
        names = getattr(self, "label_names", None)
        after = "" if val is not None else " after holding out validation"
        return select(train, per_class_indices(self.label_ids(train), self.train_per_class, self.seed, names, after))

    def setup(self, stage: str) -> None:
        if self.trainer is not None and self.trainer.lightning_module is not None:
            self.connect(self.trainer.lightning_module)
        for split in STAGE_SPLITS[stage]:
            if split not in self.datasets:
                self.datasets[split] = self.build(split, self.split_rows(split))

    def on_rank_zero(self, fn: Callable[[], R]) -> R:
        """``fn()`` computed by global rank 0 alone and broadcast to every process (e.g. a file check); an error
        raised there is raised on every rank, so none waits forever."""
        trainer = self.trainer
        if trainer is None or trainer.world_size < 2:
            return fn()
        outcome: tuple[bool, Any] = (True, None)
        if trainer.is_global_zero:
            try:
                outcome = (True, fn())
            except Exception as err:  # noqa: BLE001 - re-raised below on every rank
                outcome = (False, err)
        ok, value = trainer.strategy.broadcast(outcome, src=0)
        if not ok:
            raise value
        return value

    # --- loaders ----------------------------------------------------------------------------------------------
    def _replicas(self) -> dict[str, int]:
        """``num_replicas`` and ``rank`` of data parallelism, as the strategy gives them to Lightning's samplers."""
        strategy = getattr(self.trainer, "strategy", None)
        kwargs = getattr(strategy, "distributed_sampler_kwargs", None) if strategy is not None else None
        return dict(kwargs) if kwargs and kwargs.get("num_replicas", 0) > 1 else {"num_replicas": 1, "rank": 0}

    def _loader(
        self, dataset: Dataset, train: bool, collate_fn: Any = None, lengths: list[int] | None = None
    ) -> DataLoader:
        """Training loaders shuffle with :class:`EpochSeededSampler` (by length when ``lengths`` are given);
        evaluation loaders keep the order (Lightning shards them under DDP)."""
        sampler = None
        if train:
            sampler = EpochSeededSampler(len(dataset), self.seed, lengths, self.batch_size, **self._replicas())
        return DataLoader(
            dataset,
            batch_size=self.batch_size if train else self.eval_batch_size,
            sampler=sampler,
            drop_last=False,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            collate_fn=collate_fn,
        )

    def _built(self, split: str) -> Dataset:
        if split not in self.datasets:
            stage = next(s for s, splits in STAGE_SPLITS.items() if split in splits)
            raise PtftError(f"{type(self).__name__}: no {split} dataset; call setup({stage!r}) first")
        return self.datasets[split]

    def train_dataloader(self) -> DataLoader:
        return self._loader(self._built("train"), train=True, collate_fn=self.collate_fn(), lengths=self.train_lengths())

    def val_dataloader(self) -> DataLoader:
        return self._loader(self._built("val"), train=False, collate_fn=self.collate_fn())

    def test_dataloader(self) -> DataLoader:
        return self._loader(self._built("test"), train=False, collate_fn=self.collate_fn())

    def predict_dataloader(self) -> DataLoader:
        return self._loader(self._built("predict"), train=False, collate_fn=self.collate_fn())


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
        self, batch_size: int, eval_batch_size: int | None, num_workers: int, labels: list[str] | None,
        seed: int | None = None, val_fraction: float = 0.1, train_per_class: int | None = None,
    ) -> None:
        super().__init__(batch_size, eval_batch_size, num_workers, seed, val_fraction, train_per_class)
        self.init_labels(labels)
