"""precision: auto — the decision from a measurement, its cache, one choice for every rank; and bf16 that learns."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from ptft.core import precision
from ptft.core.precision import ENV, choose_precision, measure_bf16_speedup, probe_layers


@pytest.fixture(autouse=True)
def isolated(monkeypatch, tmp_path):
    monkeypatch.setenv("PTFT_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv(ENV, raising=False)


def _fake_speed(monkeypatch, speedup: float) -> list[int]:
    calls = []

    def measured(layers, device, repeats=3):
        calls.append(len(layers))
        return speedup

    monkeypatch.setattr(precision, "measure_bf16_speedup", measured)
    return calls


@pytest.mark.parametrize(("speedup", "expected"), [(1.85, "bf16-mixed"), (1.06, "32-true"), (0.2, "32-true")])
def test_choice_follows_the_measured_speedup(monkeypatch, speedup, expected):
    _fake_speed(monkeypatch, speedup)
    choice = choose_precision(nn.Linear(16, 16), accelerator="cpu")
    assert choice.precision == expected and choice.speedup == speedup
    assert f"{speedup:.2f}x" in choice.reason


def test_measured_once_per_machine_and_shapes(monkeypatch):
    calls = _fake_speed(monkeypatch, 2.0)
    first = choose_precision(nn.Linear(16, 32), accelerator="cpu")
    monkeypatch.delenv(ENV)
    assert choose_precision(nn.Linear(16, 32), accelerator="cpu") == first and len(calls) == 1  # cached
    monkeypatch.delenv(ENV)
    choose_precision(nn.Linear(64, 32), accelerator="cpu")  # other shapes: measured again
    assert len(calls) == 2


def test_processes_started_later_inherit_the_choice(monkeypatch):
    """DDP ranks re-run the command: they take the launching process's choice instead of measuring again."""
    calls = _fake_speed(monkeypatch, 2.0)
    choice = choose_precision(None, accelerator="cpu", cache=False)
    assert json.loads(precision.os.environ[ENV])["precision"] == "bf16-mixed"
    _fake_speed(monkeypatch, 0.5)
    assert choose_precision(None, accelerator="cpu", cache=False) == choice and calls == [2]


def test_probe_layers_are_the_models_largest():
    model = nn.Sequential(nn.Linear(8, 8), nn.Linear(32, 128), nn.Conv2d(3, 16, 3), nn.Linear(32, 128))
    layers = probe_layers(model)
    assert [type(m).__name__ for m in layers] == ["Linear", "Conv2d", "Linear"]
    assert (layers[0].in_features, layers[0].out_features) == (32, 128)


def test_speedup_is_measured_for_real():
    ratio = measure_bf16_speedup([nn.Linear(32, 32)], torch.device("cpu"), repeats=1)
    assert ratio > 0 and ratio != 1.0


def _train(tmp_path, tiny_bert, text_files, precision_name: str) -> tuple[float, list[torch.dtype]]:
    import lightning as L
    from helpers import trainer

    from ptft.core import OptimizerConfig
    from ptft.text import TextClassificationDataModule, TextClassifier

    class Dtypes(L.Callback):
        seen: list[torch.dtype] = []

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            self.seen.append(outputs["loss"].dtype)

    L.seed_everything(0)
    model = TextClassifier(tiny_bert, head="attention", optimizer=OptimizerConfig(lr=1e-2))
    data = TextClassificationDataModule(train_file=text_files["train"], val_file=text_files["val"], batch_size=16,
                                        max_length=32)
    data.connect(model)
    model.num_labels, model.label_names = data.num_labels, data.label_names
    dtypes = Dtypes()
    run = trainer(tmp_path, max_epochs=8, deterministic=False, precision=precision_name, callbacks=[dtypes])
    run.fit(model, data)
    assert all(p.dtype == torch.float32 for p in model.parameters())  # weights, optimizer state, checkpoints in fp32
    assert all(s["exp_avg"].dtype == torch.float32 for s in run.optimizers[0].state.values())
    return float(run.callback_metrics["val/acc"]), dtypes.seen


def test_bf16_mixed_learns_as_fp32(tmp_path, tiny_bert, text_files):
    """CPU bf16 autocast: the loss stays fp32 and the tiny model (attention head: a softmax) learns the synthetic task as
    in fp32, within 0.1 accuracy."""
    fp32, _ = _train(tmp_path / "fp32", tiny_bert, text_files, "32-true")
    bf16, loss_dtypes = _train(tmp_path / "bf16", tiny_bert, text_files, "bf16-mixed")
    assert fp32 >= 0.9  # the task is learnt at all (chance: 0.5)
    assert bf16 >= fp32 - 0.1
    assert set(loss_dtypes) == {torch.float32}


@pytest.mark.parametrize(("asked", "speedup", "expected"),
                         [("auto", 2.0, "bf16-mixed"), ("auto", 0.3, "32-true"), ("32-true", 2.0, "32-true")])
def test_cli_decides_auto_and_records_the_choice(run_cli, tiny_bert, text_files, monkeypatch, asked, speedup, expected):
    """``precision: auto`` becomes the measured choice in the Trainer and in the saved config; explicit values win."""
    import yaml

    calls = _fake_speed(monkeypatch, speedup)
    cli = run_cli(["fit", "--model=ptft.text.TextClassifier", f"--model.model_name={tiny_bert}",
                   "--data=ptft.text.TextClassificationDataModule", f"--data.train_file={text_files['train']}",
                   f"--data.val_file={text_files['val']}", f"--trainer.precision={asked}", "--trainer.max_steps=1",
                   "--trainer.gradient_clip_val=1.0",  # as every transformer recipe (fused AdamW: see below)
                   "--trainer.limit_val_batches=1"])
    assert cli.trainer.precision == expected
    assert len(calls) == (asked == "auto")
    saved = yaml.safe_load((Path(cli.trainer.log_dir) / "config.yaml").read_text())
    assert saved["trainer"]["precision"] == expected  # rerunning the saved config trains the same way


def test_every_recipe_defaults_to_auto():
    import yaml

    from ptft.cli import RECIPES

    for recipe in RECIPES.rglob("*.yaml"):
        trainer = yaml.safe_load(recipe.read_text())["trainer"]
        if trainer.get("accelerator") == "gpu":  # the GPU-only recipes (FSDP, DeepSpeed) name bf16-mixed outright
            assert trainer["precision"] == "bf16-mixed", recipe
            continue
        assert trainer["precision"] == "auto", recipe


def test_measurement_leaves_the_runs_random_stream_alone():
    """The probe layers are initialised with random weights: without forking the generator, ``auto`` would change
    dropout and augmentation against a ``32-true`` run of the same seed (seen in bench/precision.py: 0.1525 vs 0.1325)."""
    model = nn.Linear(8, 8)
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    choose_precision(model, accelerator="cpu", cache=False)
    torch.testing.assert_close(torch.rand(3), expected)


def _one_clipped_step(tmp_path, tiny_bert, text_files, precision_name: str, fused: bool, clip: float):
    """The weight change and gradient norm of one clipped optimizer step of a tiny classifier."""
    import lightning as L
    from helpers import trainer, weights

    from ptft.core import OptimizerConfig, SchedulerConfig
    from ptft.text import TextClassificationDataModule, TextClassifier

    class GradNorm(L.Callback):
        norms: list[float] = []

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):  # grads after the clip
            self.norms.append(float(torch.linalg.vector_norm(
                torch.stack([p.grad.float().norm() for p in pl_module.parameters() if p.grad is not None]))))

    L.seed_everything(0)
    model = TextClassifier(tiny_bert, optimizer=OptimizerConfig(lr=1e-2, fused=fused),
                           scheduler=SchedulerConfig(name="constant", warmup_ratio=0.0))
    data = TextClassificationDataModule(train_file=text_files["train"], val_file=text_files["val"], batch_size=16,
                                        max_length=32)
    data.connect(model)
    model.num_labels, model.label_names = data.num_labels, data.label_names
    before = weights(model.model)
    norm = GradNorm()
    accelerator = "cuda" if precision_name == "16-mixed" else "cpu"
    run = trainer(tmp_path, max_steps=1, limit_val_batches=0, precision=precision_name, gradient_clip_val=clip,
                  callbacks=[norm], accelerator=accelerator)
    run.fit(model, data)
    assert bool(run.optimizers[0].defaults.get("fused")) is fused
    return {k: model.model.state_dict()[k].cpu() - v.cpu() for k, v in before.items()}, norm.norms[-1]


@pytest.mark.parametrize("precision_name", [
    "bf16-mixed",
    # Lightning turns 16-mixed into bf16-mixed on CPU: the fp16 scaler path needs a GPU.
    pytest.param("16-mixed", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="fp16 AMP needs CUDA")),
])
def test_fused_optimizer_clips_under_mixed_precision(tmp_path, tiny_bert, text_files, precision_name):
    """Lightning's MixedPrecision refuses to clip for fused optimizers ("performs unscaling of gradients internally"),
    which stopped every transformer recipe (fused AdamW + gradient_clip_val) under bf16-mixed at its first step. ptft
    clips them: the gradient norm after the step is the clip value, and the step equals the non-fused optimizer's
    (for fp16, whose scaler must unscale before clipping and not again in the fused kernel)."""
    clip = 1e-3
    fused_step, fused_norm = _one_clipped_step(tmp_path / "fused", tiny_bert, text_files, precision_name, True, clip)
    plain_step, plain_norm = _one_clipped_step(tmp_path / "plain", tiny_bert, text_files, precision_name, False, clip)
    assert fused_norm == pytest.approx(clip, rel=1e-2)
    assert plain_norm == pytest.approx(clip, rel=1e-2)
    for name, delta in plain_step.items():
        assert torch.allclose(fused_step[name], delta, atol=1e-6, rtol=1e-3), name
    assert any(d.abs().max() > 0 for d in fused_step.values())
