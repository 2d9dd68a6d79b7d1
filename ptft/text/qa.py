"""Extractive question answering: the answer is a span of the context, found over all of its windows."""

from __future__ import annotations

from typing import Any

import torch
from torchmetrics import MetricCollection

from ptft.core.hf import HFModule, build_hf_model
from ptft.core.module import FineTuneModule
from ptft.text.qa_data import EXAMPLE_KEYS, QuestionAnsweringDataModule

__all__ = ["QuestionAnswerer", "QuestionAnsweringDataModule", "best_answers"]


def best_answers(
    start_logits: torch.Tensor,
    end_logits: torch.Tensor,
    batch: dict[str, Any],
    n_best: int = 20,
    max_answer_length: int = 30,
    allow_no_answer: bool = False,
    null_score_threshold: float = 0.0,
) -> list[tuple[str, float]]:
    """The answer text and its probability for each example of an evaluation batch (all windows of each example).

    As Hugging Face's ``run_qa.py`` post-processing: in each window the ``n_best`` start and end tokens inside the
    context form the candidate spans (end not before start, at most ``max_answer_length`` tokens), scored by start
    plus end logit; the best span over all windows of an example wins. With ``allow_no_answer`` the answer is empty
    when the smallest null score (CLS start + end logits) over the windows exceeds the best span's score by more than
    ``null_score_threshold``. The probability is the span's (or the null answer's) start x end probability in its
    window.
    """
    start, end = start_logits.float(), end_logits.float()
    offsets, cls = batch["offsets"], batch["cls_index"]
    inside = offsets[..., 0] >= 0  # context tokens
    attended = batch["attention_mask"].bool() if "attention_mask" in batch else torch.ones_like(inside)
    log_p_start = start.masked_fill(~attended, float("-inf")).log_softmax(-1)
    log_p_end = end.masked_fill(~attended, float("-inf")).log_softmax(-1)
    k = min(n_best, start.shape[1])
    top_start = start.masked_fill(~inside, float("-inf")).topk(k, dim=-1)
    top_end = end.masked_fill(~inside, float("-inf")).topk(k, dim=-1)
    scores = top_start.values[:, :, None] + top_end.values[:, None, :]  # (windows, k starts, k ends)
    length = top_end.indices[:, None, :] - top_start.indices[:, :, None]
    scores = scores.masked_fill((length < 0) | (length >= max_answer_length), float("-inf"))
    span_score, flat = scores.flatten(1).max(dim=-1)
    s = top_start.indices.gather(1, (flat // k)[:, None]).squeeze(1)
    e = top_end.indices.gather(1, (flat % k)[:, None]).squeeze(1)
    rows = torch.arange(start.shape[0], device=start.device)
    null_score = start[rows, cls] + end[rows, cls]
    span_prob = (log_p_start[rows, s] + log_p_end[rows, e]).exp()
    null_prob = (log_p_start[rows, cls] + log_p_end[rows, cls]).exp()
    char_start, char_end = offsets[rows, s, 0], offsets[rows, e, 1]
    values = [t.tolist() for t in (span_score, null_score, span_prob, null_prob, char_start, char_end,
                                   batch["window_example"])]
    span_score, null_score, span_prob, null_prob, char_start, char_end, example_of = values

    answers = []
    for i, context in enumerate(batch["contexts"]):
        windows = [w for w, ex in enumerate(example_of) if ex == i]
        best = max(windows, key=span_score.__getitem__)
        least_null = min(windows, key=null_score.__getitem__)
        has_span = span_score[best] != float("-inf")
        if allow_no_answer and (not has_span or null_score[least_null] - span_score[best] > null_score_threshold):
            answers.append(("", null_prob[least_null]))
        elif has_span:
            answers.append((context[char_start[best]:char_end[best]], span_prob[best]))
        else:  # no context token in any window (empty context)
            answers.append(("", 0.0))
    return answers


class QuestionAnswerer(HFModule, FineTuneModule):
    """Extractive question answering (SQuAD v1.1 / v2.0) with any ``AutoModelForQuestionAnswering`` model.

    Trains on context windows (start and end token of the answer, CLS when the window lacks it); evaluation and
    prediction pick the best span over all windows of an example. Logs ``exact_match`` and ``f1`` (SQuAD's, in
    percent, torchmetrics) per validation / test epoch.

    Args:
        model_name: Hugging Face hub name (``distilbert/distilbert-base-uncased``), a local folder with
            ``config.json`` and weights, or a ptft checkpoint (``.ckpt``). Also the data module's default tokenizer.
        pretrained: Load the pretrained weights. ``False`` builds the architecture with random weights.
        model_config: Values overriding the model's config; a dict holding ``model_type`` is a complete config
            (full checkpoints store the architecture this way, so they load without the hub).
        n_best: Start and end candidates per window combined into answer spans.
        max_answer_length: Longest answer, in tokens.
        allow_no_answer: Predict "no answer" (an empty string) when the null score beats the best span (SQuAD v2).
        null_score_threshold: With ``allow_no_answer``: answer nothing when the null score exceeds the best span's
            score by more than this (raise it to answer more often).
        **kwargs: The shared fine-tuning arguments of :class:`ptft.core.FineTuneModule` (``optimizer``,
            ``scheduler``, ``l1``, ``l2_sp``, ``peft``, ``checkpoint_weights``, ``compile``,
            ``gradient_checkpointing``).
    """

    needs_processor = True  # an export without its tokenizer is refused (ptft.core.hf.HFModule.save_model)

    checkpoint_monitor = ("val/f1", "max")

    def __init__(
        self,
        model_name: str,
        pretrained: bool = True,
        model_config: dict[str, Any] | None = None,
        n_best: int = 20,
        max_answer_length: int = 30,
        allow_no_answer: bool = False,
        null_score_threshold: float = 0.0,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        from transformers import AutoModelForQuestionAnswering

        self.model_name = model_name
        self.n_best = n_best
        self.max_answer_length = max_answer_length
        self.allow_no_answer = allow_no_answer
        self.null_score_threshold = null_score_threshold
        model = build_hf_model(AutoModelForQuestionAnswering, model_name, pretrained, model_config)
        architecture = model.config.to_dict()
        self.set_model(model)
        self._save_hparams(pretrained=False, model_config=architecture)

    def build_metrics(self) -> MetricCollection:
        from torchmetrics.text import SQuAD

        return MetricCollection({"squad": SQuAD()})

    def forward(self, batch: dict[str, Any]) -> Any:
        """The model's output (``start_logits``, ``end_logits``, and ``loss`` when the batch has positions)."""
        return self.model(**{k: v for k, v in batch.items() if k not in EXAMPLE_KEYS})

    def step(self, batch: dict[str, Any], stage: str) -> tuple[torch.Tensor, Any]:
        out = self(batch)
        return out.loss, (out.start_logits.detach(), out.end_logits.detach())

    def decode(self, batch: dict[str, Any], start_logits: torch.Tensor, end_logits: torch.Tensor) -> list[tuple[str, float]]:
        """Answer text and probability per example of an evaluation / prediction batch (see :func:`best_answers`)."""
        return best_answers(start_logits, end_logits, batch, self.n_best, self.max_answer_length,
                            self.allow_no_answer, self.null_score_threshold)

    def update_metrics(self, stage: str, outputs: Any, batch: dict[str, Any]) -> None:
        if stage == "train":  # training windows are not whole examples: answers are scored at evaluation only
            return
        answers = self.decode(batch, *outputs)
        # Keys by position: ids need not be unique for the metric. An unanswerable question's reference is "".
        preds = [{"prediction_text": text, "id": str(i)} for i, (text, _) in enumerate(answers)]
        target = [{"answers": {"text": gold or [""], "answer_start": [0] * max(len(gold), 1)}, "id": str(i)}
                  for i, gold in enumerate(batch["answers"])]
        self.metrics[f"{stage}_"]["squad"].update(preds, target)

    def epoch_metrics(self, stage: str) -> dict[str, torch.Tensor] | None:
        """``exact_match`` and ``f1`` over every rank's examples (torchmetrics syncs the sums)."""
        metric = self.metrics[f"{stage}_"]["squad"]
        if not metric.update_count:
            return None
        return {f"{stage}/{k}": v for k, v in metric.compute().items()}

    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> dict[str, Any]:
        """The answer text and its probability for each example of the batch."""
        out = self(batch)
        answers = self.decode(batch, out.start_logits, out.end_logits)
        return {"ids": batch["ids"], "questions": batch["questions"], "answers": answers}

    def prediction_rows(self, outputs: dict[str, Any]) -> list[dict[str, Any]]:
        """``id``, ``question``, ``answer`` (empty: no answer) and ``score`` (its probability) per question."""
        return [
            {"id": qid, "question": question, "answer": text, "score": round(score, 6)}
            for qid, question, (text, score) in zip(outputs["ids"], outputs["questions"], outputs["answers"])
        ]
