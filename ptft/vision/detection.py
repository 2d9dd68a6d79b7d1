"""Object detection and instance segmentation: torchvision's Faster / Mask R-CNN and Hugging Face detectors."""

from __future__ import annotations

import inspect
import json
import re
from collections import OrderedDict
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torchmetrics import MetricCollection

from ptft.core.errors import PtftError
from ptft.core.hf import HFModule, build_hf_model, label_config
from ptft.core.layers import timm_layer_ids
from ptft.core.module import FineTuneModule
from ptft.vision.modules import create_timm_model

# torchvision's ImageNet normalisation, which its detection models apply to their [0, 1] inputs by default.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
#: Logged from torchmetrics' MeanAveragePrecision (``bbox_`` entries without the prefix, ``segm_`` ones with it).
LOGGED_MAP = ("map", "map_50", "map_75", "mar_100")


class DetectionModule(FineTuneModule):
    """What the detectors share: category names, box (and mask) mAP, evaluation and prediction rows.

    Subclasses implement :meth:`losses` (a dict of loss terms in training) and :meth:`detect` (per image: ``boxes``
    as absolute ``x1, y1, x2, y2`` in the original image, ``scores``, ``labels`` as category indices, and for
    instance segmentation ``masks``).

    Args:
        num_labels: Number of object categories (without background). Linked from the data module by the CLI.
        label_names: Category names in label order. Linked from the data module by the CLI.
        predict_threshold: Minimum score of the detections written by ``ptft predict`` (mAP uses all of them).
        **kwargs: The shared fine-tuning arguments of :class:`ptft.core.FineTuneModule`.
    """

    checkpoint_monitor = ("val/map", "max")
    #: Whether the data module must decode instance masks.
    needs_masks = False

    def __init__(
        self, num_labels: int = 1, label_names: list[str] | None = None, predict_threshold: float = 0.5, **kwargs: Any
    ) -> None:
        if label_names is not None and len(label_names) != num_labels:
            raise PtftError(f"{len(label_names)} label_names given for num_labels={num_labels}")
        self.num_labels = num_labels
        self.label_names = list(label_names) if label_names else [str(i) for i in range(num_labels)]
        self.predict_threshold = predict_threshold
        super().__init__(**kwargs)

    def _save_hparams(self, **overrides: Any) -> None:
        super()._save_hparams(frame=inspect.currentframe().f_back, **overrides)
        self.hparams.update(num_labels=self.num_labels, label_names=self.label_names, predict_threshold=self.predict_threshold)

    def build_metrics(self) -> MetricCollection:
        from torchmetrics.detection import MeanAveragePrecision

        iou_type = ("bbox", "segm") if self.needs_masks else "bbox"
        return MetricCollection({"map": MeanAveragePrecision(iou_type=iou_type, backend="pycocotools")})

    # --- subclass hooks -------------------------------------------------------------------------------------
    def losses(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        """The loss terms of a training batch (summed into ``train/loss``)."""
        raise NotImplementedError

    def detect(self, batch: dict[str, Any]) -> tuple[list[dict[str, torch.Tensor]], torch.Tensor | None]:
        """Detections per image in original-image pixels, and the loss when the model gives one in evaluation."""
        raise NotImplementedError

    # --- steps ----------------------------------------------------------------------------------------------
    def step(self, batch: dict[str, Any], stage: str) -> tuple[torch.Tensor, Any]:
        terms = self.losses(batch)
        self.log_dict({f"{stage}/{k}": v for k, v in terms.items()}, batch_size=len(batch["images"]))
        return sum(terms.values()), None

    def _evaluate(self, batch: dict[str, Any], stage: str) -> None:
        detections, loss = self.detect(batch)
        if loss is not None:
            self.log(f"{stage}/loss", loss, batch_size=len(batch["images"]))
        targets = []
        for t in batch["targets"]:
            target = {"boxes": t["boxes"], "labels": t["labels"], "iscrowd": t["iscrowd"]}
            if self.needs_masks:
                target["masks"] = t["masks"].bool()
            targets.append(target)
        self.metrics[f"{stage}_"].update(detections, targets)

    def _log_map(self, stage: str) -> None:
        metrics = self.metrics[f"{stage}_"]
        values = metrics.compute()
        metrics.reset()
        prefix = f"{stage}/"
        logged = {}
        for iou in ("bbox", "segm") if self.needs_masks else ("bbox",):
            for name in LOGGED_MAP:
                value = values.get(f"{prefix}{iou}_{name}", values.get(f"{prefix}{name}"))
                if value is not None:
                    logged[f"{prefix}{name}" if iou == "bbox" else f"{prefix}segm_{name}"] = value.float()
        self.log_dict(logged, prog_bar=stage == "val", sync_dist=False)

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._evaluate(batch, "val")

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._evaluate(batch, "test")

    def on_validation_epoch_end(self) -> None:
        self._log_map("val")

    def on_test_epoch_end(self) -> None:
        self._log_map("test")

    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> dict[str, Any]:
        detections, _ = self.detect(batch)
        return {"files": batch["files"], "detections": detections}

    def prediction_rows(self, outputs: dict[str, Any]) -> list[dict[str, Any]]:
        """Per image: ``image``, then ``boxes`` (``[x1, y1, x2, y2]`` pixels), ``labels``, ``label_ids``, ``scores``."""
        rows = []
        for file, det in zip(outputs["files"], outputs["detections"]):
            keep = det["scores"] >= self.predict_threshold
            ids = det["labels"][keep].tolist()
            rows.append({
                "image": file,
                "boxes": [[round(v, 2) for v in box] for box in det["boxes"][keep].tolist()],
                "labels": [self.label_names[i] for i in ids],
                "label_ids": ids,
                "scores": [round(s, 4) for s in det["scores"][keep].tolist()],
            })
        return rows


# --- torchvision R-CNN --------------------------------------------------------------------------------------
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


# --- Hugging Face detectors ---------------------------------------------------------------------------------
class HFObjectDetector(HFModule, DetectionModule):
    """Object detection with any ``AutoModelForObjectDetection`` model (DETR, Conditional / Deformable DETR, YOLOS…).

    Images and targets go through the model's image processor (resize, normalisation, padding; COCO boxes to the
    normalised centre format the model expects). Without one (a bare config), ptft normalises with ImageNet
    statistics, pads to the largest image and converts boxes itself. These models compute their loss in evaluation
    too: validation logs ``val/loss`` besides box mAP.

    Args:
        model_name: Hugging Face hub name (``facebook/detr-resnet-50``, ``hustvl/yolos-tiny``) or a local folder with
            ``config.json``, weights and ideally ``preprocessor_config.json``.
        pretrained: Load the pretrained weights (the class head is re-initialised for the data's categories).
        model_config: Config overrides; a dict holding ``model_type`` is a complete config (as full checkpoints
            store it, so they load without the hub).
        image_processor: Overrides of the image processor's settings, e.g. ``{size: {shortest_edge: 512,
            longest_edge: 800}}``. A dict holding ``image_processor_type`` is a complete processor (full checkpoints
            store it this way).
        **kwargs: ``num_labels``, ``label_names``, ``predict_threshold`` and the shared fine-tuning arguments.
    """

    def __init__(
        self,
        model_name: str,
        pretrained: bool = True,
        model_config: dict[str, Any] | None = None,
        image_processor: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        from transformers import AutoModelForObjectDetection

        self.model_name = model_name
        labels = label_config(self.label_names)
        # A pretrained COCO head with another number of classes is re-initialised (build_hf_model: mismatched sizes).
        model = build_hf_model(AutoModelForObjectDetection, model_name, pretrained, model_config, **labels)
        self.processor = self._load_processor(model_name, image_processor or {})
        architecture = model.config.to_dict()
        self.set_model(model)
        # Full checkpoints keep the processor's settings too: the same preprocessing without model_name's folder.
        processor = None if self.processor is None else json.loads(self.processor.to_json_string())  # plain values
        self._save_hparams(pretrained=False, model_config=architecture, image_processor=processor)

    @staticmethod
    def _load_processor(model_name: str, overrides: dict[str, Any]) -> Any:
        import transformers

        from ptft.core.hub import resolve_model_name

        kind = overrides.get("image_processor_type")
        if kind is not None:  # complete settings, as full checkpoints store them
            settings = {k: v for k, v in overrides.items() if k not in ("image_processor_type", "processor_class")}
            return getattr(transformers, kind)(**settings)
        try:
            return transformers.AutoImageProcessor.from_pretrained(resolve_model_name(model_name), **overrides)
        except (OSError, ValueError):
            return None  # no preprocessor_config.json: ptft's own normalisation (see the class docstring)

    def batch_encoder(self) -> HFBatchEncoder:
        """What the data module's collate applies (in its workers): model inputs from images and targets."""
        return HFBatchEncoder(self.processor)

    def forward(self, batch: dict[str, Any]) -> Any:
        return self.model(**batch["inputs"])

    def losses(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        return {"loss": self(batch).loss}

    def step(self, batch: dict[str, Any], stage: str) -> tuple[torch.Tensor, Any]:
        return self.losses(batch)["loss"], None

    def detect(self, batch: dict[str, Any]) -> tuple[list[dict[str, torch.Tensor]], torch.Tensor | None]:
        outputs = self(batch)
        sizes = torch.tensor(batch["sizes"], device=outputs.logits.device)
        if self.processor is not None:
            # Predictions are relative to the padded canvas (as the processor made the training boxes): decode
            # against the canvas in original pixels, then clip to the image.
            padded = torch.tensor(batch["inputs"]["pixel_values"].shape[-2:], device=sizes.device)
            valid = torch.tensor(batch["valid_sizes"], device=sizes.device) if "valid_sizes" in batch else padded
            canvas = sizes * padded / valid
            results = self.processor.post_process_object_detection(outputs, threshold=0.0, target_sizes=canvas)
            for r, (h, w) in zip(results, sizes.tolist()):
                r["boxes"] = torch.stack(
                    [r["boxes"][:, 0].clamp(0, w), r["boxes"][:, 1].clamp(0, h), r["boxes"][:, 2].clamp(0, w),
                     r["boxes"][:, 3].clamp(0, h)], dim=-1,
                )
        else:
            results = _plain_post_process(outputs, batch["inputs"]["pixel_values"].shape[-2:], sizes)
        return [{k: r[k] for k in ("boxes", "scores", "labels")} for r in results], outputs.loss

    def save_model(self, model: nn.Module, folder: str) -> None:
        """``save_pretrained`` plus the image processor: the folder is a ``model_name`` again."""
        model.save_pretrained(folder)
        if self.processor is not None:
            self.processor.save_pretrained(folder)


class HFBatchEncoder:
    """Turns a detection batch into a Hugging Face detector's inputs; small and picklable, for DataLoader workers.

    With the model's image processor: resize, normalisation, padding, and COCO boxes to normalised ``(cx, cy, w, h)``.
    Without one: :func:`_plain_inputs`. Crowd regions are left out of the training targets. ``valid_sizes`` holds
    each image's resized extent on the padded canvas (height, width), to decode predictions at the right scale.
    """

    def __init__(self, processor: Any) -> None:
        self.processor = processor

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        images = batch["images"]
        targets = batch.get("targets")
        if self.processor is None:
            return {**batch, "inputs": _plain_inputs(images, targets)}
        annotations = None
        if targets is not None:
            annotations = [
                {"image_id": i, "annotations": [
                    {"bbox": [x1, y1, x2 - x1, y2 - y1], "category_id": c, "area": (x2 - x1) * (y2 - y1), "iscrowd": 0}
                    for (x1, y1, x2, y2), c, crowd in zip(t["boxes"].tolist(), t["labels"].tolist(), t["iscrowd"].tolist())
                    if not crowd
                ]}
                for i, t in enumerate(targets)
            ]
        encoded = self.processor(images=images, annotations=annotations, do_rescale=False, return_tensors="pt")
        inputs = {"pixel_values": encoded["pixel_values"]}
        if "pixel_mask" in encoded:
            inputs["pixel_mask"] = encoded["pixel_mask"]
            mask = encoded["pixel_mask"].bool()
            valid = [(int(m.any(dim=1).sum()), int(m.any(dim=0).sum())) for m in mask]  # each image's resized extent
        else:  # no mask (a processor that pads without one): each image's resized size, encoded alone unpadded
            alone = [self.processor(images=[im], do_rescale=False, do_pad=False, return_tensors="pt") for im in images]
            valid = [tuple(e["pixel_values"].shape[-2:]) for e in alone]
        if targets is not None:
            inputs["labels"] = [{"class_labels": e["class_labels"], "boxes": e["boxes"]} for e in encoded["labels"]]
        return {**batch, "inputs": inputs, "valid_sizes": valid}


def _plain_inputs(images: list[torch.Tensor], targets: list[dict[str, torch.Tensor]] | None) -> dict[str, Any]:
    """Without an image processor: ImageNet normalisation, zero padding to the largest image, a pixel mask, and
    boxes as ``(cx, cy, w, h)`` relative to the padded image (what the DETR family and YOLOS expect)."""
    height = max(im.shape[-2] for im in images)
    width = max(im.shape[-1] for im in images)
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    pixels = torch.zeros(len(images), 3, height, width)
    mask = torch.zeros(len(images), height, width, dtype=torch.long)
    for i, im in enumerate(images):
        pixels[i, :, : im.shape[-2], : im.shape[-1]] = (im - mean) / std
        mask[i, : im.shape[-2], : im.shape[-1]] = 1
    inputs: dict[str, Any] = {"pixel_values": pixels, "pixel_mask": mask}
    if targets is not None:
        from torchvision.ops import box_convert

        scale = torch.tensor([width, height, width, height], dtype=torch.float32)
        inputs["labels"] = [
            {"class_labels": t["labels"][t["iscrowd"] == 0], "boxes": box_convert(t["boxes"][t["iscrowd"] == 0], "xyxy", "cxcywh") / scale}
            for t in targets
        ]
    return inputs


def _plain_post_process(outputs: Any, padded: torch.Size, sizes: torch.Tensor) -> list[dict[str, torch.Tensor]]:
    """Detections in image pixels from :func:`_plain_inputs`' layout (boxes relative to the padded image)."""
    from torchvision.ops import box_convert

    probs = outputs.logits.softmax(-1)[..., :-1]  # the last class is "no object"
    scores, labels = probs.max(-1)
    height, width = padded
    scale = torch.tensor([width, height, width, height], dtype=outputs.pred_boxes.dtype, device=scores.device)
    boxes = box_convert(outputs.pred_boxes, "cxcywh", "xyxy") * scale
    results = []
    for s, lab, b, (h, w) in zip(scores, labels, boxes, sizes.tolist()):
        b = torch.stack([b[:, 0].clamp(0, w), b[:, 1].clamp(0, h), b[:, 2].clamp(0, w), b[:, 3].clamp(0, h)], dim=-1)
        results.append({"scores": s, "labels": lab, "boxes": b})
    return results
