"""The networks of a dual encoder: two assembled towers with projections, or a transformers CLIP / SigLIP-family
model. :class:`ptft.multimodal.DualEncoder` trains either; this module holds what they compute."""

from __future__ import annotations

from typing import Any, Literal

import torch
from torch import nn

from ptft.multimodal.towers import audio_frames
from ptft.text.heads import masked_mean


class AssembledDualEncoder(nn.Module):
    """Any Hugging Face text encoder and any timm image encoder (or Hugging Face audio encoder: CLAP-style), each
    followed by a linear projection into the shared space (CLIP's bias-free projections), with a learned logit scale
    (and bias, for the sigmoid loss).

    Args:
        text: A Hugging Face base model (``AutoModel``) returning ``last_hidden_state``.
        other: A timm model returning pooled features (``num_classes=0``), or a Hugging Face audio encoder.
        media: ``image`` (``other`` is the ``vision`` tower) or ``audio`` (the ``audio`` tower).
        projection_dim: Size of the shared embedding space.
        text_pooling: ``mean`` of the token states (padding excluded; sentence-transformers' pooling) or the first
            (``cls``) token's.
        logit_scale: Starting log scale of the similarities.
        logit_bias: Starting bias (sigmoid loss), or ``None`` for no bias.
    """

    def __init__(self, text: nn.Module, other: nn.Module, media: Literal["image", "audio"], projection_dim: int,
                 text_pooling: Literal["mean", "cls"], logit_scale: float, logit_bias: float | None) -> None:
        super().__init__()
        self.text = text
        self.media = media
        self.text_pooling = text_pooling
        self.text_projection = nn.Linear(text.config.hidden_size, projection_dim, bias=False)
        if media == "image":
            self.vision = other
            features = getattr(other, "head_hidden_size", None) or other.num_features
            self.vision_projection = nn.Linear(features, projection_dim, bias=False)
        else:
            self.audio = other
            self.audio_projection = nn.Linear(other.config.hidden_size, projection_dim, bias=False)
        self.logit_scale = nn.Parameter(torch.tensor(float(logit_scale)))
        self.logit_bias = nn.Parameter(torch.tensor(float(logit_bias))) if logit_bias is not None else None

    def text_states(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """The text tower's token states ``(B, T, H)``."""
        return self.text(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state

    def project_text(self, states: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        if self.text_pooling == "cls":
            return self.text_projection(states[:, 0])
        return self.text_projection(masked_mean(states, attention_mask))

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.project_text(self.text_states(input_ids, attention_mask), attention_mask)

    def image_states(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """The image tower's unpooled features (timm's ``forward_features``: a CNN's map, a ViT's tokens)."""
        return self.vision.forward_features(pixel_values)

    def project_image(self, states: torch.Tensor) -> torch.Tensor:
        return self.vision_projection(self.vision.forward_head(states, pre_logits=True))

    def encode_image(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.project_image(self.image_states(pixel_values))

    def encode_audio(self, input_values: torch.Tensor, audio_mask: torch.Tensor | None) -> torch.Tensor:
        """The mean of the audio tower's frame states (padding excluded), projected."""
        return self.audio_projection(masked_mean(*audio_frames(self.audio, input_values, audio_mask)))

    def media_states(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(regions (B, N, C), their mask (B, N), projected embeddings (B, D))`` of a batch's images (a CNN's map
        cells or a ViT's tokens), clips (each frame's pooled features; the embedding is the frames' mean, as
        :meth:`DualEncoder.encode_images`) or audio (the encoder's frames, padding masked)."""
        if self.media == "audio":
            states, mask = audio_frames(self.audio, batch["input_values"], batch.get("audio_mask"))
            return states, mask, self.audio_projection(masked_mean(states, mask))
        pixels = batch["pixel_values"]
        if pixels.ndim == 5:
            size, frames = pixels.shape[:2]
            pooled = self.vision.forward_head(self.image_states(pixels.flatten(0, 1)), pre_logits=True)
            regions = pooled.view(size, frames, -1)
            embeddings = self.vision_projection(regions).mean(1)
        else:
            regions = self.image_states(pixels)
            embeddings = self.project_image(regions)
            if regions.ndim == 4:  # (B, C, H, W) -> (B, H*W, C)
                regions = regions.flatten(2).transpose(1, 2)
        return regions, torch.ones(regions.shape[:2], dtype=torch.long, device=regions.device), embeddings


class PretrainedDualEncoder(nn.Module):
    """A transformers dual encoder (CLIP, SigLIP, ALIGN…: ``get_text_features`` / ``get_image_features``), its own
    projections, logit scale and bias included."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    @property
    def logit_scale(self) -> torch.Tensor:
        return self.model.logit_scale

    @property
    def logit_bias(self) -> torch.Tensor | None:
        return getattr(self.model, "logit_bias", None)

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return _features(self.model.get_text_features(input_ids=input_ids, attention_mask=attention_mask))

    def encode_image(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return _features(self.model.get_image_features(pixel_values=pixel_values))


def _features(output: Any) -> torch.Tensor:
    """transformers 5 returns the projected features as ``pooler_output`` of a model output, 4 a tensor."""
    return output if isinstance(output, torch.Tensor) else output.pooler_output
