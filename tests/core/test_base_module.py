"""The base module: evaluation losses synced over ranks, per-rank random states in checkpoints, hyperparameters from
the constructor's arguments, the epoch-metric hook, and optimizer / weight-decay choices that must not fall back
silently."""

from __future__ import annotations

import inspect
import random
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import sentiment_rows, write_csv
from helpers import trainer
from torch import nn

from ptft.core import OptimizerConfig, PtftError, build_optimizer
from ptft.core.module import constructor_arguments
from ptft.core.rng import rng_states
from ptft.core.optim import _use_fused
from ptft.text import TextClassificationDataModule, TextClassifier

LABELS = ["negative", "positive"]


def test_ddp_validation_loss_is_the_mean_over_every_rank(tiny_bert, tmp_path):
    """Without ``sync_dist`` each rank logs the mean of its own half: rank 0's value is not the epoch's loss, and ranks
    could pick different best checkpoints or cut the learning rate at different epochs."""
    val = write_csv(tmp_path / "val.csv", sentiment_rows(16, seed=5))
    data = TextClassificationDataModule(val_file=val, labels=LABELS, batch_size=4, max_length=16)
    model = TextClassifier(tiny_bert, num_labels=2, label_names=LABELS)
    data.connect(model)
    single = trainer(tmp_path).validate(model, data, verbose=False)[0]
    ddp = trainer(tmp_path, devices=2, strategy="ddp_spawn").validate(model, data, verbose=False)[0]
    # The two ranks' halves differ, so a per-rank mean would miss the whole-set value.
    assert ddp["val/loss"] == pytest.approx(single["val/loss"], abs=1e-5)
    assert ddp["val/acc"] == pytest.approx(single["val/acc"], abs=1e-6)


def test_rank_halves_really_differ(tiny_bert, tmp_path):
    """Guards the test above: the two ranks' halves (every other example) have different mean losses."""
    rows = sentiment_rows(16, seed=5)
    model = TextClassifier(tiny_bert, num_labels=2, label_names=LABELS)
    losses = []
    for rank in (0, 1):
        val = write_csv(tmp_path / f"half{rank}.csv", rows[rank::2])
        data = TextClassificationDataModule(val_file=val, labels=LABELS, batch_size=4, max_length=16)
        data.connect(model)
        losses.append(trainer(tmp_path).validate(model, data, verbose=False)[0]["val/loss"])
    assert abs(losses[0] - losses[1]) > 1e-3


def _module_with_rank(tiny_bert: str, rank: int) -> TextClassifier:
    module = TextClassifier(tiny_bert, num_labels=2, label_names=LABELS)
    module._trainer = SimpleNamespace(global_rank=rank, state=SimpleNamespace(fn="fit"))
    return module


def test_each_rank_resumes_its_own_random_streams(tiny_bert):
    torch.manual_seed(1), random.seed(1), np.random.seed(1)
    rank0 = rng_states()
    torch.manual_seed(2), random.seed(2), np.random.seed(2)
    rank1 = rng_states()
    checkpoint = {"rng_states": rank0, "rng_states_per_rank": [rank0, rank1], "hyper_parameters": {}}
    module = _module_with_rank(tiny_bert, rank=1)
    torch.manual_seed(99)
    module.on_load_checkpoint(checkpoint)
    torch.testing.assert_close(torch.get_rng_state(), rank1["torch"])
    assert random.getstate() == rank1["python"]
    expected = np.random.RandomState()
    expected.set_state(("MT19937", rank1["numpy"][0].numpy(), *rank1["numpy"][1:]))
    assert np.random.rand() == expected.rand()


def test_checkpoint_of_a_ddp_run_holds_every_ranks_random_states(tiny_bert, tmp_path):
    from lightning.pytorch.callbacks import ModelCheckpoint

    train = write_csv(tmp_path / "train.csv", sentiment_rows(16, seed=1))
    data = TextClassificationDataModule(train_file=train, val_file=train, labels=LABELS, batch_size=4, max_length=16)
    model = TextClassifier(tiny_bert, num_labels=2, label_names=LABELS)
    data.connect(model)
    folder = tmp_path / "checkpoints"
    trainer(tmp_path, devices=2, strategy="ddp_spawn", max_steps=1, limit_val_batches=1, enable_checkpointing=True,
            callbacks=[ModelCheckpoint(dirpath=folder)]).fit(model, data)
    (path,) = folder.glob("*.ckpt")
    checkpoint = torch.load(path, weights_only=True)
    per_rank = checkpoint["rng_states_per_rank"]
    assert len(per_rank) == 2 and all({"torch", "python", "numpy"} <= set(states) for states in per_rank)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="GPU only: CUDA random states")
def test_cuda_random_states_round_trip():
    torch.cuda.init()
    states = rng_states()
    assert len(states["cuda"]) == torch.cuda.device_count()
    expected = torch.rand(3, device="cuda")
    from ptft.core.rng import set_rng_states

    set_rng_states(states)
    torch.testing.assert_close(torch.rand(3, device="cuda"), expected)


def test_hyperparameters_are_the_constructor_arguments_with_inherited_defaults(tiny_bert):
    module = TextClassifier(tiny_bert, num_labels=3, label_names=["a", "b", "c"], label_smoothing=0.1)
    hp = module.hparams
    assert hp["model_name"] == tiny_bert and hp["num_labels"] == 3 and hp["label_names"] == ["a", "b", "c"]
    assert hp["label_smoothing"] == 0.1
    assert hp["l2_sp"] == 0.0 and hp["checkpoint_weights"] == "all"  # defaults of FineTuneModule, reached via **kwargs
    assert hp["optimizer"]["lr"] == OptimizerConfig().lr and isinstance(hp["optimizer"]["betas"], list)
    assert hp["pretrained"] is False  # a full checkpoint holds the weights


def test_cli_still_sees_every_inherited_argument():
    """Recording the constructor's arguments must leave the signature LightningCLI reads intact (--help, YAML keys):
    the shared optimizer options and the label fields reached through ``**kwargs``, and the docstrings."""
    from jsonargparse import ArgumentParser

    from ptft.text.sft import ChatFineTuner

    for cls in (TextClassifier, ChatFineTuner):
        parser = ArgumentParser()
        parser.add_class_arguments(cls, "model")
        keys = {action.dest for action in parser._actions}
        assert {"model.optimizer.lr", "model.scheduler.name", "model.l2_sp", "model.peft"} <= keys, cls
        assert ("model.num_labels" in keys) == (cls is TextClassifier)
    assert TextClassifier.__init__.__doc__ == inspect.unwrap(TextClassifier.__init__).__doc__
    assert constructor_arguments(TextClassifier, (), {})["label_smoothing"] == 0.0


def test_epoch_metrics_hook_logs_and_resets(tiny_bert):
    module = TextClassifier(tiny_bert, num_labels=2, label_names=LABELS)
    logged = {}
    module.log_dict = lambda values, **kw: logged.update(values)
    metric = module.metrics["val_"]
    metric.update(torch.tensor([[2.0, 0.0], [0.0, 2.0]]), torch.tensor([0, 0]))
    module.epoch_metrics = lambda stage: {f"{stage}/acc": metric.compute()["val/acc"]}
    module.on_validation_epoch_end()
    assert logged == {"val/acc": torch.tensor(0.5)}
    assert all(m.update_count == 0 for m in metric.values())  # reset after logging


def _fake_param(device: str) -> SimpleNamespace:
    return SimpleNamespace(device=torch.device(device), is_floating_point=lambda: True)


def test_fused_adagrad_only_on_cpu():
    """torch's fused Adagrad is CPU-only: on CUDA parameters it must not be turned on by default."""
    cuda = [{"params": [_fake_param("cuda")]}]
    assert _use_fused(cuda, OptimizerConfig(name="adamw"))
    assert not _use_fused(cuda, OptimizerConfig(name="adagrad"))
    assert _use_fused([{"params": [_fake_param("cpu")]}], OptimizerConfig(name="adagrad"))
    with pytest.raises(PtftError, match="no fused adagrad"):
        _use_fused(cuda, OptimizerConfig(name="adagrad", fused=True))
    with pytest.raises(PtftError, match="no fused rmsprop"):
        build_optimizer([{"params": [nn.Parameter(torch.zeros(2))]}], OptimizerConfig(name="rmsprop", fused=True))


def test_batch_size_counts_rows_of_a_tokenizers_batch_encoding():
    """A tokenizer's BatchEncoding is a UserDict, not a dict: its rows are counted, not the letters of a key (that
    made every text evaluation loss an unweighted mean of batch means)."""
    from transformers import BatchEncoding

    from ptft.core.module import FineTuneModule

    batch = BatchEncoding({"input_ids": torch.ones(5, 7, dtype=torch.long), "labels": torch.zeros(5)})
    assert FineTuneModule.batch_size_of(batch) == 5
    assert FineTuneModule.batch_size_of({"pixel_values": torch.ones(3, 1)}) == 3
