"""Video-text contrastive training: a dual encoder embeds a clip as the mean of its frames, learns colour captions of
generated clips (zero-shot, retrieval), and the recipe fits and predicts clips zero-shot."""

from __future__ import annotations

import csv
from pathlib import Path

import lightning as L
import pytest
import torch
from helpers import trainer
from video_clips import write_colour_clips

from ptft.core import PtftError
from ptft.multimodal import DualEncoder, VideoTextDataModule


@pytest.fixture(scope="module")
def colour_clips(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("colour-clips")
    return {"train": write_colour_clips(root / "train", 8, seed=0), "val": write_colour_clips(root / "val", 4, seed=1)}


def test_clips_learn_their_captions(tiny_bert, colour_clips, tmp_path):
    data = VideoTextDataModule(train=colour_clips["train"], val=colour_clips["val"], num_frames=3, image_size=32,
                               batch_size=12, num_workers=0, hflip=0.0)
    assert data.class_names == ["blue", "green", "red"]
    L.seed_everything(0)
    model = DualEncoder(text_model=tiny_bert, image_model="test_resnet", pretrained=False, projection_dim=16,
                        class_names=data.class_names, prompt="a video of {}.", optimizer={"lr": 1e-3})
    data.connect(model)
    data.setup("fit")
    assert next(iter(data.train_dataloader()))["pixel_values"].shape == (12, 3, 3, 32, 32)
    before = trainer(tmp_path).validate(model, data, verbose=False)[0]
    trainer(tmp_path, max_epochs=20).fit(model, data)
    after = trainer(tmp_path).validate(model, data, verbose=False)[0]
    assert after["val/zero_shot_acc"] >= 0.9 > before["val/zero_shot_acc"] + 0.2  # chance 1/3
    assert after["val/image_to_text/recall@1"] >= 0.9


def test_video_text_recipe_fits_and_predicts(run_recipe, run_cli, tiny_bert, colour_clips, tmp_path):
    from ptft.cli import RECIPES

    args = [f"--model.init_args.text_model={tiny_bert}", "--model.init_args.image_model=test_resnet",
            "--model.init_args.pretrained=false", f"--data.init_args.train={colour_clips['train']}",
            "--data.init_args.image_size=32", "--data.init_args.num_frames=3", "--data.init_args.num_workers=0"]
    cli = run_recipe("recipes/video/video-text-zero-shot.yaml", args)
    assert cli.trainer.global_step == 2 and cli.model.class_names == ["blue", "green", "red"]
    cli.trainer.save_checkpoint(tmp_path / "vt.ckpt")
    run_cli(["predict", "--config", str(RECIPES / "video/video-text-zero-shot.yaml"), *args,
             f"--data.init_args.predict={colour_clips['val']}", f"--ckpt_path={tmp_path / 'vt.ckpt'}"])
    rows = list(csv.DictReader(open(tmp_path / "runs/video-text-zero-shot/predictions.csv")))
    assert len(rows) == 12 and all(r["file"].endswith(".mp4") for r in rows)
    assert {r["label"] for r in rows} <= {"blue", "green", "red"}


def test_clip_objectives_and_bad_clips(tiny_bert, colour_clips, tmp_path):
    bad = Path(tmp_path / "bad" / "red")
    bad.mkdir(parents=True)
    (bad / "x.mp4").write_bytes(b"nope" * 100)
    data = VideoTextDataModule(train=str(tmp_path / "bad"), num_workers=0)
    model = DualEncoder(text_model=tiny_bert, image_model="test_resnet", pretrained=False,
                        objectives={"contrastive": 1.0, "itm": 1.0})
    data.connect(model)
    with pytest.raises(PtftError, match=r"1 unreadable video\(s\) in train, first: .*x.mp4"):
        data.setup("fit")
    data = VideoTextDataModule(train=colour_clips["train"], num_workers=0, num_frames=2, image_size=32, batch_size=4)
    data.connect(model)
    data.setup("fit")
    batch = next(iter(data.train_dataloader()))
    regions, mask, embeddings = model.model.media_states(batch)  # each frame a region of the matching head
    assert regions.shape[:2] == mask.shape == (4, 2)
    assert torch.allclose(torch.nn.functional.normalize(embeddings, dim=-1), model.encode_images(batch["pixel_values"]),
                          atol=1e-5)  # the clip embedding of contrastive training
    fit = trainer(tmp_path, max_steps=1)
    fit.fit(model, data)
    assert torch.isfinite(fit.callback_metrics["train/loss_itm"])
