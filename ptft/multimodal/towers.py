"""What every multimodal module shares about its towers: a learning rate per tower and one depth scale for all.

A multimodal module names its towers in ``towers()`` (parameter-name prefixes within ``self.model``); the freezing
schedules (``FreezeSchedule(tower=...)``), ``ptft inspect-layers`` and :class:`TowerLearningRates` read them.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ptft.core.freezing import tower_parameters


def stretched_layer_ids(model: nn.Module, per_tower: dict[str, dict[str, int]]) -> dict[str, int]:
    """One depth index per parameter of ``model`` from each tower's own (``{prefix: {name: depth}}``): every tower is
    stretched so that the towers' tops meet (a 6-block text tower beside a 4-stage CNN: both top out at 6, so
    layer-wise decay and ``train_layers`` treat their tops alike); every other parameter (projections, fusion, head)
    sits one above."""
    top = max((max(ids.values(), default=0) for ids in per_tower.values()), default=0)
    ids: dict[str, int] = {}
    for prefix, tower_ids in per_tower.items():
        depth = max(tower_ids.values(), default=0) or 1
        ids.update({f"{prefix}.{n}": round(i * top / depth) for n, i in tower_ids.items()})
    for name, _ in model.named_parameters():
        ids.setdefault(name, top + 1)
    return ids


class TowerLearningRates:
    """``param_groups`` with a learning rate per named tower (``tower_lr``), for a :class:`ptft.core.FineTuneModule`
    with ``towers()``. Call :meth:`init_tower_lr` after ``set_model``: unknown tower names fail there, in one line."""

    def init_tower_lr(self, tower_lr: dict[str, float] | None) -> None:
        self.tower_lr = dict(tower_lr or {})
        for tower in self.tower_lr:
            tower_parameters(self, tower)  # a tower that does not exist: one line now, not at the first step

    def param_groups(self) -> list[dict[str, Any]]:
        """The shared parameter groups, each split by tower where ``tower_lr`` gives a tower its own rate: the rate
        at the tower's top layer, decayed below it as layer-wise decay decays ``optimizer.lr``."""
        groups = super().param_groups()  # type: ignore[misc]
        if not self.tower_lr:
            return groups
        owner = {name: tower for tower in self.tower_lr for name in tower_parameters(self, tower)}
        top = max(self.layer_ids().values(), default=0)  # type: ignore[attr-defined]
        split: list[dict[str, Any]] = []
        for group in groups:
            parts: dict[str | None, dict[str, Any]] = {}
            for name, param in zip(group["names"], group["params"]):
                part = parts.setdefault(owner.get(name), {**group, "names": [], "params": []})
                part["names"].append(name)
                part["params"].append(param)
            for tower, part in parts.items():
                if tower is not None:
                    rate = self.tower_lr[tower]
                    part["lr"] = rate if group.get("layer") == top else group["lr"] * rate / self.optimizer_config.lr  # type: ignore[attr-defined]
                split.append(part)
        return split


def text_tower(name: str, pretrained: bool) -> nn.Module:
    """A Hugging Face text encoder (``AutoModel``) as a tower whose token states are used: BERT-family poolers are
    removed, since their parameters would get no gradient (DDP's unused-parameter error) and nothing reads them."""
    from transformers import AutoModel

    from ptft.core.hf import build_hf_model

    model = build_hf_model(AutoModel, name, pretrained, None)
    if getattr(model, "pooler", None) is not None:
        model.pooler = None  # BertModel, RobertaModel… skip a pooler that is None
    return model


def audio_frames(encoder: nn.Module, input_values: torch.Tensor, audio_mask: torch.Tensor | None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """A Hugging Face audio encoder's frame states ``(B, T, H)`` and their mask: padding excluded after the feature
    encoder's striding (its own ``_get_feature_vector_attention_mask``), every frame when the batch has no mask."""
    kwargs = {} if audio_mask is None else {"attention_mask": audio_mask}
    states = encoder(input_values, **kwargs).last_hidden_state
    if audio_mask is not None and hasattr(encoder, "_get_feature_vector_attention_mask"):
        return states, encoder._get_feature_vector_attention_mask(states.shape[1], audio_mask).long()
    return states, torch.ones(states.shape[:2], dtype=torch.long, device=states.device)
