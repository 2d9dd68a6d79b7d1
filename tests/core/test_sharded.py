"""Sharded checkpoint folders become one checkpoint: ``read_checkpoint``, ``load_checkpoint`` and ``ptft export``.

The folder is written here in one process, in the layout Lightning's ``FSDPStrategy(state_dict_type="sharded")``
writes: ``torch.distributed.checkpoint`` files holding ``{"model": ..., "optimizer_0": ...}`` and ``meta.pt`` with the
rest of the checkpoint. tests/test_ddp_recipes.py consolidates folders that a 2-process FSDP run wrote.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers import trainer

from ptft.core.errors import PtftError
from ptft.core.module import load_checkpoint, read_checkpoint
from ptft.text import TextClassificationDataModule, TextClassifier


@pytest.fixture
def checkpoints(tiny_bert, text_files, tmp_path) -> tuple[Path, Path]:
    """A ptft checkpoint after one training step, as a file and as an FSDP-style sharded folder."""
    import torch.distributed.checkpoint as dcp

    torch.manual_seed(0)
    model = TextClassifier(tiny_bert, num_labels=2, label_names=["negative", "positive"])
    data = TextClassificationDataModule(train_file=text_files["train"], val_file=text_files["val"], batch_size=8)
    fit = trainer(tmp_path, max_steps=1, limit_val_batches=1)
    fit.fit(model, data)
    file = tmp_path / "one.ckpt"
    fit.save_checkpoint(file)
    checkpoint = torch.load(file, weights_only=True)
    folder = tmp_path / "sharded.ckpt"
    shards = {"model": checkpoint.pop("state_dict")}
    shards.update({f"optimizer_{i}": s for i, s in enumerate(checkpoint.pop("optimizer_states"))})
    dcp.save(shards, checkpoint_id=folder, no_dist=True)
    torch.save(checkpoint, folder / "meta.pt")
    return file, folder


def test_sharded_folder_reads_as_the_file(checkpoints):
    file, folder = checkpoints
    expected, consolidated = read_checkpoint(str(file)), read_checkpoint(str(folder))
    assert consolidated.keys() >= expected.keys() - {"optimizer_states"}
    assert consolidated["hyper_parameters"] == expected["hyper_parameters"]
    assert consolidated["state_dict"].keys() == expected["state_dict"].keys()
    for key, value in expected["state_dict"].items():
        torch.testing.assert_close(consolidated["state_dict"][key], value, rtol=0, atol=0)


def test_sharded_folder_loads_and_exports(checkpoints, tmp_path):
    from transformers import AutoModelForSequenceClassification

    from ptft.cli import export

    file, folder = checkpoints
    module = load_checkpoint(str(folder))
    assert isinstance(module, TextClassifier)
    expected = read_checkpoint(str(file))["state_dict"]
    for key, value in module.state_dict().items():
        torch.testing.assert_close(value, expected[key], rtol=0, atol=0)
    export([str(folder), str(tmp_path / "out")])
    exported = AutoModelForSequenceClassification.from_pretrained(tmp_path / "out").state_dict()
    assert exported
    for key, value in exported.items():
        torch.testing.assert_close(value, expected[f"model.{key}"], rtol=0, atol=0)


def test_folder_that_is_no_sharded_checkpoint_is_one_line(tmp_path):
    (tmp_path / "plain").mkdir()
    with pytest.raises(PtftError, match="is a folder but not a sharded checkpoint"):
        read_checkpoint(str(tmp_path / "plain"))
    with pytest.raises(PtftError, match="does not exist"):
        read_checkpoint(str(tmp_path / "missing.ckpt"))
