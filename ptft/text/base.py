"""What every text data module shares: files or a Hugging Face dataset, column checks, the tokenizer.

Splits, the held-out validation split, the seed and the loaders come from :class:`ptft.core.data.FineTuneDataModule`.
A text task's data module subclasses :class:`TextDataModule` and implements :meth:`~TextDataModule.columns` (the
columns each split needs), :meth:`~TextDataModule.encode` (a split's rows -> tokenised features) and
:meth:`~TextDataModule.collate` (features -> a padded batch).
"""

from __future__ import annotations

import csv
import warnings
from pathlib import Path
from typing import Any

import lightning as L

from ptft.core.data import FineTuneDataModule, existing_path
from ptft.core.errors import PtftError
from ptft.core.hub import load_pretrained, resolve_model_name

FORMATS = {".csv": "csv", ".tsv": "csv", ".tab": "csv", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}
SPLITS = ("train", "val", "test", "predict")


def load_table(path: Path) -> Any:
    """Loads a CSV / TSV / JSON / JSONL / Parquet file as a ``datasets.Dataset`` (memory-mapped and cached)."""
    import datasets

    fmt = FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise PtftError(f"{path}: unsupported file type {path.suffix!r}; use one of {sorted(FORMATS)}")
    kwargs: dict[str, Any] = {}
    if path.suffix.lower() in (".tsv", ".tab"):
        # Tab-separated files (GLUE's among them) are not quoted: a lone '"' is part of the text.
        kwargs = {"delimiter": "\t", "quoting": csv.QUOTE_NONE}
    try:
        return datasets.load_dataset(fmt, data_files=str(path), split="train", **kwargs)
    except Exception as err:  # datasets raises many types for malformed files
        raise PtftError(f"cannot read {path}: {str(err).splitlines()[0]}") from err


def column(ds: Any, name: str) -> list[Any]:
    """A column of a ``datasets.Dataset`` as a list (``ds[name]`` is a lazy column, slow to iterate)."""
    return ds[name][:]


def sort_by_length(ds: Any, key: str = "length") -> Any:
    """Longest first: evaluation batches then carry almost no padding (metrics do not depend on order)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # pyarrow's deprecation inside datasets.sort
        return ds.sort(key, reverse=True)


class TextSources:
    """Where a text task's splits come from: local files, or a Hugging Face dataset name / folder with split names.

    Applies ``rename_columns`` and checks the needed columns, with a one-line error naming the argument to set.
    """

    def __init__(
        self,
        files: dict[str, str | None],
        dataset: str | None,
        dataset_config: str | None,
        splits: dict[str, str | None],
        rename_columns: dict[str, str] | None,
        reader: Any = load_table,
    ) -> None:
        self.files = {split: existing_path(path, f"{split}_file") for split, path in files.items()}
        self.reader = reader  # a task's own file formats (nested SQuAD JSON, CoNLL) -> datasets.Dataset
        self.dataset = dataset
        self.dataset_config = dataset_config
        self.splits = splits
        self.rename_columns = rename_columns or {}

    def describe(self, split: str) -> str:
        return str(self.files.get(split) or f"{self.dataset}[{self.splits.get(split)}]")

    def load(self, split: str, needed: dict[str, str]) -> Any:
        """The split as a ``datasets.Dataset``, or ``None`` if not given.

        Args:
            split: ``train``, ``val``, ``test`` or ``predict``.
            needed: Column name -> the data argument that names it (for the error message).
        """
        if self.dataset is not None and split != "predict" and self.files.get(split) is None:
            name = self.splits.get(split)
            if name is None:
                return None
            import datasets

            try:
                ds = datasets.load_dataset(self.dataset, self.dataset_config, split=name)
            except Exception as err:
                raise PtftError(
                    f"cannot load split {name!r} of dataset {self.dataset!r}: {str(err).splitlines()[0]}. "
                    "Offline, point train_file / val_file at local files instead; for a dataset without this split, "
                    "set data.init_args.val_split=null to hold out val_fraction of training"
                ) from err
        elif self.files.get(split) is not None:
            ds = self.reader(self.files[split])
        else:
            return None
        renames = {old: new for old, new in self.rename_columns.items() if old in ds.column_names}
        if renames:
            ds = ds.rename_columns(renames)
        for name, arg in needed.items():
            if name not in ds.column_names:
                raise PtftError(
                    f"{self.describe(split)} has no column {name!r} (columns: {ds.column_names}); "
                    f"set data.init_args.{arg} or rename_columns"
                )
        if len(ds) == 0:
            raise PtftError(f"{self.describe(split)} has no rows")
        return ds


class TextDataModule(FineTuneDataModule):
    """Base of the text data modules. Subclasses pass their task arguments and the shared ones below.

    Args:
        train_file: Training data: ``.csv``, ``.tsv`` (unquoted), ``.json``, ``.jsonl`` or ``.parquet``.
        val_file: Validation data; held out from the training data when missing.
        test_file: Test data (for ``ptft test``).
        predict_file: Data to predict (for ``ptft predict``); targets are ignored if present.
        dataset: A Hugging Face ``datasets`` name or local dataset folder, instead of files.
        dataset_config: The dataset's configuration name (``sst2`` for ``glue``).
        train_split: Split of ``dataset`` used for training.
        val_split: Split of ``dataset`` used for validation; ``None`` holds out ``val_fraction`` of training.
        test_split: Split of ``dataset`` used for testing.
        rename_columns: Renames applied to every split before anything else, e.g. ``{content: sentence}`` when the
            validation file names a column differently.
        tokenizer: Tokenizer name or folder; defaults to the model's ``model_name``.
        max_length: Truncate inputs to this many tokens.
        batch_size: Training batch size.
        eval_batch_size: Validation / test / predict batch size; defaults to ``batch_size``.
        val_fraction: Fraction of the training rows held out for validation when none is given.
        seed: Seed of the held-out split and of the batch order; by default the one of ``seed_everything``.
        num_workers: DataLoader worker processes (tokenisation happens once beforehand, so 0 is usually fastest).
    """

    def __init__(
        self,
        train_file: str | None = None,
        val_file: str | None = None,
        test_file: str | None = None,
        predict_file: str | None = None,
        dataset: str | None = None,
        dataset_config: str | None = None,
        train_split: str = "train",
        val_split: str | None = "validation",
        test_split: str | None = None,
        rename_columns: dict[str, str] | None = None,
        tokenizer: str | None = None,
        max_length: int = 256,
        batch_size: int = 32,
        eval_batch_size: int | None = None,
        val_fraction: float = 0.1,
        seed: int | None = None,
        num_workers: int = 0,
    ) -> None:
        super().__init__(batch_size, eval_batch_size, num_workers, seed, val_fraction)
        if dataset is None and all(f is None for f in (train_file, val_file, test_file, predict_file)):
            raise PtftError("give train_file (and optionally val_file / test_file) or a dataset name")
        self.sources = TextSources(
            {"train": train_file, "val": val_file, "test": test_file, "predict": predict_file},
            dataset, dataset_config, {"train": train_split, "val": val_split, "test": test_split}, rename_columns,
            reader=self.read_file,
        )
        self.tokenizer_name = tokenizer
        self.max_length = max_length
        self._raw: dict[str, Any] | None = None
        self.tokenizer: Any = None

    # --- task hooks -----------------------------------------------------------------------------------------
    def read_file(self, path: Path) -> Any:
        """Reads a local data file as a ``datasets.Dataset``; override for a task's own formats (CoNLL, SQuAD)."""
        return load_table(path)

    def columns(self, split: str) -> dict[str, str]:
        """Columns ``split`` needs: column name -> the argument that names it (``{"text": "text_column"}``)."""
        raise NotImplementedError

    def encode(self, ds: Any, split: str) -> Any:
        """Tokenises a split (``datasets.Dataset.map``); ``predict`` rows carry no targets."""
        raise NotImplementedError

    def collate(self, features: list[dict[str, Any]]) -> dict[str, Any]:
        """Pads a list of encoded rows into a batch."""
        raise NotImplementedError

    # --- raw data -------------------------------------------------------------------------------------------
    @property
    def files(self) -> dict[str, Path | None]:
        return self.sources.files

    def raw(self) -> dict[str, Any]:
        """The loaded, renamed and checked splits (``None`` for absent ones), before the held-out split."""
        if self._raw is None:
            self._raw = {split: self.sources.load(split, self.columns(split)) for split in SPLITS}
        return self._raw

    # --- tokenizer and setup --------------------------------------------------------------------------------
    def connect(self, model: L.LightningModule) -> None:
        if self.tokenizer_name is None:
            self.tokenizer_name = getattr(model, "model_name", None)

    def load_tokenizer(self) -> Any:
        if self.tokenizer is None:
            if self.tokenizer_name is None:
                self._connect_from_trainer()
            if self.tokenizer_name is None:
                raise PtftError("set data.init_args.tokenizer: the model does not name one")
            from transformers import AutoTokenizer

            name = resolve_model_name(self.tokenizer_name)
            tokenizer = load_pretrained(AutoTokenizer.from_pretrained, name, "tokenizer")
            # Targets (QA spans, token tags, RNN heads' packing) are computed on unpadded rows: pad on the right.
            # Generation pads prompts on the left itself (ChatDataModule's collate).
            tokenizer.padding_side = "right"
            if tokenizer.pad_token is None and tokenizer.eos_token is not None:
                tokenizer.pad_token = tokenizer.eos_token  # decoder-only models (GPT-2, Llama): padding is masked out
            self.tokenizer = tokenizer
        return self.tokenizer

    # --- the base's hooks -----------------------------------------------------------------------------------
    def load_split(self, split: str) -> Any:
        """A split's loaded, renamed and checked rows; ``predict`` falls back to the test rows."""
        raw = self.raw()
        if split == "predict" and raw["predict"] is None:
            return raw["test"]
        return raw[split]

    def build(self, split: str, rows: Any) -> Any:
        return self.encode(rows, split)

    def collate_fn(self) -> Any:
        return self.collate

    def source_hint(self, split: str) -> str:
        return {
            "train": "data.init_args.train_file (or dataset)",
            "val": "data.init_args.val_file",
            "test": "data.init_args.test_file (or test_split with a dataset)",
            "predict": "data.init_args.predict_file",
        }[split]

    def setup(self, stage: str) -> None:
        self.load_tokenizer()
        super().setup(stage)
