"""Text classification from LitData shards (``ptft convert --kind text``): raw texts tokenised at read time by the
model's tokenizer and padded per batch, as :class:`ptft.text.TextClassificationDataModule` does."""

from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Any

import lightning as L

from ptft.core.data import existing_path
from ptft.core.errors import PtftError
from ptft.core.streaming import ConvertRows, StreamingDataModule
from ptft.text.base import TextDataModule, column, load_table

_TABLES: dict[str, Any] = {}  # each writer process opens (memory-maps) the table once


def convert_rows(input: str, options: dict[str, Any]) -> ConvertRows:
    """``ptft convert --kind text``: every row of a csv / tsv / json / jsonl / parquet file with a text (and
    optionally a text-pair) column and a label column; an empty text stops the conversion, naming its row."""
    import pyarrow.compute as pc

    path = existing_path(input, "--input")
    table = load_table(path)
    text, pair, label = options["text_column"], options["text_pair_column"], options["label_column"]
    for name, option in ((text, "--text_column"), (pair, "--text_pair_column"), (label, "--label_column")):
        if name is not None and name not in table.column_names:
            raise PtftError(f"{path} has no column {name!r} (columns: {table.column_names}); set {option}")
    if len(table) == 0:
        raise PtftError(f"{path} has no rows")
    for name in (text, pair):
        if name is not None and table.data.column(name).null_count:
            first = pc.index(pc.is_null(table.data.column(name)), True).as_py()
            raise PtftError(f"{path}: row {first + 1} has no {name!r} value; fill or remove the empty rows")
    read = partial(_text_payload, path=str(path), text=text, pair=pair)
    return ConvertRows(column(table, label), list(range(len(table))), read)


def _text_payload(row: int, path: str, text: str, pair: str | None) -> dict[str, Any]:
    if path not in _TABLES:
        _TABLES[path] = load_table(Path(path))
    values = _TABLES[path][row]
    fields = {"text": str(values[text])}
    if pair is not None:
        fields["text_pair"] = str(values[pair])
    return {**fields, "source": f"{path}:{row + 1}"}


class Tokenize:
    """A stored sample -> the tokenizer's ids (truncated to ``max_length``), ``labels`` and ``index``."""

    def __init__(self, tokenizer: Any, max_length: int) -> None:
        self.tokenizer = tokenizer
        self.max_length = max_length

    def __call__(self, sample: dict[str, Any]) -> dict[str, Any]:
        pair = sample["text_pair"].decode("utf-8") if "text_pair" in sample else None
        item = dict(self.tokenizer(sample["text"].decode("utf-8"), pair, truncation=True, max_length=self.max_length))
        return {**item, "labels": sample["label"], "index": sample["index"]}


class PadText:
    """Tokenised items -> a batch padded to its longest row (``DataCollatorWithPadding``), without ``index``."""

    def __init__(self, tokenizer: Any) -> None:
        from transformers import DataCollatorWithPadding

        self.pad = DataCollatorWithPadding(tokenizer, return_tensors="pt")

    def __call__(self, items: list[dict[str, Any]]) -> dict[str, Any]:
        return self.pad([{k: v for k, v in item.items() if k != "index"} for item in items])


class StreamingTextDataModule(StreamingDataModule):
    """Single-text or text-pair classification from shards written by ``ptft convert --kind text``, tokenised at read
    time (in the loader's workers) by the model's tokenizer and padded per batch.

    Shuffling, seeding, the validation and test splits and mid-epoch resume come from
    :class:`ptft.core.streaming.StreamingDataModule`. Long documents are truncated (no sliding windows) and batches
    are not grouped by length.

    Args:
        data: The folder ``ptft convert --output`` wrote (``train/``, ``val/``, optionally ``test/``, ``labels.json``).
        tokenizer: Tokenizer name or folder; defaults to the model's ``model_name``.
        max_length: Truncate inputs to this many tokens.
        shuffle: Shuffle training rows every epoch (LitData: chunk order, then rows inside each chunk).
        batch_size: Training batch size.
        eval_batch_size: Validation / test batch size; defaults to ``batch_size``.
        seed: Seed of the training order; by default the one of ``seed_everything``. Resuming needs the same seed,
            batch size, worker count and process count.
        num_workers: DataLoader worker processes tokenising rows.
    """

    kind = "text"

    def __init__(
        self,
        data: str,
        tokenizer: str | None = None,
        max_length: int = 256,
        shuffle: bool = True,
        batch_size: int = 32,
        eval_batch_size: int | None = None,
        seed: int | None = None,
        num_workers: int = 2,
    ) -> None:
        super().__init__(data, batch_size, eval_batch_size, num_workers, seed, shuffle)
        self.save_hyperparameters(logger=False)
        self.tokenizer_name = tokenizer
        self.max_length = max_length
        self.tokenizer: Any = None

    def connect(self, model: L.LightningModule) -> None:
        if self.tokenizer_name is None:
            self.tokenizer_name = getattr(model, "model_name", None)

    def setup(self, stage: str) -> None:
        # The file data modules' tokenizer settings (right padding, EOS as padding for decoder-only models).
        TextDataModule.load_tokenizer(self)  # type: ignore[arg-type]
        super().setup(stage)

    def decoder(self, split: str) -> Tokenize:
        return Tokenize(self.tokenizer, self.max_length)

    def collate_fn(self) -> PadText:
        return PadText(self.tokenizer)
