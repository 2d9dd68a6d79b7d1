"""Transfer techniques on top of any ptft module: distillation, few-shot ensembles and soups, continual and multi-task
fine-tuning."""

from ptft.transfer.continual import ContinualDataModule, ContinueFrom, evaluate_old_and_new
from ptft.transfer.distill import Distillation
from ptft.transfer.ensemble import EnsemblePredictions, ensemble_predictions
from ptft.transfer.ewc import EWC
from ptft.transfer.multitask import MultiTaskModule, TaskHead
from ptft.transfer.multitask_export import load_task_module
from ptft.transfer.multitask_data import MultiTaskDataModule
from ptft.transfer.soup import Soup, greedy_soup, uniform_soup

__all__ = [
    "EWC",
    "ContinualDataModule",
    "ContinueFrom",
    "Distillation",
    "EnsemblePredictions",
    "MultiTaskDataModule",
    "MultiTaskModule",
    "Soup",
    "TaskHead",
    "ensemble_predictions",
    "evaluate_old_and_new",
    "greedy_soup",
    "load_task_module",
    "uniform_soup",
]
