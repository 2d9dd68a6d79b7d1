"""What every Hugging Face task module shares (text, vision, audio): building the model by name or config, its layers,
its export."""

from __future__ import annotations

from typing import Any

import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import nn

from ptft.core.errors import PtftError
from ptft.core.hub import load_pretrained, resolve_model_name
from ptft.core.layers import hf_layer_ids


def build_hf_model(
    auto_class: Any, model_name: str, pretrained: bool, model_config: dict[str, Any] | None, **config_values: Any
) -> nn.Module:
    """An ``AutoModelFor…`` model, pretrained or randomly initialised from its config.

    Args:
        auto_class: e.g. ``transformers.AutoModelForTokenClassification``.
        model_name: Hub name, local folder, or a ptft checkpoint (``.ckpt``) whose model is exported first.
        pretrained: Load the pretrained weights; ``False`` builds the architecture with random weights.
        model_config: Config overrides; a dict holding ``model_type`` is a complete config, used without reading
            ``model_name``'s (full checkpoints store the architecture this way, so they reload without the hub).
        **config_values: Task values set on the config (``num_labels``, ``id2label``…).
    """
    from transformers import AutoConfig

    overrides = dict(model_config or {})
    if "model_type" in overrides:
        config = AutoConfig.for_model(**{**overrides, **config_values})
        pretrained = False
    else:
        name = resolve_model_name(model_name)
        config = load_pretrained(AutoConfig.from_pretrained, name, "config", **overrides, **config_values)
    if pretrained:
        # A fine-tuned model with another label set (2-class SST-2 -> 3-class NLI) or CTC vocabulary: the head is
        # re-initialised, with transformers' warning naming it. Only task heads change size: the rest of the config is the checkpoint's.
        resize = {"ignore_mismatched_sizes": True} if {"num_labels", "vocab_size"} & set(config_values) else {}
        # transformers 5 keeps the stored dtype (bf16 for most LLMs): fp32 weights here, the Trainer's precision
        # decides the compute dtype (bf16-mixed keeps fp32 master weights, as mixed precision should).
        return load_pretrained(auto_class.from_pretrained, name, config=config, dtype=torch.float32, **resize)
    return auto_class.from_config(config, dtype=torch.float32)  # LLM configs often store bfloat16


def keep_hf_layers(model: nn.Module, keep: list[int]) -> None:
    """Keeps only the transformer blocks ``keep`` (in that order) of a Hugging Face model, in place.

    A smaller student initialised from its teacher's blocks, as DistilBERT (every other layer). The blocks are the
    model's one ``ModuleList`` as long as ``config.num_hidden_layers``; the config is updated, so ``save_pretrained``
    writes the smaller architecture.
    """
    config = model.config
    total = config.num_hidden_layers
    lists = [name for name, m in model.named_modules() if isinstance(m, nn.ModuleList) and len(m) == total]
    if len(lists) != 1:
        raise PtftError(f"keep_layers: cannot find the {total} blocks of {type(model).__name__} "
                        f"({len(lists)} module lists of that length)")
    bad = [i for i in keep if not -total <= i < total]
    if bad or not keep:
        raise PtftError(f"keep_layers {list(keep)}: the model has blocks 0-{total - 1}")
    parent_name, _, attr = lists[0].rpartition(".")
    parent = model.get_submodule(parent_name)
    blocks = getattr(parent, attr)
    setattr(parent, attr, nn.ModuleList(blocks[i] for i in keep))
    config.num_hidden_layers = len(keep)
    layer_types = getattr(config, "layer_types", None)
    if isinstance(layer_types, list) and len(layer_types) == total:  # per-layer attention kinds (Gemma, ModernBERT)
        config.layer_types = [layer_types[i] for i in keep]


def label_config(label_names: list[str]) -> dict[str, Any]:
    """The config values of a Hugging Face task head: ``num_labels``, ``id2label``, ``label2id``."""
    return {
        "num_labels": len(label_names),
        "id2label": dict(enumerate(label_names)),
        "label2id": {name: i for i, name in enumerate(label_names)},
    }


class HFModule:
    """Mixin for task modules whose ``self.model`` is a Hugging Face model built from ``self.model_name``.

    Provides the head (parameters outside the base model, e.g. ``classifier``), the layer index per parameter
    (embeddings 0, one per block, head on top) and the export (``save_pretrained`` plus the tokenizer or image
    processor).
    """

    model_name: str
    #: Submodules that were pretrained even though they sit outside the base model (tied LM heads).
    pretrained_heads: tuple[str, ...] = ()

    def head_modules(self, model: nn.Module) -> list[str]:
        prefix = getattr(model, "base_model_prefix", "")
        outside = {n.split(".")[0] for n, _ in model.named_parameters() if n.split(".")[0] != prefix}
        if prefix and not hasattr(model, prefix):  # the model is its own base (a bare AutoModel)
            return []
        return sorted(outside - set(self.pretrained_heads))

    def discover_layers(self, model: nn.Module) -> dict[str, int]:
        heads = tuple(h + "." for h in self.head_modules(model))
        return hf_layer_ids(model, lambda name: name.startswith(heads))

    def save_model(self, model: nn.Module, folder: str) -> None:
        """``save_pretrained`` (safetensors) plus the tokenizer / processor, so the folder is a ``model_name`` again.

        The tokenizer or processor comes from the trainer's data module when one is attached, else from
        ``model_name``, else from the data's ``tokenizer`` setting saved in the checkpoint (a model built from a
        config has none of its own). Without any, text modules (``needs_processor``) stop before writing: a folder
        without its tokenizer cannot be fed text nor fine-tuned further by name.
        """
        processor = self.find_processor()
        if processor is None and self.needs_processor:
            tried = " or ".join(repr(n) for n in self._processor_sources())
            raise PtftError(
                f"cannot export: no tokenizer found at {tried} (a model built from a config has none); set "
                "data.init_args.tokenizer when training, or copy one in after saving the weights: "
                "AutoTokenizer.from_pretrained(NAME).save_pretrained(FOLDER)"
            )
        model.save_pretrained(folder)
        if processor is not None:
            processor.save_pretrained(folder)
        else:
            rank_zero_warn(f"no tokenizer or processor found for {self.model_name!r}: {folder} holds the model only")

    #: Whether an export without a tokenizer / processor is refused (text: yes; vision models can be fed pixels).
    needs_processor: bool = False

    def _processor_sources(self) -> list[str]:
        names = [self.model_name, getattr(self, "_data_tokenizer", None)]
        return [n for n in dict.fromkeys(names) if n]

    def find_processor(self) -> Any:
        """The data module's tokenizer / processor, or one loaded from :meth:`_processor_sources`; ``None`` if none."""
        from transformers import AutoProcessor

        trainer = getattr(self, "_trainer", None)
        attached = getattr(getattr(trainer, "datamodule", None), "tokenizer", None) if trainer is not None else None
        if attached is not None:
            return attached
        for name in self._processor_sources():
            try:  # the tokenizer for text models, the image processor (or a multimodal processor) otherwise
                return AutoProcessor.from_pretrained(resolve_model_name(name))
            except (OSError, ValueError, TypeError):
                continue
        return None

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # The data's tokenizer, when the model has none (built from a config): what export saves with the weights.
        self._data_tokenizer = (checkpoint.get("datamodule_hyper_parameters") or {}).get("tokenizer")
        super().on_load_checkpoint(checkpoint)
