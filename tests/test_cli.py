"""The ptft command: runs, errors, checkpoints, configs."""

import csv
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from conftest import REPO, write_csv

from ptft.cli import main
from ptft.text import TextClassifier
from ptft.vision import ImageClassifier


def text_args(tiny_bert, files, *extra):
    return [
        "--model=ptft.text.TextClassifier", f"--model.model_name={tiny_bert}",
        "--data=ptft.text.TextClassificationDataModule", f"--data.train_file={files['train']}",
        f"--data.val_file={files['val']}", f"--data.test_file={files['test']}", "--data.batch_size=16", *extra,
    ]


def test_fit_saves_best_checkpoint_that_reloads_outside_the_cli(run_cli, tiny_bert, text_files, tmp_path):
    cli = run_cli(["fit", *text_args(tiny_bert, text_files, "--trainer.max_epochs=2")])
    best = Path(cli.trainer.checkpoint_callback.best_model_path)
    assert best.is_file() and best.name.startswith("best-")
    # linked from the data, saved with the model
    assert cli.model.hparams.label_names == ["negative", "positive"]

    reloaded = TextClassifier.load_from_checkpoint(best)  # torch.load(weights_only=True) by default
    assert reloaded.label_names == ["negative", "positive"]
    assert reloaded.model.config.id2label == {0: "negative", 1: "positive"}
    state = torch.load(best, weights_only=True)["state_dict"]
    for name, value in reloaded.state_dict().items():
        torch.testing.assert_close(value, state[name])

    cli.datamodule.setup("test")
    batch = next(iter(cli.datamodule.test_dataloader()))
    reloaded.eval()
    cli.model.load_state_dict(state)
    cli.model.eval()
    torch.testing.assert_close(reloaded(batch), cli.model(batch))


def test_validate_test_predict_from_checkpoint(run_cli, tiny_bert, text_files):
    fit = run_cli(["fit", *text_args(tiny_bert, text_files, "--trainer.max_epochs=1")])
    ckpt = fit.trainer.checkpoint_callback.best_model_path
    test = run_cli(["test", *text_args(tiny_bert, text_files), f"--ckpt_path={ckpt}"])
    assert 0.0 <= test.trainer.callback_metrics["test/acc"].item() <= 1.0
    pred = run_cli(["predict", *text_args(tiny_bert, text_files, f"--data.predict_file={text_files['test']}"),
                    f"--ckpt_path={ckpt}", "--trainer.callbacks+=ptft.core.WritePredictions",
                    "--trainer.callbacks.path=preds.csv"])
    outputs = pred.trainer.predict_loop.predictions
    assert sum(len(o["labels"]) for o in outputs) == 32
    rows = list(csv.DictReader(open("preds.csv")))
    assert len(rows) == 32 and set(rows[0]) == {"label", "label_id", "p_negative", "p_positive"}
    first = outputs[0]
    assert rows[0]["label"] == first["labels"][0]
    assert float(rows[0]["p_positive"]) == pytest.approx(first["probs"][0, 1].item(), abs=1e-6)


def test_image_fit(run_cli, image_dirs):
    cli = run_cli([
        "fit", "--model=ptft.vision.ImageClassifier", "--model.model_name=test_resnet", "--model.pretrained=false",
        "--data=ptft.vision.ImageClassificationDataModule", f"--data.train={image_dirs['train']}",
        "--data.image_size=32", "--data.num_workers=0", "--data.batch_size=8", "--trainer.max_epochs=1",
    ])
    assert cli.model.label_names == ["blue", "green", "red"]
    reloaded = ImageClassifier.load_from_checkpoint(cli.trainer.checkpoint_callback.best_model_path)
    assert reloaded.model.fc.out_features == 3


def test_print_config_is_complete_and_reruns(run_cli, tiny_bert, text_files, tmp_path, capsys):
    with pytest.raises(SystemExit):
        run_cli(["fit", *text_args(tiny_bert, text_files), "--print_config"], quiet=False)
    printed = capsys.readouterr().out
    config = yaml.safe_load(printed)
    assert config["model"]["init_args"]["optimizer"]["lr"] == 5e-5
    assert config["data"]["init_args"]["train_file"] == text_files["train"]
    (tmp_path / "printed.yaml").write_text(printed)
    cli = run_cli(["fit", "--config", str(tmp_path / "printed.yaml"), "--trainer.max_steps=1"])
    assert cli.trainer.global_step == 1


def one_line_error(capsys, argv):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    errors = [line for line in err.splitlines() if line.startswith("ptft: error: ")]
    assert len(errors) == 1 and err.strip().endswith(errors[0]), err[-2000:]
    return errors[0]


def test_one_line_errors(capsys, tmp_path, tiny_bert, text_files, image_dirs, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["ptft"])
    line = one_line_error(capsys, ["fit", *text_args("no-such-org/no-such-model", text_files)])
    assert "'no-such-org/no-such-model'" in line and "local folder" in line
    line = one_line_error(capsys, ["fit", *text_args(tiny_bert, {**text_files, "train": "missing.csv"})])
    assert "train_file: 'missing.csv' does not exist" in line
    line = one_line_error(capsys, ["fit", *text_args(tiny_bert, text_files, "--data.text_column=review")])
    assert "has no column 'review'" in line
    unseen = write_csv(tmp_path / "unseen.csv", [{"text": "so so", "label": "neutral"}])
    line = one_line_error(capsys, ["fit", *text_args(tiny_bert, {**text_files, "val": unseen})])
    assert "never seen in training: ['neutral']" in line
    (Path(image_dirs["train"]) / "red" / "bad.jpg").write_bytes(b"\x00garbage")
    line = one_line_error(capsys, [
        "fit", "--model=ptft.vision.ImageClassifier", "--model.model_name=test_resnet", "--model.pretrained=false",
        "--data=ptft.vision.ImageClassificationDataModule", f"--data.train={image_dirs['train']}",
        "--data.num_workers=0", "--trainer.logger=false",
    ])
    assert "unreadable image(s) in train" in line and "bad.jpg" in line
    assert not list(tmp_path.rglob("*.ckpt"))  # nothing half-written


def test_console_script_end_to_end(tmp_path, tiny_bert, text_files):
    """One real subprocess: the installed `ptft` entry point."""
    ptft = Path(sys.executable).parent / "ptft"
    result = subprocess.run(
        [str(ptft), "fit", *text_args(tiny_bert, text_files, "--trainer.max_steps=2", "--trainer.log_every_n_steps=1", "--trainer.enable_progress_bar=false",
                                     f"--trainer.default_root_dir={tmp_path}")],
        cwd=tmp_path, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert list((tmp_path / "runs").rglob("metrics.csv"))
    assert list((tmp_path / "runs").rglob("config.yaml"))


def test_recipe_headers_name_their_command():
    for recipe in (REPO / "recipes").rglob("*.yaml"):
        head = recipe.read_text().splitlines()[:4]
        assert any("ptft " in line for line in head if line.startswith("#")), recipe


def test_inspect_layers(capsys, tiny_bert, text_files, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    main(["inspect-layers", *text_args(tiny_bert, text_files, "--model.optimizer.layer_decay=0.5",
                                       "--trainer.logger=false")])
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.strip()[:1].isdigit()]
    assert [int(r.split()[0]) for r in rows] == [0, 1, 2, 3]
    assert "classifier" in rows[-1] and "5.00e-05" in rows[-1] and "6.25e-06" in rows[0]


def test_lr_find_saves_plot_and_suggests(capsys, tiny_bert, text_files, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    main(["lr-find", "--num_training=20", f"--plot={tmp_path / 'lr.png'}",
          *text_args(tiny_bert, text_files, "--trainer.logger=false", "--trainer.enable_progress_bar=false")])
    out = capsys.readouterr().out
    assert (tmp_path / "lr.png").stat().st_size > 1000
    suggestion = float(out.split("suggested learning rate: ")[1].split()[0])
    assert 1e-7 <= suggestion <= 1.0


def test_export_timm_model_loads_with_timm_alone(run_cli, image_dirs, tmp_path):
    import timm

    cli = run_cli([
        "fit", "--model=ptft.vision.ImageClassifier", "--model.model_name=test_resnet", "--model.pretrained=false",
        "--data=ptft.vision.ImageClassificationDataModule", f"--data.train={image_dirs['train']}",
        "--data.image_size=32", "--data.num_workers=0", "--trainer.max_epochs=1",
    ])
    main(["export", cli.trainer.checkpoint_callback.best_model_path, str(tmp_path / "exported")])
    plain = timm.create_model(f"local-dir:{tmp_path / 'exported'}", pretrained=True).eval()
    x = torch.randn(2, 3, 32, 32)
    cli.model.eval()
    torch.testing.assert_close(plain(x), cli.model({"pixel_values": x}))
