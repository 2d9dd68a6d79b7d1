"""Shipped recipes trained on 2 processes (gloo DDP on CPU, ``ddp_fork``) end where 1 process ends.

Each recipe runs through the ptft CLI twice on the same tiny model and generated data: once on 1 process with batch
size ``2 * B``, once on 2 processes with ``B`` each. DDP averages the ranks' gradients, and every loss here is a mean
over the examples of a batch, so both runs take the same optimizer steps and must end with the same weights, the same
logged validation metrics and the same checkpoint files (written once, by rank 0). What makes that hold:

- the training order: :class:`ptft.core.data.EpochSeededSampler` draws one permutation per epoch and gives rank ``r``
  every second index from ``r``, so the two ranks' batches ``k`` together are the 1-process batch ``k``;
- no randomness that differs between ranks: dropout, random crops, flips, colour jitter, SpecAugment and waveform
  augmentation are off (each rank draws from its own random stream, so they cannot match 1 process);
- no BatchNorm: per-rank BatchNorm statistics over ``B`` examples differ from those over ``2B``; GPU runs fix it with
  ``--trainer.sync_batchnorm=true``, but torch's SyncBatchNorm refuses CPU tensors, so the vision and audio recipes
  run a LayerNorm model (timm ``test_convnext``) here;
- audio clips of one length: a batch is padded to its longest clip, and padded frames reach the pooled features, so
  clips of different lengths give outputs that depend on how they are grouped into batches;
- validation sets holding a multiple of ``2 x`` the evaluation batch size, so the distributed sampler pads nothing.

The FSDP recipe runs on 2 CPU processes through :class:`CPUFSDPStrategy` (Lightning's FSDPStrategy, which refuses
CPUs) and must match DDP; the DeepSpeed recipe (GPU only) is parsed and its strategy built.
"""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch
from audio_signals import write_audio_tree
from conftest import REPO, sentiment_rows, write_csv, write_images
from lightning.pytorch.strategies import FSDPStrategy
from lightning.pytorch.strategies.launchers.multiprocessing import _MultiProcessingLauncher

from ptft.core.module import load_checkpoint

PER_RANK = 4  # B: the 1-process run uses 2 * B
EPOCHS = 2  # the second epoch's order comes from set_epoch
CPU = ["--trainer.accelerator=cpu", "--trainer.num_sanity_val_steps=0", "--trainer.enable_progress_bar=false",
       "--trainer.enable_model_summary=false", f"--trainer.max_epochs={EPOCHS}", "--trainer.max_steps=-1",
       "--data.init_args.eval_batch_size=2"]


@pytest.fixture(scope="module")
def tiny_bert_no_dropout(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A 2-layer, hidden-32 random BERT folder without dropout, with MiniLM's tokenizer."""
    from conftest import minilm_dir
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    path = tmp_path_factory.mktemp("tiny-bert-no-dropout")
    tokenizer = AutoTokenizer.from_pretrained(minilm_dir())
    config = BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=128, hidden_dropout_prob=0.0,
                        attention_probs_dropout_prob=0.0, classifier_dropout=0.0)
    torch.manual_seed(0)
    BertForSequenceClassification(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def text_case(data: Path, model: str) -> list[str]:
    def rows(n: int, seed: int, column: str) -> list[dict]:
        return [{"label": int(r["label"] == "positive"), column: r["text"]} for r in sentiment_rows(n, seed)]

    train = write_csv(data / "train.csv", rows(16, 1, "sentence"))
    val = write_csv(data / "val.csv", rows(8, 2, "content"))  # the recipe renames dev.tsv's column
    return [f"--model.init_args.model_name={model}", f"--data.init_args.train_file={train}",
            f"--data.init_args.val_file={val}", "--model.init_args.optimizer.lr=1e-3"]


def vision_case(data: Path, _: str) -> list[str]:
    train = write_images(data / "train", 8, size=32)  # 3 classes x 8 = 24 = 3 batches of 2 x B
    val = write_images(data / "val", 4, size=32, seed=1)  # 12 = 3 x (2 ranks x 2)
    return [f"--data.init_args.train={train}", f"--data.init_args.val={val}", "--data.init_args.test=null",
            "--data.init_args.num_workers=0", "--model.init_args.model_name=test_convnext",
            "--model.init_args.pretrained=false", "--model.init_args.model_kwargs={drop_rate: 0.0}",
            "--data.init_args.hflip=0", "--data.init_args.color_jitter=0", "--data.init_args.scale=[1.0, 1.0]",
            "--data.init_args.ratio=[1.0, 1.0]"]


def audio_case(data: Path, _: str) -> list[str]:
    train = write_audio_tree(data / "train", 4, seed=1, seconds=(0.5, 0.5))  # 4 kinds x 4 = 16 clips
    val = write_audio_tree(data / "val", 2, seed=2, seconds=(0.5, 0.5))  # 8 = 2 x (2 ranks x 2)
    return [f"--data.init_args.train={train}", f"--data.init_args.val={val}", "--data.init_args.test=null",
            "--data.init_args.num_workers=0", "--data.init_args.augment=null", "--data.init_args.random_crop=false",
            "--model.init_args.model_name=test_convnext", "--model.init_args.pretrained=false",
            "--model.init_args.sampling_rate=8000", "--model.init_args.spec_augment=null",
            "--model.init_args.model_kwargs={drop_rate: 0.0}"]


CASES = {
    "recipes/text/sst2.yaml": text_case,
    "recipes/vision/cifar10.yaml": vision_case,
    "recipes/audio/keyword-cnn.yaml": audio_case,
}


def fit(run_cli, recipe: str, overrides: list[str], root: Path, devices: int) -> Path:
    """Runs ``ptft fit`` with the global batch ``2 * PER_RANK`` on ``devices`` processes; returns the run folder."""
    batch = 2 * PER_RANK // devices
    parallel = ["--trainer.devices=2", "--trainer.strategy=ddp_fork"] if devices == 2 else ["--trainer.devices=1"]
    run_cli(["fit", "--config", str(REPO / recipe), *overrides, *CPU, *parallel, f"--data.init_args.batch_size={batch}",
             f"--trainer.logger.init_args.save_dir={root}"], quiet=False)
    (run,) = root.glob("*/version_0")
    return run


def val_metrics(run: Path) -> list[dict[str, float]]:
    """The logged validation rows of ``metrics.csv``: epoch, step and every ``val/`` value."""
    with open(run / "metrics.csv") as f:
        rows = [r for r in csv.DictReader(f) if r.get("val/loss")]
    return [{k: float(v) for k, v in r.items() if v and (k.startswith("val/") or k in ("epoch", "step"))} for r in rows]


@pytest.mark.parametrize("recipe", list(CASES))
def test_two_processes_train_as_one(recipe, run_cli, tiny_bert_no_dropout, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    overrides = CASES[recipe](data, tiny_bert_no_dropout)
    one = fit(run_cli, recipe, overrides, tmp_path / "one", devices=1)
    two = fit(run_cli, recipe, overrides, tmp_path / "two", devices=2)

    files = sorted(p.name for p in (one / "checkpoints").iterdir())
    assert sorted(p.name for p in (two / "checkpoints").iterdir()) == files, "checkpoints differ from 1 process's"
    assert "last.ckpt" in files and len(files) == 2, files  # the best and the last, each written once
    start = load_checkpoint(str(one / "checkpoints" / "last.ckpt"))  # loadable as the module that wrote it
    trained = {k: torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"] for k, run in
               (("one", one), ("two", two))}
    assert trained["one"].keys() == trained["two"].keys()
    moved = [k for k, v in trained["one"].items() if v.is_floating_point() and not torch.equal(v, start.state_dict()[k])]
    assert not moved  # load_checkpoint restored the saved weights
    for key, value in trained["one"].items():
        torch.testing.assert_close(trained["two"][key], value, rtol=1e-4, atol=1e-5, msg=lambda m, k=key: f"{k}: {m}")

    assert_same_metrics(val_metrics(one), val_metrics(two))


def assert_same_metrics(single: list[dict[str, float]], parallel: list[dict[str, float]]) -> None:
    assert len(single) == EPOCHS and {"val/loss", "val/acc"} <= set(single[0]), single
    assert [r.keys() for r in parallel] == [r.keys() for r in single]
    for a, b in zip(single, parallel):
        for key in a:
            assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-5), (key, single, parallel)


# --- FSDP on CPU ------------------------------------------------------------------------------------------------
class CPUFSDPStrategy(FSDPStrategy):
    """Lightning's ``FSDPStrategy`` made to run on CPU with gloo, for tests only.

    Lightning refuses FSDP without a GPU, and torch's FSDP asks for ``device_id=torch.device("cpu")`` on CPU, which
    Lightning never passes (it passes the GPU index). Processes are forked, as ``ddp_fork`` does, instead of
    re-running the command line (pytest's); rank 0's weights are not sent back to the parent process (they are
    shards), the tests read the checkpoints instead. Everything else (wrapping, optimizer setup, sharded checkpoints)
    is Lightning's own.
    """

    def _configure_launcher(self) -> None:
        self._launcher = _ForkWithoutWeights(self, start_method="fork")

    def _setup_model(self, model: torch.nn.Module) -> torch.nn.Module:
        from torch.distributed.fsdp import FullyShardedDataParallel

        return FullyShardedDataParallel(module=model, cpu_offload=self.cpu_offload, sharding_strategy=self.sharding_strategy,
                                        mixed_precision=self.mixed_precision_config, device_id=torch.device("cpu"),
                                        **self.kwargs)


class _ForkWithoutWeights(_MultiProcessingLauncher):
    def _collect_rank_zero_results(self, trainer, results):
        output = super()._collect_rank_zero_results(trainer, results)
        if output is None or output.weights_path is None:
            return output
        Path(output.weights_path).unlink()
        return output._replace(weights_path=None)


FSDP_RECIPE = "recipes/text/sst2-fsdp.yaml"
#: The FSDP recipe on CPU: the test strategy, fp32 (CPU bf16 would differ from DDP's fp32), embeddings frozen
#: throughout. Clipping and weight decay need ptft's FSDP paths (the norm over every shard, decay decided on the
#: unsharded shapes); to show them, SGD (Adam's update hardly changes when a step's gradients are scaled), a
#: clipping norm that bites every step and a strong decay.
FSDP_ON_CPU = ["--trainer.precision=32-true", "--trainer.devices=2",
               "--trainer.callbacks+=ptft.core.FreezeSchedule", "--trainer.callbacks.freeze=[bert.embeddings.*]",
               "--trainer.gradient_clip_val=0.002", "--model.init_args.optimizer.name=sgd",
               "--model.init_args.optimizer.lr=0.5", "--model.init_args.optimizer.weight_decay=0.1"]


def test_fsdp_recipe_trains_as_ddp_and_exports(run_cli, tiny_bert_no_dropout, tmp_path):
    """2-process FSDP (gloo, CPU) ends with DDP's weights and metrics, keeps frozen parameters frozen, writes sharded
    checkpoint folders, and ``ptft export`` turns one into a plain model folder."""
    from transformers import AutoModelForSequenceClassification

    from ptft.cli import export
    from ptft.core.module import read_checkpoint

    data = tmp_path / "data"
    data.mkdir()
    overrides = [*text_case(data, tiny_bert_no_dropout), *CPU, *FSDP_ON_CPU, f"--data.init_args.batch_size={PER_RANK}"]
    runs = {}
    # --trainer.strategy.class_path keeps the recipe's init_args; a plain name replaces the whole strategy.
    for name, strategy in (("fsdp", ".class_path=test_ddp_recipes.CPUFSDPStrategy"), ("ddp", "=ddp_fork")):
        cli = run_cli(["fit", "--config", str(REPO / FSDP_RECIPE), *overrides, f"--trainer.strategy{strategy}",
                       f"--trainer.logger.init_args.save_dir={tmp_path / name}"], quiet=False)
        (runs[name],) = (tmp_path / name).glob("*/version_0")
        if name == "fsdp":  # the recipe's settings reached Lightning's FSDPStrategy
            from torch.distributed.fsdp.wrap import ModuleWrapPolicy
            from transformers.models.bert.modeling_bert import BertLayer

            strategy = cli.trainer.strategy
            assert strategy.kwargs["use_orig_params"] is True and strategy._state_dict_type == "sharded"
            policy = strategy.kwargs["auto_wrap_policy"]
            assert isinstance(policy, ModuleWrapPolicy) and policy._module_classes == {BertLayer}

    folders = sorted(p.name for p in (runs["fsdp"] / "checkpoints").iterdir())
    assert folders == sorted(p.name for p in (runs["ddp"] / "checkpoints").iterdir())
    last = runs["fsdp"] / "checkpoints" / "last.ckpt"
    assert last.is_dir() and {"meta.pt", ".metadata", "__0_0.distcp", "__1_0.distcp"} <= {p.name for p in last.iterdir()}
    sharded = read_checkpoint(str(last))["state_dict"]
    ddp = torch.load(runs["ddp"] / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    assert sharded.keys() == ddp.keys()
    for key, value in ddp.items():
        torch.testing.assert_close(sharded[key], value, rtol=1e-4, atol=1e-5, msg=lambda m, k=key: f"{k}: {m}")
    start = AutoModelForSequenceClassification.from_pretrained(tiny_bert_no_dropout).state_dict()
    frozen = [k for k in ddp if k.startswith("model.bert.embeddings.")]
    assert frozen and all(torch.equal(sharded[k], start[k.removeprefix("model.")]) for k in frozen)
    assert not torch.equal(sharded["model.classifier.weight"], start["classifier.weight"])  # it trained

    assert_same_metrics(val_metrics(runs["ddp"]), val_metrics(runs["fsdp"]))

    export([str(last), str(tmp_path / "exported")])
    exported = AutoModelForSequenceClassification.from_pretrained(tmp_path / "exported").state_dict()
    for key, value in exported.items():
        torch.testing.assert_close(value, sharded[f"model.{key}"], rtol=0, atol=0)


def test_fsdp_with_a_weight_penalty_stops_before_training(run_cli, tiny_bert_no_dropout, tmp_path):
    """L1 / L2-SP on a shard would be 1/N of the penalty: one clear line, nothing written."""
    data = tmp_path / "data"
    data.mkdir()
    with pytest.raises(Exception, match="l1 and l2_sp are not supported under FSDP"):
        run_cli(["fit", "--config", str(REPO / FSDP_RECIPE), *text_case(data, tiny_bert_no_dropout), *CPU,
                 *FSDP_ON_CPU, "--trainer.strategy.class_path=test_ddp_recipes.CPUFSDPStrategy",
                 "--model.init_args.l2_sp=0.01", f"--trainer.logger.init_args.save_dir={tmp_path}"],
                quiet=False)
    assert not list(tmp_path.rglob("*.ckpt"))


def test_deepspeed_recipe_parses_and_builds_its_strategy(run_cli, capsys):
    """GPU only to run; here the recipe parses and its ZeRO settings build Lightning's DeepSpeedStrategy."""
    pytest.importorskip("deepspeed", reason="DeepSpeed is not installed (pip install deepspeed)")
    import yaml
    from lightning.pytorch.strategies import DeepSpeedStrategy

    with pytest.raises(SystemExit) as stop:
        run_cli(["fit", "--config", str(REPO / "recipes/text/sst2-deepspeed.yaml"), "--print_config"], quiet=False)
    assert stop.value.code in (0, None)
    strategy = yaml.safe_load(capsys.readouterr().out)["trainer"]["strategy"]
    assert strategy["class_path"] == "lightning.pytorch.strategies.DeepSpeedStrategy"
    built = DeepSpeedStrategy(**{k: v for k, v in strategy["init_args"].items() if v is not None})
    zero = built.config["zero_optimization"]
    assert zero["stage"] == 2 and zero["reduce_bucket_size"] == 200_000_000
