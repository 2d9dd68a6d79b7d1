"""Parameter-efficient fine-tuning through the PEFT library, for Hugging Face and timm models alike."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

from torch import nn

from ptft.core.errors import missing_extra

# Parts PEFT inserts into parameter names: base_model.model.<name>, <module>.base_layer.weight,
# <head>.modules_to_save.default.weight / <head>.original_module.weight.
_PEFT_PARTS = re.compile(r"^base_model\.model\.|\.base_layer(?=\.)|\.modules_to_save\.default(?=\.)|\.original_module(?=\.)")


def plain_name(name: str) -> str:
    """A parameter's name in the model before PEFT wrapped it (adapter weights keep their own names)."""
    return _PEFT_PARTS.sub("", name)


@dataclass(frozen=True)
class PeftConfig:
    """Adapter settings (``model.init_args.peft`` in a recipe)."""

    method: Literal["lora", "loha", "ia3"] = "lora"
    """``lora`` (Hu et al., 2021), ``loha`` (LoRA with Hadamard products) or ``ia3`` (learned rescaling vectors)."""
    r: int = 8
    """Rank of the low-rank update (lora, loha)."""
    alpha: int = 16
    """Scaling of the low-rank update (lora, loha)."""
    dropout: float = 0.0
    """Dropout on the adapter's input (lora). Costs a copy of every adapted layer's input: on CPU, 0.05 made LoRA
    steps slower than full fine-tuning of MiniLM-L6."""
    target_modules: list[str] | str = "all-linear"
    """Module names (suffixes) or a regex to adapt; ``all-linear`` adapts every linear layer except the task head."""
    feedforward_modules: list[str] | None = None
    """ia3: the target modules that are feed-forward layers (scaled on their input); ``None``: PEFT's defaults."""


def apply_peft(model: nn.Module, config: PeftConfig, head_modules: list[str]) -> nn.Module:
    """Wraps ``model`` with adapters; the task head (``head_modules``) is trained fully and saved."""
    try:
        import peft
    except ImportError as err:
        raise missing_extra("peft", "peft") from err

    common = {"target_modules": config.target_modules, "exclude_modules": head_modules, "modules_to_save": head_modules}
    if config.method == "lora":
        peft_config = peft.LoraConfig(r=config.r, lora_alpha=config.alpha, lora_dropout=config.dropout, **common)
    elif config.method == "loha":
        peft_config = peft.LoHaConfig(r=config.r, alpha=config.alpha, module_dropout=config.dropout, **common)
    else:
        feedforward = config.feedforward_modules
        if feedforward is None and isinstance(config.target_modules, list):
            feedforward = [m for m in config.target_modules if re.search(r"fc|mlp|ffn|intermediate|output", m)]
        peft_config = peft.IA3Config(feedforward_modules=feedforward or [], **common)
    return peft.get_peft_model(model, peft_config)


def merge_adapters(model: nn.Module) -> nn.Module:
    """The plain model with adapters merged into its weights (no PEFT needed to use it)."""
    try:
        import peft
    except ImportError:  # without PEFT installed, no model can hold adapters
        return model
    if isinstance(model, peft.PeftModel):
        return model.merge_and_unload()
    return model
