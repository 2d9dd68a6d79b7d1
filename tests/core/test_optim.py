import math

import pytest
import torch
from torch import nn

from ptft.core.optim import (
    OptimizerConfig,
    SchedulerConfig,
    as_dict,
    build_optimizer,
    build_param_groups,
    build_scheduler,
)


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(10, 4)
        self.block = nn.Linear(4, 4)
        self.norm = nn.LayerNorm(4)
        self.head = nn.Linear(4, 2)


def layer_of(name: str) -> int:
    return {"embed": 0, "block": 1, "norm": 1, "head": 2}[name.split(".")[0]]


def by_name(groups):
    return {n: g for g in groups for n in g["names"]}


def test_no_weight_decay_for_biases_and_norms():
    groups = by_name(build_param_groups(Net().named_parameters(), lr=1e-3, weight_decay=0.1))
    assert groups["block.weight"]["weight_decay"] == 0.1
    assert groups["embed.weight"]["weight_decay"] == 0.1
    for name in ("block.bias", "norm.weight", "norm.bias", "head.bias"):
        assert groups[name]["weight_decay"] == 0.0, name


def test_layer_decay_writes_real_lr_per_group():
    groups = build_param_groups(Net().named_parameters(), lr=1e-3, weight_decay=0.0, layer_of=layer_of, layer_decay=0.5)
    lrs = {n: g["lr"] for g in groups for n in g["names"]}
    assert lrs["head.weight"] == pytest.approx(1e-3)
    assert lrs["block.weight"] == pytest.approx(1e-3 * 0.5)
    assert lrs["norm.bias"] == pytest.approx(1e-3 * 0.5)
    assert lrs["embed.weight"] == pytest.approx(1e-3 * 0.25)
    assert "lr_scale" not in groups[0]


def test_head_lr_and_frozen_params_left_out():
    net = Net()
    net.embed.weight.requires_grad_(False)
    groups = build_param_groups(net.named_parameters(), lr=1e-4, weight_decay=0.0, layer_of=layer_of, head_lr=1e-2)
    named = by_name(groups)
    assert "embed.weight" not in named
    assert named["head.weight"]["lr"] == 1e-2
    assert named["block.weight"]["lr"] == pytest.approx(1e-4)
    # every trainable parameter appears exactly once
    params = [p for g in groups for p in g["params"]]
    assert len(params) == len({id(p) for p in params}) == sum(p.requires_grad for p in net.parameters())


@pytest.mark.parametrize(
    ("name", "cls"),
    [("adamw", torch.optim.AdamW), ("adam", torch.optim.Adam), ("sgd", torch.optim.SGD),
     ("rmsprop", torch.optim.RMSprop), ("adagrad", torch.optim.Adagrad)],
)
def test_optimizers_keep_group_lrs(name, cls):
    groups = build_param_groups(Net().named_parameters(), lr=1e-3, weight_decay=0.01, layer_of=layer_of, layer_decay=0.5)
    opt = build_optimizer(groups, OptimizerConfig(name=name, lr=1e-3))
    assert isinstance(opt, cls)
    assert sorted({g["lr"] for g in opt.param_groups}) == pytest.approx([2.5e-4, 5e-4, 1e-3])


def make_opt():
    groups = build_param_groups(Net().named_parameters(), lr=1e-3, weight_decay=0.0, layer_of=layer_of, layer_decay=0.5)
    return build_optimizer(groups, OptimizerConfig(lr=1e-3))


def lrs_over(optimizer, scheduler, steps):
    history = []
    for _ in range(steps):
        history.append([g["lr"] for g in optimizer.param_groups])
        optimizer.step()
        scheduler.step()
    return history


@pytest.mark.parametrize("name", ["linear", "cosine", "constant"])
def test_warmup_schedules_scale_every_group_from_its_own_lr(name):
    opt = make_opt()
    peaks = [g["lr"] for g in opt.param_groups]
    cfg = SchedulerConfig(name=name, warmup_steps=4)
    sched = build_scheduler(opt, cfg, total_steps=20)
    assert sched["interval"] == "step"
    history = lrs_over(opt, sched["scheduler"], 20)
    assert history[0] == [0.0] * len(peaks)
    torch.testing.assert_close(history[2], [p * 2 / 4 for p in peaks])
    torch.testing.assert_close(history[4], peaks)
    if name == "linear":
        torch.testing.assert_close(history[12], [p * (20 - 12) / 16 for p in peaks])
    elif name == "cosine":
        torch.testing.assert_close(history[12], [p * 0.5 * (1 + math.cos(math.pi * 8 / 16)) for p in peaks])
    else:
        torch.testing.assert_close(history[12], peaks)


def test_warmup_ratio_counts_steps():
    opt = make_opt()
    sched = build_scheduler(opt, SchedulerConfig(name="linear", warmup_ratio=0.1), total_steps=100)
    history = lrs_over(opt, sched["scheduler"], 11)
    assert history[5][-1] == pytest.approx(1e-3 * 0.5)
    assert history[10][-1] == pytest.approx(1e-3)


def test_constant_without_warmup_is_no_scheduler():
    assert build_scheduler(make_opt(), SchedulerConfig(name="constant", warmup_ratio=0.0), total_steps=10) is None


def test_onecycle_peaks_at_each_groups_lr():
    opt = make_opt()
    peaks = [g["lr"] for g in opt.param_groups]
    sched = build_scheduler(opt, SchedulerConfig(name="onecycle", pct_start=0.5), total_steps=10)
    history = lrs_over(opt, sched["scheduler"], 10)
    torch.testing.assert_close(history[4], peaks)  # peak at step pct_start * total - 1
    assert all(h < p / 10 for h, p in zip(history[0], peaks))


def test_step_and_plateau():
    opt = make_opt()
    peaks = [g["lr"] for g in opt.param_groups]
    step = build_scheduler(opt, SchedulerConfig(name="step", step_size=2, gamma=0.5), total_steps=10)
    assert step["interval"] == "epoch"
    history = lrs_over(opt, step["scheduler"], 3)
    torch.testing.assert_close(history[2], [p * 0.5 for p in peaks])

    opt = make_opt()
    plateau = build_scheduler(opt, SchedulerConfig(name="plateau", patience=0, factor=0.5), total_steps=10)
    assert plateau["monitor"] == "val/loss"
    plateau["scheduler"].step(1.0)
    plateau["scheduler"].step(1.0)
    torch.testing.assert_close([g["lr"] for g in opt.param_groups], [p * 0.5 for p in peaks])


def test_configs_round_trip_through_plain_dicts():
    opt = OptimizerConfig(name="sgd", lr=0.1, betas=(0.8, 0.9))
    assert OptimizerConfig.coerce(as_dict(opt)) == opt
    sched = SchedulerConfig(name="cosine", warmup_steps=3)
    assert SchedulerConfig.coerce(as_dict(sched)) == sched
