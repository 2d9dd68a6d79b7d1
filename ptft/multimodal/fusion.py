"""Fusion classifiers: one label from a text and an image (or a clip of audio), each read by its own pretrained tower.

``FusionClassifier`` encodes the text with any Hugging Face text encoder and the other input with any timm image
model or Hugging Face audio encoder, then fuses them (``fusion`` in YAML):

* ``concat`` -- the two pooled vectors side by side, through an MLP (the late-fusion baseline);
* ``gated`` -- a gated multimodal unit (Arevalo et al., 2017): a learned gate weighs the two modalities per feature
  and per example, so a missing or uninformative input can be ignored;
* ``cross_attention`` -- the text tokens attend to the image regions / audio frames (transformer decoder layers:
  self-attention, cross-attention, MLP), then are pooled: the early-fusion choice of VQA-style models.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from torch import nn

from ptft.core.classification import ClassificationModule
from ptft.core.errors import PtftError
from ptft.core.hf import build_hf_model
from ptft.core.hub import load_pretrained, resolve_model_name
from ptft.core.layers import hf_layer_ids, timm_layer_ids
from ptft.text.heads import masked_mean
from ptft.multimodal.towers import TowerLearningRates, audio_frames, stretched_layer_ids, text_tower

FusionKind = Literal["concat", "gated", "cross_attention"]


class FusionHead(nn.Module):
    """Fuses text token states with the other modality's token states into class logits.

    Args:
        kind: ``concat``, ``gated`` or ``cross_attention``.
        text_dim: Width of the text tower's states.
        other_dim: Width of the image / audio tower's states.
        dim: Width of the fused representation.
        num_labels: Number of classes.
        dropout: Dropout in the fusion layers and before the classifier.
        heads: Attention heads of ``cross_attention``.
        layers: Cross-attention layers of ``cross_attention``.
    """

    def __init__(self, kind: FusionKind, text_dim: int, other_dim: int, dim: int, num_labels: int, dropout: float,
                 heads: int, layers: int) -> None:
        super().__init__()
        self.kind = kind
        self.text_proj = nn.Linear(text_dim, dim)
        self.other_proj = nn.Linear(other_dim, dim)
        if kind == "concat":
            self.mix = nn.Sequential(nn.Linear(2 * dim, dim), nn.GELU(), nn.Dropout(dropout))
        elif kind == "gated":
            self.gate = nn.Linear(2 * dim, dim)
        else:
            layer = nn.TransformerDecoderLayer(dim, heads, 2 * dim, dropout, activation="gelu", batch_first=True,
                                               norm_first=True)
            self.cross = nn.TransformerDecoder(layer, layers, norm=nn.LayerNorm(dim))
            self.memory_norm = nn.LayerNorm(dim)  # pre-norm layers normalise their queries, not the memory
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(dim, num_labels)

    def forward(self, text: torch.Tensor, text_mask: torch.Tensor, other: torch.Tensor,
                other_mask: torch.Tensor) -> torch.Tensor:
        if self.kind == "cross_attention":
            fused = self.cross(self.text_proj(text), self.memory_norm(self.other_proj(other)), tgt_key_padding_mask=text_mask == 0,
                               memory_key_padding_mask=other_mask == 0)
            return self.classifier(self.dropout(masked_mean(fused, text_mask)))
        t = self.text_proj(masked_mean(text, text_mask))
        o = self.other_proj(masked_mean(other, other_mask))
        if self.kind == "concat":
            return self.classifier(self.dropout(self.mix(torch.cat([t, o], -1))))
        z = torch.sigmoid(self.gate(torch.cat([t, o], -1)))  # GMU: per-feature weight of the text
        return self.classifier(self.dropout(z * torch.tanh(t) + (1 - z) * torch.tanh(o)))


class FusionNetwork(nn.Module):
    """The towers and the fusion head: ``text`` (transformers), ``vision`` (timm) or ``audio`` (transformers),
    ``fusion``. Each tower returns token states and their mask."""

    def __init__(self, text: nn.Module, other: nn.Module, media: Literal["image", "audio"], fusion: FusionHead) -> None:
        super().__init__()
        self.text = text
        self.media = media
        if media == "image":
            self.vision = other
        else:
            self.audio = other
        self.fusion = fusion

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.text(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state

    def encode_image(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Region states ``(B, N, C)``: a CNN's feature map flattened, or a ViT's tokens."""
        states = self.vision.forward_features(pixel_values)
        if states.ndim == 4:  # (B, C, H, W), as timm's CNNs return it
            states = states.flatten(2).transpose(1, 2)
        return states, torch.ones(states.shape[:2], dtype=torch.long, device=states.device)

    def encode_audio(self, input_values: torch.Tensor, audio_mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Frame states ``(B, T, C)`` and the frame mask (padding excluded, after the feature encoder's striding)."""
        return audio_frames(self.audio, input_values, audio_mask)

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        text = self.encode_text(batch["input_ids"], batch["attention_mask"])
        if self.media == "image":
            other, other_mask = self.encode_image(batch["pixel_values"])
        else:
            other, other_mask = self.encode_audio(batch["input_values"], batch.get("audio_mask"))
        return self.fusion(text, batch["attention_mask"], other, other_mask)


class FusionClassifier(TowerLearningRates, ClassificationModule):
    """Classification of (text, image) or (text, audio) pairs: multimodal sentiment, VQA as classification, memes…

    Give ``text_model`` (any Hugging Face text encoder) and ``image_model`` (any timm model) or ``audio_model`` (any
    Hugging Face audio encoder: wav2vec2, HuBERT, WavLM). The towers are ``text``, ``vision`` or ``audio``, and
    ``fusion`` (projections, fusion layers, classifier: the new head): freeze, unfreeze or give each its own learning
    rate with ``FreezeSchedule(tower=...)`` and ``tower_lr``; ``ptft inspect-layers`` lists them.

    Args:
        text_model: Hugging Face text encoder by hub name or folder (``sentence-transformers/all-MiniLM-L6-v2``).
        image_model: timm image model (``resnet18``, ``vit_small_patch16_224``…).
        audio_model: Hugging Face audio encoder by hub name or folder (``facebook/wav2vec2-base``); its feature
            extractor preprocesses the clips.
        pretrained: Load pretrained weights (every tower); ``False`` builds them from their configs with random weights.
        image_pretrained: Whether the timm image tower starts from pretrained weights; ``None`` follows ``pretrained``.
        image_pretrained_file: Local weights file of the timm image tower (offline).
        image_kwargs: Extra ``timm.create_model`` arguments of the image tower.
        fusion: ``concat`` (pooled vectors through an MLP), ``gated`` (gated multimodal unit) or ``cross_attention``
            (text tokens attend to image regions / audio frames).
        fusion_dim: Width of the fused representation.
        fusion_heads: Attention heads of ``cross_attention``.
        fusion_layers: Cross-attention layers of ``cross_attention``.
        dropout: Dropout of the fusion layers and before the classifier.
        tokenizer: Tokenizer of the texts; defaults to ``text_model``'s.
        max_length: Longest text in tokens (longer ones are truncated).
        tower_lr: Learning rate of each named tower (``text``, ``vision`` / ``audio``, ``fusion``), e.g.
            ``{text: 2.0e-5, vision: 1.0e-4}``; towers not named keep ``optimizer.lr`` (the fusion head:
            ``optimizer.head_lr``).
        **kwargs: ``label_smoothing``, ``num_labels``, ``label_names`` (linked from the data) and the shared
            fine-tuning arguments of :class:`ptft.core.FineTuneModule`.
    """

    def __init__(
        self,
        text_model: str,
        image_model: str | None = None,
        audio_model: str | None = None,
        pretrained: bool = True,
        image_pretrained: bool | None = None,
        image_pretrained_file: str | None = None,
        image_kwargs: dict[str, Any] | None = None,
        fusion: FusionKind = "concat",
        fusion_dim: int = 256,
        fusion_heads: int = 4,
        fusion_layers: int = 1,
        dropout: float = 0.1,
        tokenizer: str | None = None,
        max_length: int = 128,
        tower_lr: dict[str, float] | None = None,
        **kwargs: Any,
    ) -> None:
        if (image_model is None) == (audio_model is None):
            raise PtftError("FusionClassifier: give image_model (text + image) or audio_model (text + audio), one of them")
        if fusion not in ("concat", "gated", "cross_attention"):
            raise PtftError(f"FusionClassifier: fusion must be concat, gated or cross_attention, got {fusion!r}")
        if fusion == "cross_attention" and fusion_dim % fusion_heads:
            raise PtftError(f"FusionClassifier: fusion_dim={fusion_dim} is not divisible by fusion_heads={fusion_heads}")
        super().__init__(**kwargs)
        self.media: Literal["image", "audio"] = "image" if image_model is not None else "audio"
        self.model_name = f"{text_model} + {image_model or audio_model}"  # as ptft inspect-layers names it
        self.tokenizer_name = tokenizer or text_model
        self.max_length = max_length
        #: Audio pairs: the data module runs this feature extractor at its sampling rate.
        self.feature_extractor_name = audio_model
        self.sampling_rate: int | None = None
        from transformers import AutoModel

        text = text_tower(text_model, pretrained)
        if image_model is not None:
            import timm.data

            from ptft.vision.modules import create_timm_model

            image_pretrained = pretrained if image_pretrained is None else image_pretrained
            other = create_timm_model(image_model, image_pretrained, image_pretrained_file, num_classes=0,
                                      **(image_kwargs or {}))
            self._image_data_config = timm.data.resolve_data_config(model=other)
            other_dim = getattr(other, "num_features")
        else:
            other = build_hf_model(AutoModel, audio_model, pretrained, None)
            other_dim = other.config.hidden_size
            self._image_data_config = {}
        head = FusionHead(fusion, text.config.hidden_size, other_dim, fusion_dim, self.num_labels, dropout,
                          fusion_heads, fusion_layers)
        self.set_model(FusionNetwork(text, other, self.media, head))
        self.init_tower_lr(tower_lr)
        self._save_hparams(pretrained=False, image_pretrained=False, image_pretrained_file=None)

    # --- what the data module reads -----------------------------------------------------------------------------
    def data_config(self) -> dict[str, Any]:
        """The image tower's preprocessing (input size, mean, std) as timm spells it."""
        return dict(self._image_data_config)

    def tokenizer(self) -> Any:
        from transformers import AutoTokenizer

        if getattr(self, "_tokenizer", None) is None:
            self._tokenizer = load_pretrained(AutoTokenizer.from_pretrained, resolve_model_name(self.tokenizer_name),
                                              "tokenizer")
        return self._tokenizer

    # --- towers and layers ----------------------------------------------------------------------------------
    def towers(self) -> dict[str, list[str]]:
        """Parameter-name prefixes of each tower: ``text``, ``vision`` or ``audio``, ``fusion``."""
        other = "vision" if self.media == "image" else "audio"
        return {"text": ["text"], other: [other], "fusion": ["fusion"]}

    def head_modules(self, model: nn.Module) -> list[str]:
        return ["fusion"]

    def discover_layers(self, model: nn.Module) -> dict[str, int]:
        """Each tower's own depth, stretched so both tops meet; the fusion head on top."""
        other = {"vision": timm_layer_ids(model.vision)} if model.media == "image" else {
            "audio": hf_layer_ids(model.audio, lambda _: False)}
        return stretched_layer_ids(model, {"text": hf_layer_ids(model.text, lambda _: False), **other})

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.model(batch)
