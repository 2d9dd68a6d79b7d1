"""Extractive question answering data: SQuAD JSON or flat rows, tokenised into overlapping context windows.

Training uses every window on its own, labelled with the answer's first and last token, or the CLS token when the
answer is not inside the window (or the question has none). Evaluation and prediction keep all windows of an example
in one row, so a batch always holds whole examples and the answer can be chosen over all of their windows.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch

from ptft.core.errors import PtftError
from ptft.text.base import TextDataModule

__all__ = ["QuestionAnsweringDataModule", "is_squad_json", "read_squad_json"]

#: Batch keys that describe the windows and examples rather than feed the model.
EXAMPLE_KEYS = ("offsets", "cls_index", "window_example", "ids", "questions", "contexts", "answers")


def is_squad_json(path: Path) -> bool:
    """Whether ``path`` is a nested SQuAD file (``{"data": [{"paragraphs": [...]}]}``) rather than flat rows."""
    if path.suffix.lower() != ".json" or not path.is_file():
        return False
    with open(path, encoding="utf-8", errors="replace") as f:
        head = f.read(1 << 16)  # titles are short: "paragraphs" follows "data" early
    return head.lstrip().startswith("{") and bool(re.search(r'"data"\s*:\s*\[', head)) and '"paragraphs"' in head


def read_squad_json(path: Path, id_: str, question: str, context: str, answers: str) -> Any:
    """A nested SQuAD (v1.1 or v2.0) file flattened to Hugging Face's layout, one row per question.

    Columns are named by the data module's arguments; ``answers`` is ``{"text": [...], "answer_start": [...]}``,
    empty for questions marked ``is_impossible``.
    """
    import datasets

    try:
        with open(path, encoding="utf-8") as f:
            articles = json.load(f)["data"]
        rows = []
        for article in articles:
            for paragraph in article["paragraphs"]:
                for qa in paragraph["qas"]:
                    gold = [] if qa.get("is_impossible") else qa.get("answers", [])
                    rows.append({
                        id_: str(qa.get("id", len(rows))),
                        question: qa["question"],
                        context: paragraph["context"],
                        answers: {"text": [a["text"] for a in gold],
                                  "answer_start": [int(a.get("answer_start", -1)) for a in gold]},
                    })
    except json.JSONDecodeError as err:
        raise PtftError(f"cannot read {path}: {err}") from err
    except (KeyError, TypeError, ValueError) as err:
        raise PtftError(f"{path}: not a valid SQuAD file ({type(err).__name__}: {err}); expected "
                        '{"data": [{"paragraphs": [{"context": ..., "qas": [{"id", "question", "answers"}]}]}]}') from err
    if not rows:
        raise PtftError(f"{path} has no questions")
    return datasets.Dataset.from_list(rows)


def answer_span(qid: str, context: str, answers: Any, where: str, column_name: str, align: bool) -> tuple[int, int] | None:
    """Character span of the first answer (``None`` when there is none), after checking every answer of the row."""
    if not isinstance(answers, dict) or "text" not in answers or "answer_start" not in answers:
        raise PtftError(f"{where}: column {column_name!r} of question {qid!r} must be "
                        f"{{'text': [...], 'answer_start': [...]}}, not {str(answers)[:60]!r}")
    texts, starts = answers["text"] or [], answers["answer_start"] or []
    if len(texts) != len(starts):
        raise PtftError(f"{where}: question {qid!r} has {len(texts)} answer texts but {len(starts)} answer_start values")
    spans = []
    for text, start in zip(texts, starts):
        if not text:  # "" marks an unanswerable question in some SQuAD v2 exports
            continue
        if start is None or not 0 <= start < len(context):
            raise PtftError(f"{where}: answer_start {start} of question {qid!r} is outside its context "
                            f"(0..{len(context) - 1}); fix answer_start")
        if context[start:start + len(text)] != text:
            found = [m.start() for m in re.finditer(re.escape(text), context)]
            if not found:
                raise PtftError(f"{where}: answer {text!r} of question {qid!r} does not occur in its context; "
                                "fix the answer text or drop the question")
            nearest = min(found, key=lambda pos: abs(pos - start))
            if not align:
                raise PtftError(f"{where}: answer {text!r} of question {qid!r} is not at answer_start {start} (the "
                                f"context has {context[start:start + len(text)]!r} there; the answer is at {nearest}): "
                                "fix answer_start, or set data.init_args.align_answers=true to use the nearest match")
            start = nearest
        spans.append((start, start + len(text)))
    return spans[0] if spans else None


class QuestionAnsweringDataModule(TextDataModule):
    """Extractive question answering data (SQuAD v1.1 / v2.0) from files or a Hugging Face dataset.

    Files are nested SQuAD JSON (``{"data": [{"paragraphs": [{"context", "qas": [...]}]}]}``, as published) or
    flat rows in Hugging Face's layout (``.json`` / ``.jsonl`` / ``.parquet`` with ``id``, ``question``, ``context``
    and ``answers = {"text": [...], "answer_start": [...]}``); questions without answers are unanswerable (SQuAD v2).
    Contexts longer than ``max_length`` are split into overlapping windows, ``doc_stride`` tokens shared by
    neighbours.

    Args:
        question_column: Column with the question.
        context_column: Column with the context passage.
        answers_column: Column with the answers, ``{"text": [...], "answer_start": [...]}`` (character offsets into
            the context). Training uses the first answer; evaluation scores against all of them.
        id_column: Column with the question id, copied to predictions; the row number when the column is absent.
        doc_stride: Tokens shared by consecutive windows of a long context.
        align_answers: When an answer's text is not at its ``answer_start``, use its nearest occurrence in the
            context instead of stopping with an error.
        max_length: Tokens per window (question, context and special tokens).
        **kwargs: The shared text data arguments of :class:`ptft.text.base.TextDataModule` (``train_file``,
            ``val_file``, ``test_file``, ``predict_file``, ``dataset``, ``dataset_config``, splits,
            ``rename_columns``, ``tokenizer``, ``batch_size``, ``eval_batch_size`` (examples, with all their
            windows), ``val_fraction``, ``seed``, ``num_workers``).
    """

    def __init__(
        self,
        question_column: str = "question",
        context_column: str = "context",
        answers_column: str = "answers",
        id_column: str = "id",
        doc_stride: int = 128,
        align_answers: bool = False,
        max_length: int = 384,
        **kwargs: Any,
    ) -> None:
        super().__init__(max_length=max_length, **kwargs)
        self.save_hyperparameters(logger=False)
        if not 0 <= doc_stride < max_length // 2:
            raise PtftError(f"doc_stride ({doc_stride}) must be under half of max_length ({max_length})")
        self.question_column = question_column
        self.context_column = context_column
        self.answers_column = answers_column
        self.id_column = id_column
        self.doc_stride = doc_stride
        self.align_answers = align_answers
        self._pad: Any = None

    def columns(self, split: str) -> dict[str, str]:
        needed = {self.question_column: "question_column", self.context_column: "context_column"}
        if split != "predict":
            needed[self.answers_column] = "answers_column"
        return needed

    def read_file(self, path: Path) -> Any:
        """Nested SQuAD JSON files are flattened to rows; other files load as the base's."""
        if is_squad_json(path):
            return read_squad_json(path, self.id_column, self.question_column, self.context_column, self.answers_column)
        return super().read_file(path)

    # --- encoding -------------------------------------------------------------------------------------------
    def encode(self, ds: Any, split: str) -> Any:
        tokenizer, where, align = self.tokenizer, self.sources.describe(split), self.align_answers
        q_col, c_col, a_col, id_col = self.question_column, self.context_column, self.answers_column, self.id_column
        has_ids, labelled, per_window = id_col in ds.column_names, split != "predict", split == "train"
        pad_right = tokenizer.padding_side == "right"  # the context goes second unless padding is on the left
        inputs = [k for k in tokenizer.model_input_names if k != "offset_mapping"]
        options = {
            "truncation": "only_second" if pad_right else "only_first", "max_length": self.max_length,
            "stride": self.doc_stride, "return_overflowing_tokens": True, "return_offsets_mapping": True,
        }

        def windows(batch: dict[str, list], indices: list[int]) -> dict[str, list]:
            ids = [str(i) for i in batch[id_col]] if has_ids else [str(i) for i in indices]
            questions = [q.lstrip() for q in batch[q_col]]  # leading spaces only waste window room
            contexts = batch[c_col]
            spans = [
                answer_span(qid, context, answers, where, a_col, align)
                for qid, context, answers in zip(ids, contexts, batch[a_col])
            ] if labelled else [None] * len(ids)
            try:
                enc = tokenizer(*((questions, contexts) if pad_right else (contexts, questions)), **options)
            except Exception as err:  # the tokenizer cannot fit a window (question too long for max_length)
                raise PtftError(f"{where}: cannot split into windows: {str(err).splitlines()[0]}; "
                                "raise max_length, lower doc_stride or shorten the question") from err
            rows: dict[str, list] = {k: [] for k in (*inputs, "offsets", "cls_index", "start_positions",
                                                     "end_positions", "example")}
            for w, example in enumerate(enc["overflow_to_sample_mapping"]):
                sequence = enc.sequence_ids(w)
                side = 1 if pad_right else 0
                offsets = [list(o) if s == side else [-1, -1] for o, s in zip(enc["offset_mapping"][w], sequence)]
                input_ids = enc["input_ids"][w]
                cls = input_ids.index(tokenizer.cls_token_id) if tokenizer.cls_token_id in input_ids else 0
                start, end = window_positions(offsets, spans[example], cls)
                for k in inputs:
                    rows[k].append(enc[k][w])
                for k, v in (("offsets", offsets), ("cls_index", cls), ("start_positions", start),
                             ("end_positions", end), ("example", example)):
                    rows[k].append(v)
            if per_window:
                return {k: rows[k] for k in (*inputs, "start_positions", "end_positions")}
            # one row per example holding all its windows
            grouped: dict[str, list] = {k: [[] for _ in ids] for k in rows if k != "example"}
            for w, example in enumerate(rows["example"]):
                for k in grouped:
                    grouped[k][example].append(rows[k][w])
            if not labelled:
                del grouped["start_positions"], grouped["end_positions"]
            grouped.update(id=ids, question=batch[q_col], context=contexts)
            if labelled:
                grouped["answer_texts"] = [[t for t in (a["text"] or []) if t] for a in batch[a_col]]
            return grouped

        return ds.map(windows, batched=True, with_indices=True, remove_columns=ds.column_names,
                      desc=f"Tokenizing {split}")

    def collate(self, features: list[dict[str, Any]]) -> dict[str, Any]:
        if self._pad is None:
            from transformers import DataCollatorWithPadding

            self._pad = DataCollatorWithPadding(self.tokenizer, return_tensors="pt")
        if "offsets" not in features[0]:  # training: one window per row
            return dict(self._pad(features))
        per_window = [k for k in features[0] if k not in ("id", "question", "context", "answer_texts", "offsets")]
        windows = [{k: f[k][w] for k in per_window} for f in features for w in range(len(f["input_ids"]))]
        batch = dict(self._pad(windows))
        offsets = torch.full((*batch["input_ids"].shape, 2), -1, dtype=torch.long)
        for w, window in enumerate(o for f in features for o in f["offsets"]):
            offsets[w, : len(window)] = torch.tensor(window, dtype=torch.long)
        batch["offsets"] = offsets
        batch["window_example"] = torch.tensor([i for i, f in enumerate(features) for _ in f["input_ids"]])
        batch["ids"] = [f["id"] for f in features]
        batch["questions"] = [f["question"] for f in features]
        batch["contexts"] = [f["context"] for f in features]
        if "answer_texts" in features[0]:
            batch["answers"] = [f["answer_texts"] for f in features]
        return batch


def window_positions(offsets: list[list[int]], span: tuple[int, int] | None, cls: int) -> tuple[int, int]:
    """First and last token of the answer in a window, or ``(cls, cls)`` when the window does not hold all of it."""
    context = [k for k, (s, _) in enumerate(offsets) if s >= 0]
    if span is None or not context:
        return cls, cls
    first, last = context[0], context[-1]
    start_char, end_char = span
    if not (offsets[first][0] <= start_char and offsets[last][1] >= end_char):
        return cls, cls
    start = first
    while start <= last and offsets[start][0] <= start_char:
        start += 1
    end = last
    while end >= first and offsets[end][1] >= end_char:
        end -= 1
    return start - 1, end + 1

