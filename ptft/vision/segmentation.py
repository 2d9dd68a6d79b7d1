"""Semantic segmentation: U-Net / FPN over timm encoders (segmentation_models_pytorch), or Hugging Face SegFormer."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics import MetricCollection
from torchmetrics.classification import MulticlassAccuracy, MulticlassJaccardIndex

from ptft.core.errors import PtftError
from ptft.core.hf import HFModule, build_hf_model, label_config
from ptft.core.classification import ClassificationModule
from ptft.vision.modules import check_backbone_loaded, resolve_weights_file
from ptft.vision.segmentation_data import IGNORE, IMAGENET_MEAN, IMAGENET_STD


class SegmentationModule(ClassificationModule):
    """One class per pixel: cross-entropy over labelled pixels, mean IoU and pixel accuracy, masks as predictions.

    Batches hold ``pixel_values`` ``(B, 3, H, W)`` and ``labels`` ``(B, H, W)`` with unlabelled pixels at -100
    (:class:`ptft.vision.segmentation_data.SegmentationDataModule` maps its ``ignore_index`` to it). Logits are
    upsampled (bilinear) to the label size before the loss and the metrics.

    Args:
        predict_dir: Folder where ``ptft predict`` writes one mask per image: a palette PNG of class ids at the
            image's original size, at the image's path relative to the predict folder (``.png`` suffix).
        **kwargs: The shared arguments of :class:`ptft.core.ClassificationModule` (``num_labels``, ``label_names``,
            ``label_smoothing``, ``optimizer``, ``scheduler``, ``l1``, ``l2_sp``, ``peft``, ``checkpoint_weights``,
            ``compile``, ``gradient_checkpointing``).
    """

    checkpoint_monitor = ("val/miou", "max")

    def __init__(self, predict_dir: str = "predicted_masks", **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.predict_dir = predict_dir

    def logits(self, batch: dict[str, Any], size: tuple[int, int] | None = None) -> torch.Tensor:
        """Class scores ``(B, C, H, W)`` at ``size`` (default: the input's)."""
        logits = self(batch)
        size = size or tuple(batch["pixel_values"].shape[-2:])
        if tuple(logits.shape[-2:]) != size:
            logits = F.interpolate(logits, size=size, mode="bilinear", align_corners=False)
        return logits

    def build_metrics(self) -> MetricCollection:
        # Macro IoU over the classes present in predictions or labels (absent classes do not count as 0).
        return MetricCollection(
            {
                "miou": MulticlassJaccardIndex(num_classes=self.num_labels, average="macro", ignore_index=IGNORE),
                "pixel_acc": MulticlassAccuracy(num_classes=self.num_labels, average="micro", ignore_index=IGNORE),
            }
        )

    def loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits, labels, ignore_index=IGNORE, label_smoothing=self.label_smoothing)

    def step(self, batch: dict[str, Any], stage: str) -> tuple[torch.Tensor, Any]:
        labels = batch["labels"]
        logits = self.logits(batch, tuple(labels.shape[-2:]))
        return self.loss(logits, labels), (logits.detach().argmax(dim=1), labels)

    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> dict[str, Any]:
        """Writes each image's predicted mask (original size) to :attr:`predict_dir`; returns the paths."""
        from PIL import Image

        logits = self(batch).float()
        files, masks = [], []
        for i, (path, name, size) in enumerate(zip(batch["path"], batch["name"], batch["size"])):
            ids = F.interpolate(logits[i : i + 1], size=tuple(size), mode="bilinear", align_corners=False).argmax(1)[0]
            out = Path(self.predict_dir) / Path(name).with_suffix(".png")
            out.parent.mkdir(parents=True, exist_ok=True)
            array = ids.cpu().numpy()
            if self.num_labels <= 256:
                image = Image.fromarray(array.astype("uint8"), mode="P")
                image.putpalette(_palette())
            else:
                image = Image.fromarray(array.astype("int32"), mode="I")
            image.save(out)
            files.append(path)
            masks.append(str(out))
        return {"files": files, "masks": masks}

    def prediction_rows(self, outputs: dict[str, Any]) -> list[dict[str, Any]]:
        """``file`` (the image) and ``mask`` (the written PNG of class ids)."""
        return [{"file": f, "mask": m} for f, m in zip(outputs["files"], outputs["masks"])]

    def data_config(self) -> dict[str, Any]:
        """Input normalisation the data module applies (ImageNet's unless the model says otherwise)."""
        return {"mean": IMAGENET_MEAN, "std": IMAGENET_STD}


def _palette() -> list[int]:
    """VOC's colour map: class ids stay the pixel values, and a viewer shows distinct colours."""
    palette = []
    for i in range(256):
        r = g = b = 0
        c = i
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        palette += [r, g, b]
    return palette


class SemanticSegmenter(SegmentationModule):
    """U-Net or FPN decoder over any timm encoder, built by segmentation_models_pytorch (``tu-<timm name>``).

    The encoder's layers are timm's own blocks (its ``group_matcher``: stem 0, one index per block); the decoder
    and segmentation head are new and sit on top (``head_lr`` applies to them).

    Args:
        encoder: timm model name, with an optional pretrained tag (``resnet50.a1_in1k``, ``convnext_tiny``,
            ``efficientnet_b0``); any timm model with a 5-stage feature pyramid.
        architecture: The decoder: ``unet`` or ``fpn`` (or any other ``smp.create_model`` architecture name:
            ``unetplusplus``, ``deeplabv3plus``, ``segformer``…).
        pretrained: Load the encoder's pretrained weights from the hub (or from ``pretrained_file``).
        pretrained_file: Local timm weights file (``.safetensors`` or ``.pth``) for the encoder, e.g. a ptft
            pre-trained backbone, or a ptft checkpoint (``.ckpt``); its classifier is dropped. Every encoder weight
            must be in the file (one-line error otherwise).
        model_kwargs: Extra ``smp.create_model`` arguments (``decoder_channels: [256, 128, 64, 32, 16]`` for U-Net,
            ``decoder_pyramid_channels``, ``decoder_segmentation_channels`` (multiples of 32) and ``decoder_dropout``
            for FPN, ``encoder_depth``), and timm arguments for the encoder (``drop_path_rate``).
        **kwargs: The arguments of :class:`SegmentationModule` (``predict_dir``, ``num_labels``, ``label_names``,
            ``optimizer``, ``scheduler``…).
    """

    def __init__(
        self,
        encoder: str = "resnet50.a1_in1k",
        architecture: str = "unet",
        pretrained: bool = True,
        pretrained_file: str | None = None,
        model_kwargs: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        import segmentation_models_pytorch as smp

        self.model_name = encoder
        self.encoder_name = encoder
        extra = dict(model_kwargs or {})
        weights = None
        if pretrained_file is not None:
            weights = resolve_weights_file(pretrained_file)  # a .ckpt: its exported weights
            # timm loads the file into the full model before wrapping it as a feature extractor (keys match).
            extra["pretrained_cfg_overlay"] = {"file": str(weights)}
            pretrained = True
        # Only the names and preprocessing of the full timm model are kept (not as a submodule: no weights).
        self._timm_layers, self._timm_data = _timm_reference(encoder)
        try:
            model = smp.create_model(
                architecture,
                encoder_name=f"tu-{encoder}",
                encoder_weights=True if pretrained else None,
                classes=self.num_labels,
                **extra,
            )
        except KeyError as err:  # unknown architecture
            raise PtftError(f"unknown architecture {architecture!r}: {str(err).splitlines()[0]}") from err
        except (OSError, ValueError, RuntimeError) as err:
            message = str(err).splitlines()[0] if str(err) else type(err).__name__
            if pretrained and not isinstance(err, ValueError):
                raise PtftError(
                    f"cannot load pretrained weights for encoder {encoder!r} (hub unreachable?): {message}. Offline, "
                    "give a local timm weights file: --model.init_args.pretrained_file=/path/to/model.safetensors"
                ) from err
            if "downsampling pattern" in message:
                message += " (smp needs an encoder with a feature pyramid: ResNet, ConvNeXt, EfficientNet…, not a plain ViT)"
            raise PtftError(f"cannot build {architecture} over timm encoder {encoder!r}: {message}") from err
        if weights is not None:  # timm loads non-strictly: names that fit nothing would leave the encoder random
            check_backbone_loaded(model.encoder.model, encoder, weights)
        self.set_model(model)
        self._save_hparams(pretrained=False, pretrained_file=None)

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.model(batch["pixel_values"])

    def head_modules(self, model: nn.Module) -> list[str]:
        return [name for name, _ in model.named_children() if name != "encoder"]

    def discover_layers(self, model: nn.Module) -> dict[str, int]:
        """timm's block index for each encoder parameter (via the full model's ``group_matcher``), decoder on top.

        The feature extractor smp wraps renames flattened stages (``stages_0`` for ``stages.0``); names are mapped
        back before matching. Encoders without a ``group_matcher`` count as one layer (0).
        """
        full_ids = self._timm_layers
        ids = {}
        for name, _ in model.encoder.model.named_parameters():
            plain = name if name in full_ids else re.sub(r"^(\w+?)_(\d+)\.", r"\1.\2.", name)
            ids[f"encoder.model.{name}"] = full_ids.get(plain, 0)
        top = max(ids.values(), default=0) + 1
        for name, _ in model.named_parameters():
            ids.setdefault(name, top)
        return ids

    def data_config(self) -> dict[str, Any]:
        return {"mean": self._timm_data["mean"], "std": self._timm_data["std"]}

    def save_model(self, model: nn.Module, folder: str) -> None:
        """smp's ``save_pretrained`` layout (config.json + model.safetensors): ``smp.from_pretrained(folder)``.

        The config asks for no pretrained encoder weights (they are in the file) and records the class names as
        ``_label_names`` (smp ignores keys starting with ``_``).
        """
        config = model.config
        saved = dict(config)
        config.update(encoder_weights=None, _label_names=self.label_names)
        config.pop("pretrained_cfg_overlay", None)
        try:
            model.save_pretrained(folder)
        finally:
            config.clear()
            config.update(saved)


def _timm_reference(name: str) -> tuple[dict[str, int], dict[str, Any]]:
    """From the encoder's full timm model (built without weights): the block index of each parameter (its
    ``group_matcher``, empty when it has none) and its preprocessing config."""
    import timm
    import timm.data
    from timm.models import group_parameters

    try:
        with torch.device("meta"):
            reference = timm.create_model(name, pretrained=False)
    except RuntimeError as err:
        if "Unknown model" in str(err):
            raise PtftError(
                f"unknown timm encoder {name!r}; list them with: "
                f"python -c \"import timm; print(timm.list_models('*{name.split('.')[0][:6]}*'))\""
            ) from err
        raise
    layers = {}
    if hasattr(reference, "group_matcher"):
        layers = group_parameters(reference, reference.group_matcher(coarse=False), reverse=True)
    return layers, timm.data.resolve_data_config(model=reference)


class HFSemanticSegmenter(HFModule, SegmentationModule):
    """Semantic segmentation with a Hugging Face ``AutoModelForSemanticSegmentation`` model (SegFormer, DPT, UperNet…).

    Layers: the encoder's blocks in order (embeddings 0), the decode head on top and new (``head_lr`` applies).

    Args:
        model_name: Hub name (``nvidia/mit-b0`` for an ImageNet encoder with a new head,
            ``nvidia/segformer-b0-finetuned-ade-512-512`` for an ADE20K-trained model) or a local folder.
        pretrained: Load the pretrained weights; ``False`` builds the architecture with random weights.
        model_config: Config overrides; a dict holding ``model_type`` is a complete config, used without reading
            ``model_name``'s (how full checkpoints reload without the hub).
        image_stats: Input normalisation ``{mean: [...], std: [...]}``; ``None``: the model's image processor's
            (with ``pretrained``), else ImageNet's. Checkpoints store the one used, so a reload normalises the same.
        **kwargs: The arguments of :class:`SegmentationModule` (``predict_dir``, ``num_labels``, ``label_names``,
            ``optimizer``, ``scheduler``…).
    """

    def __init__(
        self,
        model_name: str = "nvidia/mit-b0",
        pretrained: bool = True,
        model_config: dict[str, Any] | None = None,
        image_stats: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        from transformers import AutoModelForSemanticSegmentation

        self.model_name = model_name
        labels = label_config(self.label_names)
        model = build_hf_model(AutoModelForSemanticSegmentation, model_name, pretrained, model_config, **labels)
        if image_stats is None and pretrained:
            image_stats = _image_stats(model_name)
        if image_stats is not None and not {"mean", "std"} <= set(image_stats):
            raise PtftError(f"image_stats needs 'mean' and 'std' (3 values each), got {image_stats!r}")
        self._image_stats = None if image_stats is None else {k: tuple(image_stats[k]) for k in ("mean", "std")}
        architecture = model.config.to_dict()
        self.set_model(model)
        self._save_hparams(pretrained=False, model_config=architecture)
        # Every checkpoint (full, or weights-only rebuilt with pretrained) normalises as this run did.
        self.hparams["image_stats"] = None if self._image_stats is None else {k: list(v) for k, v in self._image_stats.items()}

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.model(pixel_values=batch["pixel_values"]).logits

    def data_config(self) -> dict[str, Any]:
        return dict(self._image_stats or super().data_config())


def _image_stats(model_name: str) -> dict[str, Any] | None:
    """The model's own normalisation from its image processor, when one is available locally or on the hub."""
    from transformers import AutoImageProcessor

    from ptft.core.hub import resolve_model_name

    try:
        processor = AutoImageProcessor.from_pretrained(resolve_model_name(model_name))
    except (OSError, ValueError, ImportError):  # no processor saved with the model: ImageNet's statistics
        return None
    mean, std = getattr(processor, "image_mean", None), getattr(processor, "image_std", None)
    return {"mean": tuple(mean), "std": tuple(std)} if mean and std else None
