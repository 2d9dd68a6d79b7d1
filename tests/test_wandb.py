"""W&B with no account: an offline run whose stored config and metrics are read back from the run file."""

import json
from pathlib import Path

import pytest
from wandb_reader import read_finished_run, run_contents

from ptft.core.tracking import WandbLogger, wandb_credentials_available


def test_offline_run_stores_full_nested_config_and_metrics(run_cli, tiny_bert, text_files, tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc login either
    assert not wandb_credentials_available()
    cli = run_cli(
        [
            "fit", "--model=ptft.text.TextClassifier", f"--model.model_name={tiny_bert}",
            "--model.optimizer.lr=0.0003", "--data=ptft.text.TextClassificationDataModule",
            f"--data.train_file={text_files['train']}", f"--data.val_file={text_files['val']}",
            "--data.batch_size=16", "--trainer.max_epochs=1", "--trainer.log_every_n_steps=1",
            "--trainer.logger=ptft.core.WandbLogger", f"--trainer.logger.save_dir={tmp_path}",
            "--trainer.logger.project=ptft-test", "--trainer.enable_progress_bar=false",
        ],
        quiet=False,
    )
    logger = cli.trainer.logger
    assert isinstance(logger, WandbLogger) and logger._offline
    logger.experiment.finish()  # as at process exit: flushes the run file
    (run_dir,) = (Path(tmp_path) / "wandb").glob("offline-run-*")
    config, history = run_contents(run_dir)

    # the full nested recipe, once, not flattened
    assert "model" in config, f"config keys stored: {sorted(config)}"
    model = config["model"]
    assert model["class_path"] == "ptft.text.TextClassifier"
    assert model["init_args"]["optimizer"]["lr"] == pytest.approx(3e-4)
    assert model["init_args"]["label_names"] == ["negative", "positive"]  # linked value recorded
    assert config["data"]["init_args"]["batch_size"] == 16
    assert not any("/" in key or key.startswith("model.") or key == "label_names" for key in config)

    losses = [row["train/loss"] for row in history if "train/loss" in row]
    assert len(losses) == 6  # 96 examples / 16, logged every step
    val = [row for row in history if "val/acc" in row]
    assert len(val) == 1
    assert val[0]["val/acc"] == pytest.approx(cli.trainer.callback_metrics["val/acc"].item())


def test_offline_run_keeps_checkpoints_as_artifacts(run_cli, tiny_bert, text_files, tmp_path, monkeypatch):
    """``log_model=True`` offline: W&B stores the best checkpoint as an artifact that ``wandb sync`` uploads."""
    monkeypatch.delenv("WANDB_MODE", raising=False)
    cli = run_cli(
        [
            "fit", "--model=ptft.text.TextClassifier", f"--model.model_name={tiny_bert}",
            "--data=ptft.text.TextClassificationDataModule", f"--data.train_file={text_files['train']}",
            f"--data.val_file={text_files['val']}", "--data.batch_size=32", "--trainer.max_epochs=1",
            "--trainer.logger=ptft.core.WandbLogger", f"--trainer.logger.save_dir={tmp_path}",
            "--trainer.logger.offline=true", "--trainer.logger.log_model=true", "--trainer.enable_progress_bar=false",
        ],
        quiet=False,
    )
    logger = cli.trainer.logger
    assert logger._offline and logger.experiment.settings.mode in ("offline", "dryrun")
    logger.experiment.finish()
    (run_file,) = (Path(tmp_path) / "wandb").glob("offline-run-*/run-*.wandb")
    artifacts = [r.artifact for r in read_finished_run(run_file) if r.WhichOneof("record_type") == "artifact"]
    files = {json.loads(a.metadata)["original_filename"]: sorted(a.aliases) for a in artifacts}
    best = Path(cli.trainer.checkpoint_callback.best_model_path).name
    assert files == {best: ["best", "latest"], "last.ckpt": ["latest"]}
    assert all(a.type == "model" and [e.path for e in a.manifest.contents] == ["model.ckpt"] for a in artifacts)
