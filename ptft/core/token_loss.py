"""Token-level losses (language modelling, SFT) averaged over every token of an optimizer step, on every rank.

A Hugging Face language model returns the mean loss over the tokens of *its* batch. Lightning's gradient accumulation
then averages those means over micro-batches, and DDP over ranks: a micro-batch of 10 tokens weighs as much as one of
1,000, so the step is not the step of the whole batch. transformers' Trainer fixes this by dividing token sums by
``num_items_in_batch`` (the tokens of the whole accumulated batch, summed across devices with
``average_tokens_across_devices``). Lightning has no such hook, so :class:`TokenMeanLoss` does the same in three
places: ``training_step`` returns the micro-batch's token *sum*, counts its tokens, and ``on_before_optimizer_step``
(after the last backward and DDP's gradient all-reduce, before clipping) multiplies the gradients by
``world_size * accumulate_grad_batches / tokens of the step on all ranks``, which undoes Lightning's division by
``accumulate_grad_batches`` and DDP's averaging. The gradient is then that of the mean over every token of the step.
"""

from __future__ import annotations

from typing import Any

import torch
from torchmetrics import MeanMetric


class Perplexity(MeanMetric):
    """``exp`` of the token-weighted mean negative log-likelihood: ``update(mean_loss, weight=tokens)`` per batch.

    ptft's own rather than ``torchmetrics.text.Perplexity``: that one takes the logits and runs a softmax over the
    vocabulary a second time; the model has already computed the loss, and its mean weighted by the batch's tokens is
    all perplexity needs. Its states are two sums, so it syncs across processes exactly.
    """

    def compute(self) -> torch.Tensor:
        return super().compute().exp()


class TokenMeanLoss:
    """Mixin for a :class:`ptft.core.FineTuneModule` whose ``step`` loss is a mean over tokens (LM, SFT).

    The subclass says how many tokens its loss averages with :meth:`loss_tokens`. Training gradients then average
    over every token of the optimizer step (all accumulated micro-batches, all ranks), as one batch holding them all
    would give; ``{stage}/loss`` is logged as the token-weighted mean, so ``val/loss`` is the mean negative
    log-likelihood per token of the whole validation set (and ``log`` of the perplexity). The L1 / L2-SP penalty is
    added to the gradients once per optimizer step, unscaled (it does not depend on tokens).
    """

    _step_tokens: torch.Tensor | None = None

    def loss_tokens(self, batch: dict[str, Any]) -> int:
        """How many tokens the model's loss on ``batch`` averages over (labels other than -100, after any shift)."""
        raise NotImplementedError

    def _token_step(self, batch: dict[str, Any], stage: str) -> tuple[torch.Tensor, int]:
        loss, outputs = self.step(batch, stage)
        tokens = self.loss_tokens(batch)
        if tokens:
            # Weighted by tokens: the epoch value is the mean over every token, on every rank (sync_dist). A float
            # count: Lightning 2.6 averages an integer count across ranks with floor division (23 tokens -> 11).
            self.log(f"{stage}/loss", loss, prog_bar=stage != "test", batch_size=float(tokens), sync_dist=stage != "train")
        self.update_metrics(stage, outputs, batch)
        return loss, tokens

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        loss, tokens = self._token_step(batch, "train")
        count = torch.tensor(float(tokens), device=self.device)
        self._step_tokens = count if self._step_tokens is None else self._step_tokens + count
        if not tokens:
            # The model's mean over no tokens is NaN; a zero that reaches every trainable parameter keeps DDP's
            # gradient all-reduce in step with the other ranks.
            return sum(p.view(-1)[0] for p in self.parameters() if p.requires_grad) * 0.0
        return loss * tokens

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._token_step(batch, "val")

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._token_step(batch, "test")

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        trainer = self.trainer
        tokens = self._step_tokens if self._step_tokens is not None else torch.zeros((), device=self.device)
        self._step_tokens = None
        tokens = trainer.strategy.reduce(tokens, reduce_op="sum")  # every rank's tokens of this step
        scale = trainer.world_size * trainer.accumulate_grad_batches / tokens.clamp(min=1.0)
        params = [p for group in optimizer.param_groups for p in group["params"] if p.requires_grad]
        grads = [p.grad for p in params if p.grad is not None]
        if grads:  # one fused multi-tensor kernel, not a Python loop of small kernels per parameter
            torch._foreach_mul_(grads, scale.to(grads[0].device))
        penalty = self.penalty()
        if penalty is not None:
            # The same on every rank and independent of tokens: its gradient is added once, after the rescaling.
            self.log("train/penalty", penalty.detach())
            for param, grad in zip(params, torch.autograd.grad(penalty, params, allow_unused=True)):
                if grad is not None:
                    param.grad = grad if param.grad is None else param.grad + grad
