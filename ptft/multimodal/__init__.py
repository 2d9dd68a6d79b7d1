"""Multimodal tasks: contrastive dual encoders (image / audio / video with text), fusion classifiers."""

from ptft.multimodal.audio_text import AudioTextDataModule
from ptft.multimodal.data import ImageTextDataModule
from ptft.multimodal.dual_encoder import DualEncoder
from ptft.multimodal.fusion import FusionClassifier
from ptft.multimodal.fusion_data import MultimodalClassificationDataModule
from ptft.multimodal.losses import contrastive_loss, sigmoid_loss
from ptft.multimodal.metrics import CrossModalRetrieval
from ptft.multimodal.video_text import VideoTextDataModule

__all__ = ["AudioTextDataModule", "CrossModalRetrieval", "DualEncoder", "FusionClassifier", "ImageTextDataModule",
           "MultimodalClassificationDataModule", "VideoTextDataModule", "contrastive_loss", "sigmoid_loss"]
