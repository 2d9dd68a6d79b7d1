"""Text tasks on Hugging Face transformers."""

from ptft.text.data import TextClassificationDataModule
from ptft.text.modules import TextClassifier

__all__ = ["TextClassificationDataModule", "TextClassifier"]
