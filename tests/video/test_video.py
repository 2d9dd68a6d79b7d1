"""Video: frame sampling, clips from video files and frame folders, temporal heads that see frame order (and pooling
that cannot), transformers video models, one-line errors for bad clips."""

from __future__ import annotations

import csv
from pathlib import Path

import lightning as L
import pytest
import torch
from helpers import trainer

from ptft.core import PtftError
from ptft.video import HFVideoClassifier, VideoClassificationDataModule, VideoClassifier
from ptft.video.io import sample_indices


def test_segment_and_clip_sampling():
    g = torch.Generator().manual_seed(0)
    assert sample_indices(80, 8, "segments", 1, training=False) == [5, 15, 25, 35, 45, 55, 65, 75]
    for _ in range(20):  # one frame inside each tenth of the clip, in order
        picks = sample_indices(80, 8, "segments", 1, training=True, generator=g)
        assert all(10 * i <= p < 10 * (i + 1) for i, p in enumerate(picks))
    assert sample_indices(100, 4, "clip", 4, training=False) == [43, 47, 51, 55]  # centred (43 frames before, 44 after), stride 4
    starts = {sample_indices(100, 4, "clip", 4, training=True, generator=g)[0] for _ in range(50)}
    assert len(starts) > 10 and max(starts) <= 100 - 13
    assert sample_indices(3, 6, "segments", 1, training=False) == [0, 0, 1, 1, 2, 2]  # short clips repeat frames
    assert sample_indices(5, 4, "clip", 4, training=True) == [0, 1, 3, 4]


def data(clip_dirs, **kwargs) -> VideoClassificationDataModule:
    return VideoClassificationDataModule(train=clip_dirs["train"], val=clip_dirs["val"], num_workers=0, batch_size=8,
                                         hflip=0.0, scale=(0.8, 1.0), image_size=32, **kwargs)


def frame_model(clip_dirs, temporal: str, **kwargs):
    d = data(clip_dirs)
    L.seed_everything(0)
    # A 2x2 grid of a 4x4 map (output stride 8 at 32 pixels): where the square is, in each frame
    model = VideoClassifier("test_resnet", pretrained=False, temporal=temporal, num_frames=4, temporal_size=32,
                            pool_grid=2, model_kwargs={"output_stride": 8}, dropout=0.0, num_labels=d.num_labels,
                            label_names=d.label_names, **{"optimizer": {"lr": 2e-3}, **kwargs})
    d.connect(model)
    return model, d


def test_a_temporal_head_learns_direction_that_pooling_cannot_see(clip_dirs, tmp_path):
    """Left and right clips hold the same frames in opposite order: mean pooling gives a clip and its reversal the
    same logits (so it can at best learn the axis: 0.5), a temporal head learns the direction. Half the clips are mp4
    files, half frame folders."""
    model, d = frame_model(clip_dirs, "gru")
    assert d.label_names == ["down", "left", "right", "up"] and d.num_frames == 4
    clips = torch.randn(2, 4, 3, 32, 32)
    pooled, _ = frame_model(clip_dirs, "mean")
    for m, blind in ((pooled, True), (model, False)):
        m.eval()
        same = torch.allclose(m({"pixel_values": clips}), m({"pixel_values": clips.flip(1)}), atol=1e-5)
        assert same == blind
    model.train()
    trainer(tmp_path, max_epochs=12).fit(model, d)
    assert trainer(tmp_path).validate(model, d, verbose=False)[0]["val/acc"] >= 0.9  # chance 0.25


def tiny_videomae(folder: Path) -> str:
    from transformers import VideoMAEConfig, VideoMAEForVideoClassification, VideoMAEImageProcessor

    config = VideoMAEConfig(image_size=32, patch_size=8, num_frames=4, tubelet_size=2, hidden_size=32,
                            num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)
    VideoMAEForVideoClassification(config).save_pretrained(folder)
    VideoMAEImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32},
                           image_mean=[0.5] * 3, image_std=[0.5] * 3).save_pretrained(folder)
    return str(folder)


def test_transformers_video_model_by_folder(tmp_path, clip_dirs):
    """A tiny VideoMAE from its config: clips get its frame count and its processor's size and statistics."""
    folder = tiny_videomae(tmp_path / "videomae")
    d = VideoClassificationDataModule(train=clip_dirs["train"], val=clip_dirs["val"], num_workers=0, batch_size=8,
                                      sampling="clip", frame_stride=2, hflip=0.0)
    model = HFVideoClassifier(str(folder), num_labels=d.num_labels, label_names=d.label_names,
                              optimizer={"lr": 1e-3})
    d.connect(model)
    assert d.num_frames == 4 and model.data_config()["mean"] == (0.5, 0.5, 0.5)
    d.setup("fit")
    batch = next(iter(d.train_dataloader()))
    assert batch["pixel_values"].shape == (8, 4, 3, 32, 32)
    before = trainer(tmp_path).validate(model, d, verbose=False)[0]["val/loss"]
    trainer(tmp_path, max_epochs=3).fit(model, d)
    assert trainer(tmp_path).validate(model, d, verbose=False)[0]["val/loss"] < before
    with pytest.raises(PtftError, match="num_frames=6 but the model takes clips of 4 frames"):
        VideoClassificationDataModule(train=clip_dirs["train"], num_frames=6).connect(model)


def test_bad_clips_are_one_line_errors_or_skipped(tmp_path, clip_dirs):
    from video_clips import write_clips

    root = Path(write_clips(tmp_path / "bad", 2, folders="none"))
    (root / "left" / "broken.mp4").write_bytes(b"\x00not a video" * 50)
    (root / "up" / "empty").mkdir()
    model, _ = frame_model(clip_dirs, "mean")
    d = VideoClassificationDataModule(train=str(root), num_workers=0, batch_size=2)
    d.connect(model)
    with pytest.raises(PtftError, match=r"2 unreadable video\(s\) in train, first: .*broken.mp4 \(cannot be read .*"
                                        r"set data.init_args.on_bad_video=skip"):
        d.setup("fit")
    d = VideoClassificationDataModule(train=str(root), num_workers=0, batch_size=2, on_bad_video="skip")
    d.connect(model)
    with pytest.warns(UserWarning, match=r"skipping 2 unreadable video\(s\)"):
        d.setup("fit")
    assert len(d.datasets["train"]) + len(d.datasets["val"]) == 8
    (tmp_path / "none" / "left").mkdir(parents=True)
    (tmp_path / "none" / "left" / "notes.txt").write_text("not a clip")
    with pytest.raises(PtftError, match="train: no clips under .* \\(expected <root>/<class>/<video file or frame folder>"):
        VideoClassificationDataModule(train=str(tmp_path / "none"))
    with pytest.raises(PtftError, match="video models take clips \\(batch, frames, 3, height, width\\)"):
        model({"pixel_values": torch.zeros(2, 3, 32, 32)})


def test_video_recipes_fit_and_predict(run_recipe, run_cli, clip_dirs, tmp_path):
    from ptft.cli import RECIPES

    args = ["--model.init_args.model_name=test_resnet", "--model.init_args.pretrained=false",
            f"--data.init_args.train={clip_dirs['train']}", f"--data.init_args.val={clip_dirs['val']}",
            "--data.init_args.image_size=32", "--data.init_args.num_workers=0"]
    cli = run_recipe("recipes/video/frames-temporal.yaml", args)
    assert cli.trainer.global_step == 2 and cli.model.label_names == ["down", "left", "right", "up"]
    cli.trainer.save_checkpoint(tmp_path / "video.ckpt")
    run_cli(["predict", "--config", str(RECIPES / "video/frames-temporal.yaml"), *args,
             f"--data.init_args.predict={clip_dirs['val']}", f"--ckpt_path={tmp_path / 'video.ckpt'}"])
    rows = list(csv.DictReader(open(tmp_path / "runs/frames-temporal/predictions.csv")))
    assert len(rows) == 24 and {r["label"] for r in rows} <= {"down", "left", "right", "up"}
    assert sum(r["file"].endswith(".mp4") for r in rows) == 12  # files and frame folders alike


def test_videomae_recipe_fits(run_recipe, clip_dirs, tmp_path):
    cli = run_recipe("recipes/video/videomae.yaml", [
        f"--model.init_args.model_name={tiny_videomae(tmp_path / 'videomae')}", f"--data.init_args.train={clip_dirs['train']}",
        f"--data.init_args.val={clip_dirs['val']}", "--data.init_args.num_workers=0", "--data.init_args.frame_stride=2"])
    assert cli.trainer.global_step == 2 and cli.datamodule.num_frames == 4  # the model's
    assert cli.model.label_names == ["down", "left", "right", "up"]
