"""Video: clips from video files (PyAV) or frame folders; per-frame timm models with temporal heads, transformers
video models by name."""

from ptft.video.data import VideoClassificationDataModule
from ptft.video.modules import HFVideoClassifier, TemporalHead, VideoClassifier

__all__ = ["HFVideoClassifier", "TemporalHead", "VideoClassificationDataModule", "VideoClassifier"]
