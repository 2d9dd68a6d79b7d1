"""Token classification (named-entity recognition, POS tagging): one tag per word, entity-level F1 from seqeval."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import rank_zero_warn
from torch import nn
from torchmetrics import MetricCollection
from torchmetrics.classification import MulticlassAccuracy

from ptft.core.data import LabelsMixin
from ptft.core.errors import PtftError
from ptft.core.hf import HFModule, build_hf_model, label_config
from ptft.core.hub import load_pretrained, resolve_model_name
from ptft.core.classification import ClassificationModule
from ptft.text.base import TextDataModule, column, sort_by_length
from ptft.text.heads import EncoderWithHead, TokenHead, TokenHeadKind
from ptft.text.token_data import (
    CONLL_SUFFIXES,
    IGNORE,
    EntityScore,
    Scheme,
    align_labels,
    continuation_ids,
    extract_entities,
    first_subtokens,
    read_conll,
)

__all__ = ["TokenClassificationDataModule", "TokenClassifier"]
NOT_MODEL_INPUTS = ("labels", "word_ids", "words")


class TokenClassifier(HFModule, ClassificationModule):
    """Token classification (NER, POS) with any ``AutoModelForTokenClassification`` model.

    The loss is cross-entropy over the labelled sub-tokens (``-100`` elsewhere). Validation logs entity-level
    micro ``precision``, ``recall`` and ``f1`` (seqeval, on each word's first sub-token) and token accuracy ``acc``;
    the best checkpoint follows ``val/f1``. Predictions are per sentence: the words, their tags and the entities.

    Args:
        model_name: Hugging Face hub name (``bert-base-cased``), a local folder with ``config.json`` and weights, or
            a ptft checkpoint (``.ckpt``). Also the default tokenizer of the data module (it must be a fast one).
        pretrained: Load the pretrained weights. ``False`` builds the architecture with random weights.
        model_config: Values overriding the model's config (``{hidden_dropout_prob: 0.2}``). A dict holding
            ``model_type`` is a complete config, used without reading ``model_name``'s.
        head: ``model``: the model's own token-classification head (dropout + linear). ``lstm`` / ``gru``: a
            bidirectional RNN over the encoder's token states, then a linear layer (BERT-BiLSTM taggers).
        head_dropout: Dropout before the classifier of an ``lstm`` / ``gru`` head.
        rnn_size: Hidden size per direction of an ``lstm`` / ``gru`` head (default: half the encoder's).
        mode: Entity matching of the metrics: ``default`` (seqeval's default, as conlleval) or ``strict``
            (only entities well formed in ``scheme`` count).
        scheme: Tagging scheme for ``mode: strict`` (``IOB2``, ``IOBES``, ``BILOU``…).
        **kwargs: The shared fine-tuning arguments of :class:`ptft.core.ClassificationModule` (``num_labels``,
            ``label_names`` (both linked from the data), ``label_smoothing``, ``optimizer``, ``scheduler``, ``l1``,
            ``l2_sp``, ``peft``, ``checkpoint_weights``, ``compile``, ``gradient_checkpointing``).
    """

    needs_processor = True  # an export without its tokenizer is refused (ptft.core.hf.HFModule.save_model)

    checkpoint_monitor = ("val/f1", "max")

    def __init__(
        self,
        model_name: str,
        pretrained: bool = True,
        model_config: dict[str, Any] | None = None,
        head: TokenHeadKind = "model",
        head_dropout: float = 0.1,
        rnn_size: int | None = None,
        mode: Literal["default", "strict"] = "default",
        scheme: Scheme = "IOB2",
        **kwargs: Any,
    ) -> None:
        self.entity_mode = mode  # before the base __init__: build_metrics reads them
        self.entity_scheme = scheme
        super().__init__(**kwargs)
        from transformers import AutoModel, AutoModelForTokenClassification

        self.model_name = model_name
        labels = label_config(self.label_names)
        if head == "model":
            model = build_hf_model(AutoModelForTokenClassification, model_name, pretrained, model_config, **labels)
        else:
            encoder = build_hf_model(AutoModel, model_name, pretrained, model_config, **labels)
            hidden = encoder.config.hidden_size
            model = EncoderWithHead(encoder, TokenHead(head, hidden, self.num_labels, head_dropout, rnn_size))
        architecture = model.config.to_dict()
        self.set_model(model)
        self._save_hparams(pretrained=False, model_config=architecture)

    def build_metrics(self) -> MetricCollection:
        scores = {
            name: EntityScore(self.label_names, name, self.entity_mode, self.entity_scheme)
            for name in ("precision", "recall", "f1")
        }
        # the three scores share their states (torchmetrics compute groups); seqeval runs once per score
        return MetricCollection({**scores, "acc": MulticlassAccuracy(self.num_labels, average="micro", ignore_index=IGNORE)})

    def forward(self, batch: dict[str, Any]) -> torch.Tensor:
        """Tag logits of every sub-token, ``(batch, time, num_labels)``."""
        out = self.model(**{k: v for k, v in batch.items() if k not in NOT_MODEL_INPUTS})
        return out if isinstance(out, torch.Tensor) else out.logits

    def head_modules(self, model: nn.Module) -> list[str]:
        return ["head"] if isinstance(model, EncoderWithHead) else super().head_modules(model)

    def loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(
            logits.flatten(0, 1).float(), labels.flatten(), ignore_index=IGNORE, label_smoothing=self.label_smoothing
        )

    def step(self, batch: dict[str, Any], stage: str) -> tuple[torch.Tensor, Any]:
        logits = self(batch)
        labels = batch["labels"]
        # metrics score words: the first sub-token of each (also when label_all_tokens trains on every sub-token)
        target = labels.masked_fill(~first_subtokens(batch["word_ids"]), IGNORE)
        return self.loss(logits, labels), (logits.detach().argmax(dim=-1), target)

    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> dict[str, Any]:
        """The words of each sentence and their predicted tags (``O`` for words cut by ``max_length``)."""
        predicted = self(batch).argmax(dim=-1)
        first = first_subtokens(batch["word_ids"])
        words = batch.get("words")
        fallback = "O" if "O" in self.label_names else self.label_names[0]
        sentences, tags = [], []
        for row in range(predicted.shape[0]):
            word_ids = batch["word_ids"][row][first[row]].tolist()
            ids = predicted[row][first[row]].tolist()
            count = len(words[row]) if words is not None else max(word_ids, default=-1) + 1
            sentence_tags = [fallback] * count
            for word, tag in zip(word_ids, ids):
                sentence_tags[word] = self.label_names[tag]
            sentences.append(list(words[row]) if words is not None else [str(i) for i in range(count)])
            tags.append(sentence_tags)
        return {"tokens": sentences, "tags": tags}

    def prediction_rows(self, outputs: dict[str, Any]) -> list[dict[str, Any]]:
        """``tokens``, ``tags`` and ``entities`` (``type``, ``text``, word offsets ``start``/``end``, end exclusive)."""
        return [
            {"tokens": words, "tags": tags, "entities": extract_entities(words, tags)}
            for words, tags in zip(outputs["tokens"], outputs["tags"])
        ]


class TokenClassificationDataModule(LabelsMixin, TextDataModule):
    """Token classification data: CoNLL files, JSON lines / Parquet / a Hugging Face dataset with word lists.

    CoNLL files (``.conll``, ``.txt``, ``.bio``, ``.iob``): one token per line, whitespace-separated columns, the
    token first and the tag last (or in ``tag_column_index``), blank lines between sentences, ``-DOCSTART-`` lines
    skipped. Other files and datasets need a column of word lists and a column of tag lists (names, or ids with
    ``labels`` or a ``ClassLabel`` feature giving their names, as Hugging Face's ``conll2003``).

    Words are split into sub-tokens (``is_split_into_words``); each word's tag goes to its first sub-token.
    Sentences longer than ``max_length`` sub-tokens are truncated: their cut words are not scored and are predicted
    ``O``.

    Args:
        tokens_column: Column with the list of words of each sentence.
        tags_column: Column with the list of tags (names or ids), one per word.
        tag_column_index: Column of the tag in CoNLL files (``-1``: the last; the token is always the first).
        labels: Tag names in id order. Integer tags index this list; otherwise it fixes the order and any other
            tag is an error. Discovered from the training data when not given (``O`` first, then sorted).
        label_all_tokens: Train on every sub-token of a word (``B-X`` continuations become ``I-X``), instead of
            the first sub-token only (later ones get ``-100``). Metrics always score words by their first sub-token.
        group_by_length: Batch sentences of similar length together (less padding, faster). Off by default: on
            WNUT-17 it cost entity F1 (docs/text.md, Token classification).
        **kwargs: The shared text data arguments of :class:`ptft.text.base.TextDataModule` (``train_file``,
            ``val_file``, ``test_file``, ``predict_file``, ``dataset``, ``dataset_config``, splits,
            ``rename_columns``, ``tokenizer``, ``max_length``, ``batch_size``, ``eval_batch_size``,
            ``val_fraction``, ``seed``, ``num_workers``).
    """

    def __init__(
        self,
        tokens_column: str = "tokens",
        tags_column: str = "ner_tags",
        tag_column_index: int = -1,
        labels: list[str] | None = None,
        label_all_tokens: bool = False,
        group_by_length: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.save_hyperparameters(logger=False)
        self.init_labels(labels)
        self.tokens_column = tokens_column
        self.tags_column = tags_column
        self.tag_column_index = tag_column_index
        self.label_all_tokens = label_all_tokens
        self.group_by_length = group_by_length

    def read_file(self, path: Path) -> Any:
        """CoNLL files (``.conll``, ``.txt``, ``.bio``, ``.iob``) into a dataset; other formats as every text task."""
        if path.suffix.lower() not in CONLL_SUFFIXES:
            return super().read_file(path)
        import datasets

        # files to predict need only the token column
        read = read_conll(path, None if path == self.sources.files.get("predict") else self.tag_column_index)
        data: dict[str, list] = {self.tokens_column: read.tokens, "_line": read.lines}
        if read.tags is not None:
            data[self.tags_column] = read.tags
        return datasets.Dataset.from_dict(data)

    def columns(self, split: str) -> dict[str, str]:
        needed = {self.tokens_column: "tokens_column"}
        if split != "predict":
            needed[self.tags_column] = "tags_column"
        return needed

    # --- tags -----------------------------------------------------------------------------------------------
    def _where(self, ds: Any, split: str, row: int) -> str:
        if "_line" in ds.column_names:
            return f"{self.sources.describe(split)} sentence at line {ds[row]['_line']}"
        return f"{self.sources.describe(split)} row {row + 1}"

    def _checked_tags(self, ds: Any, split: str) -> list[list[Any]]:
        """The tag lists of a split, after checking there is one tag per token."""
        tokens, tags = column(ds, self.tokens_column), column(ds, self.tags_column)
        for row, (words, row_tags) in enumerate(zip(tokens, tags)):
            if not isinstance(words, list) or not isinstance(row_tags, list):
                raise PtftError(
                    f"{self._where(ds, split, row)}: {self.tokens_column!r} and {self.tags_column!r} must be lists "
                    f"(one entry per word), got {type(words).__name__} and {type(row_tags).__name__}"
                )
            if len(words) != len(row_tags):
                raise PtftError(
                    f"{self._where(ds, split, row)} has {len(words)} tokens but {len(row_tags)} tags; "
                    "every token needs exactly one tag"
                )
        return tags

    def discover_labels(self) -> list[str]:
        raw = self.raw()
        train = raw["train"]
        if train is None:
            if self.given_labels is None:
                raise PtftError("without training data, give the tag names: data.init_args.labels=[O, B-PER, ...]")
            return list(self.given_labels)
        tags = self._checked_tags(train, "train")
        feature_names = getattr(getattr(train.features.get(self.tags_column), "feature", None), "names", None)
        seen = {t for row in tags for t in row}
        if seen and all(isinstance(t, int) for t in seen):
            names = self.given_labels or feature_names
            if names is None:
                raise PtftError(
                    f"{self.sources.describe('train')} has integer tags without names; "
                    "give them in id order: data.init_args.labels=[O, B-PER, I-PER, ...]"
                )
            if max(seen) >= len(names) or min(seen) < 0:
                raise PtftError(f"{self.sources.describe('train')} has tag id {max(seen)} but {len(names)} tag names: {names}")
            names = list(names)
        elif self.given_labels is not None:
            names = list(self.given_labels)
        else:
            rest = sorted({str(t) for t in seen} - {"O"})
            names = ["O", *rest] if "O" in {str(t) for t in seen} else rest
        for split in ("train", "val", "test"):
            if raw[split] is not None:
                self._check_known(raw[split], split, names)
        return names

    def _check_known(self, ds: Any, split: str, names: list[str]) -> None:
        tags = self._checked_tags(ds, split) if split != "train" else column(ds, self.tags_column)
        known = set(names)
        unknown: dict[str, int] = {}
        for row, row_tags in enumerate(tags):
            for tag in row_tags:
                ok = 0 <= tag < len(names) if isinstance(tag, int) else str(tag) in known
                if not ok and str(tag) not in unknown:
                    unknown[str(tag)] = row
        if unknown:
            first = min(unknown.values())
            what = "never seen in training" if split != "train" else "not in the given labels"
            raise PtftError(
                f"{self.sources.describe(split)} has tags {what}: {sorted(unknown)[:5]} (first: "
                f"{self._where(ds, split, first)}); known: {names[:12]}{' …' if len(names) > 12 else ''}"
            )

    # --- tokenizer and encoding -----------------------------------------------------------------------------
    def load_tokenizer(self) -> Any:
        tokenizer = super().load_tokenizer()
        # byte-level BPE (RoBERTa, GPT-2, DeBERTa) needs the prefix space for pre-split words, as in HF's run_ner
        backend = getattr(tokenizer, "backend_tokenizer", None)
        byte_level = backend is not None and "ByteLevel" in json.dumps(json.loads(backend.to_str()).get("pre_tokenizer"))
        if byte_level and getattr(tokenizer, "add_prefix_space", None) is False:
            from transformers import AutoTokenizer

            name = resolve_model_name(self.tokenizer_name)
            tokenizer = load_pretrained(AutoTokenizer.from_pretrained, name, "tokenizer", add_prefix_space=True)
            self.tokenizer = tokenizer
        if not getattr(tokenizer, "is_fast", False):
            raise PtftError(f"token classification needs a fast tokenizer (word_ids); {self.tokenizer_name!r} has none")
        return tokenizer

    def encode(self, ds: Any, split: str) -> Any:
        tokenizer, words_column, tags_column = self.tokenizer, self.tokens_column, self.tags_column
        names = self.label_names if split != "predict" else None
        index = {name: i for i, name in enumerate(names or [])}
        continuation = continuation_ids(names or [])
        label_all, max_length = self.label_all_tokens, self.max_length

        def tokenize(batch: dict[str, list]) -> dict[str, list]:
            enc = tokenizer(batch[words_column], is_split_into_words=True, truncation=True, max_length=max_length)
            word_ids = [enc.word_ids(i) for i in range(len(enc["input_ids"]))]
            enc["word_ids"] = [[-1 if w is None else w for w in ids] for ids in word_ids]
            enc["length"] = [len(ids) for ids in enc["input_ids"]]
            enc["cut"] = [
                max((w for w in ids if w is not None), default=-1) < len(words) - 1
                for ids, words in zip(word_ids, batch[words_column])
            ]
            if names is not None:
                enc["labels"] = [
                    align_labels(ids, [t if isinstance(t, int) else index[str(t)] for t in tags], label_all, continuation)
                    for ids, tags in zip(word_ids, batch[tags_column])
                ]
            else:
                enc["words"] = batch[words_column]
            return enc

        encoded = ds.map(tokenize, batched=True, remove_columns=ds.column_names, desc=f"Tokenizing {split}")
        cut = sum(column(encoded, "cut"))
        if cut:
            rank_zero_warn(
                f"{cut} of {len(encoded)} {split} sentences are longer than max_length={max_length} sub-tokens: "
                "their last words are cut (not scored; predicted O). Raise data.init_args.max_length"
            )
        encoded = encoded.remove_columns("cut")
        return sort_by_length(encoded) if split in ("val", "test") else encoded

    def collate(self, features: list[dict[str, Any]]) -> dict[str, Any]:
        inputs = [{k: v for k, v in f.items() if k not in (*NOT_MODEL_INPUTS, "length")} for f in features]
        batch = dict(self.tokenizer.pad(inputs, return_tensors="pt"))
        width = batch["input_ids"].shape[1]
        left = self.tokenizer.padding_side == "left"

        def pad(rows: list[list[int]], value: int) -> torch.Tensor:
            padded = [[value] * (width - len(r)) + r if left else r + [value] * (width - len(r)) for r in rows]
            return torch.tensor(padded, dtype=torch.long)

        if "labels" in features[0]:
            batch["labels"] = pad([f["labels"] for f in features], IGNORE)
        batch["word_ids"] = pad([f["word_ids"] for f in features], -1)
        if "words" in features[0]:
            batch["words"] = [f["words"] for f in features]
        return batch

    def train_lengths(self) -> list[int] | None:
        return column(self.datasets["train"], "length") if self.group_by_length else None
