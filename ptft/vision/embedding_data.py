"""Metric-learning data: identity class folders in P×K training batches, indexed evaluation images, named predictions."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch.utils.data import DataLoader, DistributedSampler

from ptft.core.errors import PtftError
from ptft.core.labels import discover_label_names
from ptft.vision.data import ImageClassificationDataModule, ImageDataset, collate

class IdentityBatchSampler(DistributedSampler):
    """P×K batches: ``P`` random identities, ``K`` images of each, drawn afresh from ``seed + epoch``.

    An epoch has ``len(labels) // (P*K)`` batches (as many images as the data); identities are drawn uniformly and
    each one's images in a shuffled cycle, so an identity with fewer than ``K`` images repeats some within a batch.
    Sampling identities rather than images balances them, as in FaceNet and Hermans et al. Yields flat indices: use a
    ``DataLoader`` with ``batch_size=P*K``.

    Why not pytorch-metric-learning's ``MPerClassSampler``, which draws the same kind of batch: under DDP Lightning
    wraps a plain sampler in a strided split (rank ``r`` takes every ``world_size``-th index), which leaves each rank
    ``K / world_size`` images per identity instead of ``K``; and its order comes from numpy's global random stream,
    not from ``seed + epoch``, so a resumed run draws other batches and ranks agree only while their numpy streams
    stay in step. This class is a ``DistributedSampler`` so that Lightning leaves it alone: every rank draws the same
    global sequence from ``seed + epoch`` and takes whole P×K batches of it.

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


class IndexedImages(ImageDataset):
    """Evaluation images that also return their index, so that retrieval metrics drop the copies a DDP sampler adds."""

    def __getitem__(self, index: int) -> dict[str, Any]:
        return {**super().__getitem__(index), "index": index}


def collate_embedding_items(items: list[dict[str, Any]]) -> dict[str, Any]:
    """:func:`ptft.vision.data.collate` plus the evaluation ``indices`` and the prediction ``files`` when items have them."""
    batch: dict[str, Any] = collate(items)
    if "index" in items[0]:
        batch["indices"] = torch.tensor([it["index"] for it in items])
    if "file" in items[0]:
        batch["files"] = [it["file"] for it in items]
    return batch


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

    def build(self, split: str, rows: list) -> ImageDataset:
        if split == "train":
            return super().build(split, rows)
        if split == "predict":
            ds = super().build(split, rows)
            return NamedImages(ds.images, None, ds.transform)
        known = self.label_names
        unseen = sorted({str(label) for _, label in rows} - set(known))
        # Identities never seen in training get ids from num_labels up: ids only group images for retrieval.
        self._label_names = known + unseen
        try:
            ds = super().build(split, rows)
        finally:
            self._label_names = known
        return IndexedImages(ds.images, ds.labels, ds.transform)

    def collate_fn(self) -> Any:
        return collate_embedding_items

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
        sampler = IdentityBatchSampler(
            self._built("train").labels,
            self.batch_size // self.samples_per_identity,
            self.samples_per_identity,
            seed=self.seed,
            **self._replicas(),
        )
        return DataLoader(
            self.datasets["train"], batch_size=self.batch_size, sampler=sampler, drop_last=True,
            num_workers=self.num_workers, persistent_workers=self.num_workers > 0, collate_fn=collate,
        )
