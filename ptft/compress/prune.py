"""Magnitude pruning of a fine-tuned backbone: during fine-tuning (a callback, so the weights left recover) or at once.

Only the weights of the backbone's ``Linear`` and convolution layers are pruned: the task head (few weights, all of
them decisive) and the embeddings (lookup tables, not matrix products) stay dense.

What sparsity buys: **unstructured** pruning (``l1_unstructured``, the default) zeroes single weights, keeps accuracy
best at a given sparsity, but the tensors stay dense: neither a safetensors file nor CPU latency shrinks (dense
kernels multiply the zeros too). Only a compressed or sparse storage shrinks the file (zip: roughly the kept
fraction, bench/compress.py measures it). **Structured** pruning (``ln_structured``) zeroes whole output rows /
channels, costs more accuracy at the same sparsity, and still needs the zero rows sliced away (not done here) before
the model itself is smaller or faster.
"""

from __future__ import annotations

from typing import Any, Literal

import torch.nn.utils.prune as torch_prune
from lightning.pytorch.callbacks import ModelPruning
from torch import nn

from ptft.core.errors import PtftError

PRUNED_LAYERS = (nn.Linear, nn.modules.conv._ConvNd)
Method = Literal["l1_unstructured", "ln_structured"]


def backbone_weights(module: nn.Module) -> list[tuple[nn.Module, str]]:
    """``(layer, "weight")`` of every ``Linear`` / convolution of ``module.model`` outside its task head.

    Args:
        module: A ptft :class:`~ptft.core.module.FineTuneModule` (its ``head_modules`` names the head).
    """
    model = getattr(module, "model", None)
    if not isinstance(model, nn.Module) or not hasattr(module, "head_modules"):
        raise PtftError(f"pruning needs a ptft module with a .model, got {type(module).__name__}")
    heads = tuple(module.head_modules(model))
    layers = [
        (layer, "weight") for name, layer in model.named_modules()
        if isinstance(layer, PRUNED_LAYERS) and not any(name == h or name.startswith(h + ".") for h in heads)
    ]
    if not layers:
        raise PtftError(f"{type(module).__name__} has no Linear or convolution layer outside its head to prune")
    return layers


def sparsity(module: nn.Module) -> float:
    """Fraction of zero weights among the weights pruning applies to (:func:`backbone_weights`).

    Reads the effective weights, so it counts masked weights during pruned training and zeros after pruning was made
    permanent alike.
    """
    weights = [getattr(layer, name).detach() for layer, name in backbone_weights(module)]
    zeros = sum(int((w == 0).sum()) for w in weights)
    return zeros / sum(w.numel() for w in weights)


def _method(structured: bool) -> dict[str, Any]:
    # Structured: whole output rows (Linear) / output channels (conv), ranked by their L2 norm.
    return {"pruning_fn": "ln_structured", "pruning_dim": 0, "pruning_norm": 2} if structured else {"pruning_fn": "l1_unstructured"}


def prune_module(module: nn.Module, amount: float, structured: bool = False, global_unstructured: bool = False) -> nn.Module:
    """Prunes ``module``'s backbone weights by magnitude at once, in place, made permanent (no masks remain).

    Args:
        module: A ptft module; its head and embeddings are left dense.
        amount: Fraction of weights (or rows / channels when ``structured``) to zero, in ``[0, 1)``.
        structured: Zero whole output rows / channels by L2 norm instead of single weights by magnitude.
        global_unstructured: Rank single weights across all pruned layers together (layers with small weights lose
            more); ``False`` prunes ``amount`` of every layer.

    Returns:
        ``module``, for chaining.
    """
    if not 0 <= amount < 1:
        raise PtftError(f"pruning amount must be in [0, 1), got {amount}")
    if structured and global_unstructured:
        raise PtftError("global pruning ranks single weights: use structured=False with global_unstructured=True")
    layers = backbone_weights(module)
    if global_unstructured:
        torch_prune.global_unstructured(layers, pruning_method=torch_prune.L1Unstructured, amount=amount)
    else:
        for layer, name in layers:
            if structured:
                torch_prune.ln_structured(layer, name, amount=amount, n=2, dim=0)
            else:
                torch_prune.l1_unstructured(layer, name, amount=amount)
    for layer, name in layers:
        torch_prune.remove(layer, name)
    return module


def cubic_schedule(target: float, epochs: int, epoch: int) -> float:
    """Sparsity after pruning at the start of ``epoch``: ``target * (1 - (1 - (epoch + 1) / epochs) ** 3)``, then
    ``target`` (Zhu & Gupta, 2017: large steps while the network has redundancy, small ones near the target)."""
    done = min(epoch + 1, epochs) / epochs
    return target * (1 - (1 - done) ** 3)


class Pruning(ModelPruning):
    """Lightning's :class:`~lightning.pytorch.callbacks.ModelPruning` with ptft's defaults: magnitude pruning of the
    backbone's ``Linear`` / convolution weights (head and embeddings stay dense), reaching ``amount`` over the first
    ``epochs`` epochs, the pruned network fine-tuned in between and after (recovery).

    Pruning happens at the **start** of an epoch (ModelPruning's default is its end), so every pruning step is followed
    by training: with ``epochs: 1`` a one-epoch run (or ``max_steps`` within one epoch) prunes once, then recovers.
    Training runs with torch's masks (pruned weights stay zero); checkpoints hold the masked weights under the plain
    names (ModelPruning's ``make_pruning_permanent``), so they load into the unpruned module class like any other
    (``load_checkpoint``, ``ptft export``). A resumed run re-creates the masks from the saved zeros.

    Unstructured sparsity shrinks neither a dense file nor CPU latency: see :mod:`ptft.compress.prune`.

    Args:
        amount: Target fraction of pruned weights (``l1_unstructured``) or output rows / channels
            (``ln_structured``) in every pruned layer.
        epochs: Epochs over which the target is reached (cubic schedule, :func:`cubic_schedule`); training at the
            target sparsity continues for the remaining epochs.
        method: ``l1_unstructured`` (single weights by magnitude: the best accuracy at a given sparsity) or
            ``ln_structured`` (whole rows / channels by L2 norm: removable, but costs more accuracy).
        global_unstructured: Rank single weights across all pruned layers together instead of per layer.
        verbose: ModelPruning's logging of the sparsity after each step (0, 1, or 2 for every layer).
    """

    def __init__(
        self,
        amount: float = 0.5,
        epochs: int = 2,
        method: Method = "l1_unstructured",
        global_unstructured: bool = False,
        verbose: int = 0,
    ) -> None:
        if not 0 < amount < 1:
            raise PtftError(f"Pruning amount must be in (0, 1), got {amount}")
        if epochs < 1:
            raise PtftError(f"Pruning epochs must be >= 1, got {epochs}")
        if method not in ("l1_unstructured", "ln_structured"):
            raise PtftError(f"Pruning method must be 'l1_unstructured' or 'ln_structured', got {method!r}")
        if method == "ln_structured" and global_unstructured:
            raise PtftError("global_unstructured ranks single weights: use it with method l1_unstructured")
        self.target = amount
        self.epochs = epochs
        self._applied = 0.0
        super().__init__(
            **_method(method == "ln_structured"),
            amount=self.sparsity_at,  # cumulative sparsity per epoch; on_train_epoch_start turns it into steps
            parameter_names=["weight"],
            use_global_unstructured=global_unstructured,
            make_pruning_permanent=True,  # checkpoints must load into the plain module: never saved with masks
            use_lottery_ticket_hypothesis=False,  # its default keeps a deep copy of every pruned layer, unused here
            verbose=verbose,
        )

    def sparsity_at(self, epoch: int) -> float:
        """The sparsity the pruned layers have once epoch ``epoch`` starts."""
        return cubic_schedule(self.target, self.epochs, epoch)

    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        self._backbone = {id(layer) for layer, _ in backbone_weights(pl_module)}
        super().setup(trainer, pl_module, stage)

    def filter_parameters_to_prune(self, parameters_to_prune: Any = ()) -> Any:
        return [(layer, name) for layer, name in parameters_to_prune if id(layer) in self._backbone]

    def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
        self._applied = 0.0  # no masks yet (a resumed run's zeros are found again by magnitude)

    def on_train_epoch_start(self, trainer: Any, pl_module: Any) -> None:
        goal = self.sparsity_at(trainer.current_epoch)
        if goal <= self._applied:
            return
        # torch's pruning of a masked tensor takes ``amount`` of the weights still unpruned.
        self.apply_pruning(1 - (1 - goal) / (1 - self._applied))
        self._applied = goal

    def on_train_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        """Nothing: pruning happens at epoch starts."""

    def on_validation_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        """Nothing: pruning happens at epoch starts."""

