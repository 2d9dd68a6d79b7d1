"""Layer discovery and layer-wise learning-rate decay against hand computations (proof e)."""

import re

import pytest
from torch import nn

from ptft.core import OptimizerConfig, PtftError
from ptft.core.layers import describe_layers, timm_layer_ids
from ptft.core.optim import model_no_weight_decay
from ptft.text import TextClassifier
from ptft.vision import ImageClassifier

LR, DECAY = 1e-3, 0.5


def lrs(module):
    return {n: g["lr"] for g in module.param_groups() for n in g["names"]}


def bert_layer(name: str) -> int:
    # tiny BERT, 2 blocks: embeddings 0, encoder.layer.i -> i + 1, pooler joins the last block, classifier on top
    if name.startswith("bert.embeddings."):
        return 0
    if m := re.match(r"bert\.encoder\.layer\.(\d+)\.", name):
        return int(m.group(1)) + 1
    if name.startswith("bert.pooler."):
        return 2
    assert name.startswith("classifier."), name
    return 3


def vit_layer(name: str) -> int:
    # timm test_vit, 6 blocks: stem 0, blocks.i -> i + 1, the final norm joins the last block (timm's MATCH_PREV_GROUP),
    # head 7
    if name in ("cls_token", "pos_embed") or name.startswith("patch_embed."):
        return 0
    if m := re.match(r"blocks\.(\d+)\.", name):
        return int(m.group(1)) + 1
    return {"norm": 6, "head": 7}[name.split(".")[0]]


@pytest.mark.parametrize("kind", ["bert", "vit"])
def test_layer_decay_matches_hand_computation(kind, tiny_bert):
    opt = OptimizerConfig(lr=LR, layer_decay=DECAY)
    if kind == "bert":
        module, layer_of, top = TextClassifier(tiny_bert, optimizer=opt), bert_layer, 3
    else:
        module, layer_of, top = ImageClassifier("test_vit", pretrained=False, optimizer=opt), vit_layer, 7
    got = lrs(module)
    assert set(got) == {n for n, _ in module.model.named_parameters()}
    for name, lr in got.items():
        assert lr == pytest.approx(LR * DECAY ** (top - layer_of(name))), name


def test_partly_frozen_model_keeps_each_layers_lr(tiny_bert):
    """timm's layer decay shifts scales when parameters are frozen (pytorch-image-models#2691)."""
    module = TextClassifier(tiny_bert, optimizer=OptimizerConfig(lr=LR, layer_decay=DECAY))
    full = lrs(module)
    for name, param in module.model.named_parameters():
        if not name.startswith(("classifier", "bert.encoder.layer.1")):
            param.requires_grad_(False)
    partial = lrs(module)
    assert partial and set(partial) < set(full)
    assert all(partial[n] == full[n] for n in partial)


def test_head_lr_overrides_top_layer_only(tiny_bert):
    module = TextClassifier(tiny_bert, optimizer=OptimizerConfig(lr=LR, head_lr=0.1, layer_decay=DECAY))
    got = lrs(module)
    assert got["classifier.weight"] == 0.1
    assert got["bert.pooler.dense.weight"] == pytest.approx(LR * DECAY)


def test_describe_layers_lists_every_layer(tiny_bert):
    module = TextClassifier(tiny_bert, optimizer=OptimizerConfig(lr=LR, layer_decay=DECAY))
    table = describe_layers(module.model, module.layer_ids(), module.param_groups())
    rows = table.splitlines()[1:]
    assert [int(r.split()[0]) for r in rows] == [0, 1, 2, 3]
    assert "bert.embeddings" in rows[0] and "classifier" in rows[3]
    assert f"{LR:.2e}" in rows[3] and f"{LR * DECAY ** 3:.2e}" in rows[0]


class _NoMatcher(nn.Module):
    """A timm-style model without ``group_matcher``: 15 weight tensors in a trunk, then the classifier ``fc``."""

    pretrained_cfg = {"classifier": "fc"}

    def __init__(self, blocks: int = 15) -> None:
        super().__init__()
        self.trunk = nn.Sequential(*[nn.Linear(2, 2, bias=False) for _ in range(blocks)])
        self.fc = nn.Linear(2, 3)


def test_timm_model_without_group_matcher_uses_timms_auto_grouping():
    """Before: every parameter in layer 0, so layer decay did nothing and LinearProbe trained everything."""
    model = _NoMatcher()
    with pytest.warns(UserWarning, match="no group_matcher"):
        ids = timm_layer_ids(model)
    assert [ids[f"trunk.{i}.weight"] for i in range(15)] == [0] * 12 + [1] * 3  # timm: 12 parameters per layer
    assert ids["fc.weight"] == ids["fc.bias"] == 2  # the classifier on top


def test_timm_model_with_a_single_layer_stops_with_one_line():
    model = _NoMatcher(blocks=0)
    model.pretrained_cfg = {"classifier": None}  # nothing identifies a head: everything is one group
    with pytest.raises(PtftError, match="single layer"):
        timm_layer_ids(model)


def test_timm_no_weight_decay_names_get_no_decay():
    """timm's ``no_weight_decay()`` (pos_embed, cls_token) is honoured, also through a wrapper's prefix."""
    module = ImageClassifier("test_vit", pretrained=False, optimizer=OptimizerConfig(lr=LR, weight_decay=0.05))
    assert {"pos_embed", "cls_token"} <= set(module.model.no_weight_decay())
    decay = {n: g["weight_decay"] for g in module.param_groups() for n in g["names"]}
    assert decay["pos_embed"] == decay["cls_token"] == 0.0
    assert decay["blocks.0.attn.qkv.weight"] == 0.05
    wrapper = nn.Module()
    wrapper.backbone = module.model
    assert {"backbone.pos_embed", "backbone.cls_token"} <= model_no_weight_decay(wrapper)
