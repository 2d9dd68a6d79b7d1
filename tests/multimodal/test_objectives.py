"""Multi-objective pre-training: WeightedObjectives (static and learned weights), hard negatives, and a dual encoder
trained with contrastive + image-text matching + masked language modelling, each loss logged and learned."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from helpers import trainer

from ptft.core import PtftError
from ptft.core import WeightedObjectives
from ptft.multimodal import DualEncoder, ImageTextDataModule
from ptft.multimodal.objectives import hard_negatives


def test_static_weights_sum_and_learned_weights_follow_each_loss():
    static = WeightedObjectives({"a": 1.0, "b": 0.5})
    assert static({"a": torch.tensor(2.0), "b": torch.tensor(4.0)}).item() == pytest.approx(4.0)
    learned = WeightedObjectives({"a": 1.0, "b": 1.0}, "learned")
    opt = torch.optim.SGD(learned.parameters(), lr=0.1)
    for _ in range(300):  # exp(-s) * L + s is smallest at s = log L: a loss 4x larger ends up weighted 4x less
        opt.zero_grad()
        learned({"a": torch.tensor(1.0), "b": torch.tensor(4.0)}).backward()
        opt.step()
    weights = learned.effective_weights()
    assert weights["a"].item() == pytest.approx(1.0, rel=0.02) and weights["b"].item() == pytest.approx(0.25, rel=0.02)
    with pytest.raises(PtftError, match="objectives \\['b'\\] were not computed"):
        static({"a": torch.tensor(1.0)})
    with pytest.raises(PtftError, match="weights must be >= 0"):
        WeightedObjectives({"a": -1.0})


def test_hard_negatives_come_from_other_groups_only():
    torch.manual_seed(0)
    sim = torch.randn(6, 6)
    groups = torch.tensor([0, 0, 1, 1, 2, 2])
    for _ in range(20):
        (rows, captions), (caption_rows, images) = hard_negatives(sim, groups)
        assert rows.tolist() == list(range(6)) and caption_rows.tolist() == list(range(6))
        assert (groups[rows] != groups[captions]).all() and (groups[caption_rows] != groups[images]).all()
    (rows, _), _ = hard_negatives(sim, torch.zeros(6, dtype=torch.long))
    assert len(rows) == 0  # every pair shares one caption: no negative to draw


def test_contrastive_matching_and_masked_lm_train_together(tiny_bert, image_dirs, tmp_path):
    data = ImageTextDataModule(train=image_dirs["train"], val=image_dirs["test"], image_size=32, batch_size=12,
                               num_workers=0, caption_template="a photo of the colour {} here.")
    # A ViT: its patch tokens are regions for the matching head to attend to (the tiny CNN pools 32 px into one)
    L.seed_everything(0)
    model = DualEncoder(text_model=tiny_bert, image_model="test_vit", pretrained=False, projection_dim=16,
                        class_names=data.class_names, objectives={"contrastive": 1.0, "itm": 1.0, "mlm": 1.0},
                        objective_weighting="learned", optimizer={"lr": 3e-3, "head_lr": 1e-2}, mlm_probability=0.3)
    assert set(model.towers()["objective_heads"]) == {"itm_head", "mlm_head"}
    assert model.model.mlm_head.embeddings.weight is model.model.text.get_input_embeddings().weight  # tied
    data.connect(model)
    before = trainer(tmp_path).validate(model, data, verbose=False)[0]
    fit = trainer(tmp_path, max_epochs=30)
    fit.fit(model, data)
    logged = set(fit.callback_metrics)
    assert {f"train/loss_{n}" for n in ("contrastive", "itm", "mlm")} <= logged
    assert {f"train/weight_{n}" for n in ("contrastive", "itm", "mlm")} <= logged
    assert {"train/itm_acc", "train/mlm_acc"} <= logged
    after = trainer(tmp_path).validate(model, data, verbose=False)[0]
    for name in ("contrastive", "itm", "mlm"):
        assert after[f"val/loss_{name}"] < 0.7 * before[f"val/loss_{name}"], (name, before, after)
    # 1 true pair in 3 (each image with a hard-negative caption, each caption with a hard-negative image): 0.67 by
    # always answering "no"; MLM picks among ~30k tokens
    assert after["val/itm_acc"] >= 0.75 and after["val/mlm_acc"] >= 0.5
    assert after["val/zero_shot_acc"] >= 0.9
    assert len({round(float(w), 3) for w in model.model.objectives.effective_weights().values()}) == 3  # learned apart


def test_objective_errors_are_one_line(tiny_clip, tiny_bert):
    with pytest.raises(PtftError, match="unknown objective\\(s\\) \\['mim'\\]"):
        DualEncoder(text_model=tiny_bert, image_model="test_resnet", pretrained=False, objectives={"mim": 1.0})
    with pytest.raises(PtftError, match="itm / mlm need an assembled dual encoder"):
        DualEncoder(model_name=tiny_clip, pretrained=False, objectives={"contrastive": 1.0, "itm": 1.0})


def test_multi_objective_recipe_fits(run_recipe, tiny_bert, image_dirs):
    cli = run_recipe("recipes/multimodal/clip-itm-mlm-pretrain.yaml", [
        f"--model.init_args.text_model={tiny_bert}", "--model.init_args.image_model=test_vit",
        "--model.init_args.pretrained=false", f"--data.init_args.train={image_dirs['train']}",
        "--data.init_args.image_size=32", "--data.init_args.num_workers=0", "--data.init_args.batch_size=8"])
    assert cli.trainer.global_step == 2
    assert {"train/loss_contrastive", "train/loss_itm", "train/loss_mlm", "train/weight_mlm"} <= set(cli.trainer.callback_metrics)
