"""What every detector shares: category names, box (and mask) mAP at epoch end, evaluation and prediction rows."""

from __future__ import annotations

from typing import Any

import torch
from torchmetrics import MetricCollection

from ptft.core.classification import LabelledModule

#: Logged from torchmetrics' MeanAveragePrecision (``bbox_`` entries without the prefix, ``segm_`` ones with it).
LOGGED_MAP = ("map", "map_50", "map_75", "mar_100")


class DetectionModule(LabelledModule):
    """What the detectors share: category names, box (and mask) mAP, evaluation and prediction rows.

    Subclasses implement :meth:`losses` (a dict of loss terms in training) and :meth:`detect` (per image: ``boxes``
    as absolute ``x1, y1, x2, y2`` in the original image, ``scores``, ``labels`` as category indices, and for
    instance segmentation ``masks``).

    Args:
        num_labels: Number of object categories (without background). Linked from the data module by the CLI.
        label_names: Category names in label order. Linked from the data module by the CLI.
        predict_threshold: Minimum score of the detections written by ``ptft predict`` (mAP uses all of them).
        **kwargs: The shared fine-tuning arguments of :class:`ptft.core.FineTuneModule`.

    ``num_labels`` / ``label_names`` are :class:`ptft.core.classification.LabelledModule`'s (saved, and checked against a
    checkpoint's order on reload); here the default is one category.
    """

    checkpoint_monitor = ("val/map", "max")
    #: Whether the data module must decode instance masks.
    needs_masks = False

    def __init__(
        self, num_labels: int = 1, label_names: list[str] | None = None, predict_threshold: float = 0.5, **kwargs: Any
    ) -> None:
        self.predict_threshold = predict_threshold
        super().__init__(num_labels=num_labels, label_names=label_names, **kwargs)

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
        if loss is not None:  # an epoch mean over every rank's images: the monitors must agree across ranks
            self.log(f"{stage}/loss", loss, batch_size=len(batch["images"]), sync_dist=True)
        targets = []
        for t in batch["targets"]:
            target = {"boxes": t["boxes"], "labels": t["labels"], "iscrowd": t["iscrowd"]}
            if self.needs_masks:
                target["masks"] = t["masks"].bool()
            targets.append(target)
        self.metrics[f"{stage}_"].update(detections, targets)

    def epoch_metrics(self, stage: str) -> dict[str, torch.Tensor]:
        """Box mAP (``{stage}/map``, ``map_50``, ``map_75``, ``mar_100``) and for masks ``{stage}/segm_map``…, over
        every rank's images."""
        values = self.metrics[f"{stage}_"].compute()
        prefix = f"{stage}/"
        logged = {}
        for iou in ("bbox", "segm") if self.needs_masks else ("bbox",):
            for name in LOGGED_MAP:
                value = values.get(f"{prefix}{iou}_{name}", values.get(f"{prefix}{name}"))
                if value is not None:
                    logged[f"{prefix}{name}" if iou == "bbox" else f"{prefix}segm_{name}"] = value.float()
        return logged

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._evaluate(batch, "val")

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._evaluate(batch, "test")

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
