"""Text classification module."""

from __future__ import annotations

from typing import Any

import torch

from ptft.core.module import ClassificationModule
from ptft.text.hf import HFTextModule, build_hf_model


class TextClassifier(HFTextModule, ClassificationModule):
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
        **kwargs: The shared fine-tuning arguments of :class:`ptft.core.ClassificationModule` (``num_labels``,
            ``label_names``, ``label_smoothing``, ``optimizer``, ``scheduler``, ``l1``, ``l2_sp``, ``peft``,
            ``checkpoint_weights``, ``compile``).
    """

    def __init__(
        self,
        model_name: str,
        pretrained: bool = True,
        model_config: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        from transformers import AutoModelForSequenceClassification

        self.model_name = model_name
        model = build_hf_model(
            AutoModelForSequenceClassification, model_name, pretrained, model_config,
            num_labels=self.num_labels,
            id2label=dict(enumerate(self.label_names)),
            label2id={name: i for i, name in enumerate(self.label_names)},
        )
        architecture = model.config.to_dict()
        self.set_model(model)
        self._save_hparams(pretrained=False, model_config=architecture)

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        inputs = {k: v for k, v in batch.items() if k not in ("labels", "doc_ids")}
        return self.model(**inputs).logits
