"""Vision tasks on timm."""

from ptft.vision.data import ImageClassificationDataModule
from ptft.vision.modules import ImageClassifier

__all__ = ["ImageClassificationDataModule", "ImageClassifier"]
