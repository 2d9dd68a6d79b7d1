"""Token-weighted losses: an accumulated (and a 2-process) step has the gradient of one batch holding every token."""

from __future__ import annotations

import math
from pathlib import Path

import lightning as L
import pytest
import torch
from helpers import trainer

from ptft.core.optim import OptimizerConfig, SchedulerConfig
from ptft.text import ChatFineTuner, LanguageModel

GPT2 = {"model_type": "gpt2", "vocab_size": 50, "n_positions": 32, "n_embd": 16, "n_layer": 2, "n_head": 2,
        "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0, "bos_token_id": 0, "eos_token_id": 0}


class SaveGradients(L.Callback):
    """Writes the gradient of the (single, plain SGD with lr 1) optimizer step: the weights' change, on rank 0."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.start: dict[str, torch.Tensor] = {}

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.start = {n: p.detach().clone() for n, p in pl_module.model.named_parameters()}

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.global_rank == 0:
            torch.save({n: self.start[n] - p.detach() for n, p in pl_module.model.named_parameters()}, self.path)


def batch(lengths: list[int], width: int, seed: int) -> dict[str, torch.Tensor]:
    """Right-padded rows of ``lengths`` random tokens; labels are the tokens, -100 on padding."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.zeros(len(lengths), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, n in enumerate(lengths):
        ids[row, :n] = torch.randint(1, 50, (n,), generator=g)
        mask[row, :n] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}


def concatenate(batches: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    width = max(b["input_ids"].shape[1] for b in batches)

    def pad(t: torch.Tensor, value: int) -> torch.Tensor:
        return torch.nn.functional.pad(t, (0, width - t.shape[1]), value=value)

    return {k: torch.cat([pad(b[k], -100 if k == "labels" else 0) for b in batches]) for k in batches[0]}


def module(kind: str, **kwargs) -> L.LightningModule:
    torch.manual_seed(0)
    shared = dict(model_config=GPT2, optimizer=OptimizerConfig(name="sgd", lr=1.0, momentum=0.0, weight_decay=0.0),
                  scheduler=SchedulerConfig(name="constant", warmup_ratio=0.0), **kwargs)
    if kind == "lm":
        return LanguageModel("unused", objective="clm", **shared)
    return ChatFineTuner("unused", num_samples=0, **shared)


def step_gradients(kind: str, batches: list[dict], tmp_path: Path, name: str, **trainer_args) -> dict[str, torch.Tensor]:
    path = tmp_path / f"{name}.pt"
    loader = torch.utils.data.DataLoader(batches, batch_size=None)
    fit = trainer(tmp_path, max_steps=1, limit_val_batches=0, callbacks=[SaveGradients(path)], **trainer_args)
    fit.fit(module(kind, l1=1e-3), train_dataloaders=loader)
    return torch.load(path, weights_only=True)


# 2 short rows (5 predicted tokens) then 2 long ones (48): a mean of micro-batch means weighs 5 tokens as much as 48.
SHORT, LONG = batch([2, 5], 5, seed=1), batch([24, 26], 26, seed=2)


@pytest.mark.parametrize("kind", ["lm", "sft"])
def test_accumulated_step_equals_the_step_of_the_whole_batch(kind, tmp_path):
    accumulated = step_gradients(kind, [SHORT, LONG], tmp_path, "accumulated", accumulate_grad_batches=2)
    whole = step_gradients(kind, [concatenate([SHORT, LONG])], tmp_path, "whole")
    assert accumulated.keys() == whole.keys() and all(g.abs().sum() > 0 for g in whole.values())
    for key in whole:
        torch.testing.assert_close(accumulated[key], whole[key], rtol=1e-4, atol=1e-7, msg=key)


def test_two_processes_step_as_one_batch_of_all_their_tokens(tmp_path):
    """2 ranks x 2 accumulated micro-batches of different sizes == one process on one batch of all 4."""
    batches = [SHORT, LONG, batch([3], 3, seed=3), batch([20, 9, 14], 20, seed=4)]  # rank 0: 0, 2; rank 1: 1, 3
    ddp = step_gradients("lm", batches, tmp_path, "ddp", accumulate_grad_batches=2, devices=2, strategy="ddp_fork")
    whole = step_gradients("lm", [concatenate(batches)], tmp_path, "whole")
    for key in whole:
        torch.testing.assert_close(ddp[key], whole[key], rtol=1e-4, atol=1e-7, msg=key)


def test_logged_losses_are_per_token_means(tmp_path):
    """``train/loss`` stays the micro-batch's mean per token (not the sum the gradient comes from)."""
    model = module("lm")
    with torch.no_grad():
        expected = model(SHORT).loss.item()
    fit = trainer(tmp_path, max_steps=1, limit_val_batches=0)
    fit.fit(model, train_dataloaders=torch.utils.data.DataLoader([SHORT], batch_size=None))
    assert fit.callback_metrics["train/loss"].item() == pytest.approx(expected, rel=1e-5)
    assert not math.isnan(expected) and expected > 1.0
