"""Attention maps (method ``attention``): what a transformer looked at, for text and vision transformers.

Text (:class:`ptft.text.TextClassifier` on a Hugging Face encoder): per example a PNG with the text highlighted by
attention rollout into [CLS] (:func:`ptft.interpret.text.hf_attention_rollout`) above a heatmap of the last layer's
head-averaged attention, and an HTML page of the rollout. Images (:class:`ptft.vision.ImageClassifier` on a timm ViT):
:func:`ptft.interpret.vision.vit_attention_files`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import torch

from ptft.core.errors import PtftError
from ptft.interpret.common import class_probabilities, target_ids
from ptft.interpret.output import save_figure
from ptft.interpret.text import (
    FONT_SIZE,
    Token,
    WRAP_WIDTH,
    draw_highlighted,
    hf_attentions,
    highlighted_html,
    real_tokens,
    first_token_flow,
    text_height,
    titles,
    tokenizer_of,
    write_html,
)

__all__ = ["attention_files", "text_attention_files"]

#: Attention rollout is an amount, not a direction: one colour (blue) for every token.
ROLLOUT_COLOUR = (0.15, 0.35, 0.85)
#: The heatmap shows at most this many tokens per axis (the first ones): more would be unreadable.
MAX_HEATMAP_TOKENS = 64


def attention_files(
    module: Any, batch: dict[str, Any], targets: torch.Tensor | Sequence[int], folder: str | Path, first_index: int
) -> list[Path]:
    """Attention pictures of a transformer classifier, per example ``{index:04d}-attention.png`` (and ``.html`` for
    text): vision transformers through :func:`ptft.interpret.vision.vit_attention_files`, Hugging Face text encoders
    through :func:`text_attention_files`; any other module is refused."""
    from ptft.text import TextClassifier
    from ptft.vision import ImageClassifier

    if isinstance(module, ImageClassifier):
        from ptft.interpret.vision import vit_attention_files

        return vit_attention_files(module, batch, targets, folder, first_index)
    if isinstance(module, TextClassifier):
        return text_attention_files(module, batch, targets, folder, first_index)
    raise PtftError(
        f"method 'attention' explains transformers: ptft.text.TextClassifier (Hugging Face encoders) or "
        f"ptft.vision.ImageClassifier (timm ViTs), not {type(module).__name__}"
    )


def text_attention_files(
    module: Any, batch: dict[str, Any], targets: torch.Tensor | Sequence[int], folder: str | Path, first_index: int
) -> list[Path]:
    """Per example ``{index:04d}-attention.png`` (rollout-highlighted text above the last layer's head-averaged
    attention, at most :data:`MAX_HEATMAP_TOKENS` tokens a side) and ``{index:04d}-attention.html`` (the rollout),
    titled with the target class and its probability. Padding is left out."""
    ids = target_ids(targets, batch["input_ids"].shape[0], module.num_labels)
    mask = batch.get("attention_mask")
    mask = torch.ones_like(batch["input_ids"]) if mask is None else mask
    attentions = hf_attentions(module, batch)  # one forward pass for both pictures
    flow = first_token_flow(attentions, mask)
    last = attentions[-1].mean(dim=1).cpu()
    heads = titles(module, class_probabilities(module, batch), ids, "attention rollout")
    paths: list[Path] = []
    for i, (tokens, scores) in enumerate(real_tokens(tokenizer_of(module), batch, flow)):
        stem = Path(folder) / f"{first_index + i:04d}-attention"
        note = "attention rollout into the first token (Abnar & Zuidema, 2020); darker: more attention"
        page = highlighted_html(tokens, scores, heads[i], note, ROLLOUT_COLOUR)
        paths.append(write_html(stem.with_suffix(".html"), page))
        keep = mask[i].cpu().bool()
        figure = attention_figure(tokens, scores, last[i][keep][:, keep], heads[i])
        paths.append(save_figure(figure, stem.with_suffix(".png")))
    return paths


def attention_figure(tokens: list[Token], scores: list[float], matrix: torch.Tensor, title: str) -> Any:
    """The text highlighted by ``scores`` (the rollout) above a heatmap of ``matrix`` (query rows, key columns)."""
    import matplotlib.pyplot as plt

    shown = min(len(tokens), MAX_HEATMAP_TOKENS)
    text_h, heat_h = text_height(tokens), min(max(0.16 * shown, 3.0), 9.0)
    figure = plt.figure(figsize=(WRAP_WIDTH / 72, text_h + heat_h + 0.8))
    grid = figure.add_gridspec(2, 1, height_ratios=[text_h, heat_h], hspace=0.35)
    text_ax, heat_ax = figure.add_subplot(grid[0]), figure.add_subplot(grid[1])
    draw_highlighted(text_ax, tokens, scores, ROLLOUT_COLOUR)
    text_ax.set_title(title, loc="left", fontsize=FONT_SIZE + 1)
    labels = [text for text, _ in tokens[:shown]]
    image = heat_ax.imshow(matrix[:shown, :shown].numpy(), cmap="viridis", vmin=0.0)
    size = max(4.0, min(8.0, 400 / max(shown, 1)))
    heat_ax.set_xticks(range(shown), labels, rotation=90, fontsize=size)
    heat_ax.set_yticks(range(shown), labels, fontsize=size)
    cut = "" if shown == len(tokens) else f" (first {shown} of {len(tokens)} tokens)"
    heat_ax.set_title(f"last layer attention, mean over heads{cut}; row attends to column", fontsize=FONT_SIZE - 1)
    figure.colorbar(image, ax=heat_ax, fraction=0.046, pad=0.02)
    return figure
