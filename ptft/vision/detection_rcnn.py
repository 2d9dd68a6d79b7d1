"""Object detection and instance segmentation with torchvision's Faster / Mask R-CNN on torchvision or timm backbones."""

from __future__ import annotations

import json
import re
from collections import OrderedDict
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ptft.core.errors import PtftError
from ptft.core.layers import timm_layer_ids
from ptft.vision.detection_base import DetectionModule
from ptft.vision.modules import create_timm_model

# torchvision's ImageNet normalisation, which its detection models apply to their [0, 1] inputs by default.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class TimmFPNBackbone(nn.Module):
    """A timm ``features_only`` model under torchvision's feature pyramid (the interface R-CNN expects)."""

    def __init__(self, body: nn.Module, out_channels: int) -> None:
        from torchvision.ops.feature_pyramid_network import (
            FeaturePyramidNetwork,
            LastLevelMaxPool,
        )

        super().__init__()
        self.body = body
        self.fpn = FeaturePyramidNetwork(body.feature_info.channels(), out_channels, extra_blocks=LastLevelMaxPool())
        self.out_channels = out_channels

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.fpn(OrderedDict((str(i), f) for i, f in enumerate(self.body(x))))


def _load_backbone_file(body: nn.Module, pretrained_file: str, backbone: str) -> None:
    """Loads a torchvision classification state dict (``.safetensors`` / ``.pth``) into an R-CNN backbone body."""
    path = Path(pretrained_file).expanduser()
    if not path.is_file():
        raise PtftError(f"pretrained_file {pretrained_file!r} does not exist")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(path)
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
        state = state.get("state_dict", state) if isinstance(state, dict) else state
    wanted = body.state_dict().keys()
    # resnet bodies keep the classifier's names (layer1…); mobilenet bodies drop its "features." prefix.
    state = {k.removeprefix("features."): v for k, v in state.items()} if not (wanted & state.keys()) else state
    found = {k: v for k, v in state.items() if k in wanted}
    if len(found) < len(wanted):
        raise PtftError(
            f"pretrained_file {pretrained_file!r} does not fit the torchvision {backbone} backbone "
            f"({len(found)} of {len(wanted)} weights found; is it a {backbone} state dict?)"
        )
    body.load_state_dict(found, strict=False)  # FrozenBatchNorm2d has no num_batches_tracked


class FasterRCNN(DetectionModule):
    """Object detection with torchvision's Faster R-CNN on a torchvision or timm backbone with a feature pyramid.

    Losses come from the model in training mode; in evaluation it only returns detections, so there is no
    ``val/loss``: validation logs box mAP (``val/map``, ``val/map_50``…), which picks the best checkpoint.

    Args:
        backbone: ``resnet50`` (or another torchvision ResNet / ResNeXt), ``mobilenet_v3_large`` /
            ``mobilenet_v3_small`` / ``mobilenet_v2`` (torchvision, faster), or ``timm:<name>``: any timm model with
            ``features_only`` support (``timm:resnet50.a1_in1k``, ``timm:convnext_tiny``).
        pretrained: Start the backbone from ImageNet weights (torchvision's or timm's, from the internet). The
            detection heads always start from scratch.
        pretrained_file: Local backbone weights (``.safetensors`` / ``.pth``): a timm state dict for ``timm:``
            backbones (e.g. from ptft's pre-training), a torchvision state dict otherwise.
        trainable_backbone_layers: torchvision backbones: how many stages, from the top, train (ResNet 0-5, MobileNet
            0-6; torchvision's default: 3 when pretrained, all otherwise). Pretrained backbones keep frozen BatchNorm statistics.
        out_indices: timm backbones: feature stages fed to the pyramid (default ``[1, 2, 3, 4]``, strides 4-32).
        fpn_channels: timm backbones: channels of the feature pyramid (torchvision's are 256).
        anchor_sizes: Anchor box sizes in pixels (at the resized input): one per pyramid level, or a list used at
            every level. Default: 32-512, as torchvision.
        representation_size: Width of the box head's two fully connected layers (torchvision: 1024).
        min_size: Images are resized so that their short side is ``min_size`` ...
        max_size: ... and their long side at most ``max_size`` (torchvision's ``GeneralizedRCNNTransform``).
        model_kwargs: Extra arguments of torchvision's ``FasterRCNN`` (``box_score_thresh``, ``box_detections_per_img``,
            ``rpn_batch_size_per_image``, ``box_batch_size_per_image``…).
        **kwargs: ``num_labels``, ``label_names``, ``predict_threshold`` and the shared fine-tuning arguments
            (``optimizer``, ``scheduler``, ``l2_sp``, ``checkpoint_weights``…).
    """

    def __init__(
        self,
        backbone: str = "resnet50",
        pretrained: bool = True,
        pretrained_file: str | None = None,
        trainable_backbone_layers: int | None = None,
        out_indices: list[int] | None = None,
        fpn_channels: int = 256,
        anchor_sizes: list[int] | None = None,
        representation_size: int = 1024,
        min_size: int = 800,
        max_size: int = 1333,
        model_kwargs: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.backbone_name = backbone
        features, levels, mean, std = self._build_backbone(
            backbone, pretrained, pretrained_file, trainable_backbone_layers, out_indices or [1, 2, 3, 4], fpn_channels
        )
        from torchvision.models.detection.anchor_utils import AnchorGenerator

        sizes = list(anchor_sizes) if anchor_sizes else None
        if sizes is None:
            sizes = [32, 64, 128, 256, 512] if backbone.startswith("mobilenet") else [32 * 2**i for i in range(levels)]
        per_level = [(s,) for s in sizes] if len(sizes) == levels else [tuple(sizes)] * levels
        anchors = AnchorGenerator(tuple(per_level), ((0.5, 1.0, 2.0),) * levels)
        from torchvision.models.detection.faster_rcnn import (
            FastRCNNPredictor,
            TwoMLPHead,
        )

        heads = {
            "box_head": TwoMLPHead(features.out_channels * 7 * 7, representation_size),  # 7x7: the RoIAlign output
            "box_predictor": FastRCNNPredictor(representation_size, self.num_labels + 1),  # class 0 is the background
        }
        heads.update(self._mask_heads(features.out_channels))
        model = self.architecture(
            features,
            rpn_anchor_generator=anchors,
            **heads,
            min_size=min_size,
            max_size=max_size,
            image_mean=list(mean),
            image_std=list(std),
            **(model_kwargs or {}),
        )
        self.set_model(model)
        # A full checkpoint rebuilds the architecture; its weights come from the state dict.
        self._save_hparams(pretrained=False, pretrained_file=None)

    @property
    def architecture(self) -> type[nn.Module]:
        from torchvision.models.detection import FasterRCNN as TorchvisionFasterRCNN

        return TorchvisionFasterRCNN

    def _mask_heads(self, in_channels: int) -> dict[str, nn.Module]:
        return {}

    def _build_backbone(
        self, name: str, pretrained: bool, pretrained_file: str | None, trainable: int | None, out_indices: list[int],
        fpn_channels: int,
    ) -> tuple[nn.Module, int, tuple[float, ...], tuple[float, ...]]:
        """The feature pyramid backbone, its number of levels, and the input normalisation it expects."""
        if name.startswith("timm:"):
            body = create_timm_model(name[5:], pretrained, pretrained_file, features_only=True, out_indices=out_indices)
            if pretrained or pretrained_file:
                from timm.layers import freeze_batch_norm_2d

                body = freeze_batch_norm_2d(body)  # detection batches are too small for BatchNorm statistics
            cfg = body.pretrained_cfg
            return TimmFPNBackbone(body, fpn_channels), len(out_indices) + 1, cfg["mean"], cfg["std"]
        from torchvision.models.detection.backbone_utils import (
            mobilenet_backbone,
            resnet_fpn_backbone,
        )
        from torchvision.ops.misc import FrozenBatchNorm2d

        known = name.startswith(("resnet", "resnext", "wide_resnet", "mobilenet"))
        if not known:
            raise PtftError(f"unknown R-CNN backbone {name!r}: use a torchvision ResNet / MobileNet name or timm:<name>")
        frozen = pretrained or pretrained_file is not None
        stages = 6 if name.startswith("mobilenet") else 5
        layers = trainable if trainable is not None else (3 if frozen else stages)  # torchvision's defaults
        weights = "DEFAULT" if pretrained and pretrained_file is None else None
        norm = FrozenBatchNorm2d if frozen else nn.BatchNorm2d
        try:
            if name.startswith("mobilenet"):
                features = mobilenet_backbone(
                    backbone_name=name, weights=weights, fpn=True, norm_layer=norm, trainable_layers=layers
                )
                levels = 3
            else:
                features = resnet_fpn_backbone(backbone_name=name, weights=weights, norm_layer=norm, trainable_layers=layers)
                levels = 5
        except (KeyError, ValueError) as err:
            raise PtftError(f"unknown torchvision backbone {name!r}: {err}") from err
        except (OSError, RuntimeError) as err:  # urllib errors are OSErrors
            raise PtftError(
                f"cannot download torchvision's pretrained {name} weights (offline?): {str(err).splitlines()[0]}. "
                "Give a local file: --model.init_args.pretrained_file=/path/weights.pth, or pretrained=false"
            ) from err
        if pretrained_file is not None:
            _load_backbone_file(features.body, pretrained_file, name)
        return features, levels, IMAGENET_MEAN, IMAGENET_STD

    def forward(self, batch: dict[str, Any]) -> Any:
        return self.model(batch["images"], self._targets(batch) if self.model.training else None)

    def _targets(self, batch: dict[str, Any]) -> list[dict[str, torch.Tensor]]:
        """Training targets: crowd regions left out (as torchvision's references do), labels shifted past background."""
        targets = []
        for t in batch["targets"]:
            keep = t["iscrowd"] == 0
            target = {"boxes": t["boxes"][keep], "labels": t["labels"][keep] + 1}
            if "masks" in t:
                target["masks"] = t["masks"][keep]
            targets.append(target)
        return targets

    def losses(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        return self(batch)

    def detect(self, batch: dict[str, Any]) -> tuple[list[dict[str, torch.Tensor]], torch.Tensor | None]:
        outputs = self(batch)
        for out in outputs:
            out["labels"] = out["labels"] - 1
            if "masks" in out:
                out["masks"] = out["masks"][:, 0] > 0.5
        return outputs, None

    def head_modules(self, model: nn.Module) -> list[str]:
        return ["backbone.fpn", "rpn", "roi_heads"]

    def discover_layers(self, model: nn.Module) -> dict[str, int]:
        """Backbone stages by depth (timm's own grouping for timm backbones); pyramid and heads on top."""
        body = model.backbone.body
        if hasattr(body, "group_matcher"):
            ids = {f"backbone.body.{k}": v for k, v in timm_layer_ids(body).items()}
        else:
            ids = {}
            for name, _ in body.named_parameters():
                match = re.match(r"(?:layer)?(\d+)\.", name)  # resnet: layer1…4; mobilenet: 0…16
                ids[f"backbone.body.{name}"] = int(match.group(1)) if match else 0
        top = max(ids.values(), default=0) + 1
        return {n: ids.get(n, top) for n, _ in model.named_parameters()}

    def save_model(self, model: nn.Module, folder: str) -> None:
        """``model.safetensors`` (torchvision's state dict) and ``config.json`` (how to rebuild it with ptft)."""
        from safetensors.torch import save_file

        Path(folder).mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, Path(folder) / "model.safetensors")
        config = {k: v for k, v in self.hparams.items() if k not in ("optimizer", "scheduler", "peft")}
        config["class_path"] = f"{type(self).__module__}.{type(self).__qualname__}"
        (Path(folder) / "config.json").write_text(json.dumps(config, indent=2, default=str))


class MaskRCNN(FasterRCNN):
    """Instance segmentation with torchvision's Mask R-CNN: :class:`FasterRCNN` plus a mask head.

    Logs box mAP (``val/map``…) and mask mAP (``val/segm_map``, ``val/segm_map_50``…). The data needs
    ``segmentation`` polygons or RLE for every annotation. Predictions hold boxes, labels and scores (masks are not
    written to the prediction file).

    Args:
        mask_head_channels: Channels of the mask head's four convolutions and its upsampling (torchvision: 256).
        **kwargs: The arguments of :class:`FasterRCNN` (``model_kwargs`` go to torchvision's ``MaskRCNN``).
    """

    needs_masks = True

    def __init__(self, mask_head_channels: int = 256, **kwargs: Any) -> None:
        self.mask_head_channels = mask_head_channels
        super().__init__(**kwargs)

    @property
    def architecture(self) -> type[nn.Module]:
        from torchvision.models.detection import MaskRCNN as TorchvisionMaskRCNN

        return TorchvisionMaskRCNN

    def _mask_heads(self, in_channels: int) -> dict[str, nn.Module]:
        from torchvision.models.detection.mask_rcnn import (
            MaskRCNNHeads,
            MaskRCNNPredictor,
        )

        width = self.mask_head_channels
        return {
            "mask_head": MaskRCNNHeads(in_channels, [width] * 4, 1),
            "mask_predictor": MaskRCNNPredictor(width, width, self.num_labels + 1),  # class 0 is the background
        }
