"""Text classification data: single texts or pairs, from files or a Hugging Face dataset."""

from __future__ import annotations

from typing import Any

from ptft.core.data import LabelsMixin
from ptft.core.errors import PtftError
from ptft.core.labels import discover_label_names, encode_labels
from ptft.text.base import TextDataModule, column, load_table, sort_by_length

__all__ = ["TextClassificationDataModule", "column", "load_table"]


class TextClassificationDataModule(LabelsMixin, TextDataModule):
    """Single-text or text-pair classification data from files or a Hugging Face dataset.

    Give either files (``train_file`` …) or a ``dataset`` name with split names. Without a validation file or
    split, ``val_fraction`` of the training data is held out (seeded).

    Args:
        text_column: Column with the text.
        text_pair_column: Column with the second text of sentence-pair tasks (NLI, paraphrase).
        label_column: Column with the label, as integer ids or as names.
        labels: Label names in id order. Integer labels index this list; otherwise it fixes the order and any
            other label is an error. Discovered from the training data when not given.
        group_by_length: Batch texts of similar length together (shuffled mega-batches sorted by length, as
            Hugging Face's length-grouped sampler): far less padding, same accuracy.
        **kwargs: The shared text data arguments of :class:`ptft.text.base.TextDataModule` (``train_file``,
            ``val_file``, ``test_file``, ``predict_file``, ``dataset``, ``dataset_config``, splits,
            ``rename_columns``, ``tokenizer``, ``max_length``, ``batch_size``, ``eval_batch_size``,
            ``val_fraction``, ``seed``, ``num_workers``).
    """

    def __init__(
        self,
        text_column: str = "text",
        text_pair_column: str | None = None,
        label_column: str = "label",
        labels: list[str] | None = None,
        group_by_length: bool = True,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.save_hyperparameters(logger=False)
        self.init_labels(labels)
        self.text_column = text_column
        self.text_pair_column = text_pair_column
        self.label_column = label_column
        self.group_by_length = group_by_length
        self._pad: Any = None

    def columns(self, split: str) -> dict[str, str]:
        needed = {self.text_column: "text_column"}
        if self.text_pair_column:
            needed[self.text_pair_column] = "text_pair_column"
        if split != "predict":
            needed[self.label_column] = "label_column"
        return needed

    def discover_labels(self) -> list[str]:
        raw = self.raw()
        train = raw["train"]
        if train is None:
            if self.given_labels is None:
                raise PtftError("without training data, give the label names: data.init_args.labels=[...]")
            return list(self.given_labels)
        names = discover_label_names(column(train, self.label_column), self.given_labels, self.sources.describe("train"))
        for split in ("val", "test"):
            if raw[split] is not None:
                encode_labels(column(raw[split], self.label_column), names, self.sources.describe(split))
        return names

    def encode(self, ds: Any, split: str) -> Any:
        tokenizer, text, pair, max_length = self.tokenizer, self.text_column, self.text_pair_column, self.max_length
        label, names = self.label_column, self.label_names if split != "predict" else None

        def tokenize(batch: dict[str, list]) -> dict[str, list]:
            enc = tokenizer(batch[text], batch[pair] if pair else None, truncation=True, max_length=max_length)
            enc["length"] = [len(ids) for ids in enc["input_ids"]]
            if names is not None:  # evaluation labels were checked against training's in discover_labels
                enc["labels"] = encode_labels(batch[label], names, "labels")
            return enc

        encoded = ds.map(tokenize, batched=True, remove_columns=ds.column_names, desc=f"Tokenizing {split}")
        return sort_by_length(encoded) if split in ("val", "test") else encoded

    def collate(self, features: list[dict[str, Any]]) -> dict[str, Any]:
        if self._pad is None:
            from transformers import DataCollatorWithPadding

            self._pad = DataCollatorWithPadding(self.tokenizer, return_tensors="pt")
        return self._pad([{k: v for k, v in f.items() if k != "length"} for f in features])

    def train_lengths(self) -> list[int] | None:
        return column(self.datasets["train"], "length") if self.group_by_length else None
