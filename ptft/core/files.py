"""Where a modality's files live, once for every modality: a folder, a zip archive (or a folder inside one), or a CSV
file of paths; listing them (with class-folder labels or a label column), opening them, stamping them for the check
cache, and the policy for unreadable ones.

Images (:mod:`ptft.vision.data`) and audio (:mod:`ptft.audio.data`) read through it; each modality adds only its
decoder and its probe (what "readable" means for its files).
"""

from __future__ import annotations

import csv
import io
import os
import zipfile
from collections.abc import Callable, Collection
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import BinaryIO, Literal, TypeVar

from lightning.pytorch.utilities import rank_zero_warn

from ptft.core.errors import PtftError

T = TypeVar("T")


@dataclass
class FileSource:
    """One file: on disk (``root`` is its path) or inside a zip archive (``archive`` set, ``root`` its member name)."""

    root: Path
    archive: Path | None = None

    @classmethod
    def parse(cls, location: str, arg: str) -> FileSource:
        """A location as users write it: ``data/train``, ``data.zip`` or ``data.zip/train`` (a folder inside it)."""
        path = Path(location).expanduser()
        if path.is_dir():
            return cls(path)
        for parent in [path, *path.parents]:
            if parent.is_file() and zipfile.is_zipfile(parent):
                return cls(Path(path.relative_to(parent).as_posix()), archive=parent)
        if path.exists():
            raise PtftError(f"{arg}: {location!r} is neither a folder, a zip archive nor a .csv file")
        raise PtftError(f"{arg}: {location!r} does not exist (working directory: {Path.cwd()})")


def describe(source: FileSource) -> str:
    """Where a file is, as users wrote it: ``path`` or ``archive.zip/member``."""
    return f"{source.archive}/{source.root}" if source.archive else str(source.root)


def open_file(source: FileSource, archives: dict[tuple[int, Path], zipfile.ZipFile]) -> str | BinaryIO:
    """A path to open (a file on disk) or the bytes of an archive member, read through an archive handle kept in
    ``archives`` (one per process and archive: a forked DataLoader or check worker must not share the parent's
    file offset)."""
    if source.archive is None:
        return str(source.root)
    key = (os.getpid(), source.archive)
    archive = archives.get(key)
    if archive is None:
        archive = archives[key] = zipfile.ZipFile(source.archive)
    return io.BytesIO(archive.read(source.root.as_posix()))


def _read_csv(location: str, arg: str, columns: list[str], hint: str = "") -> tuple[Path, list[dict[str, str]]]:
    """The CSV's path and rows; one-line errors for a missing file or column (``hint`` ends the column error)."""
    csv_path = Path(location).expanduser()
    if not csv_path.is_file():
        raise PtftError(f"{arg}: {location!r} does not exist")
    with open(csv_path, newline="") as f:
        reader = csv.DictReader(f)
        missing = [c for c in columns if c not in (reader.fieldnames or [])]
        if missing:
            raise PtftError(f"{csv_path} has no column {missing[0]!r} (columns: {reader.fieldnames}){hint}")
        return csv_path, list(reader)


def _members(source: FileSource, suffixes: Collection[str]) -> list[tuple[FileSource, tuple[str, ...]]]:
    """Every file with one of ``suffixes`` under a folder or archive folder, sorted, with its path parts below it."""
    if source.archive is None:
        files = sorted(p for p in source.root.rglob("*") if p.suffix.lower() in suffixes)
        return [(FileSource(p), p.relative_to(source.root).parts) for p in files]
    prefix = "" if str(source.root) == "." else source.root.as_posix().rstrip("/") + "/"
    with zipfile.ZipFile(source.archive) as zf:
        names = sorted(n for n in zf.namelist() if n.startswith(prefix) and PurePosixPath(n).suffix.lower() in suffixes)
    return [(FileSource(Path(n), archive=source.archive), PurePosixPath(n[len(prefix):]).parts) for n in names]


def list_labelled_files(
    location: str, arg: str, suffixes: Collection[str], path_column: str, label_column: str, kind: str = "files"
) -> tuple[list[tuple[FileSource, str]], list[str]]:
    """``(file, label)`` pairs and the labels, from a class-folder tree (``root/<label>/<file>``, also inside a zip)
    or a CSV of paths (relative to the CSV) and labels. ``kind`` names the files in errors (``images``, ``audio files``)."""
    if location.lower().endswith(".csv"):
        csv_path, rows = _read_csv(location, arg, [path_column, label_column])
        samples = [(FileSource(csv_path.parent / row[path_column]), row[label_column]) for row in rows]
        if not samples:
            raise PtftError(f"{arg}: {location!r} lists no {kind}")
        return samples, [label for _, label in samples]
    pairs = [(f, parts[0]) for f, parts in _members(FileSource.parse(location, arg), suffixes) if len(parts) >= 2]
    if not pairs:
        raise PtftError(
            f"{arg}: no {kind} in class folders under {location!r} (expected <root>/<class>/<file>, the file "
            f"ending in {', '.join(sorted(suffixes))})"
        )
    return pairs, [label for _, label in pairs]


def list_files(
    location: str, arg: str, suffixes: Collection[str], path_column: str | None = None, kind: str = "files"
) -> list[FileSource]:
    """Every file with one of ``suffixes`` under a folder or a zip archive (or a folder inside one), at any depth
    (folder names are ignored); or, with ``path_column``, the files a CSV lists (paths relative to it)."""
    if path_column is not None and location.lower().endswith(".csv"):
        csv_path, rows = _read_csv(location, arg, [path_column])
        files = [FileSource(csv_path.parent / row[path_column]) for row in rows]
    else:
        files = [f for f, _ in _members(FileSource.parse(location, arg), suffixes)]
    if not files:
        raise PtftError(f"{arg}: no {kind} ({', '.join(sorted(suffixes))}) under {location!r}")
    return files


def file_stamps(sources: list[FileSource], kind: str) -> list[tuple[str, str] | None]:
    """Check-cache key and stamp of each file (:func:`ptft.core.data.cached_checks`): ``kind`` (which probe) and the
    absolute path as key, size and modification time as stamp. An archive member's stamp is its archive's (rewriting
    the archive checks its members again). ``None`` for a missing file."""
    archives: dict[Path, tuple[str, str] | None] = {}
    stamps: list[tuple[str, str] | None] = []
    for source in sources:
        if source.archive is None:
            name = os.path.abspath(source.root)
            try:
                stat = os.stat(name)
            except OSError:
                stamps.append(None)
                continue
            stamps.append((f"{kind}:{name}", f"{stat.st_size}:{stat.st_mtime_ns}"))
            continue
        if source.archive not in archives:  # one stat per archive, not per member
            try:
                stat = source.archive.stat()
                archives[source.archive] = (str(source.archive.resolve()), f"{stat.st_size}:{stat.st_mtime_ns}")
            except OSError:
                archives[source.archive] = None
        archive = archives[source.archive]
        stamps.append(None if archive is None else (f"{kind}:{archive[0]}/{source.root.as_posix()}", archive[1]))
    return stamps


def drop_unreadable(
    rows: list[T], problems: list[tuple[int, str]], where: Callable[[int], str], split: str,
    policy: Literal["error", "skip"], kind: str, option: str,
) -> list[T]:
    """``rows`` without those ``problems`` names (``(index, why)``): one-line error under ``policy: error`` (and always
    for ``predict``, whose every row must get an answer), else a warning with the count and the first.

    Args:
        rows: A split's rows.
        problems: ``(row index, why it cannot be used)`` of the bad rows.
        where: The location of row ``i`` for the message.
        split: The split's name.
        policy: ``error`` or ``skip``.
        kind: What a row is, for the message (``image``, ``audio file``).
        option: The data argument that sets ``policy`` (``on_bad_image``).
    """
    if not problems:
        return rows
    first = f"{where(problems[0][0])} ({problems[0][1]})"
    if policy == "error" or split == "predict":
        hint = "" if split == "predict" else f"; remove them or set data.init_args.{option}=skip"
        raise PtftError(f"{len(problems)} unreadable {kind}(s) in {split}, first: {first}{hint}")
    rank_zero_warn(f"skipping {len(problems)} unreadable {kind}(s) in {split}, first: {first}")
    bad = {i for i, _ in problems}
    return [row for i, row in enumerate(rows) if i not in bad]



class LabelledFileSplits:
    """Splits given as class-folder trees, zips of them, or CSVs of ``path,label``: the listing, the label discovery
    and the split rows that image and audio classification data share. A data module sets ``file_suffixes`` and
    ``file_kind`` (``images``, ``audio files``) and calls :meth:`list_splits` in ``__init__``; rows are
    ``(file, label)`` pairs, ``(file, None)`` to predict."""

    file_suffixes: Collection[str] = ()
    file_kind: str = "files"

    def list_splits(self, train: str | None, val: str | None, test: str | None, predict: str | None,
                    path_column: str, label_column: str) -> None:
        self.columns = (path_column, label_column)
        self.samples = {
            split: list_labelled_files(loc, split, self.file_suffixes, *self.columns, kind=self.file_kind)
            if loc is not None else None
            for split, loc in (("train", train), ("val", val), ("test", test))
        }
        self.predict_location = predict

    def discover_labels(self) -> list[str]:
        """Sorted training labels (or the given ``labels``); validation and test labels must be among them."""
        from ptft.core.labels import split_label_names

        labels = {split: None if samples is None else samples[1] for split, samples in self.samples.items()}
        return split_label_names(labels, getattr(self, "given_labels", None), self.file_kind)

    def load_split(self, split: str) -> list[tuple[FileSource, str | None]] | None:
        """``(file, label)`` pairs; files to predict need no label (``None``) and may lie at any depth."""
        if split == "predict":
            if self.predict_location is None:
                return None
            files = list_files(self.predict_location, "predict", self.file_suffixes, self.columns[0], kind=self.file_kind)
            return [(f, None) for f in files]
        samples = self.samples[split]
        return None if samples is None else samples[0]
