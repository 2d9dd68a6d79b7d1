"""AdaptBatchNorm: BatchNorm statistics re-estimated on a shifted test / predict set, then restored; 2 ranks = 1."""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import pytest
import torch
from helpers import trainer
from torch import nn
from torch.utils.data import DataLoader

from ptft.core import AdaptBatchNorm, PtftError


def two_blobs(n: int, seed: int, scale: float = 1.0, offset: float = 0.0) -> list[dict[str, torch.Tensor]]:
    """``n`` examples ``(2, 4, 4)``: channel 0 is +-1 (the label's sign) plus noise, channel 1 noise; then x*scale+offset."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % 2
    x = 0.3 * torch.randn(n, 2, 4, 4, generator=g)
    x[:, 0] += (2 * labels - 1).float()[:, None, None]
    return [{"x": xi * scale + offset, "label": yi} for xi, yi in zip(x, labels)]


class BlobNet(L.LightningModule):
    """Dropout(p=1) -> BatchNorm2d -> spatial mean -> fixed linear map: the label is the sign of normalised channel 0.

    Its BatchNorm starts with the statistics of the unshifted blobs (mean 0, variance 1 per channel, nearly); the
    dropout zeroes everything in training mode, so adapting with the whole module in train mode would be caught.
    """

    def __init__(self, record: Path | None = None) -> None:
        super().__init__()
        self.drop = nn.Dropout(p=1.0)
        self.bn = nn.BatchNorm2d(2)
        self.head = nn.Linear(2, 2, bias=False)
        with torch.no_grad():
            self.head.weight.copy_(torch.tensor([[-1.0, 0.0], [1.0, 0.0]]))
        self.record = record
        self.adapt_calls = 0
        self.scored = 0

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        if self.bn.training:
            self.adapt_calls += 1
            assert not self.training and not self.drop.training  # only BatchNorm in train mode
        return self.head(self.bn(self.drop(batch["x"])).mean((2, 3)))

    def test_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        if batch_idx == 0 and self.record is not None:
            stats = {"mean": self.bn.running_mean.tolist(), "var": self.bn.running_var.tolist()}
            (self.record / f"rank{self.global_rank}.json").write_text(json.dumps(stats))
        self.scored += len(batch["label"])
        acc = (self(batch).argmax(-1) == batch["label"]).float().mean()
        self.log("test/acc", acc, batch_size=len(batch["label"]), sync_dist=True)

    def predict_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        return self(batch).argmax(-1)


def loader(examples, batch_size: int = 8, **kwargs) -> DataLoader:
    return DataLoader(examples, batch_size=batch_size, **kwargs)


@pytest.mark.parametrize("workers", [{}, {"num_workers": 1, "persistent_workers": True}], ids=["main", "persistent"])
def test_adapted_statistics_score_a_shifted_set_then_are_restored(tmp_path, workers):
    shifted = two_blobs(64, seed=0, scale=3.0, offset=5.0)
    model = BlobNet()
    assert trainer(tmp_path).test(model, loader(shifted), verbose=False)[0]["test/acc"] < 0.6  # training statistics
    before = {k: v.clone() for k, v in model.bn.state_dict().items()}

    model.record, model.scored = tmp_path, 0
    adapted = trainer(tmp_path, callbacks=[AdaptBatchNorm()]).test(model, loader(shifted, **workers), verbose=False)
    assert adapted[0]["test/acc"] > 0.95
    assert model.adapt_calls == 8  # 64 examples / 8, each seen once
    assert model.scored == 64  # and the test itself still scores every batch
    seen = json.loads((tmp_path / "rank0.json").read_text())  # the statistics the test set was scored with
    x = torch.stack([e["x"] for e in shifted])
    assert seen["mean"] == pytest.approx(x.mean((0, 2, 3)).tolist(), abs=1e-5)  # equal batches: the set's mean
    for name, value in model.bn.state_dict().items():  # the trained statistics are back, momentum too
        assert torch.equal(value, before[name]), name
    assert model.bn.momentum == 0.1 and model.bn.training == model.training


def test_predict_adapts_and_max_batches_limits_the_estimate(tmp_path):
    shifted = two_blobs(64, seed=1, scale=3.0, offset=5.0)
    labels = torch.stack([e["label"] for e in shifted])
    model = BlobNet()
    plain = torch.cat(trainer(tmp_path).predict(model, loader(shifted)))
    adapted = torch.cat(trainer(tmp_path, callbacks=[AdaptBatchNorm(max_batches=2)]).predict(model, loader(shifted)))
    assert (plain == labels).float().mean() < 0.6 < 0.95 < (adapted == labels).float().mean()
    assert model.adapt_calls == 2
    only_test = trainer(tmp_path, callbacks=[AdaptBatchNorm(stages=["test"])]).predict(model, loader(shifted))
    assert torch.equal(torch.cat(only_test), plain) and model.adapt_calls == 2


def test_one_line_errors(tmp_path):
    class NoBatchNorm(BlobNet):
        def __init__(self) -> None:
            super().__init__()
            self.bn = nn.Identity()

    with pytest.raises(PtftError, match="no BatchNorm layer"):
        trainer(tmp_path, callbacks=[AdaptBatchNorm()]).test(NoBatchNorm(), loader(two_blobs(8, 0)), verbose=False)
    with pytest.raises(PtftError, match="stages must be test and/or predict"):
        AdaptBatchNorm(stages=["fit"])
    with pytest.raises(PtftError, match="max_batches"):
        AdaptBatchNorm(max_batches=0)


def test_two_processes_adapt_to_the_statistics_of_one(tmp_path):
    """Batches of one example: each rank averages its half of the examples, the ranks' averages are averaged."""
    shifted = two_blobs(16, seed=2, scale=2.0, offset=-3.0)
    stats = {}
    for name, kwargs in {"one": {}, "two": {"devices": 2, "strategy": "ddp_fork"}}.items():
        folder = tmp_path / name
        folder.mkdir()
        trainer(folder, callbacks=[AdaptBatchNorm()], **kwargs).test(BlobNet(folder), loader(shifted, 1), verbose=False)
        stats[name] = [json.loads(p.read_text()) for p in sorted(folder.glob("rank*.json"))]
    (one,) = stats["one"]
    assert len(stats["two"]) == 2
    x = torch.stack([e["x"] for e in shifted])
    assert one["mean"] == pytest.approx(x.mean((0, 2, 3)).tolist(), abs=1e-5)
    for rank in stats["two"]:
        assert rank["mean"] == pytest.approx(one["mean"], abs=1e-5)
        assert rank["var"] == pytest.approx(one["var"], rel=1e-5)


def test_a_failing_adaptation_leaves_the_trained_statistics(tmp_path):
    class Breaks(BlobNet):
        def forward(self, batch):
            if self.bn.training and self.adapt_calls == 2:
                raise RuntimeError("bad batch")
            return super().forward(batch)

    model = Breaks()
    before = {k: v.clone() for k, v in model.bn.state_dict().items()}
    with pytest.raises(RuntimeError, match="bad batch"):
        trainer(tmp_path, callbacks=[AdaptBatchNorm()]).test(model, loader(two_blobs(32, 0, 3.0, 5.0)), verbose=False)
    for name, value in model.bn.state_dict().items():
        assert torch.equal(value, before[name]), name
    assert model.bn.momentum == 0.1
