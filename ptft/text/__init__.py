"""Text tasks on Hugging Face transformers."""

from ptft.text.data import TextClassificationDataModule
from ptft.text.lm import LanguageModel, LanguageModelingDataModule
from ptft.text.modules import TextClassifier
from ptft.text.qa import QuestionAnswerer, QuestionAnsweringDataModule
from ptft.text.seq2seq import Seq2SeqDataModule, Seq2SeqGenerator
from ptft.text.sft import ChatDataModule, ChatFineTuner
from ptft.text.token import TokenClassificationDataModule, TokenClassifier

__all__ = [
    "ChatDataModule",
    "ChatFineTuner",
    "LanguageModel",
    "LanguageModelingDataModule",
    "QuestionAnswerer",
    "QuestionAnsweringDataModule",
    "Seq2SeqDataModule",
    "Seq2SeqGenerator",
    "TextClassificationDataModule",
    "TextClassifier",
    "TokenClassificationDataModule",
    "TokenClassifier",
]
