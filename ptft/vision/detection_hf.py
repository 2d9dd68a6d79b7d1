"""Object detection with Hugging Face detectors (DETR, Conditional / Deformable DETR, YOLOS…) and their image processors."""

from __future__ import annotations

import json
from typing import Any

import torch
from torch import nn

from ptft.core.errors import PtftError
from ptft.core.hf import HFModule, build_hf_model, label_config
from ptft.vision.detection_base import DetectionModule


class HFObjectDetector(HFModule, DetectionModule):
    """Object detection with any ``AutoModelForObjectDetection`` model (DETR, Conditional / Deformable DETR, YOLOS…).

    Images and targets go through the model's image processor (resize, normalisation, padding; COCO boxes to the
    normalised centre format the model expects), and predictions through its post-processing. A model folder without
    ``preprocessor_config.json`` (a bare config) gets its architecture's processor class with that class's defaults
    (e.g. ``DetrImageProcessor``: short side 800, ImageNet normalisation), with a warning saying so; an architecture
    transformers has no image processor for stops with one line. These models compute their loss in evaluation
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
        self.processor = load_image_processor(model_name, image_processor or {}, model.config)
        architecture = model.config.to_dict()
        self.set_model(model)
        # Full checkpoints keep the processor's settings too: the same preprocessing without model_name's folder.
        processor = json.loads(self.processor.to_json_string())  # plain values
        self._save_hparams(pretrained=False, model_config=architecture, image_processor=processor)

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
        # Predictions are relative to the padded canvas (as the processor made the training boxes): decode against
        # the canvas in original pixels, then clip to the image.
        padded = torch.tensor(batch["inputs"]["pixel_values"].shape[-2:], device=sizes.device)
        valid = torch.tensor(batch["valid_sizes"], device=sizes.device) if "valid_sizes" in batch else padded
        canvas = sizes * padded / valid
        results = self.processor.post_process_object_detection(outputs, threshold=0.0, target_sizes=canvas)
        for r, (h, w) in zip(results, sizes.tolist()):
            r["boxes"] = torch.stack(
                [r["boxes"][:, 0].clamp(0, w), r["boxes"][:, 1].clamp(0, h), r["boxes"][:, 2].clamp(0, w),
                 r["boxes"][:, 3].clamp(0, h)], dim=-1,
            )
        return [{k: r[k] for k in ("boxes", "scores", "labels")} for r in results], outputs.loss

    def save_model(self, model: nn.Module, folder: str) -> None:
        """``save_pretrained`` plus the image processor: the folder is a ``model_name`` again."""
        model.save_pretrained(folder)
        self.processor.save_pretrained(folder)


class HFBatchEncoder:
    """Turns a detection batch into a Hugging Face detector's inputs; small and picklable, for DataLoader workers.

    The model's image processor does the resize, normalisation, padding, and COCO boxes to normalised
    ``(cx, cy, w, h)``. Crowd regions are left out of the training targets. ``valid_sizes`` holds
    each image's resized extent on the padded canvas (height, width), to decode predictions at the right scale.
    """

    def __init__(self, processor: Any) -> None:
        self.processor = processor

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        images = batch["images"]
        targets = batch.get("targets")
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


def load_image_processor(model_name: str, overrides: dict[str, Any], config: Any) -> Any:
    """The image processor of ``model_name`` with ``overrides``; complete settings (``image_processor_type``, as full
    checkpoints store them); or, for a folder without ``preprocessor_config.json``, the architecture's own processor
    class with its defaults, with a warning. One line when transformers has none for the architecture."""
    import transformers
    from lightning.pytorch.utilities import rank_zero_warn

    from ptft.core.hub import resolve_model_name

    kind = overrides.get("image_processor_type")
    if kind is not None:
        settings = {k: v for k, v in overrides.items() if k not in ("image_processor_type", "processor_class")}
        return getattr(transformers, kind)(**settings)
    try:
        return transformers.AutoImageProcessor.from_pretrained(resolve_model_name(model_name), **overrides)
    except (OSError, ValueError):
        pass  # no preprocessor_config.json: the architecture's processor with its defaults
    from transformers.models.auto.image_processing_auto import IMAGE_PROCESSOR_MAPPING

    try:
        classes = IMAGE_PROCESSOR_MAPPING[type(config)]
    except KeyError:
        classes = None
    # transformers 5 maps a model type to its backends' classes ({"torchvision": ..., "pil": ...}).
    candidates = list(classes.values()) if isinstance(classes, dict) else list(classes or ())
    if isinstance(classes, dict) and classes.get("torchvision") is not None:
        candidates.insert(0, classes["torchvision"])
    processor_class = next((c for c in candidates if c is not None), None)
    if processor_class is None:
        raise PtftError(
            f"{model_name} has no preprocessor_config.json and transformers has no image processor for model type "
            f"{config.model_type!r}: add one to the folder, or give model.init_args.image_processor="
            "{image_processor_type: <class name>, ...}"
        )
    processor = processor_class(**overrides)
    size = getattr(processor, "size", None)
    rank_zero_warn(
        f"{model_name} has no preprocessor_config.json: images are preprocessed with {processor_class.__name__}'s "
        f"defaults (size {size}, mean {getattr(processor, 'image_mean', None)}, std "
        f"{getattr(processor, 'image_std', None)}); set model.init_args.image_processor to change them"
    )
    return processor
