"""Where an image classifier looks: Grad-CAM / Grad-CAM++ heat maps (pytorch-grad-cam) and ViT attention rollout.

Explains :class:`ptft.vision.ImageClassifier` (timm models). Heat maps are computed on the timm network itself
(``module.model``) with the images as the batch holds them (normalised with ``module.data_config()``): horizontal-flip
test-time augmentation (``tta: hflip``) is not part of the explanation (two passes through the network would give the
target layer two activations), while the probability in each picture's title is the module's own (with TTA).

* CNNs: Grad-CAM on the deepest feature stage timm reports (``feature_info``) whose map is at least 4x4 at the input
  size: ``layer4`` of a ResNet / ``stages.3`` of a ConvNeXt at ImageNet sizes, ``layer2`` of a ResNet at 32 px (its
  ``layer4`` is 1x1 there: a uniform map; ``layer3`` 2x2).
* timm ViTs (``VisionTransformer`` and its relatives: ``patch_embed`` + ``blocks``): Grad-CAM on the last block's
  ``norm1`` with the prefix tokens (class, registers) dropped and the patch tokens laid out on the patch grid; and
  attention rollout (:func:`vit_attention_rollout`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Literal, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ptft.core.errors import PtftError
from ptft.interpret.common import class_probabilities, explaining, rollout, target_ids

__all__ = [
    "class_caption",
    "display_images",
    "gradcam_files",
    "gradcam_maps",
    "gradcam_plus_plus_files",
    "vit_attention_files",
    "vit_attention_rollout",
]

CamMethod = Literal["gradcam", "gradcam++"]


def _fresh(tensor: torch.Tensor) -> torch.Tensor:
    """A normal tensor (an inference-mode tensor cannot be saved for backward) that does not share the batch's."""
    with torch.inference_mode(False):
        return tensor.detach().clone()


def _image_classifier(module: Any) -> nn.Module:
    """The timm network of an ImageClassifier (under a PEFT wrapper, the wrapped model)."""
    from ptft.vision.modules import ImageClassifier

    if not isinstance(module, ImageClassifier):
        raise PtftError(f"Grad-CAM and attention rollout explain ptft.vision.ImageClassifier models, not "
                        f"{type(module).__name__}")
    model = module.model
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _is_vit(model: nn.Module) -> bool:
    return hasattr(model, "patch_embed") and hasattr(model, "blocks") and hasattr(model, "num_prefix_tokens")


def display_images(module: Any, pixel_values: torch.Tensor) -> np.ndarray:
    """The images as a person sees them: ``(B, H, W, 3)`` floats in [0, 1], the model's normalisation undone
    (``module.data_config()`` mean and std); one-channel images are shown grey."""
    config = module.data_config()
    channels = pixel_values.shape[1]
    mean = torch.tensor(config.get("mean", (0.0,) * 3), dtype=torch.float32)[:channels].view(1, -1, 1, 1)
    std = torch.tensor(config.get("std", (1.0,) * 3), dtype=torch.float32)[:channels].view(1, -1, 1, 1)
    images = (pixel_values.detach().float().cpu() * std + mean).clamp(0, 1)
    if channels == 1:
        images = images.expand(-1, 3, -1, -1)
    return images.permute(0, 2, 3, 1).numpy()


# --- Grad-CAM ---------------------------------------------------------------------------------------------------
@dataclass
class _Layout:
    """How a layer's output becomes the ``(B, C, h, w)`` maps pytorch-grad-cam weighs."""

    channels: int | None = None  # known for timm's feature stages: tells NCHW from NHWC (Swin-like stages)
    prefix_tokens: int = 0
    grid: tuple[int, int] | None = None  # a ViT's patch grid: token sequences are laid out on it

    def __call__(self, output: torch.Tensor) -> torch.Tensor:
        if output.dim() == 3 and self.grid is not None:
            patches = output[:, self.prefix_tokens:]
            rows, cols = self.grid
            if patches.shape[1] != rows * cols:
                raise PtftError(f"the ViT gave {patches.shape[1]} patch tokens for a {rows}x{cols} patch grid: "
                                "explain images of the size the model was built for")
            return patches.reshape(len(patches), rows, cols, -1).permute(0, 3, 1, 2)
        if output.dim() == 4:
            if self.channels is not None and output.shape[1] != self.channels and output.shape[-1] == self.channels:
                return output.permute(0, 3, 1, 2)
            return output
        raise PtftError(f"Grad-CAM needs a layer with a spatial output (B, C, h, w) or ViT tokens, got shape "
                        f"{tuple(output.shape)}: choose another target_layer")


#: The smallest Grad-CAM grid chosen automatically: a 1x1 map (ResNet's layer4 at 32 px) is one uniform colour.
MIN_CAM_GRID = 4


def _target_layer(model: nn.Module, name: str | None, image_size: int) -> tuple[nn.Module, _Layout]:
    """The layer Grad-CAM weighs and how its output is laid out: ``name`` when given, else the last ViT block's
    ``norm1``, else the deepest feature stage timm reports whose map is at least ``MIN_CAM_GRID`` wide at
    ``image_size`` (the last stage at ImageNet sizes; an earlier one on small images)."""
    vit = _is_vit(model)
    layout = _Layout()
    if vit:
        layout = _Layout(prefix_tokens=int(model.num_prefix_tokens), grid=tuple(model.patch_embed.grid_size))
    if name is not None:
        layers = dict(model.named_modules())
        if name not in layers:
            raise PtftError(f"target_layer {name!r} is not a submodule of {type(model).__name__}; e.g. "
                            f"{[n for n, _ in model.named_children()]}")
        return layers[name], layout
    if vit:
        return model.blocks[-1].norm1, layout
    info = getattr(model, "feature_info", None)
    if not info:
        raise PtftError(f"{type(model).__name__} reports no feature stages (timm's feature_info): give target_layer")
    wide_enough = [stage for stage in info if image_size // int(stage.get("reduction", 1)) >= MIN_CAM_GRID]
    chosen = wide_enough[-1] if wide_enough else info[0]
    layout.channels = chosen.get("num_chs")
    return dict(model.named_modules())[chosen["module"]], layout


def gradcam_maps(module: Any, pixel_values: torch.Tensor, targets: torch.Tensor | Sequence[int],
                 method: CamMethod = "gradcam", target_layer: str | None = None) -> torch.Tensor:
    """Grad-CAM (Selvaraju et al., 2017) or Grad-CAM++ (Chattopadhay et al., 2018) heat maps of an ImageClassifier.

    Args:
        module: A :class:`ptft.vision.ImageClassifier`.
        pixel_values: ``(B, C, H, W)`` images normalised as the model expects (the batch's ``pixel_values``).
        targets: The class to explain for each image.
        method: ``gradcam`` or ``gradcam++``.
        target_layer: Name of the submodule of the timm model whose activations are weighed (``layer3``,
            ``stages.2``, ``blocks.5.norm1``); by default the deepest feature stage whose map is at least 4x4 at
            this image size (the last one at ImageNet sizes, ``layer2`` of a ResNet at 32 px), or the last ViT
            block's ``norm1``.

    Returns:
        ``(B, H, W)`` maps in [0, 1] (each scaled to its own maximum) at the input resolution, on the CPU.
    """
    from pytorch_grad_cam import GradCAM, GradCAMPlusPlus
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    if method not in ("gradcam", "gradcam++"):
        raise PtftError(f"method must be 'gradcam' or 'gradcam++', got {method!r}")
    model = _image_classifier(module)
    layer, layout = _target_layer(model, target_layer, min(pixel_values.shape[-2:]))
    ids = target_ids(targets, len(pixel_values), module.num_labels)
    cam_class = GradCAM if method == "gradcam" else GradCAMPlusPlus
    with explaining(module):
        # An input that requires grad: the target layer's output needs a gradient even when the backbone is frozen.
        images = _fresh(pixel_values).requires_grad_(True)
        with cam_class(module.model, [layer], reshape_transform=layout) as cam:
            maps = cam(images, targets=[ClassifierOutputTarget(t) for t in ids])
    return torch.from_numpy(np.ascontiguousarray(maps, dtype=np.float32))


def class_caption(module: Any, probs: torch.Tensor, target: int) -> str:
    """``target class (p=…)`` and the predicted class when it differs."""
    names = module.label_names
    text = f"{names[target]} (p={float(probs[target]):.2f})"
    predicted = int(probs.argmax())
    return text if predicted == target else f"{text}; predicted {names[predicted]} (p={float(probs[predicted]):.2f})"


def _overlay_files(module: Any, batch: dict[str, Any], targets: list[int], heat: torch.Tensor, folder: str | Path,
                   first_index: int, suffix: str, title: str) -> list[Path]:
    """One PNG per image: the image, and ``heat`` (``(B, h, w)``, upsampled to the image, scaled to [0, 1]) over it."""
    import matplotlib.pyplot as plt
    from pytorch_grad_cam.utils.image import show_cam_on_image

    from ptft.interpret.output import save_figure

    images = display_images(module, batch["pixel_values"])
    heat = F.interpolate(heat.unsqueeze(1).float(), size=images.shape[1:3], mode="bilinear", align_corners=False)[:, 0]
    heat = heat / heat.flatten(1).amax(1).clamp(min=1e-12).view(-1, 1, 1)
    probs = class_probabilities(module, batch)
    paths = []
    for i, (image, target) in enumerate(zip(images, targets)):
        figure, (left, right) = plt.subplots(1, 2, figsize=(6, 3.4))
        left.imshow(image)
        left.set_title("input", fontsize=9)
        right.imshow(show_cam_on_image(image.astype(np.float32), heat[i].clamp(0, 1).numpy(), use_rgb=True))
        right.set_title(title, fontsize=9)
        for axis in (left, right):
            axis.axis("off")
        figure.suptitle(class_caption(module, probs[i], target), fontsize=10)
        paths.append(save_figure(figure, Path(folder) / f"{first_index + i:04d}-{suffix}.png"))
    return paths


def _cam_files(method: CamMethod) -> Callable[..., list[Path]]:
    def files(module: Any, batch: dict[str, Any], targets: torch.Tensor | Sequence[int], folder: str | Path,
              first_index: int) -> list[Path]:
        _image_classifier(module)
        ids = target_ids(targets, len(batch["pixel_values"]), module.num_labels)
        maps = gradcam_maps(module, batch["pixel_values"], ids, method=method)
        return _overlay_files(module, batch, ids, maps, folder, first_index, method, "Grad-CAM" + method[7:])

    return files


def gradcam_files(module: Any, batch: dict[str, Any], targets: torch.Tensor | Sequence[int], folder: str | Path,
                  first_index: int) -> list[Path]:
    """Grad-CAM of each image of ``batch`` for its target class: ``{index:04d}-gradcam.png`` in ``folder`` (the image,
    the heat map over it, the target class and its probability)."""
    return _cam_files("gradcam")(module, batch, targets, folder, first_index)


def gradcam_plus_plus_files(module: Any, batch: dict[str, Any], targets: torch.Tensor | Sequence[int],
                            folder: str | Path, first_index: int) -> list[Path]:
    """Grad-CAM++ pictures as :func:`gradcam_files`, named ``{index:04d}-gradcam++.png``."""
    return _cam_files("gradcam++")(module, batch, targets, folder, first_index)


# --- attention rollout ------------------------------------------------------------------------------------------
def _vit(module: Any) -> nn.Module:
    model = _image_classifier(module)
    blocks = getattr(model, "blocks", None)
    if not _is_vit(model) or not blocks or not all(
            hasattr(b, "attn") and hasattr(b.attn, "fused_attn") and hasattr(b.attn, "attn_drop") for b in blocks):
        raise PtftError(f"attention rollout explains timm Vision Transformers (vit_*, deit_*: patch_embed + blocks of "
                        f"timm Attention), not {type(model).__name__}; use --method gradcam")
    return model


def _attention_probabilities(module: Any, model: nn.Module, pixel_values: torch.Tensor) -> list[torch.Tensor]:
    """Every block's ``(B, heads, N, N)`` attention probabilities for ``pixel_values``.

    timm's ``Attention`` computes them only on its unfused path (the fused one calls SDPA, which never exposes them):
    each block runs unfused for this pass, the input of its ``attn_drop`` is recorded, and the flags are restored.
    """
    captured: list[torch.Tensor] = []
    flags = [block.attn.fused_attn for block in model.blocks]
    handles = [block.attn.attn_drop.register_forward_pre_hook(lambda _m, args: captured.append(args[0].detach()))
               for block in model.blocks]
    try:
        for block in model.blocks:
            block.attn.fused_attn = False
        with explaining(module), torch.no_grad():
            module.model(_fresh(pixel_values))
    finally:
        for block, flag in zip(model.blocks, flags):
            block.attn.fused_attn = flag
        for handle in handles:
            handle.remove()
    return captured


def vit_attention_rollout(module: Any, pixel_values: torch.Tensor, head_fusion: str = "mean",
                          discard_ratio: float = 0.0) -> torch.Tensor:
    """Attention rollout of a timm ViT ImageClassifier: how much each image patch flows into the class token.

    Class-agnostic (attention does not depend on the target). Models pooled over patches instead of a class token
    (``class_token=False``) get the mean of the patch tokens' rows.

    Args:
        module: A :class:`ptft.vision.ImageClassifier` with a timm Vision Transformer.
        pixel_values: ``(B, C, H, W)`` normalised images.
        head_fusion: How heads combine in each layer: ``mean``, ``max`` or ``min``.
        discard_ratio: Fraction of the weakest attention weights zeroed in each layer (0: none).

    Returns:
        ``(B, grid_h, grid_w)`` non-negative rollout weights on the CPU (a class-token row sums to at most 1 over
        the patches; the prefix tokens take the rest).
    """
    model = _vit(module)
    flow = rollout(_attention_probabilities(module, model, pixel_values), head_fusion, discard_ratio)  # (B, N, N)
    prefix = int(model.num_prefix_tokens)
    if getattr(model, "cls_token", None) is not None:  # timm puts the class token first, then registers
        row = flow[:, 0, prefix:]
    else:
        row = flow[:, prefix:, prefix:].mean(1)
    rows, cols = model.patch_embed.grid_size
    if row.shape[1] != rows * cols:
        raise PtftError(f"the ViT gave {row.shape[1]} patch tokens for a {rows}x{cols} patch grid: explain images "
                        "of the size the model was built for")
    return row.reshape(len(row), rows, cols).cpu()


def vit_attention_files(module: Any, batch: dict[str, Any], targets: torch.Tensor | Sequence[int], folder: str | Path,
                        first_index: int) -> list[Path]:
    """Attention rollout over each image of ``batch``: ``{index:04d}-attention.png`` in ``folder``. The rollout does
    not depend on the target; the title names it (and its probability) as the other methods do."""
    _vit(module)
    ids = target_ids(targets, len(batch["pixel_values"]), module.num_labels)
    flow = vit_attention_rollout(module, batch["pixel_values"])
    return _overlay_files(module, batch, ids, flow, folder, first_index, "attention", "attention rollout")
