"""Text task modules."""

from __future__ import annotations

from typing import Any

import torch

from ptft.core.hub import load_pretrained
from ptft.core.module import FineTuneModule
from ptft.core.optim import OptimizerConfig, SchedulerConfig


class TextClassifier(FineTuneModule):
    """Sequence (or sentence-pair) classification with any ``AutoModelForSequenceClassification`` model.

    Args:
        model_name: Hugging Face hub name (``sentence-transformers/all-MiniLM-L6-v2``) or a local folder with
            ``config.json`` and weights. Also the default tokenizer of the text data modules.
        num_labels: Number of classes. Linked from the data module by the CLI.
        label_names: Class names in label-id order. Linked from the data module by the CLI.
        pretrained: Load the pretrained weights. ``False`` builds the architecture with random weights.
        model_config: Values overriding the model's config (``{hidden_dropout_prob: 0.2}``). A dict holding
            ``model_type`` is a complete config and is used without reading ``model_name``'s: checkpoints store
            the architecture this way so they load without the hub.
        optimizer: Optimizer and per-group learning-rate settings.
        scheduler: Learning-rate schedule.
        label_smoothing: Cross-entropy label smoothing.
    """

    def __init__(
        self,
        model_name: str,
        num_labels: int = 2,
        label_names: list[str] | None = None,
        pretrained: bool = True,
        model_config: dict[str, Any] | None = None,
        optimizer: OptimizerConfig = OptimizerConfig(),
        scheduler: SchedulerConfig = SchedulerConfig(),
        label_smoothing: float = 0.0,
    ) -> None:
        super().__init__(num_labels, label_names, optimizer, scheduler, label_smoothing)
        from transformers import AutoConfig, AutoModelForSequenceClassification

        self.model_name = model_name
        labels = {
            "num_labels": num_labels,
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
            self.model = load_pretrained(
                AutoModelForSequenceClassification.from_pretrained, model_name, config=config, use_safetensors=None
            )
        else:
            self.model = AutoModelForSequenceClassification.from_config(config)
        # from_pretrained returns eval mode and Lightning keeps submodules' modes: without this, dropout stays off.
        self.model.train()
        # A checkpoint rebuilds the architecture from its stored config; its weights come from the state dict.
        self._save_hparams(pretrained=False, model_config=self.model.config.to_dict())

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        inputs = {k: v for k, v in batch.items() if k not in ("labels", "doc_ids")}
        return self.model(**inputs).logits

    def is_head_parameter(self, name: str) -> bool:
        # Everything outside the base model (bert., roberta., ...) is the task head added on top.
        return not name.startswith(self.model.base_model_prefix + ".")
