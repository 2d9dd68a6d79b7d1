"""Video classification: a timm image model on every frame with a temporal head, or a transformers video model
(VideoMAE, TimeSformer, ViViT) by name."""

from __future__ import annotations

from typing import Any, Literal

import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import nn

from ptft.core.classification import ClassificationModule
from ptft.core.errors import PtftError
from ptft.core.hf import HFModule, build_hf_model, label_config
from ptft.core.hub import load_pretrained, resolve_model_name
from ptft.core.layers import timm_layer_ids
from ptft.text.heads import Recurrent
from ptft.vision.modules import create_timm_model

TemporalKind = Literal["mean", "max", "lstm", "gru", "transformer"]


class TemporalHead(nn.Module):
    """Per-frame features ``(B, T, D)`` -> class logits.

    ``mean`` / ``max`` pool over time (order-blind: the TSN baseline); ``lstm`` / ``gru`` run a bidirectional RNN,
    then mean-pool its outputs; ``transformer`` adds learned frame-position embeddings and runs ``layers`` pre-norm
    encoder layers, then mean-pools.

    Args:
        kind: ``mean``, ``max``, ``lstm``, ``gru`` or ``transformer``.
        features: Width of the per-frame features.
        num_labels: Number of classes.
        num_frames: Frames per clip (the transformer's position table).
        hidden: Width of the RNN (per direction) or of the transformer.
        layers: Transformer layers.
        heads: Transformer attention heads.
        dropout: Dropout in the temporal layers and before the classifier.
    """

    def __init__(self, kind: TemporalKind, features: int, num_labels: int, num_frames: int, hidden: int, layers: int,
                 heads: int, dropout: float) -> None:
        super().__init__()
        self.kind = kind
        size = features
        if kind in ("lstm", "gru"):
            self.rnn = Recurrent(kind, features, hidden)
            size = self.rnn.output_size
        elif kind == "transformer":
            self.inp = nn.Linear(features, hidden)
            self.position = nn.Parameter(torch.zeros(1, num_frames, hidden))
            nn.init.trunc_normal_(self.position, std=0.02)
            layer = nn.TransformerEncoderLayer(hidden, heads, 2 * hidden, dropout, activation="gelu", batch_first=True,
                                               norm_first=True)
            self.encoder = nn.TransformerEncoder(layer, layers, norm=nn.LayerNorm(hidden), enable_nested_tensor=False)
            size = hidden
        elif kind not in ("mean", "max"):
            raise PtftError(f"temporal must be mean, max, lstm, gru or transformer, got {kind!r}")
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(size, num_labels)

    def forward(self, frames: torch.Tensor) -> torch.Tensor:
        if self.kind == "max":
            pooled = frames.amax(1)
        elif self.kind == "mean":
            pooled = frames.mean(1)
        elif self.kind == "transformer":
            if frames.shape[1] > self.position.shape[1]:
                raise PtftError(f"clips of {frames.shape[1]} frames, but the temporal transformer was built for "
                                f"{self.position.shape[1]}: set model.init_args.num_frames")
            pooled = self.encoder(self.inp(frames) + self.position[:, : frames.shape[1]]).mean(1)
        else:
            mask = torch.ones(frames.shape[:2], dtype=torch.long, device=frames.device)
            pooled = self.rnn(frames, mask).mean(1)
        return self.classifier(self.dropout(pooled))


class FrameModel(nn.Module):
    """A timm image model (no classifier) on every frame, then a :class:`TemporalHead`.

    With ``pool_grid`` the frame's feature map is average-pooled to a ``g x g`` grid and flattened instead of pooled
    globally: global pooling keeps what is in a frame but not where, so motion (a thing moving left or right) is
    invisible to every temporal head after it.
    """

    def __init__(self, backbone: nn.Module, temporal: TemporalHead, pool_grid: int | None = None) -> None:
        super().__init__()
        self.backbone = backbone
        self.grid = None if pool_grid is None else nn.AdaptiveAvgPool2d(pool_grid)
        self.temporal = temporal

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        batch, frames = pixel_values.shape[:2]
        features = self.backbone(pixel_values.flatten(0, 1))  # frames as one batch of images
        if self.grid is not None:
            if features.ndim != 4:
                raise PtftError(f"pool_grid needs a model whose features are a map (a CNN), got shape "
                                f"{tuple(features.shape)}")
            features = self.grid(features)
        return self.temporal(features.reshape(batch, frames, -1))


def _check_clips(pixel_values: torch.Tensor) -> None:
    if pixel_values.ndim != 5:
        raise PtftError(f"video models take clips (batch, frames, 3, height, width), got shape {tuple(pixel_values.shape)}")


class VideoClassifier(ClassificationModule):
    """Video classification with any timm image model applied to each frame and a temporal head over the frames.

    The image backbone (pretrained on images: ImageNet weights carry over) sees the ``num_frames`` frames of a clip as
    one batch; ``temporal`` turns their features into a label. Order-blind pooling (``mean``, ``max``) suits scenes
    and objects; ``gru`` / ``lstm`` / ``transformer`` see the order (motion, direction, actions that differ only in
    time). Towers for freezing schedules: ``backbone`` and ``temporal``.

    Args:
        model_name: timm model (``resnet18.a1_in1k``, ``efficientnet_b0``, ``vit_small_patch16_224``…).
        pretrained: Load the image model's pretrained weights (hub or ``pretrained_file``).
        pretrained_file: Local weights file of the image model (offline).
        model_kwargs: Extra ``timm.create_model`` arguments (``{drop_path_rate: 0.1}``).
        temporal: ``mean``, ``max``, ``lstm``, ``gru`` or ``transformer``.
        pool_grid: Pool each frame's feature map (CNNs) to a ``g x g`` grid instead of globally, so the temporal
            head sees where things are (motion, direction); ``None``: the model's global pooling.
        num_frames: Frames per clip (the data module samples this many).
        temporal_size: Width of the RNN (per direction) or of the temporal transformer.
        temporal_layers: Temporal transformer layers.
        temporal_heads: Temporal transformer attention heads.
        dropout: Dropout of the temporal head.
        **kwargs: ``label_smoothing``, ``num_labels``, ``label_names`` (linked from the data) and the shared
            fine-tuning arguments of :class:`ptft.core.FineTuneModule`.
    """

    def __init__(
        self,
        model_name: str,
        pretrained: bool = True,
        pretrained_file: str | None = None,
        model_kwargs: dict[str, Any] | None = None,
        temporal: TemporalKind = "transformer",
        pool_grid: int | None = None,
        num_frames: int = 8,
        temporal_size: int = 256,
        temporal_layers: int = 1,
        temporal_heads: int = 4,
        dropout: float = 0.1,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        import timm.data

        self.model_name = model_name
        self.num_frames = num_frames
        if pool_grid is not None and pool_grid < 1:
            raise PtftError(f"pool_grid must be >= 1 (or null for global pooling), got {pool_grid}")
        pool = {} if pool_grid is None else {"global_pool": ""}
        backbone = create_timm_model(model_name, pretrained, pretrained_file, num_classes=0,
                                     **{**(model_kwargs or {}), **pool})
        self._data_config = timm.data.resolve_data_config(model=backbone)
        head = TemporalHead(temporal, backbone.num_features * (pool_grid or 1) ** 2, self.num_labels, num_frames,
                            temporal_size, temporal_layers, temporal_heads, dropout)
        self.set_model(FrameModel(backbone, head, pool_grid))
        self._save_hparams(pretrained=False, pretrained_file=None)

    def data_config(self) -> dict[str, Any]:
        """The image backbone's preprocessing (input size, mean, std, crop) as timm resolves it."""
        return dict(self._data_config)

    def towers(self) -> dict[str, list[str]]:
        """``backbone`` (the image model) and ``temporal`` (the head), for per-tower freezing schedules."""
        return {"backbone": ["backbone"], "temporal": ["temporal"]}

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        _check_clips(batch["pixel_values"])
        return self.model(batch["pixel_values"])

    def head_modules(self, model: nn.Module) -> list[str]:
        return ["temporal"]

    def discover_layers(self, model: nn.Module) -> dict[str, int]:
        ids = {f"backbone.{n}": i for n, i in timm_layer_ids(model.backbone).items()}
        top = max(ids.values(), default=0) + 1
        return {n: ids.get(n, top) for n, _ in model.named_parameters()}


class HFVideoClassifier(HFModule, ClassificationModule):
    """Video classification with any ``AutoModelForVideoClassification`` model: VideoMAE, TimeSformer, ViViT…

    Clips get the model's own frame count (``config.num_frames``) and its processor's size, mean and std.

    Args:
        model_name: Hugging Face hub name (``MCG-NJU/videomae-base-finetuned-kinetics``,
            ``facebook/timesformer-base-finetuned-k400``) or a local folder with config, weights and processor.
        pretrained: Load the pretrained weights; ``False`` builds the architecture with random weights.
        model_config: Values overriding the model's config; a dict holding ``model_type`` is a complete config.
        **kwargs: ``label_smoothing``, ``num_labels``, ``label_names`` (linked from the data) and the shared
            fine-tuning arguments of :class:`ptft.core.FineTuneModule`.
    """

    def __init__(self, model_name: str, pretrained: bool = True, model_config: dict[str, Any] | None = None,
                 **kwargs: Any) -> None:
        super().__init__(**kwargs)
        from transformers import AutoModelForVideoClassification

        self.model_name = model_name
        model = build_hf_model(AutoModelForVideoClassification, model_name, pretrained, model_config,
                               **label_config(self.label_names))
        self.num_frames = int(getattr(model.config, "num_frames", 8))
        self._data_config = self._processor_data_config(model_name, model.config)
        architecture = model.config.to_dict()
        self.set_model(model)
        self._save_hparams(pretrained=False, model_config=architecture)

    @staticmethod
    def _processor_data_config(name: str, config: Any) -> dict[str, Any]:
        """The model's video (or image) processor as a timm data config; ImageNet statistics at the config's
        ``image_size`` when the folder has no processor (a model built from a config)."""
        from transformers import AutoImageProcessor, AutoVideoProcessor

        processor = None
        for auto in (AutoVideoProcessor, AutoImageProcessor):
            try:
                processor = load_pretrained(auto.from_pretrained, resolve_model_name(name), "processor")
                break
            except (OSError, ValueError, TypeError, PtftError):
                continue
        side = int(getattr(config, "image_size", 224))
        if processor is None:
            rank_zero_warn(f"{name}: no video or image processor found; clips get ImageNet mean / std at the "
                           f"config's image_size {side}")
            return {"input_size": (3, side, side), "mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225),
                    "crop_pct": 0.875}
        crop = getattr(processor, "crop_size", None) or {}
        size = getattr(processor, "size", None) or {}
        crop_side = crop.get("height") if getattr(processor, "do_center_crop", False) else None
        side = crop_side or size.get("height") or size.get("shortest_edge") or side
        short = size.get("shortest_edge") or side
        return {"input_size": (3, side, side), "mean": tuple(processor.image_mean), "std": tuple(processor.image_std),
                "crop_pct": min(side / short, 1.0)}

    def data_config(self) -> dict[str, Any]:
        return dict(self._data_config)

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        _check_clips(batch["pixel_values"])
        return self.model(pixel_values=batch["pixel_values"]).logits
