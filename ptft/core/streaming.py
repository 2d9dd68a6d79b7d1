"""Data larger than memory: ``ptft convert`` writes LitData shards, :class:`StreamingDataModule` streams them.

Why LitData: its ``StreamingDataset`` has random access and a length (Lightning knows an epoch's batches; an epoch
is a seeded shuffle), reads local folders in place or object storage through a cache, and its
``StreamingDataLoader`` has ``state_dict`` / ``load_state_dict`` that resume exactly mid-epoch (a per-rank sample
count, skipped without reading those samples). Hugging Face ``datasets`` streaming has no random access or length,
shuffles through a buffer whose content its ``state_dict`` does not keep (a resumed run refills it: not the samples
an uninterrupted run sees); WebDataset's tar shards have no exact mid-epoch state either. LitData is Lightning's own.

Shards hold no pickle: every sample is ``{"index": int, "label": int, <payload>, "source": bytes}`` where the payload
is the file's encoded bytes (``image``: JPEG / PNG / ...; ``audio``: WAV / FLAC / ...) or the raw text as UTF-8
(``text``, and ``text_pair``), so each modality's own decoding and transforms run at read time, as with files.
``index`` is the row's position in the sorted input listing: a stable id. Rows are written in a seeded random order,
because LitData shuffles chunks and the rows inside a chunk, not across chunks.

Resuming: Lightning saves a stateful loader's position in its loop state, but restores it only when the loader is
built after the checkpoint is read, which ``trainer.estimated_stepping_batches`` in ``configure_optimizers`` (every
ptft module calls it for its schedule) prevents (pytorch-lightning#20550: the run would silently start the epoch
over). So the position travels in the data module's own state (:meth:`StreamingDataModule.state_dict`), restored
into the training loader when it is built; and because Lightning ends an epoch at its length without exhausting the
iterator, :class:`ResumableLoader` tells LitData when the resumed epoch is over.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

from ptft.core.data import FineTuneDataModule, LabelsMixin, hold_out_indices
from ptft.core.errors import PtftError, missing_extra

try:
    from litdata import StreamingDataLoader, StreamingDataset
except ImportError as err:  # the stream extra is not installed
    raise missing_extra("litdata", "stream") from err

#: Written by ``ptft convert`` next to the split folders: what the shards hold.
INFO_FILE = "labels.json"
FORMAT = "ptft-shards-v1"
KINDS = ("image", "audio", "text")
#: LitData's serializer names that shards may use: no ``pickle`` (reading one would run arbitrary code), and none
#: that decodes on read (images to tensors, audio through torchcodec): the modality's own decoding runs instead.
SAFE_FORMATS = {"int", "bytes"}
_VERBS = {"train": "fitting", "val": "validating", "test": "testing", "predict": "predicting"}


# --- what the shards hold ---------------------------------------------------------------------------------------
def read_info(root: Path, kind: str | None = None) -> dict[str, Any]:
    """The ``labels.json`` of a shard folder written by ``ptft convert``; one-line errors for anything else."""
    path = root / INFO_FILE
    if not path.is_file():
        raise PtftError(f"{root} has no {INFO_FILE}: give the folder `ptft convert --output` wrote")
    info = json.loads(path.read_text())
    if info.get("format") != FORMAT:
        raise PtftError(f"{path}: not written by ptft convert (format {info.get('format')!r}, expected {FORMAT!r})")
    if kind is not None and info["kind"] != kind:
        raise PtftError(f"{root} holds {info['kind']} shards, not {kind}: convert with --kind {kind}")
    return info


def check_shards(folder: Path) -> None:
    """One-line error unless ``folder`` holds LitData shards of safe types only (ints and bytes: no pickle)."""
    index = folder / "index.json"
    if not index.is_file():
        raise PtftError(f"{folder} holds no LitData shards (no index.json): convert the data with `ptft convert`")
    formats = set(json.loads(index.read_text())["config"]["data_format"])
    if not formats <= SAFE_FORMATS:
        raise PtftError(
            f"{folder} stores {sorted(formats - SAFE_FORMATS)} fields; ptft reads only {sorted(SAFE_FORMATS)} "
            "(a pickled field would run code when read): convert the data with `ptft convert`"
        )


# --- the training loader's position -----------------------------------------------------------------------------
class ResumableLoader(StreamingDataLoader):
    """LitData's ``StreamingDataLoader`` whose position is saved by :class:`StreamingDataModule`, not by Lightning.

    Lightning's loop saves the ``state_dict`` of a loader that has one and restores it only into a loader built after
    the checkpoint is read, never the case in ptft (see the module docstring); so the loader gives Lightning an empty
    state (it still counts as resumable: no warning that it is not), and :func:`epoch_position` and
    :meth:`resume_from` call LitData's own methods.
    """

    def state_dict(self) -> dict[str, Any]:
        """Empty: the data module saves the position (:func:`epoch_position`)."""
        return {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Nothing: :meth:`resume_from` takes the position the data module saved."""

    def resume_from(self, state: dict[str, Any]) -> None:
        """Continues from ``state`` (:func:`epoch_position`) at the next iteration."""
        StreamingDataLoader.load_state_dict(self, state)

    def __iter__(self) -> Any:
        if self.restore and self._num_samples_yielded_streaming >= len(self.dataset):
            # The resumed epoch was served whole, but Lightning stops fetching at the epoch's length rather than
            # exhausting the iterator, so LitData never saw it end and would replay the saved position: start the
            # next epoch instead.
            self.restore = False
        return super().__iter__()


def epoch_position(loader: StreamingDataLoader, epoch_batches: int | float) -> dict[str, Any]:
    """LitData's state of the training loader (its epoch, and the samples this rank drew in it), where a finished
    epoch (``epoch_batches`` drawn: also with ``limit_train_batches``) keeps no position, so the next starts anew.

    Lightning fetches no batch ahead from a loader with a length (LitData's have one), so the samples drawn are
    those training has seen when a checkpoint is saved.
    """
    state = StreamingDataLoader.state_dict(loader)
    batch_size = int(loader.batch_size or 1)
    if state["num_samples_yielded"] >= epoch_batches * batch_size:
        state["num_samples_yielded"] = 0
        state["dataset"] = loader.dataset.state_dict(0, loader.num_workers, batch_size)
    return state


# --- the base data module ---------------------------------------------------------------------------------------
class StreamingDataModule(LabelsMixin, FineTuneDataModule):
    """Base of the data modules that stream LitData shards written by ``ptft convert``.

    It owns the ``StreamingDataset`` of each split (``<data>/train``, ``<data>/val``, ``<data>/test``), the
    ``StreamingDataLoader`` of each, the shuffle (LitData's: chunk order and rows inside a chunk, from ``seed`` and the
    epoch) and the training loader's position in checkpoints, so that ``--ckpt_path last`` continues mid-epoch with
    the samples not yet seen. A modality adds :meth:`decoder` (a stored sample -> the item its collation reads) and
    :meth:`collate_fn`.

    Label names come from the shards' ``labels.json``. The validation split is the one ``ptft convert`` held out
    (``--val_fraction``), or one converted with ``--split val``; nothing is held out here.
    """

    #: The ``ptft convert --kind`` whose shards this module reads.
    kind = ""

    def __init__(self, data: str, batch_size: int, eval_batch_size: int | None, num_workers: int,
                 seed: int | None, shuffle: bool) -> None:
        super().__init__(batch_size, eval_batch_size, num_workers, seed)
        self.init_labels(None)
        self.root = Path(data).expanduser()
        if not self.root.is_dir():
            raise PtftError(f"data: {data!r} is not a folder (working directory: {Path.cwd()}); "
                            f"write one with: ptft convert --kind {self.kind} --input ... --output {data}")
        self.info = read_info(self.root, self.kind)
        self.shuffle = shuffle
        self._train_loader: ResumableLoader | None = None
        self._pending_position: dict[str, Any] | None = None

    # --- modality hooks ---------------------------------------------------------------------------------------
    def decoder(self, split: str) -> Callable[[dict[str, Any]], dict[str, Any]]:
        """A picklable function: stored sample -> the item :meth:`collate_fn` reads (augmented for ``train``)."""
        raise NotImplementedError

    # --- the base's hooks -------------------------------------------------------------------------------------
    def discover_labels(self) -> list[str]:
        return list(self.info["label_names"])

    def load_split(self, split: str) -> Path | None:
        folder = self.root / split
        return folder if split != "predict" and folder.is_dir() else None

    def check(self, split: str, rows: Path) -> Path:
        check_shards(rows)
        return rows

    def split_rows(self, split: str) -> Path:
        folder = self.rows(split)
        if folder is None:
            raise PtftError(f"{_VERBS[split]} needs {split} data: {self.source_hint(split)}")
        return folder

    def source_hint(self, split: str) -> str:
        if split == "predict":
            return "shards are for training and evaluation; predict from files with the modality's file data module"
        how = {"train": "", "val": " (or hold it out of training: --split train --val_fraction 0.1)"}.get(split, "")
        return (f"{self.root / split} does not exist; write it with: ptft convert --kind {self.kind} --input ... "
                f"--output {self.root} --split {split}{how}")

    def build(self, split: str, rows: Path) -> StreamingDataset:
        train = split == "train"
        return StreamingDataset(str(rows), shuffle=train and self.shuffle, seed=self.seed, transform=self.decoder(split),
                                drop_last=None if train else False)  # None: LitData's default, on under DDP

    # --- loaders ----------------------------------------------------------------------------------------------
    def _streaming_loader(self, split: str) -> ResumableLoader:
        train = split == "train"
        # No persistent workers: LitData sets each epoch's shuffle on the dataset when the iteration starts.
        return ResumableLoader(self._built(split), batch_size=self.batch_size if train else self.eval_batch_size,
                               num_workers=self.num_workers, collate_fn=self.collate_fn())

    def train_dataloader(self) -> ResumableLoader:
        loader = self._streaming_loader("train")
        if self._pending_position is not None:
            loader.resume_from(self._pending_position)
            self._pending_position = None
        self._train_loader = loader
        return loader

    def val_dataloader(self) -> ResumableLoader:
        return self._streaming_loader("val")

    def test_dataloader(self) -> ResumableLoader:
        return self._streaming_loader("test")

    def predict_dataloader(self) -> Any:
        raise PtftError(f"{type(self).__name__}: {self.source_hint('predict')}")

    # --- checkpoints ------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """The training loader's position: its epoch and the samples drawn in it (:func:`epoch_position`)."""
        trainer, loader = self.trainer, self._train_loader
        if trainer is None or loader is None:
            return {}
        return {"train_position": epoch_position(loader, trainer.num_training_batches)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Keeps the saved position for the training loader (Lightning reads the checkpoint before building it)."""
        self._pending_position = state_dict.get("train_position")
        if self._train_loader is not None and self._pending_position is not None:
            self._train_loader.resume_from(self._pending_position)
            self._pending_position = None


# --- ptft convert -----------------------------------------------------------------------------------------------
@dataclass
class ConvertRows:
    """One input as ``ptft convert`` reads it: a label and a payload pointer per row, and how to read a payload.

    Attributes:
        labels: Each row's label as given (a class-folder name, a label-column value).
        items: Each row's payload pointer (a file location, a row number): small and picklable.
        read: Module-level function (picklable, runs in writer processes): an item -> its payload fields
            (``{"image": bytes}``, ``{"text": str}``) and ``source``, the row's name in errors.
    """

    labels: list[Any]
    items: list[Any]
    read: Callable[[Any], dict[str, Any]]


def _sample(row: tuple[int, Any, int], read: Callable[[Any], dict[str, Any]]) -> dict[str, Any]:
    index, item, label = row
    # Strings are written as UTF-8 bytes: LitData stores a string naming an existing file as that file's contents
    # (its serializers guess by value), which would turn a text such as "/etc/hosts" into the file.
    fields = {k: v.encode("utf-8") if isinstance(v, str) else v for k, v in read(item).items()}
    return {"index": index, "label": label, **fields}


def _cpus() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def write_shards(rows: list[tuple[int, Any, int]], read: Callable[[Any], dict[str, Any]], folder: Path,
                 num_workers: int, chunk_bytes: str) -> None:
    """``rows`` (``(index, item, label id)``) written in their order as LitData shards in ``folder``."""
    import multiprocessing

    from litdata import optimize

    # fork: a spawned writer would first re-import torch (seconds each); DataLoader workers fork on Linux too.
    method = "fork" if "fork" in multiprocessing.get_all_start_methods() else None
    try:
        optimize(fn=partial(_sample, read=read), inputs=rows, output_dir=str(folder), chunk_bytes=chunk_bytes,
                 num_workers=max(1, min(num_workers, len(rows))), reorder_files=False, start_method=method)
    except ValueError as err:
        raise PtftError(f"writing {folder}: {err}") from err


def _kind_module(kind: str) -> Any:
    import importlib

    return importlib.import_module(f"ptft.{'vision' if kind == 'image' else kind}.streaming")


def convert(kind: str, input: str, output: str, split: str = "train", val_fraction: float = 0.1, seed: int = 42,
            text_column: str = "text", text_pair_column: str | None = None, label_column: str = "label",
            path_column: str = "path", skip_bad_files: bool = False, num_workers: int | None = None,
            chunk_bytes: str = "64MB", overwrite: bool = False) -> dict[str, Any]:
    """Converts an image folder, an audio folder or a text file into LitData shards; returns the new ``labels.json``.

    Args:
        kind: ``image`` / ``audio`` (class-folder trees, zips of them, or CSVs of path and label) or ``text`` (csv,
            tsv, json, jsonl or parquet with a text and a label column).
        input: The folder, archive or file.
        output: The shard folder: ``<output>/train``, ``<output>/val``, ``<output>/test`` and ``labels.json``.
        split: ``train`` (and ``val`` held out of it, unless ``val_fraction`` is 0), or ``val`` / ``test`` alone;
            those need the training conversion's labels.json, whose label names they must use.
        val_fraction: Fraction of ``train`` rows written to ``val`` (seeded hold-out, as the file data modules do).
        seed: Seed of the hold-out and of the order rows are written in.
        text_column: Text files: the column with the text.
        text_pair_column: Text files: the column with the second text of sentence pairs.
        label_column: The label column (text files, and image / audio CSVs).
        path_column: Image / audio CSVs: the column with file paths (relative to the CSV).
        skip_bad_files: Leave out unreadable images or audio files (with a warning) instead of stopping.
        num_workers: Writer processes; default: the CPUs, at most 8.
        chunk_bytes: Largest chunk file (``64MB``: LitData's recommended size).
        overwrite: Replace split folders that exist.
    """
    import torch

    if kind not in KINDS:
        raise PtftError(f"--kind must be one of {', '.join(KINDS)}, got {kind!r}")
    if split not in ("train", "val", "test"):
        raise PtftError(f"--split must be train, val or test, got {split!r}")
    out = Path(output).expanduser()
    info_path = out / INFO_FILE
    if split == "train":
        info = {"format": FORMAT, "kind": kind, "label_names": None, "splits": {}, "source": {}}
    elif not info_path.is_file():
        raise PtftError(f"--split {split}: {info_path} does not exist; convert the training data first "
                        f"(ptft convert --kind {kind} --input TRAIN --output {output})")
    else:
        info = read_info(out, kind)
    module = _kind_module(kind)
    options = {"text_column": text_column, "text_pair_column": text_pair_column, "label_column": label_column,
               "path_column": path_column, "skip_bad_files": skip_bad_files}
    rows: ConvertRows = module.convert_rows(input, options)
    from ptft.core.labels import discover_label_names, encode_labels

    if split == "train":
        info["label_names"] = discover_label_names(rows.labels, None, input)
    label_ids = encode_labels(rows.labels, info["label_names"], input)
    parts = {split: list(range(len(rows.items)))}
    if split == "train" and val_fraction > 0:
        parts["train"], parts["val"] = hold_out_indices(len(rows.items), val_fraction, seed)
    for name in parts:
        folder = out / name
        if folder.exists() and any(folder.iterdir()):
            if not overwrite:
                raise PtftError(f"{folder} exists; remove it or pass --overwrite")
            shutil.rmtree(folder)
    generator = torch.Generator().manual_seed(seed)
    for name, indices in parts.items():
        # A seeded random order: LitData shuffles chunks and the rows inside each, so sorted rows (class by class)
        # would make class-by-class batches.
        order = [indices[i] for i in torch.randperm(len(indices), generator=generator).tolist()]
        print(f"ptft convert: writing {len(order)} {name} rows to {out / name}", file=sys.stderr)
        write_shards([(i, rows.items[i], label_ids[i]) for i in order], rows.read, out / name,
                     num_workers or min(_cpus(), 8), chunk_bytes)
        info["splits"][name] = len(order)
        info["source"][name] = str(Path(input).expanduser().resolve())
    info_path.parent.mkdir(parents=True, exist_ok=True)
    info_path.write_text(json.dumps(info, indent=2) + "\n")
    return info


def convert_command(args: list[str]) -> None:
    """``ptft convert --kind image|audio|text --input PATH --output DIR``: see :func:`convert`."""
    parser = argparse.ArgumentParser(
        prog="ptft convert",
        description="Write LitData shards (train, val and labels.json) that the streaming data modules read: "
                    "for data larger than memory, with exact mid-epoch resume.",
    )
    parser.add_argument("--kind", required=True, choices=KINDS)
    parser.add_argument("--input", required=True, help="image / audio class-folder tree (or zip, or CSV of "
                        "path,label); text: csv, tsv, json, jsonl or parquet")
    parser.add_argument("--output", required=True, help="shard folder: <output>/train, <output>/val, labels.json")
    parser.add_argument("--split", default="train", choices=("train", "val", "test"),
                        help="train (val held out of it), or a val / test set alone (after train)")
    parser.add_argument("--val_fraction", type=float, default=0.1, help="train rows held out for val (0: none)")
    parser.add_argument("--seed", type=int, default=42, help="seed of the hold-out and of the written order")
    parser.add_argument("--text_column", default="text")
    parser.add_argument("--text_pair_column", default=None)
    parser.add_argument("--label_column", default="label")
    parser.add_argument("--path_column", default="path", help="image / audio CSVs: the file-path column")
    parser.add_argument("--skip_bad_files", action="store_true", help="leave out unreadable files (warns)")
    parser.add_argument("--num_workers", type=int, default=None, help="writer processes (default: CPUs, at most 8)")
    parser.add_argument("--chunk_bytes", default="64MB", help="largest chunk file")
    parser.add_argument("--overwrite", action="store_true", help="replace split folders that exist")
    own = parser.parse_args(args)
    info = convert(**vars(own))
    counts = ", ".join(f"{n} {split}" for split, n in info["splits"].items())
    print(f"wrote {counts} rows of {len(info['label_names'])} classes to {own.output}; train on them with "
          f"data.init_args.data={own.output}")


def read_file_bytes(item: tuple[str, str | None]) -> tuple[bytes, str]:
    """A file's bytes and its name, from ``(path, None)`` or ``(member, archive)`` (a zip member)."""
    path, archive = item
    if archive is None:
        return Path(path).read_bytes(), path
    import zipfile

    with zipfile.ZipFile(archive) as zf:
        return zf.read(path), f"{archive}/{path}"


def file_rows(input: str, options: dict[str, Any], suffixes: Any, kind: str,
              probe: Callable[[list[Any]], list[Any]], field: str) -> ConvertRows:
    """:class:`ConvertRows` of an image or audio input (class folders, a zip, a CSV), every file probed first:
    unreadable ones stop the conversion naming the first, or are left out with ``skip_bad_files``."""
    from lightning.pytorch.utilities import rank_zero_warn

    from ptft.core.files import describe, list_labelled_files

    pairs, labels = list_labelled_files(input, "--input", suffixes, options["path_column"], options["label_column"],
                                        kind=kind)
    sources = [source for source, _ in pairs]
    bad = [(i, why) for i, why in enumerate(probe(sources)) if isinstance(why, str)]
    if bad:
        first = f"{describe(sources[bad[0][0]])} ({bad[0][1]})"
        if not options["skip_bad_files"]:
            raise PtftError(f"{len(bad)} unreadable file(s) among the {kind} under {input}, first: {first}; "
                            "remove them or pass --skip_bad_files")
        rank_zero_warn(f"leaving out {len(bad)} unreadable file(s) among the {kind} under {input}, first: {first}")
        dropped = {i for i, _ in bad}
        sources = [s for i, s in enumerate(sources) if i not in dropped]
        labels = [label for i, label in enumerate(labels) if i not in dropped]
    items = [(str(s.root), None) if s.archive is None else (s.root.as_posix(), str(s.archive)) for s in sources]
    return ConvertRows(labels, items, partial(_file_payload, field=field))


def _file_payload(item: tuple[str, str | None], field: str) -> dict[str, Any]:
    data, name = read_file_bytes(item)
    return {field: data, "source": name}


