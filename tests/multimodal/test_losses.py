"""Contrastive losses against transformers' CLIP / SigLIP losses; DDP negatives; shared captions; retrieval recall."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from ptft.multimodal import CrossModalRetrieval, contrastive_loss, sigmoid_loss


def tiny_pair_model(kind: str):
    """A random CLIP or SigLIP from config and one forward with ``return_loss``: its embeddings, scale and loss."""
    from transformers import CLIPConfig, CLIPModel, SiglipConfig, SiglipModel

    text = dict(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                max_position_embeddings=16)
    vision = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=16,
                  patch_size=8)
    torch.manual_seed(0)
    if kind == "clip":
        model = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=8))
    else:
        model = SiglipModel(SiglipConfig(text_config=text, vision_config=vision))
        with torch.no_grad():  # away from the -10 start, so that positives matter in the comparison
            model.logit_bias.fill_(-1.0)
    out = model(input_ids=torch.randint(0, 64, (6, 7)), pixel_values=torch.randn(6, 3, 16, 16), return_loss=True)
    return model, out


def test_contrastive_loss_is_clips():
    model, out = tiny_pair_model("clip")
    ours = contrastive_loss(out.image_embeds, out.text_embeds, model.logit_scale)
    assert ours.item() == pytest.approx(out.loss.item(), rel=1e-5)


def test_sigmoid_loss_is_siglips():
    model, out = tiny_pair_model("siglip")
    ours = sigmoid_loss(out.image_embeds, out.text_embeds, model.logit_scale, model.logit_bias)
    assert ours.item() == pytest.approx(out.loss.item(), rel=1e-5)


def unit(n: int, d: int, seed: int) -> torch.Tensor:
    return F.normalize(torch.randn(n, d, generator=torch.Generator().manual_seed(seed)), dim=-1).requires_grad_()


@pytest.mark.parametrize("loss", ["contrastive", "sigmoid"])
@pytest.mark.parametrize("shared_captions", [False, True])
def test_two_ranks_with_gathered_negatives_equal_one_process(loss, shared_captions):
    """Each rank's loss over its half against every rank's embeddings, averaged: the whole-batch loss and gradients."""
    a, b = unit(8, 5, 0), unit(8, 5, 1)
    groups = torch.tensor([0, 1, 2, 0, 3, 1, 4, 0]) if shared_captions else None
    scale, bias = torch.tensor(math.log(10.0), requires_grad=True), torch.tensor(-2.0, requires_grad=True)

    def value(rows: slice, rank: int, gathered: bool) -> torch.Tensor:
        local_groups = None if groups is None else groups[rows]
        extra = dict(rank=rank, groups=local_groups, all_groups=groups if gathered else None)
        if loss == "contrastive":
            return contrastive_loss(a[rows], b[rows], scale, all_a=a if gathered else None,
                                    all_b=b if gathered else None, **extra)
        return sigmoid_loss(a[rows], b[rows], scale, bias, all_b=b if gathered else None, **extra)

    whole = value(slice(None), 0, gathered=False)
    whole_grads = torch.autograd.grad(whole, (a, b, scale))
    ranks = (value(slice(0, 4), 0, gathered=True) + value(slice(4, 8), 1, gathered=True)) / 2
    rank_grads = torch.autograd.grad(ranks, (a, b, scale), allow_unused=True)
    assert ranks.item() == pytest.approx(whole.item(), rel=1e-6)
    for g_whole, g_ranks in zip(whole_grads, rank_grads):
        # DDP sums what each rank's gather sends back and averages over ranks: the autograd sum here, / 2 above
        assert torch.allclose(g_whole, g_ranks, atol=1e-6)
    # without the gathered negatives the ranks see less and the loss differs: the comparison can fail
    alone = (value(slice(0, 4), 0, gathered=False) + value(slice(4, 8), 0, gathered=False)) / 2
    assert abs(alone.item() - whole.item()) > 1e-3


def test_shared_captions_are_positives_not_negatives():
    """Pairs sharing a caption are interchangeable positives: with ``groups`` the loss does not change when the
    embeddings of a group's captions swap places; without them it does (each twin is a negative)."""
    a, b = unit(6, 4, 5).detach(), unit(6, 4, 6).detach()
    groups = torch.tensor([0, 1, 0, 2, 1, 0])
    swapped = b[[2, 4, 5, 3, 1, 0]]  # captions moved within their groups only
    scale, bias = torch.tensor(math.log(10.0)), torch.tensor(-1.0)
    for loss in (lambda b_, **k: contrastive_loss(a, b_, scale, **k), lambda b_, **k: sigmoid_loss(a, b_, scale, bias, **k)):
        assert loss(swapped, groups=groups).item() == pytest.approx(loss(b, groups=groups).item(), rel=1e-6)
        assert abs(loss(swapped).item() - loss(b).item()) > 1e-2
    # aligned by group, the sigmoid loss goes to 0 only if twins count as positives
    text = torch.eye(3)[groups]
    big, low = torch.tensor(math.log(100.0)), torch.tensor(-50.0)
    assert sigmoid_loss(text, text, big, low, groups=groups).item() < 1e-3 < 10 < sigmoid_loss(text, text, big, low).item()


def brute_recall(queries, candidates, q_groups, c_groups, k):
    sims = queries @ candidates.T
    hits = [bool((c_groups[sims[i].argsort(descending=True)[:k]] == q_groups[i]).any()) for i in range(len(queries))]
    return sum(hits) / len(hits)


def test_retrieval_recall_both_directions_and_padded_copies_dropped():
    g = torch.Generator().manual_seed(3)
    a = F.normalize(torch.randn(40, 6, generator=g), dim=-1)
    b = F.normalize(a + 0.5 * torch.randn(40, 6, generator=g), dim=-1)
    metric = CrossModalRetrieval(top_k=(1, 5))
    indices = torch.arange(40)
    for start in range(0, 40, 16):
        metric.update(a[start : start + 16], b[start : start + 16], indices=indices[start : start + 16])
    metric.update(a[:3], b[:3], indices=indices[:3])  # the copies a DDP sampler pads with
    results = metric.compute()
    pairs = torch.arange(40)
    for k in (1, 5):
        assert results[f"image_to_text/recall@{k}"].item() == pytest.approx(brute_recall(a, b, pairs, pairs, k))
        assert results[f"text_to_image/recall@{k}"].item() == pytest.approx(brute_recall(b, a, pairs, pairs, k))
    assert 0.2 < results["image_to_text/recall@1"] < 1.0  # noisy enough that the values say something

    # four captions shared by ten pairs each (identical text embeddings): each caption counts once
    grouped = CrossModalRetrieval(names=("audio", "text"), top_k=(1, 2))
    groups = pairs % 4
    captions = b[:4][groups]
    grouped.update(a, captions, groups=groups)
    values = grouped.compute()
    assert values["audio_to_text/recall@1"].item() == pytest.approx(brute_recall(a, b[:4], groups, pairs[:4], 1))
    assert values["audio_to_text/recall@2"].item() == pytest.approx(brute_recall(a, b[:4], groups, pairs[:4], 2))
    assert values["audio_to_text/recall@2"] > values["audio_to_text/recall@1"]  # not the same caption twice
    assert values["text_to_audio/recall@1"].item() == pytest.approx(brute_recall(b[:4], a, pairs[:4], groups, 1))
