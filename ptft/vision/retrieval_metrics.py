"""Retrieval and verification scores of image embeddings, as a torchmetrics ``Metric`` that is right under DDP."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torchmetrics import Metric
from torchmetrics.functional.classification import (
    binary_auroc,
    binary_sensitivity_at_specificity,
)
from torchmetrics.utilities import dim_zero_cat

class RetrievalMetrics(Metric):
    """Recall@k by leave-one-out nearest-neighbour retrieval, and verification ROC-AUC and TAR@FAR over pairs.

    Accumulates every embedding of the epoch (``cat`` states: gathered across DDP processes) and computes on cosine
    similarities. Recall@k is the fraction of queries with a same-identity image among their ``k`` nearest neighbours
    (queries whose identity has no other image are skipped). Verification uses every pair, or, beyond ``max_pairs``,
    a seeded sample of ``max_pairs / 2`` positive and ``max_pairs / 2`` random pairs.

    Under DDP the evaluation sampler repeats a few examples so that every rank gets as many; an image and its copy
    would retrieve each other. Given each example's dataset ``indices``, :meth:`compute` drops the repeats and puts the
    examples in dataset order, so that 2 processes score exactly what 1 process does.

    Why ptft computes these itself: pytorch-metric-learning's ``AccuracyCalculator`` is not a torchmetrics
    ``Metric`` (nothing gathers its inputs across processes), has no recall@k beyond k=1 (its ``precision_at_1`` is
    recall@1, which the tests check against it) and finds neighbours with faiss by default; torchmetrics'
    ``RetrievalHitRate`` takes one score per (query, candidate) pair, an n x n input where this computes top-k
    on 1,024 queries at a time.

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
        self.add_state("indices", default=[], dist_reduce_fx="cat")

    def update(self, embeddings: torch.Tensor, labels: torch.Tensor, indices: torch.Tensor | None = None) -> None:
        """Adds a batch: ``embeddings`` ``(B, D)``, identity ``labels`` ``(B,)``, and the examples' dataset
        ``indices`` ``(B,)`` (give them on every update or on none)."""
        self.embeddings.append(embeddings.detach().float())
        self.labels.append(labels.detach())
        if indices is not None:
            self.indices.append(indices.detach())

    def compute(self) -> dict[str, torch.Tensor]:
        emb = F.normalize(dim_zero_cat(self.embeddings), dim=-1)
        labels = dim_zero_cat(self.labels)
        # A list on one process, one tensor after a DDP sync: dim_zero_cat reads both.
        indices = dim_zero_cat(self.indices) if len(self.indices) else None
        if indices is not None:
            keep = first_of_each_index(indices)
            emb, labels = emb[keep], labels[keep]
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


def first_of_each_index(indices: torch.Tensor) -> torch.Tensor:
    """Positions that put ``indices`` in ascending order, keeping one position per distinct index."""
    ordered, order = indices.sort(stable=True)
    first = torch.ones_like(ordered, dtype=torch.bool)
    first[1:] = ordered[1:] != ordered[:-1]
    return order[first]
