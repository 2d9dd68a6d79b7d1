"""Fixtures of the video tests: generated direction clips (tests/video_clips.py), as video files and frame folders."""

from __future__ import annotations


import pytest
from video_clips import write_clips


@pytest.fixture(scope="session")
def clip_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("clips")
    return {"train": write_clips(root / "train", 40, seed=0), "val": write_clips(root / "val", 6, seed=1)}
