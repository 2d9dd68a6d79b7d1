"""Token classification helpers: the CoNLL reader, word-to-sub-token label alignment, entity-level metrics.

The metric is :mod:`seqeval`'s (the reference for CoNLL entity F1), wrapped in a ``torchmetrics.Metric`` whose
states are tensors, so it gathers across processes under DDP.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat

from ptft.core.errors import PtftError, missing_extra

CONLL_SUFFIXES = (".conll", ".txt", ".bio", ".iob")
IGNORE = -100  # cross-entropy's ignore_index: special tokens, padding, continuation sub-tokens
Scheme = Literal["IOB1", "IOB2", "IOE1", "IOE2", "IOBES", "BILOU"]


# --- CoNLL files --------------------------------------------------------------------------------------------------
@dataclass
class ConllSentences:
    """Sentences of a CoNLL file: words, tags (``None`` when not read) and the line each sentence starts on."""

    tokens: list[list[str]] = field(default_factory=list)
    tags: list[list[str]] | None = field(default_factory=list)
    lines: list[int] = field(default_factory=list)


def read_conll(path: str | Path, tag_column: int | None = -1) -> ConllSentences:
    """Reads a CoNLL-style file: one token per line, whitespace-separated columns, blank lines between sentences.

    The token is the first column; ``-DOCSTART-`` lines are skipped.

    Args:
        path: The file.
        tag_column: Column index of the tag (``-1``: the last; CoNLL-2003's NER tag is column 3 = the last).
            ``None`` reads tokens only (data to predict).
    """
    if tag_column is not None and tag_column == 0:
        raise PtftError("tag_column_index=0 is the token column; the tag is usually the last column (-1)")
    needed = 1 if tag_column is None else (tag_column + 1 if tag_column > 0 else 1 - tag_column)
    out = ConllSentences(tags=None if tag_column is None else [])
    words: list[str] = []
    tags: list[str] = []
    start = 0

    def flush() -> None:
        if words:
            out.tokens.append(list(words))
            if out.tags is not None:
                out.tags.append(list(tags))
            out.lines.append(start)
            words.clear()
            tags.clear()

    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            parts = line.split()
            if not parts:
                flush()
                continue
            if parts[0] == "-DOCSTART-":
                continue
            if len(parts) < needed:
                raise PtftError(
                    f"{path} line {number}: expected a token and a tag in column {tag_column} separated by "
                    f"whitespace, got {line.rstrip()!r} (set data.init_args.tag_column_index if the tag is elsewhere)"
                )
            if not words:
                start = number
            words.append(parts[0])
            if tag_column is not None:
                tags.append(parts[tag_column])
    flush()
    if not out.tokens:
        raise PtftError(f"{path} has no sentences (one token per line, blank lines between sentences)")
    return out


# --- labels per sub-token -----------------------------------------------------------------------------------------
def continuation_ids(label_names: list[str]) -> dict[int, int]:
    """``B-X`` id -> ``I-X`` id, for tags whose ``I-`` form exists (continuation sub-tokens of a ``B-`` word)."""
    index = {name: i for i, name in enumerate(label_names)}
    return {i: index["I-" + name[2:]] for i, name in enumerate(label_names) if name.startswith("B-") and "I-" + name[2:] in index}


def align_labels(
    word_ids: list[int | None], word_tags: list[int], label_all_tokens: bool, continuation: dict[int, int]
) -> list[int]:
    """Sub-token labels from word labels, as Hugging Face's ``run_ner``.

    The first sub-token of a word gets the word's tag. Later sub-tokens get ``-100`` (ignored by the loss), or with
    ``label_all_tokens`` the word's tag too (``B-X`` becoming ``I-X`` when that tag exists). Special tokens get
    ``-100``.
    """
    labels = []
    previous = None
    for word in word_ids:
        if word is None:
            labels.append(IGNORE)
        elif word != previous:
            labels.append(word_tags[word])
        elif label_all_tokens:
            tag = word_tags[word]
            labels.append(continuation.get(tag, tag))
        else:
            labels.append(IGNORE)
        previous = word
    return labels


def first_subtokens(word_ids: torch.Tensor) -> torch.Tensor:
    """Mask of the first sub-token of each word; ``word_ids`` is ``(batch, time)`` with ``-1`` off words."""
    previous = F.pad(word_ids[:, :-1], (1, 0), value=-1)
    return (word_ids >= 0) & (word_ids != previous)


# --- entities and metrics -----------------------------------------------------------------------------------------
def _seqeval() -> Any:
    try:
        import seqeval.metrics
        import seqeval.scheme
    except ImportError as err:
        raise missing_extra("seqeval", "text") from err
    return seqeval


def extract_entities(words: list[str], tags: list[str]) -> list[dict[str, Any]]:
    """Entities of a tagged sentence: ``type``, ``text`` and word offsets ``start`` / ``end`` (end exclusive)."""
    from_tags = _seqeval().metrics.sequence_labeling.get_entities(tags)
    return [{"type": t, "text": " ".join(words[s : e + 1]), "start": s, "end": e + 1} for t, s, e in from_tags]


class EntityScore(Metric):
    """Entity-level micro precision, recall or F1 from :mod:`seqeval`, over the first sub-token of each word.

    ``update(preds, target)`` takes ``(batch, time)`` tag ids; positions where ``target`` is ``-100`` are skipped.

    Args:
        label_names: Tag names in id order (``O``, ``B-PER``…).
        score: ``precision``, ``recall`` or ``f1``.
        mode: ``default`` (seqeval's default, lenient as conlleval: an ``I-X`` without ``B-X`` starts an entity) or
            ``strict`` (only entities that are well formed in ``scheme``).
        scheme: Tagging scheme of ``strict`` mode.
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    def __init__(
        self,
        label_names: list[str],
        score: Literal["precision", "recall", "f1"] = "f1",
        mode: Literal["default", "strict"] = "default",
        scheme: Scheme = "IOB2",
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.label_names = list(label_names)
        self.score = score
        self.mode = mode
        self.scheme = scheme
        self.add_state("preds", default=[], dist_reduce_fx="cat")
        self.add_state("target", default=[], dist_reduce_fx="cat")
        self.add_state("lengths", default=[], dist_reduce_fx="cat")

    def update(self, preds: torch.Tensor, target: torch.Tensor) -> None:
        keep = target != IGNORE
        self.preds.append(preds[keep])
        self.target.append(target[keep])
        self.lengths.append(keep.sum(dim=1))

    def compute(self) -> torch.Tensor:
        seqeval = _seqeval()
        # A list on one process, one tensor once torchmetrics has synced it across processes: dim_zero_cat takes both.
        if isinstance(self.lengths, list) and not self.lengths:
            return torch.tensor(0.0)
        lengths = dim_zero_cat(self.lengths).tolist()
        preds = self._sentences(dim_zero_cat(self.preds).tolist(), lengths)
        target = self._sentences(dim_zero_cat(self.target).tolist(), lengths)
        fn = {
            "precision": seqeval.metrics.precision_score,
            "recall": seqeval.metrics.recall_score,
            "f1": seqeval.metrics.f1_score,
        }[self.score]
        kwargs: dict[str, Any] = {"average": "micro", "zero_division": 0}
        if self.mode == "strict":
            kwargs.update(mode="strict", scheme=getattr(seqeval.scheme, self.scheme))
        return torch.tensor(float(fn(target, preds, **kwargs)))

    def _sentences(self, ids: list[int], lengths: list[int]) -> list[list[str]]:
        out, start = [], 0
        for length in lengths:
            out.append([self.label_names[i] for i in ids[start : start + length]])
            start += length
        return out
