"""Text classification module."""

from __future__ import annotations

from typing import Any, Literal

import torch
from torch import nn

from ptft.core.hf import HFModule, build_hf_model, keep_hf_layers, label_config
from ptft.core.classification import ClassificationModule
from ptft.text.data import aggregate_windows
from ptft.text.heads import EncoderWithHead, SequenceHead, SequenceHeadKind


class TextClassifier(HFModule, ClassificationModule):
    """Sequence (or sentence-pair) classification with any ``AutoModelForSequenceClassification`` model.

    Args:
        model_name: Hugging Face hub name (``sentence-transformers/all-MiniLM-L6-v2``), a local folder with
            ``config.json`` and weights, or a ptft checkpoint (``.ckpt``, e.g. after continued pre-training). Also
            the default tokenizer of the text data modules.
        pretrained: Load the pretrained weights. ``False`` builds the architecture with random weights.
        model_config: Values overriding the model's config (``{hidden_dropout_prob: 0.2,
            attention_probs_dropout_prob: 0.1}``). A dict holding ``model_type`` is a complete config and is used
            without reading ``model_name``'s: full checkpoints store the architecture this way, so they load without
            the hub.
        head: The classification head. ``model``: the model's own (``AutoModelForSequenceClassification``: BERT's
            pooler + linear, RoBERTa's classification head…). Or a ptft head on the encoder's token states:
            ``mean`` (mean pooling, as sentence-transformers models are trained), ``attention`` (attention pooling),
            ``lstm`` / ``gru`` (a bidirectional RNN, then mean pooling).
        head_dropout: Dropout before the classifier of a ptft head.
        rnn_size: Hidden size per direction of an ``lstm`` / ``gru`` head (default: half the encoder's).
        keep_layers: Keep only these transformer blocks of the model, in this order: a smaller student initialised
            from its teacher's blocks, as DistilBERT (``[0, 2, 4]`` of 6). Checkpoints hold the smaller model.
        aggregate: How a long document's windows are combined at evaluation and prediction (data
            ``long_documents: windows``): ``mean`` logits, per-class ``max``, or majority ``vote``.
        **kwargs: The shared fine-tuning arguments of :class:`ptft.core.ClassificationModule` (``num_labels``,
            ``label_names``, ``label_smoothing``, ``optimizer``, ``scheduler``, ``l1``, ``l2_sp``, ``peft``,
            ``checkpoint_weights``, ``compile``, ``gradient_checkpointing``).
    """

    needs_processor = True  # an export without its tokenizer is refused (ptft.core.hf.HFModule.save_model)

    def __init__(
        self,
        model_name: str,
        pretrained: bool = True,
        model_config: dict[str, Any] | None = None,
        head: SequenceHeadKind = "model",
        head_dropout: float = 0.1,
        rnn_size: int | None = None,
        keep_layers: list[int] | None = None,
        aggregate: Literal["mean", "max", "vote"] = "mean",
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.aggregate = aggregate
        from transformers import AutoModel, AutoModelForSequenceClassification

        self.model_name = model_name
        labels = label_config(self.label_names)
        if head == "model":
            model = build_hf_model(AutoModelForSequenceClassification, model_name, pretrained, model_config, **labels)
            if model.config.pad_token_id is None and model.config.eos_token_id is not None:  # decoder-only models
                eos = model.config.eos_token_id
                model.config.pad_token_id = eos[0] if isinstance(eos, list) else eos
        else:
            encoder = build_hf_model(AutoModel, model_name, pretrained, model_config, **labels)
            hidden = encoder.config.hidden_size
            model = EncoderWithHead(encoder, SequenceHead(head, hidden, self.num_labels, head_dropout, rnn_size))
        if keep_layers is not None:
            keep_hf_layers(model.encoder if isinstance(model, EncoderWithHead) else model, keep_layers)
        architecture = model.config.to_dict()
        self.set_model(model)
        # A full checkpoint's architecture already has only the kept blocks.
        self._save_hparams(pretrained=False, model_config=architecture, keep_layers=None)

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        inputs = {k: v for k, v in batch.items() if k not in ("labels", "doc_ids")}
        out = self.model(**inputs)
        return out if isinstance(out, torch.Tensor) else out.logits

    def step(self, batch: dict[str, Any], stage: str) -> tuple[torch.Tensor, Any]:
        loss, (logits, labels) = super().step(batch, stage)
        if stage != "train" and "doc_ids" in batch:  # metrics per document, from all of its windows
            logits, first = aggregate_windows(logits, batch["doc_ids"], self.aggregate)
            labels = labels[first]
        return loss, (logits, labels)

    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> dict[str, Any]:
        if "doc_ids" not in batch:
            return super().predict_step(batch, batch_idx)
        scores, _ = aggregate_windows(self(batch).float(), batch["doc_ids"], self.aggregate)
        probs = scores if self.aggregate == "vote" else scores.softmax(dim=-1)
        ids = probs.argmax(dim=-1)
        return {"label_ids": ids, "labels": [self.label_names[i] for i in ids.tolist()], "probs": probs}

    def head_modules(self, model: nn.Module) -> list[str]:
        return ["head"] if isinstance(model, EncoderWithHead) else super().head_modules(model)
