"""Transfer techniques on top of any ptft module: distillation, few-shot ensembles and soups, continual and multi-task
fine-tuning."""

from ptft.transfer.distill import Distillation

__all__ = ["Distillation"]
