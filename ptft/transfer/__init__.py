"""Transfer techniques on top of any ptft module: distillation, few-shot ensembles and soups, continual and multi-task
fine-tuning."""
