"""Per-tower freezing schedules and learning rates of a dual encoder; unknown tower names are one-line errors."""

from __future__ import annotations

import lightning as L
import pytest
from helpers import changed, trainer, weights

from ptft.core import FreezeSchedule, PtftError
from ptft.multimodal import DualEncoder, ImageTextDataModule


def setup(tiny_bert, image_dirs, **kwargs):
    L.seed_everything(0)
    data = ImageTextDataModule(train=image_dirs["train"], image_size=32, batch_size=12, num_workers=0)
    model = DualEncoder(text_model=tiny_bert, image_model="test_resnet", pretrained=False, projection_dim=16,
                        optimizer={"lr": 1e-3}, **kwargs)
    data.connect(model)
    return model, data


def test_each_tower_follows_its_own_schedule(tiny_bert, image_dirs, tmp_path):
    model, data = setup(tiny_bert, image_dirs)
    towers = {name: {n for n, _ in model.model.named_parameters() if n.startswith(name + ".")} for name in ("text", "vision")}
    vision_ids = {n: i for n, i in model.layer_ids().items() if n in towers["vision"]}
    vision_top = {n for n, i in vision_ids.items() if i == max(vision_ids.values())}
    schedules = [FreezeSchedule(tower="text", train_layers=0, unfreeze_at_epoch=1),  # frozen for one epoch
                 FreezeSchedule(tower="vision", train_layers=1, unfreeze_every_n_epochs=1)]  # top block first
    before = weights(model.model)
    trainer(tmp_path, max_epochs=1, limit_train_batches=2, limit_val_batches=0, callbacks=schedules).fit(model, data)
    moved = changed(before, weights(model.model))
    assert not moved & towers["text"]
    # the top block only (timm zero-initialises each block's last BatchNorm, so its first one gets no gradient yet)
    assert moved & towers["vision"] <= vision_top and {n for n in vision_top if "conv" in n} <= moved
    assert {"text_projection.weight", "vision_projection.weight", "logit_scale"} <= moved  # no schedule: trains

    before = weights(model.model)
    trainer(tmp_path, max_epochs=2, limit_train_batches=2, limit_val_batches=0, callbacks=schedules).fit(model, data)
    assert changed(before, weights(model.model)) & towers["text"]  # epoch 1: the text tower trains too


def test_tower_learning_rates(tiny_bert, image_dirs):
    model, _ = setup(tiny_bert, image_dirs, tower_lr={"text": 1e-5, "vision": 5e-4})
    lr_of = {name: group["lr"] for group in model.param_groups() for name in group["names"]}
    assert {round(lr_of[n], 12) for n in lr_of if n.startswith("text.")} == {1e-5}
    assert {round(lr_of[n], 12) for n in lr_of if n.startswith("vision.")} == {5e-4}
    assert lr_of["text_projection.weight"] == pytest.approx(1e-3)  # no head_lr: the base rate


def test_unknown_tower_names_are_one_line_errors(tiny_bert, image_dirs, tmp_path):
    with pytest.raises(PtftError, match=r"tower='audio' does not exist; DualEncoder has towers \['projection', 'scale', 'text', 'vision'\]"):
        setup(tiny_bert, image_dirs, tower_lr={"audio": 1e-4})
    model, data = setup(tiny_bert, image_dirs)
    with pytest.raises(PtftError, match="tower='audio' does not exist"):
        trainer(tmp_path, max_steps=1, callbacks=[FreezeSchedule(tower="audio", train_layers=1)]).fit(model, data)
    with pytest.raises(PtftError, match="0 too with a tower"):
        FreezeSchedule(train_layers=0)
