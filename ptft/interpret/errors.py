"""Error analysis of a classifier on a split: the confusion matrix, per-class precision / recall / F1, and the
mistakes it makes with the most confidence, each shown with its input (text, image, audio).

``error_files`` is the ``errors`` split method (``fn(module, loader, folder, num_samples)``); :class:`ErrorAnalysis`
(:mod:`ptft.interpret.callbacks`) writes the same files during training from the validation batches.

Predictions keep the dataset index of each example, not its inputs: a mistake's input is fetched again from the
loader's dataset when it is drawn, so memory stays at ``(N, num_labels)`` probabilities whatever the inputs are.
"""

from __future__ import annotations

import math
import textwrap
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, NamedTuple, Sequence

import torch
from torch.utils.data import DataLoader, DistributedSampler, SequentialSampler

from ptft.core.errors import PtftError
from ptft.interpret.common import explaining
from ptft.interpret.output import save_figure, write_csv

__all__ = [
    "Predictions",
    "Mistake",
    "collect_predictions",
    "class_scores",
    "confusion_figure",
    "top_mistakes",
    "describe_input",
    "draw_input",
    "mistakes_figure",
    "write_error_report",
    "error_files",
]


# --- running a module over a loader -------------------------------------------------------------------------------
def to_device(batch: Any, device: torch.device) -> Any:
    """A collated batch moved to ``device`` (dicts, tokenizer ``BatchEncoding``, lists of tensors)."""
    from lightning.fabric.utilities.apply_func import move_data_to_device

    return move_data_to_device(batch, device)


def batch_index_lists(loader: DataLoader, what: str = "this method") -> list[list[int]]:
    """The dataset indices of every batch of ``loader``, in the order the loader yields them.

    Only for loaders whose order is fixed (sequential, or a distributed sampler without shuffling, as Lightning builds
    for validation and test): a shuffled sampler would give another order each time it is iterated.
    """
    batch_sampler = getattr(loader, "batch_sampler", None)
    if batch_sampler is None:
        raise PtftError(f"{what} needs a loader over a map-style dataset with a batch size (batch_sampler is None)")
    sampler = getattr(batch_sampler, "sampler", None)
    ordered = isinstance(sampler, SequentialSampler) or (isinstance(sampler, DistributedSampler) and not sampler.shuffle)
    if not ordered:
        raise PtftError(f"{what} needs an unshuffled loader (got sampler {type(sampler).__name__})")
    return [list(indices) for indices in batch_sampler]


def indexed_batches(loader: DataLoader) -> Iterator[tuple[list[int], Any]]:
    """``(dataset indices, batch)`` for each batch of the split ``loader`` covers.

    Batches come from a loader over the same dataset, collate function and workers whose batch sampler is the list of
    ``loader``'s batches drawn once: the indices then name the examples of each batch whatever the sampler is.
    """
    batch_sampler = getattr(loader, "batch_sampler", None)
    if batch_sampler is None:
        raise PtftError("this method needs a loader over a map-style dataset with a batch size (batch_sampler is None)")
    batches = [list(indices) for indices in batch_sampler]
    fixed = DataLoader(loader.dataset, batch_sampler=batches, collate_fn=loader.collate_fn,
                       num_workers=loader.num_workers, worker_init_fn=loader.worker_init_fn)
    yield from zip(batches, fixed)


def fetch_example(loader: DataLoader, index: int) -> Any:
    """Example ``index`` of ``loader``'s dataset as a collated batch of one (CPU tensors)."""
    return loader.collate_fn([loader.dataset[index]])


def labels_of(batch: Any) -> torch.Tensor:
    """A batch's class ids; a one-line error for batches without them (a predict split)."""
    labels = batch.get("labels") if hasattr(batch, "get") else None
    if labels is None:
        raise PtftError("the batches carry no labels: use a split with targets (val or test)")
    return labels


def example_probs(module: Any, logits: torch.Tensor, batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """Class probabilities and labels per example of ``batch`` from the module's logits.

    A long document split into windows (text data ``long_documents: windows``, batches with ``doc_ids``) is one
    example: its windows are combined as the module's metrics combine them (``aggregate``: mean / max / vote).
    """
    labels = labels_of(batch)
    if "doc_ids" in batch:
        from ptft.text.data import aggregate_windows

        how = getattr(module, "aggregate", "mean")
        scores, first = aggregate_windows(logits.float(), batch["doc_ids"], how)
        return (scores if how == "vote" else scores.softmax(dim=-1)), labels[first]
    return logits.float().softmax(dim=-1), labels


# --- predictions and scores ---------------------------------------------------------------------------------------
@dataclass
class Predictions:
    """A split's class probabilities ``(N, C)``, labels ``(N,)`` and dataset indices ``(N,)``, on the CPU."""

    probs: torch.Tensor
    labels: torch.Tensor
    indices: torch.Tensor


class Mistake(NamedTuple):
    """A wrong prediction: its row in the probabilities, true and predicted class ids, and the predicted probability."""

    position: int
    label: int
    predicted: int
    probability: float


def collect_predictions(module: Any, loader: DataLoader, max_examples: int | None = None) -> Predictions:
    """Runs ``module`` (eval mode, no gradients) over ``loader``; class probabilities, labels and dataset indices.

    Args:
        module: A :class:`ptft.core.ClassificationModule`.
        loader: A loader over a labelled split.
        max_examples: Stop after this many examples (``None``: the whole split).
    """
    probs, labels, indices, seen = [], [], [], 0
    with explaining(module), torch.no_grad():
        for batch_indices, batch in indexed_batches(loader):
            batch = to_device(batch, module.device)
            p, y = example_probs(module, module(batch), batch)
            if p.shape[0] != len(batch_indices):
                raise PtftError(f"{p.shape[0]} predictions for a batch of {len(batch_indices)} examples")
            probs.append(p.cpu())
            labels.append(y.cpu())
            indices.append(torch.tensor(batch_indices))
            seen += len(batch_indices)
            if max_examples is not None and seen >= max_examples:
                break
    if not probs:
        raise PtftError("the loader yielded no batches")
    keep = slice(0, max_examples)
    return Predictions(torch.cat(probs)[keep], torch.cat(labels)[keep].long(), torch.cat(indices)[keep])


def class_scores(probs: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
    """The confusion matrix (rows: true class, columns: predicted) and per-class precision, recall, F1 and support,
    computed with torchmetrics."""
    from torchmetrics.classification import (
        MulticlassConfusionMatrix,
        MulticlassF1Score,
        MulticlassPrecision,
        MulticlassRecall,
    )

    probs, labels = probs.detach().float().cpu(), labels.detach().long().cpu()
    num_classes = probs.shape[-1]
    kwargs = {"num_classes": num_classes, "average": None}
    return {
        "confusion": MulticlassConfusionMatrix(num_classes=num_classes)(probs, labels),
        "precision": MulticlassPrecision(**kwargs)(probs, labels),
        "recall": MulticlassRecall(**kwargs)(probs, labels),
        "f1": MulticlassF1Score(**kwargs)(probs, labels),
        "support": torch.bincount(labels, minlength=num_classes),
    }


def _heatmap(ax: Any, matrix: torch.Tensor, label_names: Sequence[str], title: str, fmt: str) -> None:
    values = matrix.numpy()
    image = ax.imshow(values, cmap="Blues")
    ticks = range(len(label_names))
    ax.set_xticks(ticks, label_names, rotation=45, ha="right")
    ax.set_yticks(ticks, label_names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    if len(label_names) <= 20:  # beyond that the numbers no longer fit in their cells
        threshold = values.max() / 2 if values.size else 0
        for i in range(values.shape[0]):
            for j in range(values.shape[1]):
                ax.text(j, i, format(values[i, j], fmt), ha="center", va="center", fontsize=8,
                        color="white" if values[i, j] > threshold else "black")
    ax.figure.colorbar(image, ax=ax, fraction=0.046, pad=0.04)


def confusion_figure(probs: torch.Tensor, labels: torch.Tensor, label_names: Sequence[str]) -> Any:
    """One figure: the confusion matrix in counts and normalised per true class, and per-class precision / recall /
    F1 bars."""
    import matplotlib.pyplot as plt
    import numpy as np

    scores = class_scores(probs, labels)
    counts = scores["confusion"]
    rows = counts.sum(dim=1, keepdim=True).clamp(min=1)
    size = max(4.5, 0.45 * len(label_names) + 2)
    figure, axes = plt.subplots(1, 3, figsize=(3 * size, size))
    _heatmap(axes[0], counts, label_names, f"confusion (counts, {int(counts.sum())} examples)", "d")
    _heatmap(axes[1], counts / rows, label_names, "confusion (share of each true class)", ".2f")
    x = np.arange(len(label_names))
    width = 0.27
    for offset, name in zip((-width, 0.0, width), ("precision", "recall", "f1")):
        axes[2].bar(x + offset, scores[name].numpy(), width, label=name)
    axes[2].set_xticks(x, label_names, rotation=45, ha="right")
    axes[2].set_ylim(0, 1.05)
    axes[2].set_title("per class")
    axes[2].legend(loc="lower right")
    figure.tight_layout()
    return figure


def top_mistakes(probs: torch.Tensor, labels: torch.Tensor, k: int) -> list[Mistake]:
    """The ``k`` wrong predictions made with the highest predicted probability, most confident first."""
    confidence, predicted = probs.float().max(dim=-1)
    wrong = (predicted != labels).nonzero().flatten()
    order = confidence[wrong].argsort(descending=True, stable=True)[:k]
    return [Mistake(int(i), int(labels[i]), int(predicted[i]), float(confidence[i])) for i in wrong[order]]


# --- showing an input ---------------------------------------------------------------------------------------------
#: Tokenizers loaded for modules without a data module attached (loading one per drawn example would be slow).
_LOADED_TOKENIZERS: weakref.WeakKeyDictionary[Any, Any] = weakref.WeakKeyDictionary()


def _tokenizer(module: Any) -> Any:
    """The module's tokenizer: its data module's or processor (Hugging Face modules), or its own (fusion models)."""
    trainer = getattr(module, "_trainer", None)
    attached = getattr(getattr(trainer, "datamodule", None), "tokenizer", None) if trainer is not None else None
    if attached is not None:
        return attached
    if module not in _LOADED_TOKENIZERS:
        if hasattr(module, "find_processor"):
            processor = module.find_processor()
            tokenizer = getattr(processor, "tokenizer", processor)
        else:
            own = getattr(module, "tokenizer", None)
            tokenizer = own() if callable(own) else own
        _LOADED_TOKENIZERS[module] = tokenizer
    return _LOADED_TOKENIZERS[module]


def _text(module: Any, example: Any) -> str:
    ids = example["input_ids"][0]
    mask = example.get("attention_mask")
    if mask is not None:
        ids = ids[mask[0].bool()]
    tokenizer = _tokenizer(module)
    if tokenizer is None:  # a model built from a config, without its tokenizer: the ids are all there is
        return "token ids " + " ".join(str(i) for i in ids.tolist())
    return tokenizer.decode(ids.tolist(), skip_special_tokens=True)


def _wave(example: Any) -> torch.Tensor:
    wave = example["input_values"][0].float()
    mask = example.get("attention_mask")
    if mask is not None and mask.shape[-1] == wave.shape[-1]:
        wave = wave[mask[0].bool()]  # padding of a shorter clip in its batch
    return wave


def describe_input(module: Any, example: Any) -> str:
    """A one-line description of an example (a collated batch of one): the decoded text, or the kind and size of an
    image, clip or other input."""
    parts = []
    if "pixel_values" in example:
        shape = tuple(example["pixel_values"].shape[1:])
        parts.append(f"{'video' if len(shape) == 4 else 'image'} {'x'.join(map(str, shape))}")
    if "input_values" in example:
        values = example["input_values"]
        if values.ndim == 2:
            rate = getattr(module, "sampling_rate", None)
            n = _wave(example).numel()
            parts.append(f"audio {n} samples" + (f" ({n / rate:.2f} s)" if rate else ""))
        else:
            parts.append(f"audio features {'x'.join(map(str, values.shape[1:]))}")
    if "input_ids" in example:
        parts.append(_text(module, example))
    if not parts:
        parts = [", ".join(f"{k} {tuple(v.shape)}" for k, v in example.items() if isinstance(v, torch.Tensor))]
    return " | ".join(parts)


def _image(module: Any, pixels: torch.Tensor) -> torch.Tensor:
    """``(C, H, W)`` model input -> ``(H, W, C)`` in [0, 1]: the data's normalisation undone with the module's
    ``data_config()`` mean and std; min-max scaled for modules that do not state them."""
    pixels = pixels.float().cpu()
    config = module.data_config() if hasattr(module, "data_config") else {}
    mean, std = config.get("mean"), config.get("std")
    if mean is not None and std is not None and len(mean) == pixels.shape[0]:
        pixels = pixels * torch.tensor(std).view(-1, 1, 1) + torch.tensor(mean).view(-1, 1, 1)
    else:
        pixels = (pixels - pixels.min()) / (pixels.max() - pixels.min()).clamp(min=1e-8)
    return pixels.clamp(0, 1).permute(1, 2, 0)


def log_spectrogram(wave: torch.Tensor, sampling_rate: int | None) -> torch.Tensor:
    """A waveform's magnitude spectrogram in dB, ``(bins, frames)``: 25 ms Hann windows (``n_fft`` the next power
    of two), hop a quarter window."""
    rate = sampling_rate or 16000
    n_fft = 2 ** math.ceil(math.log2(max(0.025 * rate, 16)))
    n_fft = min(n_fft, 2 ** int(math.log2(max(wave.numel(), 2))))  # clips shorter than one window
    spec = torch.stft(wave, n_fft, hop_length=max(n_fft // 4, 1), window=torch.hann_window(n_fft), return_complex=True)
    return 20 * spec.abs().clamp(min=1e-10).log10()


def draw_input(ax: Any, module: Any, example: Any, title: str = "") -> None:
    """Draws an example (a collated batch of one) on ``ax``: the un-normalised image (a video's middle frame) with
    any text as caption, the log-spectrogram of a clip, the decoded text, or the input's keys and shapes."""
    ax.set_xticks([])
    ax.set_yticks([])
    caption = _text(module, example) if "input_ids" in example else ""
    if "pixel_values" in example:
        pixels = example["pixel_values"][0]
        if pixels.ndim == 4:  # (frames, C, H, W)
            pixels = pixels[pixels.shape[0] // 2]
        image = _image(module, pixels).numpy()
        ax.imshow(image[..., 0] if image.shape[-1] == 1 else image, cmap="gray" if image.shape[-1] == 1 else None)
    elif "input_values" in example:
        values = example["input_values"]
        features = log_spectrogram(_wave(example), getattr(module, "sampling_rate", None)) if values.ndim == 2 else values[0]
        ax.imshow(features.float().cpu().reshape(-1, features.shape[-1]).numpy(), origin="lower", aspect="auto",
                  cmap="magma")
        ax.set_xlabel("frames")
        ax.set_ylabel("frequency bins")
    else:
        text = caption or describe_input(module, example)
        caption = ""
        ax.text(0.02, 0.98, textwrap.fill(text[:600], 48), va="top", ha="left", fontsize=8, transform=ax.transAxes)
    if caption:
        ax.set_xlabel(textwrap.fill(caption[:200], 48), fontsize=7)
    ax.set_title(title, fontsize=8)


def mistakes_figure(module: Any, mistakes: Sequence[Mistake], examples: Sequence[Any], label_names: Sequence[str],
                    total: int) -> Any:
    """A grid of the mistakes with their inputs, titled with the true label, the prediction and its probability."""
    import matplotlib.pyplot as plt

    if not mistakes:
        figure, ax = plt.subplots(figsize=(4, 1.5))
        ax.axis("off")
        ax.text(0.5, 0.5, f"no mistakes among {total} examples", ha="center", va="center")
        return figure
    cols = min(4, len(mistakes))
    rows = math.ceil(len(mistakes) / cols)
    figure, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 3.4 * rows), squeeze=False)
    for ax in axes.flat[len(mistakes):]:
        ax.axis("off")
    for ax, mistake, example in zip(axes.flat, mistakes, examples):
        title = (f"true: {label_names[mistake.label]}\npredicted: {label_names[mistake.predicted]} "
                 f"(p={mistake.probability:.2f})")
        draw_input(ax, module, example, title)
    figure.tight_layout()
    return figure


# --- the files ----------------------------------------------------------------------------------------------------
def write_error_report(module: Any, predictions: Predictions, fetch: Callable[[int], Any], folder: str | Path,
                       top_k: int) -> dict[str, Path]:
    """Writes ``confusion.png``, ``confusion.csv`` (counts), ``per_class.csv``, ``mistakes.png`` and ``mistakes.csv``
    into ``folder``.

    Args:
        module: The classifier (label names, tokenizer, normalisation).
        predictions: The split's probabilities, labels and dataset indices.
        fetch: Dataset index -> that example as a collated batch of one (to draw the mistakes).
        folder: Where the files go.
        top_k: How many of the most confident mistakes to show.

    Returns:
        The paths by name: ``confusion``, ``confusion_csv``, ``per_class``, ``mistakes``, ``mistakes_csv``.
    """
    if top_k < 1:
        raise PtftError(f"the number of mistakes to show must be >= 1, got {top_k}")
    folder = Path(folder)
    names = list(module.label_names)
    probs, labels = predictions.probs, predictions.labels
    paths = {"confusion": save_figure(confusion_figure(probs, labels, names), folder / "confusion.png")}
    scores = class_scores(probs, labels)
    rows = [[name, round(float(scores["precision"][i]), 6), round(float(scores["recall"][i]), 6),
             round(float(scores["f1"][i]), 6), int(scores["support"][i])] for i, name in enumerate(names)]
    counts = [[name, *map(int, scores["confusion"][i])] for i, name in enumerate(names)]
    paths["confusion_csv"] = write_csv(folder / "confusion.csv", ["true \\ predicted", *names], counts)
    paths["per_class"] = write_csv(folder / "per_class.csv", ["class", "precision", "recall", "f1", "support"], rows)
    mistakes = top_mistakes(probs, labels, top_k)
    examples = [fetch(int(predictions.indices[m.position])) for m in mistakes]
    figure = mistakes_figure(module, mistakes, examples, names, len(labels))
    paths["mistakes"] = save_figure(figure, folder / "mistakes.png")
    mistake_rows = [[int(predictions.indices[m.position]), names[m.label], names[m.predicted], round(m.probability, 6),
                     describe_input(module, example)] for m, example in zip(mistakes, examples)]
    paths["mistakes_csv"] = write_csv(folder / "mistakes.csv", ["index", "label", "predicted", "probability", "input"],
                                      mistake_rows)
    return paths


def error_files(module: Any, loader: DataLoader, folder: str | Path, num_samples: int | None) -> list[Path]:
    """The ``errors`` split method: every example of ``loader`` scored, ``num_samples`` most confident mistakes shown
    (``None`` or 0: 16).

    Writes ``confusion.png`` (counts, row-normalised, per-class bars), ``confusion.csv`` (counts), ``per_class.csv`` (precision, recall, F1,
    support), ``mistakes.png`` and ``mistakes.csv`` (dataset index, label, prediction, probability, the input).
    """
    predictions = collect_predictions(module, loader)
    paths = write_error_report(module, predictions, lambda index: fetch_example(loader, index), folder,
                               num_samples or 16)
    return list(paths.values())
