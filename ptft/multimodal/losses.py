"""Contrastive losses of paired embeddings (image-text, audio-text, video-text), exact under DDP.

Both take this process's ``(N, D)`` embeddings of the two modalities and, under DDP, every process's (gathered with
their gradients, in rank order), so that ``world_size`` processes with N pairs each train as one process with the
whole batch. ``groups`` (optional, ``(N,)`` and gathered alike) marks pairs that share a caption, e.g. the captions
"a photo of a cat" built from class names: such pairs are positives of each other, not negatives.

Ours rather than open_clip's ``ClipLoss`` / ``SigLipLoss`` (open_clip is not a ptft dependency, and its losses treat
a repeated caption as a negative) or transformers' ``clip_loss`` (no DDP negatives, no shared captions).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _positives(local: int, total: int, rank: int, groups: torch.Tensor | None, all_groups: torch.Tensor | None,
               device: torch.device) -> torch.Tensor:
    """``(local, total)`` bool: which of all pairs are positives of this process's pairs."""
    if groups is None:
        index = torch.arange(local, device=device) + rank * local
        return F.one_hot(index, total).bool()
    keys = groups if all_groups is None else all_groups
    return groups.unsqueeze(1) == keys.unsqueeze(0)


def contrastive_loss(
    a: torch.Tensor,
    b: torch.Tensor,
    logit_scale: torch.Tensor,
    all_a: torch.Tensor | None = None,
    all_b: torch.Tensor | None = None,
    rank: int = 0,
    groups: torch.Tensor | None = None,
    all_groups: torch.Tensor | None = None,
) -> torch.Tensor:
    """CLIP's symmetric InfoNCE: each ``a`` picks its pair among all ``b`` and each ``b`` its pair among all ``a``.

    Args:
        a: This process's ``(N, D)`` embeddings of the first modality, L2-normalised.
        b: Its ``(N, D)`` embeddings of the second modality, L2-normalised.
        logit_scale: The learned log inverse temperature (CLIP: ``log(1 / 0.07)`` at the start); logits are
            ``exp(logit_scale) * a @ b.T``.
        all_a: Every process's ``a`` under DDP ``(world_size * N, D)``; ``None`` on one process.
        all_b: Every process's ``b`` likewise.
        rank: This process's rank (its pairs' position among all).
        groups: ``(N,)`` ids of pairs that share a caption; all of a group are positives (the target spreads evenly
            over them). ``None``: only the pair itself.
        all_groups: Every process's ``groups`` under DDP.

    Returns:
        The mean of both directions' cross-entropy over this process's pairs; the mean over processes is the loss of
        one process on the whole batch.
    """
    keys_a = a if all_a is None else all_a
    keys_b = b if all_b is None else all_b
    scale = logit_scale.exp()
    positives = _positives(a.shape[0], keys_b.shape[0], rank, groups, all_groups, a.device).float()
    targets = positives / positives.sum(1, keepdim=True)
    a_to_b = F.cross_entropy(scale * a.float() @ keys_b.float().T, targets)
    b_to_a = F.cross_entropy(scale * b.float() @ keys_a.float().T, targets)
    return (a_to_b + b_to_a) / 2


def sigmoid_loss(
    a: torch.Tensor,
    b: torch.Tensor,
    logit_scale: torch.Tensor,
    logit_bias: torch.Tensor,
    all_b: torch.Tensor | None = None,
    rank: int = 0,
    groups: torch.Tensor | None = None,
    all_groups: torch.Tensor | None = None,
) -> torch.Tensor:
    """SigLIP's pairwise sigmoid loss (Zhai et al., 2023): every (a, b) pair is a binary match / no-match decision.

    Args:
        a: This process's ``(N, D)`` embeddings, L2-normalised.
        b: Its ``(N, D)`` paired embeddings, L2-normalised.
        logit_scale: Learned log scale (SigLIP starts at ``log(10)``).
        logit_bias: Learned bias (SigLIP starts at -10, so that the many negatives start near probability 0).
        all_b: Every process's ``b`` under DDP; each process scores its ``a`` against all of them (the sum over
            processes is then every pair once).
        rank: This process's rank.
        groups: ``(N,)`` ids of pairs sharing a caption (all positives of each other); ``None``: the pair only.
        all_groups: Every process's ``groups`` under DDP.

    Returns:
        ``-sum(log sigmoid(label * logit)) / N`` over this process's rows, as in the paper; the mean over processes is
        the loss of one process on the whole batch.
    """
    keys_b = b if all_b is None else all_b
    logits = logit_scale.exp() * a.float() @ keys_b.float().T + logit_bias
    labels = 2 * _positives(a.shape[0], keys_b.shape[0], rank, groups, all_groups, a.device).float() - 1
    return -F.logsigmoid(labels * logits).sum() / a.shape[0]
