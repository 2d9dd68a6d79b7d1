"""Why a text classifier decided as it did: integrated gradients (Captum), SHAP, attention rollout, and the pictures
and pages that show them as highlighted text.

Every method explains a :class:`ptft.text.TextClassifier` (``module.model`` a Hugging Face
``AutoModelForSequenceClassification`` or a ptft :class:`~ptft.text.heads.EncoderWithHead`). Scores are per token of
the model's tokenizer: word pieces are shown as the tokens they are (``##`` / ``▁`` / ``Ġ`` markers dropped and
pieces of one word drawn without a space between them, each in its own colour), never merged into words, so what
is shown is exactly what the model scored. Green supports the explained class, red speaks against it; the deeper the
colour, the larger the score relative to the example's largest.
"""

from __future__ import annotations

import html
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch
from torch import nn

from ptft.core.errors import PtftError
from ptft.interpret.common import class_probabilities, explaining, rollout, target_ids
from ptft.interpret.output import save_figure

__all__ = [
    "integrated_gradients",
    "integrated_gradients_files",
    "shap_values",
    "shap_files",
    "hf_attention_rollout",
    "rollout",
    "attention_maps",
    "display_tokens",
    "highlighted_html",
    "draw_highlighted",
    "highlighted_png",
]

#: The tokenizer's tensors a text classifier's model takes, in the order Captum passes them.
MODEL_INPUTS = ("input_ids", "attention_mask", "token_type_ids")
#: A token as displayed (its text, whether it starts a word) and a colour (RGB in 0-1).
Token = tuple[str, bool]
RGB = tuple[float, float, float]
#: Colours of supporting / opposing tokens.
POSITIVE = (0.10, 0.62, 0.15)
NEGATIVE = (0.85, 0.12, 0.12)
#: Highlighted-text pictures: font size and line height in points, lines wrapped at this width.
FONT_SIZE = 11.0
LINE_HEIGHT = 2.0 * FONT_SIZE
WRAP_WIDTH = 560.0


# --- what is explained ----------------------------------------------------------------------------------------------
def check_text_classifier(module: Any, method: str) -> None:
    """A one-line error unless ``module`` is a :class:`ptft.text.TextClassifier`."""
    from ptft.text import TextClassifier

    if not isinstance(module, TextClassifier):
        raise PtftError(f"method {method!r} explains ptft.text.TextClassifier models, not {type(module).__name__}")


def hf_model(module: Any) -> nn.Module:
    """The Hugging Face model inside ``module.model`` (the encoder of an ``EncoderWithHead``)."""
    from ptft.text.heads import EncoderWithHead

    model = module.model
    return model.encoder if isinstance(model, EncoderWithHead) else model


def model_inputs(batch: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The batch's tokenizer tensors: what the model takes (no labels, no document ids)."""
    if "input_ids" not in batch:
        raise PtftError("text explanations need batches of token ids ('input_ids'); got keys " + str(sorted(batch)))
    return {k: batch[k] for k in MODEL_INPUTS if batch.get(k) is not None}


def tokenizer_of(module: Any) -> Any:
    """The module's tokenizer (the data module's, else the model folder's); a one-line error without one."""
    tokenizer = module.find_processor()
    tokenizer = getattr(tokenizer, "tokenizer", tokenizer)  # a multimodal processor wraps its tokenizer
    if tokenizer is None or not hasattr(tokenizer, "convert_ids_to_tokens"):
        raise PtftError(f"no tokenizer found for {module.model_name!r}: set data.init_args.tokenizer when training")
    return tokenizer


def titles(module: Any, probs: torch.Tensor, targets: list[int], method: str) -> list[str]:
    """``"<method>: <class> (p = 0.93)"`` per example."""
    names = module.label_names
    return [f"{method}: {names[t]} (p = {probs[i, t]:.2f})" for i, t in enumerate(targets)]


# --- integrated gradients -------------------------------------------------------------------------------------------
def baseline_ids(input_ids: torch.Tensor, tokenizer: Any, baseline: str) -> torch.Tensor:
    """The reference input: every token replaced by the ``baseline`` token (``pad``, ``mask`` or ``unk``) except the
    framing tokens ([CLS], [SEP], <s>, </s>), which stay themselves, as in Captum's BERT tutorial: the attribution
    then measures the words, not the presence of the sentence frame."""
    token_id = getattr(tokenizer, f"{baseline}_token_id", None)
    if token_id is None:
        raise PtftError(f"baseline {baseline!r}: the tokenizer has no {baseline} token; use 'pad', 'mask' or 'unk'")
    frame = [getattr(tokenizer, f"{name}_token_id", None) for name in ("cls", "sep", "bos", "eos")]
    frame_ids = torch.tensor([i for i in frame if i is not None and i != token_id], device=input_ids.device)
    keep = torch.isin(input_ids, frame_ids)
    return torch.where(keep, input_ids, torch.full_like(input_ids, token_id))


def integrated_gradients(
    module: Any,
    batch: dict[str, Any],
    targets: torch.Tensor | Sequence[int],
    n_steps: int = 50,
    baseline: str = "pad",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Integrated gradients of the target logits with respect to the token embeddings (Sundararajan et al., 2017).

    Captum's ``LayerIntegratedGradients`` on the model's input embedding layer (``get_input_embeddings()``): the
    path runs from the baseline sentence's word embeddings to the real ones, position and segment embeddings stay.

    Args:
        module: A :class:`ptft.text.TextClassifier`.
        batch: A collated batch (``input_ids``, ``attention_mask``, optional ``token_type_ids``).
        targets: The class to explain, one per example.
        n_steps: Integration steps (Gauss-Legendre); more steps, smaller convergence delta.
        baseline: The token real tokens are replaced by in the reference input (``pad``, ``mask`` or ``unk``);
            [CLS] / [SEP] stay themselves (see :func:`baseline_ids`).

    Returns:
        ``(batch, tokens)`` attributions (summed over the embedding dimension; padding 0) and the ``(batch,)``
        convergence delta: the attributions' sum minus the change of the target logit from baseline to input.
    """
    from captum.attr import LayerIntegratedGradients

    check_text_classifier(module, "ig")
    inputs = model_inputs(batch)
    keys = list(inputs)
    ids = target_ids(targets, inputs["input_ids"].shape[0], module.num_labels)
    reference = baseline_ids(inputs["input_ids"], tokenizer_of(module), baseline)

    def forward(input_ids: torch.Tensor, *others: torch.Tensor) -> torch.Tensor:
        return module(dict(zip(keys, (input_ids, *others))))

    with explaining(module):
        explainer = LayerIntegratedGradients(forward, hf_model(module).get_input_embeddings())
        attributions, delta = explainer.attribute(
            inputs["input_ids"], baselines=reference, target=ids, n_steps=n_steps,
            additional_forward_args=tuple(inputs[k] for k in keys[1:]), return_convergence_delta=True,
            internal_batch_size=len(ids),  # one batch-sized pass per step, not n_steps x batch at once
        )
    mask = inputs.get("attention_mask", torch.ones_like(inputs["input_ids"]))
    return (attributions.sum(dim=-1) * mask).detach(), delta.detach()


def integrated_gradients_files(
    module: Any, batch: dict[str, Any], targets: torch.Tensor | Sequence[int], folder: str | Path, first_index: int
) -> list[Path]:
    """Per example ``{index:04d}-ig.html`` and ``{index:04d}-ig.png``: the text with each token highlighted by its
    integrated-gradients attribution (:func:`integrated_gradients`, pad baseline), titled with the target class and
    its probability. Padding is left out; [CLS] / [SEP] are shown (their attribution is 0 by construction)."""
    ids = target_ids(targets, batch["input_ids"].shape[0], module.num_labels)
    attributions, delta = integrated_gradients(module, batch, ids)
    probs = class_probabilities(module, batch)
    tokenizer = tokenizer_of(module)
    heads = titles(module, probs, ids, "integrated gradients")
    paths: list[Path] = []
    for i, (tokens, scores) in enumerate(real_tokens(tokenizer, batch, attributions)):
        note = f"convergence delta {delta[i].item():.2g}; green supports the class, red speaks against it"
        stem = Path(folder) / f"{first_index + i:04d}-ig"
        paths.append(write_html(stem.with_suffix(".html"), highlighted_html(tokens, scores, heads[i], note)))
        paths.append(highlighted_png(tokens, scores, heads[i], stem.with_suffix(".png")))
    return paths


def real_tokens(tokenizer: Any, batch: dict[str, Any], scores: torch.Tensor) -> list[tuple[list[Token], list[float]]]:
    """Per example the displayed tokens (:func:`display_tokens`) and their scores, padding left out."""
    ids = batch["input_ids"].cpu()
    mask = batch.get("attention_mask")
    mask = torch.ones_like(ids, dtype=torch.bool) if mask is None else mask.cpu().bool()
    out = []
    for row, keep, values in zip(ids, mask, scores.detach().float().cpu()):
        out.append((display_tokens(tokenizer.convert_ids_to_tokens(row[keep].tolist())), values[keep].tolist()))
    return out


# --- SHAP -----------------------------------------------------------------------------------------------------------
def shap_values(
    module: Any, batch: dict[str, Any], targets: torch.Tensor | Sequence[int], max_evals: int = 200
) -> list[tuple[list[str], list[float], str]]:
    """SHAP values of the target class probability per token, with the ``shap`` library's partition explainer.

    The batch's sentences are decoded back to text; ``shap.maskers.Text`` masks them token by token (hierarchically,
    so ``max_evals`` model calls per sentence suffice) and each masked text is re-tokenised and scored. Single texts
    only: a sentence pair would be decoded into one text.

    Returns:
        Per example the masker's text pieces (with their whitespace), their SHAP values for the target, and the
        ``shap.plots.text`` HTML.
    """
    import numpy as np
    import shap

    check_text_classifier(module, "shap")
    if batch.get("token_type_ids") is not None and bool((batch["token_type_ids"] > 0).any()):
        raise PtftError("method 'shap' explains single texts; for sentence pairs use 'ig'")
    ids = target_ids(targets, batch["input_ids"].shape[0], module.num_labels)
    tokenizer = tokenizer_of(module)
    texts = tokenizer.batch_decode(batch["input_ids"], skip_special_tokens=True)
    device = batch["input_ids"].device

    def predict(strings: Any) -> np.ndarray:
        encoded = tokenizer(list(strings), padding=True, truncation=True, return_tensors="pt")
        inputs = {k: v.to(device) for k, v in encoded.items() if k in MODEL_INPUTS}
        with torch.no_grad():
            return module(inputs).float().softmax(dim=-1).cpu().numpy()

    with explaining(module):
        explainer = shap.Explainer(predict, shap.maskers.Text(tokenizer), output_names=module.label_names,
                                   algorithm="partition")
        explanation = explainer(texts, max_evals=max_evals, silent=True)
    out = []
    for i, target in enumerate(ids):
        one = explanation[i, :, target]
        page = shap.plots.text(one, display=False)
        out.append(([str(p) for p in one.data], [float(v) for v in one.values], page))
    return out


def shap_files(
    module: Any, batch: dict[str, Any], targets: torch.Tensor | Sequence[int], folder: str | Path, first_index: int,
    max_evals: int = 200,
) -> list[Path]:
    """Per example ``{index:04d}-shap.html`` (shap's own interactive text plot: its scripts are inline, the page
    works offline) and ``{index:04d}-shap.png`` (the text highlighted by SHAP value, as :func:`highlighted_png`), titled
    with the target class and its probability. Needs ``shap`` (``pip install 'ptft[interpret]'``); text only."""
    check_text_classifier(module, "shap")
    ids = target_ids(targets, batch["input_ids"].shape[0], module.num_labels)
    heads = titles(module, class_probabilities(module, batch), ids, "SHAP")
    paths: list[Path] = []
    for i, (pieces, values, page) in enumerate(shap_values(module, batch, ids, max_evals)):
        stem = Path(folder) / f"{first_index + i:04d}-shap"
        tokens, scores = shap_tokens(pieces, values)
        body = f"<h3>{html.escape(heads[i])}</h3>\n{page}"
        paths.append(write_html(stem.with_suffix(".html"), html_page(heads[i], body)))
        paths.append(highlighted_png(tokens, scores, heads[i], stem.with_suffix(".png")))
    return paths


def shap_tokens(pieces: list[str], values: list[float]) -> tuple[list[Token], list[float]]:
    """The masker's pieces (``"great "``, ``""`` for [CLS]) as displayed tokens: empty pieces dropped, a piece starts
    a word when whitespace separates it from the previous one."""
    tokens: list[Token] = []
    scores: list[float] = []
    space_before = True
    for piece, value in zip(pieces, values):
        if piece.strip():
            tokens.append((piece.strip(), space_before or piece[:1].isspace()))
            scores.append(value)
            space_before = piece[-1:].isspace()
    return tokens, scores


# --- attention ------------------------------------------------------------------------------------------------------
@contextmanager
def eager_attention(model: nn.Module) -> Iterator[None]:
    """Switches a transformers model to the ``eager`` attention implementation, the one that returns attention
    weights (``sdpa`` / flash kernels return none), and back to its own afterwards."""
    config = getattr(model, "config", None)
    original = getattr(config, "_attn_implementation", None)
    if original in (None, "eager"):
        yield
        return
    if not hasattr(model, "set_attn_implementation"):
        raise PtftError(f"{type(model).__name__} cannot switch to eager attention to return its attention weights")
    model.set_attn_implementation("eager")
    try:
        yield
    finally:
        model.set_attn_implementation(original)


def hf_attentions(module: Any, batch: dict[str, Any]) -> tuple[torch.Tensor, ...]:
    """The attention weights of every layer of a Hugging Face text encoder, each ``(batch, heads, tokens, tokens)``."""
    from ptft.core.hf import HFModule

    if not isinstance(module, HFModule):
        raise PtftError(f"attention maps need a Hugging Face transformer module, not {type(module).__name__}")
    model = hf_model(module)
    inputs = model_inputs(batch)
    with explaining(module), torch.no_grad(), eager_attention(model):
        out = model(**inputs, output_attentions=True)
    attentions = getattr(out, "attentions", None)
    if not attentions:
        raise PtftError(f"{type(model).__name__} returns no attention weights (output_attentions=True)")
    return tuple(a.float() for a in attentions)


def hf_attention_rollout(module: Any, batch: dict[str, Any], head_fusion: str = "mean") -> torch.Tensor:
    """Attention rollout (Abnar & Zuidema, 2020): how much each token flows into the first token ([CLS] / <s>).

    Per layer the heads are fused, the identity added (the residual connection) and rows renormalised; the layers'
    matrices are multiplied from the first to the last. Padding keys are masked before renormalising, so each row
    sums to 1 over the real tokens. The first token's row is returned: the token BERT-like encoders classify from
    (for decoder-only classifiers, which read the last token, this is not the classifying token).

    Returns:
        ``(batch, tokens)``: non-negative, summing to 1 over the real tokens, 0 on padding.
    """
    mask = batch.get("attention_mask")
    mask = torch.ones_like(batch["input_ids"]) if mask is None else mask
    return first_token_flow(hf_attentions(module, batch), mask, head_fusion)


def first_token_flow(attentions: Sequence[torch.Tensor], mask: torch.Tensor, head_fusion: str = "mean") -> torch.Tensor:
    """The first token's row of the rollout of ``attentions`` with padding keys masked: ``(batch, tokens)``."""
    return rollout(attentions, head_fusion, mask=mask)[:, 0] * mask.to(attentions[0].device, torch.float32)


def attention_maps(module: Any, batch: dict[str, Any]) -> torch.Tensor:
    """The last layer's attention, averaged over heads: ``(batch, tokens, tokens)``, row = query, column = key."""
    return hf_attentions(module, batch)[-1].mean(dim=1)


# --- highlighted text -----------------------------------------------------------------------------------------------
def display_tokens(tokens: list[str]) -> list[Token]:
    """Tokenizer tokens as ``(text, starts_word)``: WordPiece's ``##`` continuations and SentencePiece / byte-level
    BPE word-start markers (``▁``, ``Ġ``) become spacing instead of characters."""
    marked = any(t[:1] in ("▁", "Ġ") for t in tokens)
    out = []
    for token in tokens:
        if marked:  # SentencePiece / byte-level BPE: a marker starts a word, anything else continues one
            special = token.startswith("<") and token.endswith(">")
            out.append((token.lstrip("▁Ġ") or token, token[:1] in ("▁", "Ġ") or special))
        else:  # WordPiece
            continues = token.startswith("##") and len(token) > 2
            out.append((token[2:] if continues else token, not continues))
    return out


def colour(score: float, scale: float, positive: RGB = POSITIVE) -> tuple[float, float, float, float]:
    """RGBA of a score: ``positive`` / red by sign, opacity by its size relative to ``scale``."""
    strength = min(abs(score) / scale, 1.0) if scale > 0 else 0.0
    rgb = positive if score >= 0 else NEGATIVE
    return (*rgb, 0.85 * strength)


def highlighted_html(tokens: list[Token], scores: list[float], title: str, note: str = "",
                     positive: RGB = POSITIVE) -> str:
    """A page with the tokens highlighted by score (hover shows the value); text is HTML-escaped."""
    scale = max((abs(s) for s in scores), default=0.0)
    spans = []
    for (text, starts_word), score in zip(tokens, scores):
        r, g, b, a = colour(score, scale, positive)
        style = f"background: rgba({r * 255:.0f}, {g * 255:.0f}, {b * 255:.0f}, {a:.2f}); padding: 1px 0"
        spans.append(f'{" " if starts_word and spans else ""}<span style="{style}" title="{score:.3g}">'
                     f"{html.escape(text)}</span>")
    body = f"<h3>{html.escape(title)}</h3>\n<p style=\"line-height: 2\">{''.join(spans)}</p>\n"
    if note:
        body += f"<p style=\"color: #666\">{html.escape(note)}</p>\n"
    return html_page(title, body)


def html_page(title: str, body: str) -> str:
    return (f'<!doctype html>\n<html><head><meta charset="utf-8"><title>{html.escape(title)}</title></head>\n'
            f'<body style="font-family: sans-serif; max-width: 50em">\n{body}</body></html>\n')


def write_html(path: Path, page: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(page, encoding="utf-8")
    return path


def layout(tokens: list[Token], width: float = WRAP_WIDTH) -> tuple[list[tuple[float, int]], int]:
    """Each token's ``(x, line)`` in points when the text is wrapped at ``width`` points, and the number of lines.

    Widths are measured from the glyph outlines (``TextPath``) before anything is drawn, so the figure can be sized to
    the text: matplotlib has no wrapping text with per-word backgrounds of its own.
    """
    from matplotlib.textpath import TextPath

    space = 0.35 * FONT_SIZE
    x, line, places = 0.0, 0, []
    for text, starts_word in tokens:
        advance = TextPath((0, 0), text, size=FONT_SIZE).get_extents().x1 + 0.3 * FONT_SIZE if text.strip() else space
        gap = space if starts_word and x > 0 else 0.0
        if x + gap + advance > width and x > 0:
            x, line, gap = 0.0, line + 1, 0.0
        places.append((x + gap, line))
        x += gap + advance
    return places, (line + 1 if tokens else 1)


def draw_highlighted(ax: Any, tokens: list[Token], scores: list[float],
                     positive: RGB = POSITIVE) -> None:
    """Draws the tokens, wrapped, from the top-left corner of ``ax`` (axes hidden), each on a box coloured by its
    score. Size the axes to :func:`layout`'s lines times :data:`LINE_HEIGHT` points."""
    scale = max((abs(s) for s in scores), default=0.0)
    places, _ = layout(tokens)
    ax.set_axis_off()
    for (text, _), score, (x, line) in zip(tokens, scores, places):
        ax.annotate(text, xy=(0, 1), xycoords="axes fraction", xytext=(x, -line * LINE_HEIGHT - 4),
                    textcoords="offset points", ha="left", va="top", fontsize=FONT_SIZE, annotation_clip=False,
                    bbox={"boxstyle": "square,pad=0.15", "facecolor": colour(score, scale, positive),
                          "edgecolor": "none"})


def text_height(tokens: list[Token]) -> float:
    """Height in inches of :func:`draw_highlighted`'s text."""
    return (layout(tokens)[1] * LINE_HEIGHT + 8) / 72


def highlighted_png(tokens: list[Token], scores: list[float], title: str, path: str | Path,
                    positive: RGB = POSITIVE) -> Path:
    """The tokens highlighted by score as a PNG (lines wrapped), titled ``title``."""
    import matplotlib.pyplot as plt

    figure, ax = plt.subplots(figsize=(WRAP_WIDTH / 72, text_height(tokens)))
    draw_highlighted(ax, tokens, scores, positive)
    ax.set_title(title, loc="left", fontsize=FONT_SIZE + 1)
    return save_figure(figure, path)
