"""What a classifier's representation looks like: the vector its last linear layer sees, per example, drawn in 2-D
with t-SNE (or UMAP), before and after fine-tuning.

The embedding of an example is the input of the head's final ``nn.Linear`` (the one producing the class logits),
captured by a forward pre-hook. The head is what the module recorded as new at :meth:`set_model`
(``head_modules``: ``classifier`` of Hugging Face models, ``head`` of ptft's pooling heads, timm's
``pretrained_cfg["classifier"]`` such as ``fc`` / ``head`` / ``head.fc``, ``fusion`` of fusion classifiers). Where the
head is a block (RoBERTa's dense + out_proj, DistilBERT's pre_classifier + classifier, wav2vec2's projector +
classifier, the fusion layers), the embedding is what leaves the block's earlier layers: for a pretrained counterpart
those layers are newly initialised ones.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, Sequence

import torch
from torch import nn
from torch.utils.data import DataLoader

from ptft.core.errors import PtftError
from ptft.interpret.common import explaining
from ptft.interpret.errors import indexed_batches, labels_of, to_device
from ptft.interpret.output import save_figure, write_csv

__all__ = ["head_linear", "pooled_embeddings", "tsne_figure", "pretrained_counterpart", "tsne_files"]


def head_linear(module: Any) -> tuple[str, nn.Linear]:
    """The name (in ``module.model``) and the layer of the head's final linear layer: the last ``nn.Linear`` of the
    head, in registration order, with ``num_labels`` outputs.

    PEFT-wrapped heads (``modules_to_save``) give their trained copy, not the kept original.
    """
    found = []
    for name, layer in module.model.named_modules():
        if ".original_module" in name or not isinstance(layer, nn.Linear):
            continue
        if module.is_head_parameter(f"{name}.weight") and layer.out_features == module.num_labels:
            found.append((name, layer))
    if not found:
        raise PtftError(
            f"{type(module).__name__}: no linear layer with {module.num_labels} outputs in its head "
            f"({sorted(module.head_modules(module.model)) or 'no head modules'}); embeddings need a classification "
            "module whose head ends in nn.Linear (text, image, audio, video and fusion classifiers)"
        )
    return found[-1]


def pooled_embeddings(module: Any, loader: DataLoader, max_examples: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The input of the head's final linear layer for each example of ``loader``, with its label.

    Runs in eval mode without gradients (the training flag is restored). A module that applies its head twice per
    batch (test-time augmentation ``tta: hflip``) gives the first call's input: the image as it is.

    Args:
        module: A :class:`ptft.core.ClassificationModule`.
        loader: A loader over a labelled split.
        max_examples: Stop after this many examples (``None``: the whole split).

    Returns:
        Embeddings ``(N, D)`` (float32, CPU) and labels ``(N,)``. Long documents split into windows give one row
        per window.
    """
    _, layer = head_linear(module)
    captured: list[torch.Tensor] = []

    def capture(_: nn.Module, args: tuple[Any, ...]) -> None:
        if not captured:  # the first call of this batch
            captured.append(args[0].detach())

    embeddings, labels, seen = [], [], 0
    handle = layer.register_forward_pre_hook(capture)
    try:
        with explaining(module), torch.no_grad():
            for _, batch in indexed_batches(loader):
                batch = to_device(batch, module.device)
                captured.clear()
                module(batch)
                if not captured:
                    raise PtftError(f"{type(module).__name__}'s forward did not run its head's final linear layer")
                vectors = captured[0]
                if vectors.ndim != 2:
                    raise PtftError(
                        f"{type(module).__name__}'s head sees inputs of shape {tuple(vectors.shape)}, not one vector per "
                        "example: embeddings need a sequence / image / clip classifier, not a per-token or per-pixel one"
                    )
                embeddings.append(vectors.float().cpu())
                labels.append(labels_of(batch).cpu())
                seen += vectors.shape[0]
                if max_examples is not None and seen >= max_examples:
                    break
    finally:
        handle.remove()
    if not embeddings:
        raise PtftError("the loader yielded no batches")
    return torch.cat(embeddings)[:max_examples], torch.cat(labels)[:max_examples].long()


def project_2d(embeddings: torch.Tensor, method: Literal["tsne", "umap"] = "tsne", seed: int = 0) -> Any:
    """``(N, D)`` embeddings -> ``(N, 2)`` coordinates (numpy) with scikit-learn's t-SNE (perplexity
    ``min(30, (N - 1) / 3)``, PCA initialisation) or ``umap-learn``."""
    points = embeddings.float().cpu().numpy()
    n = points.shape[0]
    if n < 4:
        raise PtftError(f"a 2-D projection needs at least 4 examples, got {n}")
    if method == "umap":
        try:
            import umap
        except ModuleNotFoundError:
            raise PtftError("method 'umap' needs umap-learn: pip install umap-learn") from None
        return umap.UMAP(n_components=2, n_neighbors=min(15, n - 1), random_state=seed).fit_transform(points)
    if method != "tsne":
        raise PtftError(f"unknown projection {method!r}; choose 'tsne' or 'umap'")
    try:
        from sklearn.manifold import TSNE
    except ModuleNotFoundError:
        raise PtftError("t-SNE needs scikit-learn: pip install 'ptft[interpret]'") from None
    return TSNE(n_components=2, perplexity=min(30.0, (n - 1) / 3), init="pca", random_state=seed).fit_transform(points)


def tsne_figure(embeddings: dict[str, tuple[torch.Tensor, torch.Tensor]], label_names: Sequence[str],
                method: Literal["tsne", "umap"] = "tsne", seed: int = 0,
                coordinates: dict[str, Any] | None = None) -> Any:
    """One scatter panel per entry (e.g. ``{"before fine-tuning": (emb, labels), "after fine-tuning": ...}``), side by
    side, points coloured by label with a legend.

    Args:
        embeddings: Panel title -> ``(embeddings (N, D), labels (N,))``.
        label_names: Class names by label id.
        method: ``tsne`` (scikit-learn) or ``umap`` (``umap-learn``).
        seed: Seed of the projection.
        coordinates: Filled with panel title -> the ``(N, 2)`` projected points, when given.
    """
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, len(embeddings), figsize=(5.5 * len(embeddings), 5), squeeze=False)
    cmap = plt.get_cmap("tab10" if len(label_names) <= 10 else "tab20")
    for ax, (title, (vectors, labels)) in zip(axes[0], embeddings.items()):
        points = project_2d(vectors, method, seed)
        if coordinates is not None:
            coordinates[title] = points
        labels = labels.cpu().numpy()
        for class_id, name in enumerate(label_names):
            chosen = labels == class_id
            if chosen.any():
                ax.scatter(points[chosen, 0], points[chosen, 1], s=12, alpha=0.8, color=cmap(class_id % cmap.N),
                           label=name)
        ax.set_title(f"{title} ({method}, {len(labels)} examples)")
        ax.set_xticks([])
        ax.set_yticks([])
        ax.legend(fontsize=7, markerscale=1.5, loc="best")
    figure.tight_layout()
    return figure


def pretrained_counterpart(module: Any) -> Any:
    """The same architecture with the weights fine-tuning started from: ``type(module)(**arguments)`` with the
    constructor arguments the module was built with (recorded by :class:`ptft.core.FineTuneModule`), in eval mode on
    the module's device. The new head is random; the global random state is left as it was.

    A module loaded from a checkpoint was rebuilt with ``pretrained=False`` and the checkpoint's architecture (its
    weights are in the file): its counterpart is ``model_name`` loaded with its pretrained weights (a warning says
    so; a run trained from random weights has no such "before").

    Raises:
        PtftError: the module has no ``pretrained`` argument, or the pretrained weights cannot be loaded (a hub
            name offline).
    """
    from lightning.pytorch.utilities import rank_zero_warn

    arguments = dict(getattr(module, "_init_arguments", None) or {})
    if not arguments:
        arguments = dict(module.hparams)
    arguments = {k: v for k, v in arguments.items() if not k.startswith("_")}
    name = type(module).__name__
    if "pretrained" not in arguments:
        raise PtftError(f"{name} has no pretrained argument: pass the starting model as before=")
    if not arguments["pretrained"]:
        arguments.update(pretrained=True)
        if "model_config" in arguments:
            arguments["model_config"] = None  # the architecture comes with the pretrained weights
        rank_zero_warn(f"{name} was built with pretrained=False (loaded from a checkpoint, or trained from random "
                       f"weights): 'before fine-tuning' is {arguments.get('model_name')!r} with its pretrained weights")
    with torch.random.fork_rng(devices=[]):  # the new head's initialisation must not move a training run's streams
        counterpart = type(module)(**arguments)
    return counterpart.to(module.device).eval()


def tsne_files(module: Any, loader: DataLoader, folder: str | Path, num_samples: int | None,
               before: Any = "pretrained", method: Literal["tsne", "umap"] = "tsne", seed: int = 0) -> list[Path]:
    """The ``tsne`` split method: the embeddings of the first ``num_samples`` examples of ``loader`` (all of them for
    ``None`` or 0), projected to 2-D before and after fine-tuning.

    Writes ``embeddings-tsne.png`` (one panel per model), ``embeddings.npz`` (the raw embeddings ``after`` and, when
    drawn, ``before``, with ``labels`` and ``label_names``: for reuse) and ``embeddings.csv`` (model, row of the npz
    arrays, label and the 2-D coordinates of each point).

    Args:
        module: The fine-tuned classifier.
        loader: A loader over a labelled split.
        folder: Where the files go.
        num_samples: How many examples to embed; ``None`` or 0: every example of the split.
        before: The model fine-tuning started from: a module, ``"pretrained"`` (rebuilt with
            :func:`pretrained_counterpart`; when that is not possible, a warning says why and only the fine-tuned
            embeddings are drawn), or ``None`` (only the fine-tuned embeddings).
        method: ``tsne`` or ``umap``.
        seed: Seed of the projection.
    """
    from lightning.pytorch.utilities import rank_zero_warn
    import numpy as np

    folder = Path(folder)
    limit = num_samples or None
    after, labels = pooled_embeddings(module, loader, limit)
    panels = {"after fine-tuning": (after, labels)}
    arrays: dict[str, Any] = {"after": after.numpy(), "labels": labels.numpy(),
                              "label_names": np.array(module.label_names)}
    if isinstance(before, str) and before == "pretrained":
        try:
            before = pretrained_counterpart(module)
        except PtftError as err:
            rank_zero_warn(f"t-SNE without the pretrained model: {err}")
            before = None
    if before is not None:
        start, start_labels = pooled_embeddings(before, loader, limit)
        panels = {"before fine-tuning": (start, start_labels), **panels}
        arrays["before"] = start.numpy()
    coordinates: dict[str, Any] = {}
    paths = [save_figure(tsne_figure(panels, module.label_names, method, seed, coordinates),
                         folder / f"embeddings-{method}.png")]
    folder.mkdir(parents=True, exist_ok=True)
    np.savez(folder / "embeddings.npz", **arrays)
    paths.append(folder / "embeddings.npz")
    rows = [[title.split()[0], i, module.label_names[int(labels[i])], round(float(x), 5), round(float(y), 5)]
            for title, points in coordinates.items() for i, (x, y) in enumerate(points)]
    paths.append(write_csv(folder / "embeddings.csv", ["model", "row", "label", "x", "y"], rows))
    return paths
