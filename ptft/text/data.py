"""Text data modules: files or Hugging Face datasets, tokenised once (cached by ``datasets``), padded per batch."""

from __future__ import annotations

import csv
import warnings
from pathlib import Path
from typing import Any

import lightning as L
import torch

from ptft.core.data import ClassificationDataModule, existing_path
from ptft.core.errors import PtftError
from ptft.core.hub import load_pretrained
from ptft.core.labels import discover_label_names, encode_labels

_FORMATS = {".csv": "csv", ".tsv": "csv", ".tab": "csv", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}
_SPLITS = ("train", "val", "test", "predict")


def load_table(path: Path) -> Any:
    """Loads a CSV / TSV / JSON / JSONL / Parquet file as a ``datasets.Dataset`` (memory-mapped and cached)."""
    import datasets

    fmt = _FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise PtftError(f"{path}: unsupported file type {path.suffix!r}; use one of {sorted(_FORMATS)}")
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


class TextClassificationDataModule(ClassificationDataModule):
    """Single-text or text-pair classification data from files or a Hugging Face dataset.

    Give either files (``train_file`` …) or a ``dataset`` name with split names. Without a validation file or
    split, ``val_fraction`` of the training data is held out (seeded).

    Args:
        train_file: Training data: ``.csv``, ``.tsv`` (unquoted), ``.json``, ``.jsonl`` or ``.parquet``.
        val_file: Validation data; held out from ``train_file`` when missing.
        test_file: Test data (for ``ptft test``).
        predict_file: Unlabelled data (for ``ptft predict``); a label column is ignored if present.
        dataset: A Hugging Face ``datasets`` name or local dataset folder, instead of files.
        dataset_config: The dataset's configuration name (``sst2`` for ``glue``).
        train_split: Split of ``dataset`` used for training.
        val_split: Split of ``dataset`` used for validation; ``None`` holds out ``val_fraction`` of training.
        test_split: Split of ``dataset`` used for testing.
        text_column: Column with the text.
        text_pair_column: Column with the second text of sentence-pair tasks (NLI, paraphrase).
        label_column: Column with the label, as integer ids or as names.
        rename_columns: Renames applied to every split before anything else, e.g. ``{content: sentence}`` when the
            validation file names its text column differently.
        labels: Label names in id order. Integer labels index this list; otherwise it fixes the order and any
            other label is an error. Discovered from the training data when not given.
        tokenizer: Tokenizer name or folder; defaults to the model's ``model_name``.
        max_length: Truncate texts to this many tokens.
        batch_size: Training batch size.
        eval_batch_size: Validation / test / predict batch size; defaults to ``batch_size``.
        group_by_length: Batch texts of similar length together (shuffled mega-batches sorted by length, as
            Hugging Face's length-grouped sampler): far less padding, same accuracy.
        val_fraction: Fraction of the training data held out for validation when none is given.
        seed: Seed of the held-out split and of the batch order.
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
        text_column: str = "text",
        text_pair_column: str | None = None,
        label_column: str = "label",
        rename_columns: dict[str, str] | None = None,
        labels: list[str] | None = None,
        tokenizer: str | None = None,
        max_length: int = 256,
        batch_size: int = 32,
        eval_batch_size: int | None = None,
        group_by_length: bool = True,
        val_fraction: float = 0.1,
        seed: int = 42,
        num_workers: int = 0,
    ) -> None:
        super().__init__(batch_size, eval_batch_size, num_workers, labels, seed)
        self.save_hyperparameters(logger=False)
        if dataset is None and train_file is None and predict_file is None and test_file is None:
            raise PtftError("give train_file (and optionally val_file / test_file) or a dataset name")
        self.files = {
            "train": existing_path(train_file, "train_file"),
            "val": existing_path(val_file, "val_file"),
            "test": existing_path(test_file, "test_file"),
            "predict": existing_path(predict_file, "predict_file"),
        }
        self.dataset_name = dataset
        self.dataset_config = dataset_config
        self.splits = {"train": train_split, "val": val_split, "test": test_split}
        self.text_column = text_column
        self.text_pair_column = text_pair_column
        self.label_column = label_column
        self.rename_columns = rename_columns or {}
        self.tokenizer_name = tokenizer
        self.max_length = max_length
        self.group_by_length = group_by_length
        self.val_fraction = val_fraction
        self._raw: dict[str, Any] | None = None
        self.datasets: dict[str, Any] = {}
        self.tokenizer: Any = None

    # --- raw data and labels --------------------------------------------------------------------------------
    def _load_split(self, split: str) -> Any:
        if self.dataset_name is not None and split != "predict":
            name = self.splits[split]
            if name is None:
                return None
            import datasets

            try:
                ds = datasets.load_dataset(self.dataset_name, self.dataset_config, split=name)
            except Exception as err:
                raise PtftError(
                    f"cannot load split {name!r} of dataset {self.dataset_name!r}: {str(err).splitlines()[0]}. "
                    "Offline, point train_file / val_file at local files instead"
                ) from err
        elif self.files[split] is not None:
            ds = load_table(self.files[split])
        else:
            return None
        renames = {old: new for old, new in self.rename_columns.items() if old in ds.column_names}
        if renames:
            ds = ds.rename_columns(renames)
        needed = [self.text_column] + ([self.text_pair_column] if self.text_pair_column else [])
        if split != "predict":
            needed.append(self.label_column)
        missing = [c for c in needed if c not in ds.column_names]
        if missing:
            source = self.files[split] or f"{self.dataset_name}[{self.splits[split]}]"
            raise PtftError(
                f"{source} has no column {missing[0]!r} (columns: {ds.column_names}); "
                f"set data.init_args.{'text_column' if missing[0] == self.text_column else 'label_column'} "
                f"or rename_columns"
            )
        return ds

    def raw(self) -> dict[str, Any]:
        """The loaded, renamed and checked splits (``None`` for absent ones), before the held-out split."""
        if self._raw is None:
            self._raw = {split: self._load_split(split) for split in _SPLITS}
        return self._raw

    def discover_labels(self) -> list[str]:
        raw = self.raw()
        train = raw["train"]
        if train is None:
            if self.given_labels is None:
                raise PtftError("without training data, give the label names: data.init_args.labels=[...]")
            return list(self.given_labels)
        source = str(self.files["train"] or self.dataset_name)
        names = discover_label_names(column(train, self.label_column), self.given_labels, source)
        for split in ("val", "test"):
            if raw[split] is not None:
                encode_labels(column(raw[split], self.label_column), names, str(self.files[split] or split))
        return names

    # --- tokenisation ---------------------------------------------------------------------------------------
    def connect(self, model: L.LightningModule) -> None:
        if self.tokenizer_name is None:
            self.tokenizer_name = getattr(model, "model_name", None)

    def _tokenize(self, ds: Any, with_labels: bool) -> Any:
        tokenizer, text, pair, max_length = self.tokenizer, self.text_column, self.text_pair_column, self.max_length
        label, names = self.label_column, self.label_names if with_labels else None

        def tokenize(batch: dict[str, list]) -> dict[str, list]:
            enc = tokenizer(batch[text], batch[pair] if pair else None, truncation=True, max_length=max_length)
            enc["length"] = [len(ids) for ids in enc["input_ids"]]
            if names is not None:  # evaluation labels were checked against training's in discover_labels
                enc["labels"] = encode_labels(batch[label], names, "labels")
            return enc

        return ds.map(tokenize, batched=True, remove_columns=ds.column_names, desc="Tokenizing")

    def setup(self, stage: str) -> None:
        if self.tokenizer is None:
            if self.tokenizer_name is None:
                self._connect_from_trainer()
            if self.tokenizer_name is None:
                raise PtftError("set data.init_args.tokenizer: the model does not name one")
            from transformers import AutoTokenizer

            self.tokenizer = load_pretrained(AutoTokenizer.from_pretrained, self.tokenizer_name, "tokenizer")
        raw = self.raw()
        if stage in ("fit", "validate") and "train" not in self.datasets:
            train, val = raw["train"], raw["val"]
            if train is None:
                raise PtftError("fitting needs train_file or a dataset")
            if val is None:
                parts = train.train_test_split(test_size=self.val_fraction, seed=self.seed)
                train, val = parts["train"], parts["test"]
            self.datasets["train"] = self._tokenize(train, with_labels=True)
            self.datasets["val"] = self._by_length(self._tokenize(val, with_labels=True))
        if stage == "test" and "test" not in self.datasets:
            if raw["test"] is None:
                raise PtftError("testing needs test_file (or test_split with a dataset)")
            self.datasets["test"] = self._by_length(self._tokenize(raw["test"], with_labels=True))
        if stage == "predict" and "predict" not in self.datasets:
            source = raw["predict"] if raw["predict"] is not None else raw["test"]
            if source is None:
                raise PtftError("predicting needs predict_file")
            self.datasets["predict"] = self._tokenize(source, with_labels=False)

    @staticmethod
    def _by_length(ds: Any) -> Any:
        # Evaluation order does not change metrics; sorted by length, batches carry almost no padding.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # pyarrow's deprecation inside datasets.sort
            return ds.sort("length", reverse=True)

    # --- loaders --------------------------------------------------------------------------------------------
    def _collate(self) -> Any:
        from transformers import DataCollatorWithPadding

        pad = DataCollatorWithPadding(self.tokenizer, return_tensors="pt")

        def collate(features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
            return pad([{k: v for k, v in f.items() if k != "length"} for f in features])

        return collate

    def train_dataloader(self) -> torch.utils.data.DataLoader:
        ds = self.datasets["train"]
        lengths = column(ds, "length") if self.group_by_length else None
        return self._loader(ds, train=True, collate_fn=self._collate(), lengths=lengths)

    def val_dataloader(self) -> torch.utils.data.DataLoader:
        return self._loader(self.datasets["val"], train=False, collate_fn=self._collate())

    def test_dataloader(self) -> torch.utils.data.DataLoader:
        return self._loader(self.datasets["test"], train=False, collate_fn=self._collate())

    def predict_dataloader(self) -> torch.utils.data.DataLoader:
        return self._loader(self.datasets["predict"], train=False, collate_fn=self._collate())
