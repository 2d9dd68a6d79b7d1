"""Text tasks on Hugging Face transformers."""

from ptft.text.data import TextClassificationDataModule
from ptft.text.modules import TextClassifier
from ptft.text.qa import QuestionAnswerer, QuestionAnsweringDataModule

__all__ = ["QuestionAnswerer", "QuestionAnsweringDataModule", "TextClassificationDataModule", "TextClassifier"]
