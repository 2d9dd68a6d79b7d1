"""Metric learning (face / person / product recognition): a timm backbone trained to embed images for retrieval.

Identities are the class folders of :class:`ImageClassificationDataModule`. The losses come from
pytorch-metric-learning: ArcFace (Deng et al., 2019, arXiv:1801.07698), CosFace (Wang et al., 2018,
arXiv:1801.09414) and FaceNet's triplet loss with online mining (Schroff et al., 2015, arXiv:1503.03832;
batch-hard mining: Hermans et al., 2017, arXiv:1703.07737).
"""

from __future__ import annotations

import copy
import inspect
import math
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import rank_zero_warn
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler
from torchmetrics import Metric, MetricCollection
from torchmetrics.functional.classification import (
    binary_auroc,
    binary_sensitivity_at_specificity,
)
from torchmetrics.utilities import dim_zero_cat

from ptft.core.errors import PtftError, missing_extra
from ptft.core.labels import discover_label_names
from ptft.core.layers import timm_layer_ids
from ptft.core.module import FineTuneModule
from ptft.vision.data import ImageClassificationDataModule, ImageDataset, collate
from ptft.vision.modules import create_timm_model

LOSSES = ("arcface", "cosface", "triplet")
MINING = ("batch_hard", "semihard", "all")
DEFAULT_MARGIN = {"arcface": 0.5, "cosface": 0.35, "triplet": 0.2}


# --- data ---------------------------------------------------------------------------------------------------------
class IdentityBatchSampler(DistributedSampler):
    """P×K batches: ``P`` random identities, ``K`` images of each, drawn afresh from ``seed + epoch``.

    An epoch has ``len(labels) // (P*K)`` batches (as many images as the data); identities are drawn uniformly and
    each one's images in a shuffled cycle, so an identity with fewer than ``K`` images repeats some within a batch.
    Sampling identities rather than images balances them, as in FaceNet and Hermans et al. Yields flat indices: use a
    ``DataLoader`` with ``batch_size=P*K``. It is a ``DistributedSampler`` so that Lightning does not wrap it under DDP
    (its strided split would break the P×K blocks): each rank takes whole batches of the same global sequence.

    Args:
        labels: Identity id of every training example.
        identities_per_batch: ``P``.
        samples_per_identity: ``K`` (at least 2: triplet mining needs positive pairs).
        seed: Base seed; Lightning calls :meth:`set_epoch` before each epoch.
        num_replicas: Number of processes (DDP world size).
        rank: This process's rank.
    """

    def __init__(
        self, labels: list[int], identities_per_batch: int, samples_per_identity: int, seed: int = 0,
        num_replicas: int = 1, rank: int = 0,
    ) -> None:
        super().__init__(labels, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed)
        self.p, self.k = identities_per_batch, samples_per_identity
        groups: dict[int, list[int]] = {}
        for index, label in enumerate(labels):
            groups.setdefault(label, []).append(index)
        self.groups = [torch.tensor(v) for _, v in sorted(groups.items())]
        if self.p > len(self.groups):
            raise PtftError(f"P={self.p} identities per batch, but the training set has only {len(self.groups)}")
        total = max(len(labels) // (self.p * self.k), num_replicas)
        self.batches_per_rank = total // num_replicas

    def __len__(self) -> int:
        return self.batches_per_rank * self.p * self.k

    def batches(self) -> list[list[int]]:
        """This rank's batches of the current epoch."""
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        queues = [group[torch.randperm(len(group), generator=g)].tolist() for group in self.groups]
        cursors = [0] * len(queues)
        batches = []
        for _ in range(self.batches_per_rank * self.num_replicas):
            batch = []
            for identity in torch.randperm(len(queues), generator=g)[: self.p].tolist():
                queue = queues[identity]
                for _ in range(self.k):
                    if cursors[identity] == len(queue):  # a new cycle through this identity's images
                        group = self.groups[identity]
                        queue = queues[identity] = group[torch.randperm(len(group), generator=g)].tolist()
                        cursors[identity] = 0
                    batch.append(queue[cursors[identity]])
                    cursors[identity] += 1
            batches.append(batch)
        return batches[self.rank :: self.num_replicas]

    def __iter__(self) -> Iterator[int]:
        return iter([i for batch in self.batches() for i in batch])


class NamedImages(ImageDataset):
    """Prediction images that also return their file name, for the embedding index."""

    def __getitem__(self, index: int) -> dict[str, Any]:
        source = self.images[index]
        item = super().__getitem__(index)
        item["file"] = f"{source.archive}/{source.root}" if source.archive else str(source.root)
        return item


def collate_named(items: list[dict[str, Any]]) -> dict[str, Any]:
    return {**collate(items), "files": [it["file"] for it in items]}


class ImageEmbeddingDataModule(ImageClassificationDataModule):
    """Images of identities (``root/<identity>/<image>``) in P×K training batches, for metric learning.

    Validation and test identities may be new ones (open-set retrieval, the usual protocol) or the training ones
    (held out images). Training batches hold ``batch_size / samples_per_identity`` identities with
    ``samples_per_identity`` images each, which triplet mining needs.

    Args:
        samples_per_identity: ``K`` images per identity in each training batch (``batch_size`` must be a multiple);
            0 draws plain shuffled batches (ArcFace / CosFace only).
        **kwargs: The arguments of :class:`ptft.vision.ImageClassificationDataModule` (``train``, ``val``, ``test``,
            ``predict``, ``image_size``, augmentation, ``batch_size``…).
    """

    def __init__(self, samples_per_identity: int = 4, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if samples_per_identity < 0 or samples_per_identity == 1:
            raise PtftError(
                f"samples_per_identity must be 0 (shuffled batches) or at least 2, got {samples_per_identity}"
            )
        if samples_per_identity and self.batch_size % samples_per_identity:
            raise PtftError(
                f"batch_size={self.batch_size} is not a multiple of samples_per_identity={samples_per_identity}"
            )
        self.samples_per_identity = samples_per_identity

    def connect(self, model: L.LightningModule) -> None:
        super().connect(model)
        if getattr(model, "loss", None) == "triplet" and self.samples_per_identity < 2:
            raise PtftError(
                "loss=triplet mines triplets inside each batch and needs several images per identity: "
                "set data.init_args.samples_per_identity (e.g. 4)"
            )

    def discover_labels(self) -> list[str]:
        if self.samples["train"] is None:
            return super().discover_labels()
        # Evaluation identities are not checked against the training ones: retrieval is usually open-set.
        return discover_label_names(self.samples["train"][1], self.given_labels, "train")

    def _dataset(self, split: str, samples: tuple[list, list[str]], training: bool) -> ImageDataset:
        known = self.label_names
        unseen = sorted({str(v) for v in samples[1]} - set(known))
        if split == "train" or not unseen:
            return super()._dataset(split, samples, training)
        # Identities never seen in training get ids from num_labels up: ids only group images for retrieval.
        self._label_names = known + unseen
        try:
            return super()._dataset(split, samples, training)
        finally:
            self._label_names = known

    def setup(self, stage: str) -> None:
        super().setup(stage)
        if stage == "fit" and self.samples_per_identity:
            self._check_identities(self.datasets["train"].labels)

    def _check_identities(self, labels: list[int]) -> None:
        k = self.samples_per_identity
        counts = Counter(labels)
        single = [self.label_names[i] for i, c in sorted(counts.items()) if c < 2]
        if single:
            raise PtftError(
                f"identity {single[0]!r} has 1 training image ({len(single)} such identities); P×K batches need "
                "at least 2 per identity: remove them, or set data.init_args.samples_per_identity=0 "
                "with loss arcface/cosface"
            )
        short = sum(c < k for c in counts.values())
        if short > len(counts) / 2:
            raise PtftError(
                f"samples_per_identity={k} is more than the training images of {short} of {len(counts)} identities "
                f"(median {sorted(counts.values())[len(counts) // 2]}): lower it"
            )
        if short:
            rank_zero_warn(f"{short} identities have fewer than {k} training images: their images repeat in batches")
        p = self.batch_size // k
        if p > len(counts):
            raise PtftError(
                f"batch_size={self.batch_size} / samples_per_identity={k} = {p} identities per batch, but the training "
                f"set has {len(counts)}: lower batch_size"
            )

    def train_dataloader(self) -> DataLoader:
        if not self.samples_per_identity:
            return super().train_dataloader()
        dist = torch.distributed.is_available() and torch.distributed.is_initialized()
        sampler = IdentityBatchSampler(
            self.datasets["train"].labels,
            self.batch_size // self.samples_per_identity,
            self.samples_per_identity,
            seed=self.seed,
            num_replicas=torch.distributed.get_world_size() if dist else 1,
            rank=torch.distributed.get_rank() if dist else 0,
        )
        return DataLoader(
            self.datasets["train"], batch_size=self.batch_size, sampler=sampler, drop_last=True,
            num_workers=self.num_workers, persistent_workers=self.num_workers > 0, collate_fn=collate,
        )

    def _predict_dataset(self, location: str) -> ImageDataset:
        ds = super()._predict_dataset(location)
        return NamedImages(ds.images, None, ds.transform)

    def predict_dataloader(self) -> DataLoader:
        return self._loader(self.datasets["predict"], train=False, collate_fn=collate_named)


# --- metrics ------------------------------------------------------------------------------------------------------
class RetrievalMetrics(Metric):
    """Recall@k by leave-one-out nearest-neighbour retrieval, and verification ROC-AUC and TAR@FAR over pairs.

    Accumulates every embedding of the epoch (``cat`` states: gathered across DDP processes) and computes on cosine
    similarities. Recall@k is the fraction of queries with a same-identity image among their ``k`` nearest neighbours
    (queries whose identity has no other image are skipped). Verification uses every pair, or, beyond ``max_pairs``,
    a seeded sample of ``max_pairs / 2`` positive and ``max_pairs / 2`` random pairs.

    Args:
        top_k: The ``k`` of recall@k.
        far: False-accept rate at which the true-accept rate is reported (``tar@far<far>``).
        max_pairs: Pair budget of the verification metrics.
    """

    full_state_update = False

    def __init__(self, top_k: tuple[int, ...] = (1, 5), far: float = 1e-2, max_pairs: int = 2_000_000) -> None:
        super().__init__()
        self.top_k = top_k
        self.far = far
        self.max_pairs = max_pairs
        self.add_state("embeddings", default=[], dist_reduce_fx="cat")
        self.add_state("labels", default=[], dist_reduce_fx="cat")

    def update(self, embeddings: torch.Tensor, labels: torch.Tensor) -> None:
        self.embeddings.append(embeddings.detach().float())
        self.labels.append(labels.detach())

    def compute(self) -> dict[str, torch.Tensor]:
        emb = F.normalize(dim_zero_cat(self.embeddings), dim=-1)
        labels = dim_zero_cat(self.labels)
        results = self._recall(emb, labels)
        left, right = self._pairs(labels)
        same = (labels[left] == labels[right]).long()
        nan = torch.tensor(float("nan"), device=emb.device)
        if 0 < int(same.sum()) < len(same):
            sims = (emb[left] * emb[right]).sum(-1)
            results["auroc"] = binary_auroc(sims, same)
            results[f"tar@far{self.far:g}"] = binary_sensitivity_at_specificity(sims, same, 1 - self.far)[0]
        else:  # one identity only, or no identity with two images: undefined
            results["auroc"] = results[f"tar@far{self.far:g}"] = nan
        return results

    def _recall(self, emb: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        n = len(labels)
        k_max = min(max(self.top_k), n - 1)
        hits = {k: [] for k in self.top_k}
        for start in range(0, n, 1024):  # chunks of queries keep the similarity matrix small
            sims = emb[start : start + 1024] @ emb.T
            rows = torch.arange(len(sims), device=emb.device)
            sims[rows, rows + start] = float("-inf")  # leave the query out
            neighbours = labels[sims.topk(max(k_max, 1), dim=1).indices]
            match = neighbours == labels[start : start + 1024, None]
            for k in self.top_k:
                hits[k].append(match[:, :k].any(dim=1))
        _, inverse, counts = labels.unique(return_inverse=True, return_counts=True)
        has_positive = counts[inverse] > 1
        nan = torch.tensor(float("nan"), device=emb.device)
        return {
            f"recall@{k}": torch.cat(hits[k])[has_positive].float().mean() if has_positive.any() and n > 1 else nan
            for k in self.top_k
        }

    def _pairs(self, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        n = len(labels)
        if n * (n - 1) // 2 <= self.max_pairs:
            left, right = torch.triu_indices(n, n, 1, device=labels.device)
            return left, right
        g = torch.Generator(device=labels.device).manual_seed(0)
        half = self.max_pairs // 2
        # Positive pairs: a random anchor with a random other image of its identity (labels sorted into groups).
        order = labels.argsort()
        _, inverse, counts = labels[order].unique_consecutive(return_inverse=True, return_counts=True)
        starts = counts.cumsum(0) - counts
        candidates = torch.nonzero(counts[inverse] > 1).squeeze(1)
        pos_left = torch.empty(0, dtype=torch.long, device=labels.device)
        pos_right = pos_left
        if len(candidates):
            anchor = candidates[torch.randint(len(candidates), (half,), generator=g, device=labels.device)]
            group = inverse[anchor]
            size, start = counts[group], starts[group]
            # Another member of the anchor's group: shift its place in the group by 1..size-1, cyclically.
            shift = 1 + (torch.rand(half, generator=g, device=labels.device) * (size - 1)).long()
            pos_left, pos_right = order[anchor], order[start + (anchor - start + shift) % size]
        rand_left = torch.randint(n, (half,), generator=g, device=labels.device)
        rand_right = (rand_left + 1 + torch.randint(n - 1, (half,), generator=g, device=labels.device)) % n
        return torch.cat([pos_left, rand_left]), torch.cat([pos_right, rand_right])


# --- model --------------------------------------------------------------------------------------------------------
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


class ImageEmbedder(FineTuneModule):
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
        num_labels: Number of training identities. Linked from the data module by the CLI.
        label_names: Training identity names in id order. Linked from the data module by the CLI.
        **kwargs: The shared fine-tuning arguments of :class:`ptft.core.FineTuneModule` (``optimizer``,
            ``scheduler``, ``l1``, ``l2_sp``, ``peft``, ``checkpoint_weights``, ``compile``).
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
        num_labels: int = 2,
        label_names: list[str] | None = None,
        **kwargs: Any,
    ) -> None:
        if embedding_size <= 0:
            raise PtftError(f"embedding_size must be positive, got {embedding_size}")
        if loss not in LOSSES:
            raise PtftError(f"loss must be one of {', '.join(LOSSES)}, got {loss!r}")
        if mining not in MINING:
            raise PtftError(f"mining must be one of {', '.join(MINING)}, got {mining!r}")
        if label_names is not None and len(label_names) != num_labels:
            raise PtftError(f"{len(label_names)} label_names given for num_labels={num_labels}")
        if loss != "triplet" and num_labels < 2:
            raise PtftError(f"loss={loss} classifies the training identities and needs at least 2, got {num_labels}")
        super().__init__(**kwargs)
        self.model_name = model_name
        self.num_labels = num_labels
        self.label_names = list(label_names) if label_names else [str(i) for i in range(num_labels)]
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

    def _save_hparams(self, **overrides: Any) -> None:
        super()._save_hparams(frame=inspect.currentframe().f_back, **overrides)
        self.hparams["label_names"] = self.label_names

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
        if self.loss != "triplet":
            known = labels < self.num_labels
            if not known.any():
                return None
            embeddings, labels = embeddings[known], labels[known]
        criterion = self.model.criterion
        pairs = None if self.miner is None else self.miner(embeddings.float(), labels)
        return criterion(embeddings.float(), labels, pairs)

    def step(self, batch: dict[str, Any], stage: str) -> tuple[torch.Tensor, Any]:
        embeddings = self(batch)
        return self.criterion_loss(embeddings, batch["labels"]), (embeddings.detach(), batch["labels"])

    def _eval_step(self, batch: dict[str, Any], stage: str) -> None:
        embeddings = self(batch)
        loss = self.criterion_loss(embeddings, batch["labels"])
        if loss is not None:
            self.log(f"{stage}/loss", loss, prog_bar=stage == "val", batch_size=len(embeddings))
        self.update_metrics(stage, (embeddings, batch["labels"]), batch)

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._eval_step(batch, "val")

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._eval_step(batch, "test")

    def build_metrics(self) -> MetricCollection:
        return MetricCollection({"retrieval": RetrievalMetrics()})

    def update_metrics(self, stage: str, outputs: Any, batch: dict[str, Any]) -> None:
        if stage != "train":  # retrieval within one P×K batch says little; evaluation sets use the whole epoch
            self.metrics[f"{stage}_"].update(*outputs)

    def _log_epoch_metrics(self, stage: str) -> None:
        metrics = self.metrics[f"{stage}_"]
        self.log_dict(metrics.compute(), prog_bar=stage == "val")
        metrics.reset()

    def on_validation_epoch_end(self) -> None:
        self._log_epoch_metrics("val")

    def on_test_epoch_end(self) -> None:
        self._log_epoch_metrics("test")

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
    """A copy of ``backbone`` whose classifier also applies ``bn`` (in eval mode): one timm model to export."""
    net = copy.deepcopy(backbone).eval()
    if isinstance(bn, nn.Identity):
        return net
    layer = net.get_classifier()
    if not isinstance(layer, (nn.Linear, nn.Conv2d)):
        raise PtftError(f"cannot fold the embedding BatchNorm into {type(layer).__name__}; train with batch_norm=false")
    with torch.no_grad():
        gain = (bn.weight if bn.affine else 1) / torch.sqrt(bn.running_var + bn.eps)
        bias = layer.bias if layer.bias is not None else torch.zeros_like(bn.running_mean)
        layer.weight.mul_(gain.view(-1, *[1] * (layer.weight.dim() - 1)))
        new_bias = (bias - bn.running_mean) * gain + (bn.bias if bn.affine else 0)
        if layer.bias is None:
            layer.bias = nn.Parameter(new_bias)
        else:
            layer.bias.copy_(new_bias)
    return net
