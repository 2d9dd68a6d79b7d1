"""Interpretability: what a fine-tuned model learned, as files a person opens and W&B images / tables.

Two kinds of methods, each a function named in a registry and imported only when used (Captum, pytorch-grad-cam
and SHAP are optional extras: ``pip install 'ptft[interpret]'``):

* per-example methods explain the model's decision on a batch of examples and write one picture (and for text an
  HTML page) per example::

      fn(module, batch, targets, folder, first_index) -> list[Path]

  ``batch`` is a collated batch on the module's device, ``targets`` the class ids to explain (one per example),
  ``first_index`` the split index of the batch's first example (files are named ``{index:04d}-{method}.png``).
* split methods look at a whole split (embeddings, errors)::

      fn(module, loader, folder, num_samples) -> list[Path]

``ptft explain`` (:mod:`ptft.interpret.command`) runs either kind from a checkpoint; :class:`ExplainCallback` and
:class:`ErrorAnalysis` run them during training.
"""

from __future__ import annotations

import importlib
from typing import Any, Callable

from ptft.core.errors import PtftError
from ptft.interpret.callbacks import ErrorAnalysis, ExplainCallback

__all__ = ["EXAMPLE_METHODS", "SPLIT_METHODS", "ErrorAnalysis", "ExplainCallback", "method_function"]

#: Per-example methods: name -> "module:function".
EXAMPLE_METHODS: dict[str, str] = {
    "gradcam": "ptft.interpret.vision:gradcam_files",
    "gradcam++": "ptft.interpret.vision:gradcam_plus_plus_files",
    "ig": "ptft.interpret.text:integrated_gradients_files",
    "attention": "ptft.interpret.attention:attention_files",
    "saliency": "ptft.interpret.audio:saliency_files",
    "shap": "ptft.interpret.text:shap_files",
}
#: Split methods: name -> "module:function".
SPLIT_METHODS: dict[str, str] = {
    "tsne": "ptft.interpret.embeddings:tsne_files",
    "errors": "ptft.interpret.errors:error_files",
}


def method_function(name: str) -> tuple[Callable[..., Any], bool]:
    """The function of method ``name`` and whether it is a split method; a one-line error for unknown names."""
    spec = EXAMPLE_METHODS.get(name) or SPLIT_METHODS.get(name)
    if spec is None:
        raise PtftError(f"unknown explanation method {name!r}; choose from {sorted(EXAMPLE_METHODS) + sorted(SPLIT_METHODS)}")
    module_name, function = spec.split(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as err:
        if err.name and err.name.split(".")[0] in ("captum", "pytorch_grad_cam", "shap", "sklearn", "umap"):
            raise PtftError(f"method {name!r} needs {err.name}: pip install 'ptft[interpret]'") from None
        raise
    return getattr(module, function), name in SPLIT_METHODS
