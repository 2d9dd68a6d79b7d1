"""Cross-modal retrieval recall@k in both directions, as a torchmetrics ``Metric`` that is right under DDP."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat

from ptft.vision.retrieval_metrics import first_of_each_index


def recall_at_k(queries: torch.Tensor, candidates: torch.Tensor, query_groups: torch.Tensor,
                candidate_groups: torch.Tensor, top_k: tuple[int, ...], chunk: int = 1024) -> dict[int, torch.Tensor]:
    """Fraction of ``queries`` with a candidate of their own group among their ``k`` most similar ``candidates``
    (cosine similarity of unit vectors), for each ``k``; queries are scored ``chunk`` at a time."""
    k_max = min(max(top_k), len(candidates))
    hits: dict[int, list[torch.Tensor]] = {k: [] for k in top_k}
    for start in range(0, len(queries), chunk):
        nearest = (queries[start : start + chunk] @ candidates.T).topk(k_max, dim=1).indices
        match = candidate_groups[nearest] == query_groups[start : start + chunk, None]
        for k in top_k:
            hits[k].append(match[:, :k].any(dim=1))
    return {k: torch.cat(v).float().mean() for k, v in hits.items()}


class CrossModalRetrieval(Metric):
    """Recall@k of ``a -> b`` retrieval (e.g. image to text) and ``b -> a``, over every pair of the epoch.

    A retrieval is right when the retrieved item belongs to the query's group: its own pair, or (``groups`` given) a
    pair sharing its caption. The ``b`` side of a group is one caption, so it counts once: as one candidate when
    images retrieve captions, as one query when captions retrieve images (with class-template captions, image -> text
    recall@k is then top-k accuracy among the distinct captions). Every embedding of the epoch is kept (``cat`` states, gathered across DDP processes);
    given the examples' dataset ``indices``, :meth:`compute` drops the copies that DDP's evaluation sampler pads with,
    so 2 processes score exactly what 1 does. torchmetrics' ``RetrievalRecall`` takes one score per (query, candidate)
    pair, an n x n input where this scores 1,024 queries at a time.

    Args:
        names: How the two directions are logged, e.g. ``("image", "text")`` gives ``image_to_text/recall@1``.
        top_k: The ``k`` of recall@k.
    """

    full_state_update = False

    def __init__(self, names: tuple[str, str] = ("image", "text"), top_k: tuple[int, ...] = (1, 5, 10)) -> None:
        super().__init__()
        self.names = tuple(names)
        self.top_k = tuple(top_k)
        for state in ("a", "b", "groups", "indices"):
            self.add_state(state, default=[], dist_reduce_fx="cat")

    def update(self, a: torch.Tensor, b: torch.Tensor, groups: torch.Tensor | None = None,
               indices: torch.Tensor | None = None) -> None:
        """Adds a batch of pairs: ``a`` and ``b`` ``(B, D)``, their ``groups`` ``(B,)`` (``None``: each pair its own;
        needs ``indices`` to tell pairs apart across batches) and dataset ``indices`` ``(B,)``, on every update or on
        none."""
        self.a.append(a.detach().float())
        self.b.append(b.detach().float())
        if groups is not None:
            self.groups.append(groups.detach())
        if indices is not None:
            self.indices.append(indices.detach())

    def compute(self) -> dict[str, torch.Tensor]:
        a, b = F.normalize(dim_zero_cat(self.a), dim=-1), F.normalize(dim_zero_cat(self.b), dim=-1)
        # Lists on one process, tensors after a DDP sync: dim_zero_cat reads both.
        indices = dim_zero_cat(self.indices) if len(self.indices) else None
        groups = dim_zero_cat(self.groups) if len(self.groups) else None
        if indices is not None:
            keep = first_of_each_index(indices)
            a, b = a[keep], b[keep]
            groups = groups[keep] if groups is not None else indices[keep]
        elif groups is None:
            groups = torch.arange(len(a), device=a.device)
        # A caption shared by several pairs (one group) is one text: one candidate for a -> b, one query for b -> a.
        shared = first_of_each_index(groups)
        b_shared, b_groups = b[shared], groups[shared]
        first, second = self.names
        results = {}
        for name, queries, q_groups, candidates, c_groups in (
            (f"{first}_to_{second}", a, groups, b_shared, b_groups), (f"{second}_to_{first}", b_shared, b_groups, a, groups)
        ):
            for k, value in recall_at_k(queries, candidates, q_groups, c_groups, self.top_k).items():
                results[f"{name}/recall@{k}"] = value
        return results
