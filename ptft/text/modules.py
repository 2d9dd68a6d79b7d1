"""Text task modules."""

from __future__ import annotations

from typing import Any

import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import nn

from ptft.core.hub import load_pretrained
from ptft.core.layers import hf_layer_ids
from ptft.core.module import FineTuneModule


class TextClassifier(FineTuneModule):
    """Sequence (or sentence-pair) classification with any ``AutoModelForSequenceClassification`` model.

    Args:
        model_name: Hugging Face hub name (``sentence-transformers/all-MiniLM-L6-v2``) or a local folder with
            ``config.json`` and weights. Also the default tokenizer of the text data modules.
        pretrained: Load the pretrained weights. ``False`` builds the architecture with random weights.
        model_config: Values overriding the model's config (``{hidden_dropout_prob: 0.2,
            attention_probs_dropout_prob: 0.1}``). A dict holding ``model_type`` is a complete config and is used
            without reading ``model_name``'s: full checkpoints store the architecture this way, so they load without
            the hub.
        **kwargs: The shared fine-tuning arguments of :class:`ptft.core.FineTuneModule` (``num_labels``,
            ``label_names``, ``optimizer``, ``scheduler``, ``label_smoothing``, ``l1``, ``l2_sp``, ``peft``,
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
        from transformers import AutoConfig, AutoModelForSequenceClassification

        self.model_name = model_name
        labels = {
            "num_labels": self.num_labels,
            "id2label": dict(enumerate(self.label_names)),
            "label2id": {name: i for i, name in enumerate(self.label_names)},
        }
        overrides = dict(model_config or {})
        if "model_type" in overrides:
            config = AutoConfig.for_model(**{**overrides, **labels})
            pretrained = False
        else:
            config = load_pretrained(AutoConfig.from_pretrained, model_name, "config", **overrides, **labels)
        if pretrained:
            model = load_pretrained(AutoModelForSequenceClassification.from_pretrained, model_name, config=config)
        else:
            model = AutoModelForSequenceClassification.from_config(config)
        architecture = model.config.to_dict()
        self.set_model(model)
        self._save_hparams(pretrained=False, model_config=architecture)

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        inputs = {k: v for k, v in batch.items() if k not in ("labels", "doc_ids")}
        return self.model(**inputs).logits

    def head_modules(self, model: nn.Module) -> list[str]:
        # Everything outside the base model (bert., roberta., ...) is the task head added on top of it.
        prefix = model.base_model_prefix
        return sorted({n.split(".")[0] for n, _ in model.named_parameters() if n.split(".")[0] != prefix})

    def discover_layers(self, model: nn.Module) -> dict[str, int]:
        heads = tuple(h + "." for h in self.head_modules(model))
        return hf_layer_ids(model, lambda name: name.startswith(heads))

    def save_model(self, model: nn.Module, folder: str) -> None:
        """``save_pretrained`` (safetensors) plus the tokenizer, so the folder is a ``model_name`` again."""
        from transformers import AutoTokenizer

        model.save_pretrained(folder)
        try:
            AutoTokenizer.from_pretrained(self.model_name).save_pretrained(folder)
        except (OSError, ValueError):
            rank_zero_warn(f"tokenizer of {self.model_name!r} not found: {folder} holds the model only")
