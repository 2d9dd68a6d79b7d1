"""Multimodal tasks: contrastive dual encoders (image / audio / video with text), fusion classifiers."""

from ptft.multimodal.losses import contrastive_loss, sigmoid_loss
from ptft.multimodal.metrics import CrossModalRetrieval

__all__ = ["CrossModalRetrieval", "contrastive_loss", "sigmoid_loss"]
