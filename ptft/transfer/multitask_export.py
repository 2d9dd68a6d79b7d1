"""Export of a multi-task model: one folder per task that the task's single-task module loads (the shared backbone
and that task's trained head), and :func:`load_task_module` that rebuilds the module from such a folder."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

from ptft.core.errors import PtftError
from ptft.core.module import FineTuneModule
from ptft.transfer.multitask import LinearHead, MultiTaskModule, MultiTaskNetwork

__all__ = ["TASK_FILE", "export_tasks", "load_task_module"]

#: What :func:`export_tasks` writes into each task folder, for :func:`load_task_module`.
TASK_FILE = "ptft_task.json"


def export_tasks(module: MultiTaskModule, folder: str) -> None:
    """Writes ``folder/<task>/`` for every task: the backbone and that task's trained head, as the task's
    single-task module loads them (:func:`load_task_module`), and ``folder/multitask.json`` listing the tasks.

    Layouts: a ``token`` task with the ``linear`` head is a Hugging Face ``AutoModelForTokenClassification``
    folder (``TokenClassifier(model_name=folder/<task>)`` loads its head too); other text tasks are
    :class:`ptft.text.heads.EncoderWithHead` folders (encoder + ``ptft_head.safetensors``); image tasks are timm
    hub folders with the head as the model's classifier (``timm.create_model("local-dir:<folder>", pretrained=True)``).
    """
    from ptft.core.peft import merge_adapters

    network = merge_adapters(module.model)
    root = Path(folder)
    root.mkdir(parents=True, exist_ok=True)
    for task, spec in module.tasks.items():
        target = root / task
        target.mkdir(parents=True, exist_ok=True)
        if module.modality == "image":
            save_image_task(module, network, task, target)
        else:
            save_text_task(module, network, task, target)
        info = {"task": task, **asdict(spec), "label_names": module.label_names[task], "backbone": module.model_name}
        (target / TASK_FILE).write_text(json.dumps(info, indent=2) + "\n")
    summary = {"backbone": module.model_name, "tasks": {t: asdict(s) for t, s in module.tasks.items()}}
    (root / "multitask.json").write_text(json.dumps(summary, indent=2) + "\n")

def task_tokenizer(module: MultiTaskModule) -> Any:
    datamodule = getattr(module._trainer, "datamodule", None) if module._trainer is not None else None
    for data in getattr(datamodule, "tasks", {}).values():
        if getattr(data, "tokenizer", None) is not None:
            return data.tokenizer
    from transformers import AutoTokenizer

    from ptft.core.hub import load_pretrained, resolve_model_name

    return load_pretrained(AutoTokenizer.from_pretrained, resolve_model_name(module.model_name), "tokenizer")

def save_text_task(module: MultiTaskModule, network: MultiTaskNetwork, task: str, folder: Path) -> None:
    import copy

    from ptft.core.hf import label_config
    from ptft.text.heads import EncoderWithHead

    names = module.label_names[task]
    head = network.heads[task]
    encoder = copy.deepcopy(network.backbone)
    encoder.config.update(label_config(names))
    if isinstance(head, LinearHead):
        from transformers import AutoModelForTokenClassification

        model = AutoModelForTokenClassification.from_config(encoder.config)
        getattr(model, model.base_model_prefix).load_state_dict(encoder.state_dict())
        model.classifier.load_state_dict(head.classifier.state_dict())
        model.save_pretrained(folder)
    else:
        EncoderWithHead(encoder, head).save_pretrained(str(folder))
    task_tokenizer(module).save_pretrained(folder)

def save_image_task(module: MultiTaskModule, network: MultiTaskNetwork, task: str, folder: Path) -> None:
    import timm
    from timm.models import save_for_hf

    names = module.label_names[task]
    backbone = network.backbone
    name = backbone.pretrained_cfg.get("architecture") or module.model_name
    model = timm.create_model(name, pretrained=False, num_classes=len(names), **module.backbone_kwargs)
    missing, unexpected = model.load_state_dict(backbone.state_dict(), strict=False)
    head = model.pretrained_cfg.get("classifier")
    if unexpected or set(missing) - {f"{head}.weight", f"{head}.bias"}:  # only the classifier is new
        raise PtftError(f"cannot export task {task!r}: timm's {name!r} does not take the backbone's weights "
                        f"(missing {sorted(missing)[:3]}, unexpected {sorted(unexpected)[:3]})")
    model.get_classifier().load_state_dict(network.heads[task].classifier.state_dict())
    model.pretrained_cfg = {**backbone.pretrained_cfg, "num_classes": len(names), "label_names": names}
    save_for_hf(model, str(folder), safe_serialization=True)


def load_task_module(folder: str, **kwargs: Any) -> FineTuneModule:
    """The single-task ptft module of one task folder written by :func:`export_tasks`, with the shared
    backbone and the task's trained head: a ``TextClassifier`` (sequence), ``TokenClassifier`` (token) or
    ``ImageClassifier`` (image), ready to fine-tune further, test or predict on that task alone.

    Args:
        folder: ``<export folder>/<task>``.
        **kwargs: Further arguments of the single-task module (``optimizer``, ``scheduler``…).
    """
    path = Path(folder)
    if not (path / TASK_FILE).is_file():
        raise PtftError(f"{folder} has no {TASK_FILE}: give a task folder written by MultiTaskModule.export")
    info = json.loads((path / TASK_FILE).read_text())
    names = info["label_names"]
    labels = {"num_labels": len(names), "label_names": names}
    if info["kind"] == "image":
        from ptft.vision.modules import ImageClassifier

        return ImageClassifier(f"local-dir:{path.resolve()}", pretrained=True, **labels, **kwargs)
    from ptft.text.modules import TextClassifier
    from ptft.text.token import TokenClassifier

    if info["kind"] == "token" and info["head"] == "linear":
        return TokenClassifier(str(path), **labels, **kwargs)  # Hugging Face loads the trained classifier
    from safetensors.torch import load_file

    cls = TextClassifier if info["kind"] == "sequence" else TokenClassifier
    module = cls(str(path), head=info["head"], head_dropout=info["dropout"], **labels, **kwargs)
    module.model.head.load_state_dict(load_file(str(path / "ptft_head.safetensors")))
    return module
