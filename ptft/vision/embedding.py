"""Metric learning (face / person / product recognition): a timm backbone trained to embed images for retrieval.

Identities are the class folders of :class:`ImageEmbeddingDataModule`. The losses come from
pytorch-metric-learning: ArcFace (Deng et al., 2019, arXiv:1801.07698), CosFace (Wang et al., 2018,
arXiv:1801.09414) and FaceNet's triplet loss with online mining (Schroff et al., 2015, arXiv:1503.03832;
batch-hard mining: Hermans et al., 2017, arXiv:1703.07737). The data module lives in
:mod:`ptft.vision.embedding_data`, the retrieval metrics in :mod:`ptft.vision.retrieval_metrics`.
"""

from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics import MetricCollection

from ptft.core.errors import PtftError, missing_extra
from ptft.core.layers import timm_layer_ids
from ptft.core.classification import LabelledModule
from ptft.vision.embedding_data import IdentityBatchSampler, ImageEmbeddingDataModule
from ptft.vision.modules import create_timm_model
from ptft.vision.retrieval_metrics import RetrievalMetrics

# Re-exported: recipes and user code name them from here.
__all__ = ["IdentityBatchSampler", "ImageEmbedder", "ImageEmbeddingDataModule", "RetrievalMetrics", "fold_batch_norm"]

LOSSES = ("arcface", "cosface", "triplet")
MINING = ("batch_hard", "semihard", "all")
DEFAULT_MARGIN = {"arcface": 0.5, "cosface": 0.35, "triplet": 0.2}


class EmbeddingModel(nn.Module):
    """A timm model whose classifier outputs ``embedding_size`` values, an optional BatchNorm, L2 normalisation; and
    the loss (with its class centres for ArcFace / CosFace), so that the optimizer and checkpoints see them."""

    def __init__(self, backbone: nn.Module, embedding_size: int, batch_norm: bool, criterion: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone
        self.bn = nn.BatchNorm1d(embedding_size) if batch_norm else nn.Identity()
        self.criterion = criterion

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.bn(self.backbone(images)), dim=-1)


class ImageEmbedder(LabelledModule):
    """Metric learning with any timm model: L2-normalised image embeddings for retrieval and verification.

    The network is the timm model with its classifier resized to ``embedding_size`` (a linear layer on the pooled
    features), an optional BatchNorm and L2 normalisation. Validation and test report retrieval recall@1 / recall@5
    (leave-one-out nearest neighbours among the evaluation images), verification ROC-AUC and TAR at FAR 1e-2 on
    cosine similarities. ``ptft predict`` writes one embedding per image; ``ptft export`` a plain timm model
    (BatchNorm folded into the last layer) whose normalised outputs are the embeddings.

    Args:
        model_name: timm model name, with an optional pretrained tag (``resnet50.a1_in1k``, ``vit_small_patch16_224``),
            or ``hf-hub:timm/<name>``.
        pretrained: Load pretrained weights from the hub (or from ``pretrained_file``).
        pretrained_file: Local weights file (``.safetensors`` or ``.pth``) to load instead of the hub.
        model_kwargs: Extra ``timm.create_model`` arguments, e.g. ``{drop_rate: 0.1, drop_path_rate: 0.1}``.
        embedding_size: Size of the embedding.
        batch_norm: BatchNorm on the embedding before normalisation (ArcFace's and BNNeck's feature layer).
        loss: ``arcface`` (additive angular margin), ``cosface`` (additive cosine margin) or ``triplet``
            (FaceNet's triplet loss on squared L2 distances, with online mining; needs P×K batches).
        margin: The loss margin; ``None``: 0.5 rad for ArcFace, 0.35 for CosFace, 0.2 for triplet.
        scale: The logit scale ``s`` of ArcFace / CosFace (64 in both papers; lower it for few identities).
        mining: Triplets mined in each batch: ``batch_hard`` (hardest positive and negative per anchor),
            ``semihard`` (negatives farther than the positive but within the margin) or ``all`` (every triplet).
        **kwargs: ``num_labels`` and ``label_names`` (the training identities, linked from the data module by the
            CLI) and the shared fine-tuning arguments of :class:`ptft.core.FineTuneModule` (``optimizer``,
            ``scheduler``, ``l1``, ``l2_sp``, ``peft``, ``checkpoint_weights``, ``compile``,
            ``gradient_checkpointing``).
    """

    checkpoint_monitor = ("val/recall@1", "max")

    def __init__(
        self,
        model_name: str,
        pretrained: bool = True,
        pretrained_file: str | None = None,
        model_kwargs: dict[str, Any] | None = None,
        embedding_size: int = 512,
        batch_norm: bool = True,
        loss: Literal["arcface", "cosface", "triplet"] = "arcface",
        margin: float | None = None,
        scale: float = 64.0,
        mining: Literal["batch_hard", "semihard", "all"] = "batch_hard",
        **kwargs: Any,
    ) -> None:
        if embedding_size <= 0:
            raise PtftError(f"embedding_size must be positive, got {embedding_size}")
        if loss not in LOSSES:
            raise PtftError(f"loss must be one of {', '.join(LOSSES)}, got {loss!r}")
        if mining not in MINING:
            raise PtftError(f"mining must be one of {', '.join(MINING)}, got {mining!r}")
        super().__init__(**kwargs)
        if loss != "triplet" and self.num_labels < 2:
            raise PtftError(
                f"loss={loss} classifies the training identities and needs at least 2, got {self.num_labels}"
            )
        self.model_name = model_name
        self.loss = loss
        self.margin = DEFAULT_MARGIN[loss] if margin is None else margin
        self.scale = scale
        self.mining = mining
        backbone = create_timm_model(
            model_name, pretrained, pretrained_file, num_classes=embedding_size, **(model_kwargs or {})
        )
        import timm.data

        self._data_config = timm.data.resolve_data_config(model=backbone)
        self.miner = None
        criterion = self._build_loss(embedding_size)
        self.set_model(EmbeddingModel(backbone, embedding_size, batch_norm, criterion))
        self._save_hparams(pretrained=False, pretrained_file=None)

    def _build_loss(self, embedding_size: int) -> nn.Module:
        try:
            from pytorch_metric_learning import distances, losses, miners
        except ImportError as err:
            raise missing_extra("pytorch-metric-learning", "vision") from err
        if self.loss == "arcface":
            # pytorch-metric-learning takes ArcFace's margin in degrees.
            margin = math.degrees(self.margin)
            return losses.ArcFaceLoss(self.num_labels, embedding_size, margin=margin, scale=self.scale)
        if self.loss == "cosface":
            return losses.CosFaceLoss(self.num_labels, embedding_size, margin=self.margin, scale=self.scale)
        # FaceNet: squared euclidean distance between unit vectors, margin 0.2.
        distance = distances.LpDistance(normalize_embeddings=True, p=2, power=2)
        if self.mining == "batch_hard":
            self.miner = miners.BatchHardMiner(distance=distance)
        else:
            self.miner = miners.TripletMarginMiner(margin=self.margin, type_of_triplets=self.mining, distance=distance)
        return losses.TripletMarginLoss(margin=self.margin, distance=distance)

    def data_config(self) -> dict[str, Any]:
        """The model's preprocessing (input size, interpolation, mean, std, crop) as timm resolves it."""
        return dict(self._data_config)

    # --- steps ------------------------------------------------------------------------------------------------
    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """L2-normalised embeddings of ``batch["pixel_values"]``, shape ``(batch, embedding_size)``."""
        return self.model(batch["pixel_values"])

    def criterion_loss(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor | None:
        """The loss; ``None`` for ArcFace / CosFace on a batch of identities never seen in training."""
        scored = self._scored(labels)
        if not scored.any():
            return None
        embeddings, labels = embeddings[scored], labels[scored]
        criterion = self.model.criterion
        pairs = None if self.miner is None else self.miner(embeddings.float(), labels)
        return criterion(embeddings.float(), labels, pairs)

    def _scored(self, labels: torch.Tensor) -> torch.Tensor:
        """Which examples the loss sees: ArcFace / CosFace have class centres for the training identities only."""
        return labels < self.num_labels if self.loss != "triplet" else torch.ones_like(labels, dtype=torch.bool)

    def step(self, batch: dict[str, Any], stage: str) -> tuple[torch.Tensor, Any]:
        embeddings = self(batch)
        return self.criterion_loss(embeddings, batch["labels"]), (embeddings.detach(), batch["labels"])

    def _eval_step(self, batch: dict[str, Any], stage: str) -> None:
        embeddings = self(batch)
        loss = self.criterion_loss(embeddings, batch["labels"])
        scored = int(self._scored(batch["labels"]).sum())
        # Logged on every rank, also for a batch of unseen identities (weight 0): a value that some ranks never log
        # would stall the others in the epoch-end sync. Weighted by the examples the loss saw.
        value = loss.detach() if loss is not None else torch.zeros((), device=embeddings.device)
        self.log(f"{stage}/loss", value, prog_bar=stage == "val", batch_size=scored, sync_dist=True)
        self.update_metrics(stage, (embeddings, batch["labels"]), batch)

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._eval_step(batch, "val")

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._eval_step(batch, "test")

    def build_metrics(self) -> MetricCollection:
        return MetricCollection({"retrieval": RetrievalMetrics()})

    def update_metrics(self, stage: str, outputs: Any, batch: dict[str, Any]) -> None:
        if stage != "train":  # retrieval within one P×K batch says little; evaluation sets use the whole epoch
            self.metrics[f"{stage}_"].update(*outputs, indices=batch.get("indices"))

    def epoch_metrics(self, stage: str) -> dict[str, torch.Tensor]:
        """Recall@k, ROC-AUC and TAR@FAR over the whole evaluation set (every rank's embeddings)."""
        return self.metrics[f"{stage}_"].compute()

    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> dict[str, Any]:
        """The embeddings of a batch, with the image files when the data module names them."""
        return {"files": batch.get("files"), "embeddings": self(batch).float()}

    def prediction_rows(self, outputs: dict[str, Any]) -> list[dict[str, Any]]:
        """``file`` and ``embedding`` (a list of floats, unit length): write them as ``.jsonl``."""
        embeddings = outputs["embeddings"].cpu().tolist()
        files = outputs["files"] or [None] * len(embeddings)
        return [{"file": f, "embedding": [round(x, 6) for x in e]} for f, e in zip(files, embeddings)]

    # --- layers and export ------------------------------------------------------------------------------------
    def head_modules(self, model: nn.Module) -> list[str]:
        classifier = model.backbone.pretrained_cfg.get("classifier") or ()
        names = [classifier] if isinstance(classifier, str) else list(classifier)
        return [f"backbone.{n}" for n in names] + ["bn", "criterion"]

    def discover_layers(self, model: nn.Module) -> dict[str, int]:
        heads = self.head_modules(model)
        is_head = lambda name: any(name.startswith(h + ".") for h in heads)
        ids = {f"backbone.{n}": i for n, i in timm_layer_ids(model.backbone).items() if not is_head(f"backbone.{n}")}
        top = max(ids.values(), default=0) + 1
        ids.update({n: top for n, _ in model.named_parameters() if is_head(n)})
        return ids

    def save_model(self, model: nn.Module, folder: str) -> None:
        """timm's hub layout of the backbone with the BatchNorm folded into its last layer:
        ``F.normalize(timm.create_model("local-dir:<folder>", pretrained=True).eval()(images))`` are the embeddings."""
        from timm.models import save_for_hf

        net = fold_batch_norm(model.backbone, model.bn)
        # Top-level keys of config.json, for the reader (timm ignores them).
        about = {"embedding_size": net.num_classes, "normalize_embeddings": True, "metric_loss": self.loss}
        Path(folder).mkdir(parents=True, exist_ok=True)
        save_for_hf(net, folder, model_config=about, safe_serialization=True)


def fold_batch_norm(backbone: nn.Module, bn: nn.Module) -> nn.Module:
    """A copy of ``backbone`` whose classifier also applies ``bn`` (in eval mode): one timm model to export.

    The folding is torch's ``fuse_linear_bn_eval`` / ``fuse_conv_bn_eval`` (a 1x1 convolution classifier).
    """
    from torch.nn.utils.fusion import fuse_conv_bn_eval, fuse_linear_bn_eval

    net = copy.deepcopy(backbone).eval()
    if isinstance(bn, nn.Identity):
        return net
    bn = copy.deepcopy(bn).eval()
    layer = net.get_classifier()
    classifier = net.pretrained_cfg.get("classifier")
    name = classifier if isinstance(classifier, str) else None
    if name is None or net.get_submodule(name) is not layer or not isinstance(layer, (nn.Linear, nn.Conv2d)):
        raise PtftError(
            f"cannot fold the embedding BatchNorm into {type(layer).__name__} of {type(net).__name__}; "
            "train with batch_norm=false"
        )
    fuse = fuse_linear_bn_eval if isinstance(layer, nn.Linear) else fuse_conv_bn_eval
    with torch.no_grad():
        net.set_submodule(name, fuse(layer, bn))
    return net
