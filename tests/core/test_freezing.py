"""Freezing schedules: what trains when, resume, schedulers, BatchNorm, DDP, torch.compile (PITFALLS.md)."""


import lightning as L
import pytest
import torch
from helpers import RecordLrs, SaveRankWeights, changed, trainer, weights
from lightning.pytorch.callbacks import ModelCheckpoint

from ptft.core import (
    BitFit,
    FreezeSchedule,
    FreezeUnfreeze,
    GradualUnfreeze,
    LinearProbe,
    OptimizerConfig,
    SchedulerConfig,
)
from ptft.core.errors import PtftError
from ptft.text import TextClassificationDataModule, TextClassifier
from ptft.vision import ImageClassificationDataModule, ImageClassifier


def text_setup(tiny_bert, text_files, batch_size=16, **model_kwargs):
    L.seed_everything(0)
    model = TextClassifier(tiny_bert, num_labels=2, **model_kwargs)
    data = TextClassificationDataModule(train_file=text_files["train"], val_file=text_files["val"], batch_size=batch_size)
    data.connect(model)
    return model, data


def block_of(name: str) -> str:
    """bert.encoder.layer.1.x -> 'layer.1'; embeddings / pooler / classifier otherwise."""
    parts = name.split(".")
    if "layer" in parts:
        return "layer." + parts[parts.index("layer") + 1]
    return next(p for p in ("embeddings", "pooler", "classifier") if p in name)


# --- the schedule itself --------------------------------------------------------------------------------------
def schedule(cb: FreezeSchedule, top: int = 4) -> FreezeSchedule:
    cb._top = top
    return cb


def test_depth_follows_each_option():
    assert schedule(FreezeSchedule()).depth(0, 0) == 5
    probe = schedule(LinearProbe())
    assert [probe.depth(e, 0) for e in range(4)] == [1, 1, 1, 1]
    fu = schedule(FreezeUnfreeze(unfreeze_at_epoch=2))
    assert [fu.depth(e, 0) for e in range(4)] == [1, 1, 5, 5]
    by_step = schedule(FreezeSchedule(train_layers=1, unfreeze_at_step=10))
    assert (by_step.depth(0, 9), by_step.depth(0, 10)) == (1, 5)
    gradual = schedule(GradualUnfreeze(every_n_epochs=2))
    assert [gradual.depth(e, 0) for e in range(12)] == [1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 5, 5]
    milestones = schedule(FreezeSchedule(train_layers=2, unfreeze_milestones=[1, 3], layers_per_unfreeze=2))
    assert [milestones.depth(e, 0) for e in range(5)] == [2, 4, 4, 5, 5]


def test_bad_arguments():
    with pytest.raises(PtftError):
        FreezeSchedule(train_layers=0)
    with pytest.raises(PtftError):
        GradualUnfreeze(every_n_epochs=0)


# --- what trains ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("callback", "expected"),
    [
        (LinearProbe(), {"classifier"}),
        (FreezeSchedule(train_layers=2), {"classifier", "layer.1", "pooler"}),
        (FreezeSchedule(freeze=["bert.embeddings.*", "bert.encoder.layer.0.*"]), {"classifier", "layer.1", "pooler"}),
    ],
    ids=["linear-probe", "top-2", "name-patterns"],
)
def test_frozen_parameters_never_change(callback, expected, tiny_bert, text_files, tmp_path):
    model, data = text_setup(tiny_bert, text_files)
    before = weights(model.model)
    trainer(tmp_path, max_epochs=1, callbacks=[callback]).fit(model, data)
    after = weights(model.model)
    trained = {block_of(n) for n in changed(before, after) if "position_ids" not in n}
    assert trained == expected


def test_bitfit_trains_biases_and_head_only(tiny_bert, text_files, tmp_path):
    model, data = text_setup(tiny_bert, text_files)
    before = weights(model.model)
    trainer(tmp_path, max_epochs=1, callbacks=[BitFit()]).fit(model, data)
    trained = changed(before, weights(model.model))
    assert trained and all(n.endswith("bias") or n.startswith("classifier") for n in trained)
    assert any(n.startswith("bert.encoder") for n in trained)


def test_frozen_parameters_stay_out_of_the_optimizer_unless_they_unfreeze_later(tiny_bert, text_files, tmp_path):
    model, data = text_setup(tiny_bert, text_files)
    t = trainer(tmp_path, max_steps=1, callbacks=[LinearProbe()])
    t.fit(model, data)
    optimized = {id(p) for g in t.optimizers[0].param_groups for p in g["params"]}
    assert optimized == {id(p) for p in model.model.classifier.parameters()}

    model, data = text_setup(tiny_bert, text_files)
    t = trainer(tmp_path, max_steps=1, callbacks=[GradualUnfreeze()])
    t.fit(model, data)
    assert sum(len(g["params"]) for g in t.optimizers[0].param_groups) == len(list(model.model.parameters()))


def test_gradual_unfreezing_goes_top_down(tiny_bert, text_files, tmp_path):
    model, data = text_setup(tiny_bert, text_files)

    class Snapshot(L.Callback):
        def __init__(self):
            self.trained = []
            self.before = None

        def on_train_epoch_start(self, trainer, pl_module):
            self.before = weights(pl_module.model)

        def on_train_epoch_end(self, trainer, pl_module):
            self.trained.append({block_of(n) for n in changed(self.before, weights(pl_module.model))})

    snap = Snapshot()
    trainer(tmp_path, max_epochs=4, callbacks=[GradualUnfreeze(every_n_epochs=1), snap]).fit(model, data)
    assert snap.trained == [
        {"classifier"},
        {"classifier", "layer.1", "pooler"},
        {"classifier", "layer.1", "pooler", "layer.0"},
        {"classifier", "layer.1", "pooler", "layer.0", "embeddings"},
    ]


# --- proof (a): resume before, at and after the unfreeze milestone ------------------------------------------------
def test_resume_around_unfreeze_equals_uninterrupted_run(tiny_bert, text_files, tmp_path):
    """Lightning's BaseFinetuning re-freezes or crashes here (pytorch-lightning#6891, #8502, #21901)."""

    def run(root, ckpt_path=None, save=False):
        model, data = text_setup(tiny_bert, text_files)  # dropout active: the RNG stream must resume too
        callbacks = [FreezeUnfreeze(unfreeze_at_epoch=2)]
        if save:
            callbacks.append(ModelCheckpoint(dirpath=root, filename="{epoch}", save_top_k=-1, every_n_epochs=1))
        t = trainer(root, max_epochs=4, callbacks=callbacks, enable_checkpointing=save)
        t.fit(model, data, ckpt_path=ckpt_path)
        return weights(model.model)

    reference = run(tmp_path / "full", save=True)
    for epoch in (0, 1, 2):  # resume into epochs 1 (before), 2 (the unfreeze) and 3 (after)
        resumed = run(tmp_path / f"from{epoch}", ckpt_path=tmp_path / "full" / f"epoch={epoch}.ckpt")
        assert changed(reference, resumed, atol=1e-6) == set(), f"resumed after epoch {epoch}"
    # the backbone did train after the milestone
    model, _ = text_setup(tiny_bert, text_files)
    assert "bert.encoder.layer.0.output.dense.weight" in changed(weights(model.model), reference)


# --- proof (c): every scheduler drives the groups unfrozen later -------------------------------------------------
@pytest.mark.parametrize("name", ["onecycle", "plateau", "cosine", "linear"])
def test_unfrozen_groups_receive_the_scheduled_lr(name, tiny_bert, text_files, tmp_path):
    opt = OptimizerConfig(lr=1e-3, layer_decay=0.5, weight_decay=0.0)
    sched = SchedulerConfig(name=name, warmup_steps=2, patience=0, factor=0.5, pct_start=0.3)
    model, data = text_setup(tiny_bert, text_files, optimizer=opt, scheduler=sched)
    record = RecordLrs()
    trainer(tmp_path, max_epochs=3, callbacks=[FreezeUnfreeze(unfreeze_at_epoch=1), record]).fit(model, data)

    groups = model.param_groups()
    initial = [g["lr"] for g in groups]
    steps_per_epoch, total = 6, 18
    assert len(record.lrs) == total
    # frozen in epoch 0, updated from the first step of epoch 1 on
    embeddings = next(i for i, g in enumerate(groups) if g["layer"] == 0)
    assert [u[embeddings] for u in record.updated] == [False] * steps_per_epoch + [True] * (total - steps_per_epoch)
    # at every step every group sits at the same point of the schedule, from its own layer-decayed lr
    for lrs in record.lrs:
        factors = [lr / init for lr, init in zip(lrs, initial)]
        torch.testing.assert_close(factors, [factors[0]] * len(factors))
    # and that point is the scheduler's own
    reference_opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    if name == "onecycle":
        ref = torch.optim.lr_scheduler.OneCycleLR(reference_opt, max_lr=1.0, total_steps=total, pct_start=0.3)
    elif name == "plateau":
        ref = None
    else:
        from transformers import get_scheduler

        ref = get_scheduler(name, reference_opt, num_warmup_steps=2, num_training_steps=total)
    factors = [lrs[0] / initial[0] for lrs in record.lrs]
    if ref is not None:
        expected = []
        for _ in range(total):
            expected.append(reference_opt.param_groups[0]["lr"])
            reference_opt.step()
            ref.step()
        torch.testing.assert_close(factors, expected)
    else:  # plateau: epoch-level decay, shared by every group
        assert set(factors[:steps_per_epoch]) == {1.0}
        assert all(f in (1.0, 0.5, 0.25) for f in factors)


# --- BatchNorm ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("freeze_bn", "backbone_bn_training"), [("frozen", False), ("none", True), ("all", False)])
def test_frozen_batchnorm_stays_in_eval_mode_only_when_asked(freeze_bn, backbone_bn_training, image_dirs, tmp_path):
    L.seed_everything(0)
    model = ImageClassifier("test_resnet", num_labels=3, pretrained=False)
    data = ImageClassificationDataModule(train=image_dirs["train"], image_size=32, batch_size=8, num_workers=0)
    data.connect(model)
    seen = []

    class Probe(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            seen.append(pl_module.model.bn1.training)

    bn = model.model.bn1
    running = bn.running_mean.clone()
    trainer(tmp_path, max_epochs=2, limit_val_batches=1, callbacks=[LinearProbe(freeze_bn=freeze_bn), Probe()]).fit(model, data)
    assert set(seen) == {backbone_bn_training}
    assert torch.equal(bn.running_mean, running) != backbone_bn_training


# --- proof (b): DDP, 2 processes on CPU ----------------------------------------------------------------------------
@pytest.mark.parametrize("callback", [FreezeUnfreeze(unfreeze_at_epoch=1), GradualUnfreeze(every_n_epochs=1)],
                         ids=["freeze-unfreeze", "gradual"])
def test_ddp_replicas_unfreeze_together(callback, tiny_bert, text_files, tmp_path):
    """BackboneFinetuning under DDP leaves replicas apart (pytorch-lightning#20340)."""
    model, data = text_setup(tiny_bert, text_files, batch_size=8)
    initial = weights(model.model)
    ddp = trainer(tmp_path, max_epochs=3, devices=2, strategy="ddp_spawn", callbacks=[callback, SaveRankWeights(str(tmp_path))])
    assert not ddp.strategy._ddp_kwargs.get("find_unused_parameters", False)
    ddp.fit(model, data)
    rank0 = torch.load(tmp_path / "rank0.pt", weights_only=True)
    rank1 = torch.load(tmp_path / "rank1.pt", weights_only=True)
    assert changed(rank0, rank1, atol=1e-6) == set()  # replicas agree

    single, data = text_setup(tiny_bert, text_files, batch_size=16)
    trainer(tmp_path / "single", max_epochs=3, callbacks=[type(callback)(**_args(callback))]).fit(single, data)
    assert changed(initial, rank0) == changed(initial, weights(single.model))  # the same parameters trained


def _args(callback):
    if isinstance(callback, FreezeUnfreeze):
        return {"unfreeze_at_epoch": callback.unfreeze_at_epoch}
    return {"every_n_epochs": callback.unfreeze_every_n_epochs}


# --- proof (d): torch.compile then unfreeze ------------------------------------------------------------------------
def test_compiled_model_trains_layers_unfrozen_later(image_dirs, tmp_path):
    """Toggling requires_grad under torch.compile can leave a stale graph (pytorch/pytorch#139476)."""
    L.seed_everything(0)
    model = ImageClassifier("test_resnet", num_labels=3, pretrained=False, compile="aot_eager")
    data = ImageClassificationDataModule(train=image_dirs["train"], image_size=32, batch_size=8, num_workers=0)
    data.connect(model)
    before = weights(model.model)
    callback = FreezeUnfreeze(unfreeze_at_epoch=1)

    class Snapshot(L.Callback):
        def on_train_epoch_end(self, trainer, pl_module):
            if trainer.current_epoch == 0:
                self.after_probe = weights(pl_module.model)

    snap = Snapshot()
    trainer(tmp_path, max_epochs=2, limit_val_batches=1, callbacks=[callback, snap]).fit(model, data)
    assert callback.mask_gradients  # compiled: requires_grad never switched
    assert changed(before, snap.after_probe) == {"fc.weight", "fc.bias"}  # probe: head only, backbone BN frozen
    assert "conv1.0.weight" in changed(snap.after_probe, weights(model.model))  # the stem trained after unfreezing
