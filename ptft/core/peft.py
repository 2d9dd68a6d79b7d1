"""Parameter-efficient fine-tuning through the PEFT library, for Hugging Face and timm models alike."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from ptft.core.errors import PtftError, missing_extra

# Parts PEFT inserts into parameter names: base_model.model.<name>, <module>.base_layer.weight,
# <head>.modules_to_save.default.weight / <head>.original_module.weight.
_PEFT_PARTS = re.compile(r"^base_model\.model\.|\.base_layer(?=\.)|\.modules_to_save\.default(?=\.)|\.original_module(?=\.)")


# Parts FSDP, activation checkpointing and torch.compile wrappers insert once Lightning wraps the model.
_WRAPPER_PARTS = re.compile(r"(?:^|(?<=\.))(?:_fsdp_wrapped_module|_checkpoint_wrapped_module|_orig_mod)\.")


def plain_name(name: str) -> str:
    """A parameter's name in the model before PEFT (or FSDP's and activation checkpointing's wrappers) wrapped it;
    adapter weights keep their own names."""
    return _PEFT_PARTS.sub("", _WRAPPER_PARTS.sub("", name))


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
    base_weights: Literal["fp32", "bf16", "nf4"] = "fp32"
    """How the frozen base model's weights are stored. ``bf16``: its weight matrices (linear, embedding, convolution)
    in bfloat16, half their memory; needs ``trainer.precision: bf16-mixed`` (fp32 activations cannot multiply bf16
    weights). ``nf4``: its linear layers in 4-bit NormalFloat (QLoRA, Dettmers et al., 2023; bitsandbytes: ``pip
    install 'ptft[qlora]'``; CUDA or CPU), computed in bf16, any precision. Either way the adapters, the task head and
    the 1-D weights (norms, biases) stay fp32. Both change the frozen weights' values slightly (rounding)."""


def apply_peft(model: nn.Module, config: PeftConfig, head_modules: list[str]) -> nn.Module:
    """Wraps ``model`` with adapters; the task head (``head_modules``) is trained fully and saved."""
    try:
        import peft
    except ImportError as err:
        raise missing_extra("peft", "peft") from err
    if config.base_weights == "nf4" and config.method != "lora":
        raise PtftError(f"peft.base_weights=nf4 works with method lora only, got {config.method}")

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
    if config.base_weights == "nf4":
        quantize_nf4(model, head_modules)
    model = peft.get_peft_model(model, peft_config)
    if config.base_weights == "bf16":
        for param in model.parameters():
            if not param.requires_grad and param.dtype == torch.float32 and param.dim() >= 2:
                param.data = param.data.to(torch.bfloat16)
        model.register_forward_pre_hook(_require_autocast)
    return model


def _require_autocast(model: nn.Module, args: tuple) -> None:
    """Stops with one line where bf16 base weights would meet fp32 activations (no autocast, fp32 adapters)."""
    bf16 = next(p for p in model.parameters() if p.dtype == torch.bfloat16)
    mixed = any(p.dtype == torch.float32 for p in model.parameters() if p.requires_grad)
    if mixed and not torch.is_autocast_enabled(bf16.device.type):
        raise PtftError("peft.base_weights=bf16 needs bf16 autocast: set trainer.precision: bf16-mixed (fp32 "
                        "activations cannot multiply the bf16 base weights)")


def quantize_nf4(model: nn.Module, head_modules: list[str]) -> None:
    """Replaces ``model``'s linear layers, but the head's and tied ones, by bitsandbytes' 4-bit NF4 layers, in place.

    Their weights are quantized here, on the device they are on (bitsandbytes >= 0.48 does it on CPU as well); the
    layers compute in bf16. PEFT then wraps them with its own 4-bit LoRA layers.
    """
    try:
        import bitsandbytes as bnb
    except ImportError as err:
        raise missing_extra("bitsandbytes", "qlora") from err

    uses: dict[int, int] = {}
    for _, param in model.named_parameters(remove_duplicate=False):
        uses[id(param)] = uses.get(id(param), 0) + 1
    heads = tuple(head_modules)
    for name, module in list(model.named_modules()):
        if type(module) is not nn.Linear or uses[id(module.weight)] > 1:  # a tied LM head shares the embeddings
            continue
        if any(name == h or name.startswith(h + ".") for h in heads):
            continue
        layer = bnb.nn.Linear4bit(module.in_features, module.out_features, bias=module.bias is not None,
                                  compute_dtype=torch.bfloat16, quant_type="nf4", device="meta")
        layer.weight = bnb.nn.Params4bit(module.weight.data, requires_grad=False, quant_type="nf4")
        if module.bias is not None:
            layer.bias = nn.Parameter(module.bias.data, requires_grad=False)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, layer.to(module.weight.device))  # .to quantizes
    model.is_loaded_in_4bit = True  # what PEFT reads to wrap these layers with its 4-bit LoRA layers


def merge_adapters(model: nn.Module) -> nn.Module:
    """The plain fp32 model with adapters merged into its weights (no PEFT needed to use it), in place.

    A bf16 or NF4 base is brought back to fp32 first, so the (small) adapter update is added at full precision
    rather than rounded away by PEFT's merge into bf16 or 4-bit weights.
    """
    try:
        import peft
    except ImportError:  # without PEFT installed, no model can hold adapters
        return model
    if isinstance(model, peft.PeftModel):
        _merge_nf4_lora(model)
        model.float()
        return model.merge_and_unload()
    return model


def _merge_nf4_lora(model: nn.Module) -> None:
    """Replaces PEFT's 4-bit LoRA layers by fp32 linear layers holding the dequantized weights plus the update."""
    if not any(type(m).__name__ == "Linear4bit" for m in model.modules()):
        return
    import bitsandbytes as bnb
    from peft.tuners.lora.bnb import Linear4bit as LoraLinear4bit

    for name, module in list(model.named_modules()):
        if not isinstance(module, LoraLinear4bit):
            continue
        base = module.get_base_layer()
        weight = bnb.functional.dequantize_4bit(base.weight.data, base.weight.quant_state).float()
        for adapter in module.active_adapters:
            weight = weight + module.get_delta_weight(adapter).float()
        plain = nn.Linear(base.in_features, base.out_features, bias=base.bias is not None, device=weight.device)
        plain.weight = nn.Parameter(weight, requires_grad=False)
        if base.bias is not None:
            plain.bias = nn.Parameter(base.bias.detach().float(), requires_grad=False)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, plain)
