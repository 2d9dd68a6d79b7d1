"""Gradient checkpointing of the Hugging Face and timm models inside a module (``gradient_checkpointing: true``).

Kept apart from :mod:`ptft.core.module`: it knows the backends' switches, the base module only calls it.
"""

from __future__ import annotations

from torch import nn

from ptft.core.errors import PtftError


def enable_gradient_checkpointing(model: nn.Module) -> None:
    """Turns on non-reentrant gradient checkpointing in ``model``'s Hugging Face and timm models, in place.

    ``model`` is one such model or holds some (a multimodal module's towers). Reentrant checkpointing gives no
    gradients to a checkpointed block whose input needs none, which is what frozen embeddings or a frozen stem feed
    it (huggingface/transformers#21381): non-reentrant checkpointing differentiates through the block regardless.
    Generative models also stop caching keys and values (the cache would hold the activations checkpointing drops).

    Raises:
        PtftError: ``model`` holds neither kind of model, one of them cannot checkpoint, or timm was told to
            checkpoint reentrantly (``TIMM_REENTRANT_CKPT``).
    """
    from transformers import PreTrainedModel

    found: list[str] = []
    for name, module in model.named_modules():
        if any(name.startswith(f + ".") or not f for f in found):  # inside a model already switched on
            continue
        if isinstance(module, PreTrainedModel):
            if not module.supports_gradient_checkpointing:
                raise PtftError(f"gradient_checkpointing: {type(module).__name__} does not support it")
            kwargs = {"use_reentrant": False}
            if hasattr(module, "activation_checkpointing_enable"):  # transformers >= 5.x's name; the old one warns
                module.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
            else:
                module.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
            if getattr(module.config, "use_cache", None):
                module.config.use_cache = False
        elif type(module).__module__.startswith("timm.") and hasattr(module, "set_grad_checkpointing"):
            from timm.layers import use_reentrant_ckpt

            if use_reentrant_ckpt():
                raise PtftError("gradient_checkpointing: TIMM_REENTRANT_CKPT makes timm checkpoint reentrantly, which "
                                "gives no gradients to blocks above frozen layers; unset it")
            try:
                module.set_grad_checkpointing(True)
            except AssertionError as err:  # timm's models without checkpointing assert `not enable`
                raise PtftError(f"gradient_checkpointing: timm's {type(module).__name__} does not support it") from err
        else:
            continue
        found.append(name)
    if not found:
        raise PtftError(f"gradient_checkpointing: {type(model).__name__} is neither a Hugging Face nor a timm model "
                        "and holds none")
