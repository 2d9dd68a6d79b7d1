"""The ptft command: runs, errors, checkpoints, configs."""

import csv
import logging
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
import yaml
from torch.optim.optimizer import register_optimizer_step_post_hook
from conftest import write_csv

from ptft.cli import ExpectedHeadReport, main
from ptft.commands import RECIPES
from ptft.core.errors import PtftError
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
    pred = run_cli(["predict", *text_args(tiny_bert, text_files, f"--data.predict_file={text_files['test']}"),
                    f"--ckpt_path={ckpt}", "--trainer.callbacks+=ptft.core.WritePredictions",
                    "--trainer.callbacks.path=preds.csv"])
    outputs = pred.trainer.predict_loop.predictions
    assert pred.trainer.checkpoint_callback is None  # nothing to save, and no warning about the run folder
    assert sum(len(o["labels"]) for o in outputs) == 32
    rows = list(csv.DictReader(open("preds.csv")))
    assert len(rows) == 32 and set(rows[0]) == {"label", "label_id", "p_negative", "p_positive"}
    first = outputs[0]
    assert rows[0]["label"] == first["labels"][0]
    assert float(rows[0]["p_positive"]) == pytest.approx(first["probs"][0, 1].item(), abs=1e-6)
    # test/acc is the accuracy of the same checkpoint's predictions on the same file
    truth = [r["label"] for r in csv.DictReader(open(text_files["test"]))]
    accuracy = sum(r["label"] == t for r, t in zip(rows, truth)) / len(truth)
    assert test.trainer.callback_metrics["test/acc"].item() == pytest.approx(accuracy)


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


def test_console_script_end_to_end_shows_what_matters(tmp_path, text_files):
    """One real subprocess: the installed `ptft` entry point, on a model without a head (transformers adds one)."""
    from transformers import AutoTokenizer, BertConfig, BertModel

    from conftest import minilm_dir

    headless = tmp_path / "headless"
    tokenizer = AutoTokenizer.from_pretrained(minilm_dir())
    BertModel(BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=64, max_position_embeddings=128)).save_pretrained(headless)
    tokenizer.save_pretrained(headless)
    ptft = Path(sys.executable).parent / "ptft"
    result = subprocess.run(
        [str(ptft), "fit", *text_args(str(headless), text_files, "--trainer.max_steps=2", "--trainer.log_every_n_steps=1",
                                      "--trainer.enable_progress_bar=false", f"--trainer.default_root_dir={tmp_path}")],
        cwd=tmp_path, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert list((tmp_path / "runs").rglob("metrics.csv"))
    assert list((tmp_path / "runs").rglob("config.yaml"))
    console = result.stdout + result.stderr
    for noise in ("LOAD REPORT", "newly initialized", "💡 Tip", "litlogger", "litmodels", "deprecated",
                  "LightningCLI's args parameter"):
        assert noise not in console, noise
    # Real messages stay: Lightning's run facts, and its warning that no validation ran to score a best checkpoint.
    assert "`Trainer.fit` stopped: `max_steps=2` reached." in console
    assert "could not find the monitored key" in console


def load_report(model_class: str, rows: list[tuple[str, str]]) -> logging.LogRecord:
    table = "\n".join(f"{key} | \x1b[31m{status}\x1b[0m | " for key, status in rows)
    message = f"\x1b[1m{model_class} LOAD REPORT\x1b[0m from: x\nKey | Status | \n---+---\n{table}\n\nNotes: ..."
    return logging.LogRecord("transformers.modeling_utils", logging.WARNING, "", 0, message, None, None)


def test_load_report_filter_drops_only_a_new_head():
    keep = ExpectedHeadReport().filter
    assert not keep(load_report("BertForSequenceClassification", [("classifier.weight", "MISSING"),
                                                                  ("classifier.bias", "MISSING")]))
    assert not keep(load_report("BertForTokenClassification", [("classifier.weight", "MISMATCH"),
                                                               ("cls.predictions.bias", "UNEXPECTED")]))
    # a missing base-model weight is a real problem: the report prints
    assert keep(load_report("BertForSequenceClassification", [("classifier.weight", "MISSING"),
                                                              ("bert.encoder.layer.0.output.dense.weight", "MISSING")]))
    assert keep(logging.LogRecord("transformers.modeling_utils", logging.WARNING, "", 0, "other", None, None))


def test_recipe_headers_name_their_command():
    for recipe in RECIPES.rglob("*.yaml"):
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


# --- shipped recipes ----------------------------------------------------------------------------------------------
def test_recipes_lists_and_copies_shipped_recipes(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    main(["recipes"])
    out = capsys.readouterr().out
    shipped = sorted(p.relative_to(RECIPES).as_posix() for p in RECIPES.rglob("*.yaml"))
    listed = [line.split()[0] for line in out.splitlines() if line.startswith("  ")]
    assert listed == shipped
    assert "text/sst2.yaml" in out and "SST-2 sentiment (GLUE)" in out  # the recipe's first comment line

    main(["recipes", "text/sst2.yaml"])
    assert (tmp_path / "sst2.yaml").read_text() == (RECIPES / "text" / "sst2.yaml").read_text()
    main(["recipes", "recipes/vision/cifar10.yaml", "mine/cifar.yaml"])  # the path the docs use works too
    assert (tmp_path / "mine" / "cifar.yaml").read_text() == (RECIPES / "vision" / "cifar10.yaml").read_text()
    capsys.readouterr()
    assert "exists" in one_line_error(capsys, ["recipes", "text/sst2.yaml"])  # never overwrites an edited copy
    assert "ptft recipes" in one_line_error(capsys, ["recipes", "text/no-such.yaml"])


def test_config_names_a_shipped_recipe_unless_the_file_exists_here(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["ptft"])
    with pytest.raises(SystemExit):
        main(["fit", "--config", "text/sst2.yaml", "--print_config"])
    assert yaml.safe_load(capsys.readouterr().out)["trainer"]["logger"]["init_args"]["name"] == "sst2"

    local = tmp_path / "text" / "sst2.yaml"  # a file of that name here wins over the shipped recipe
    local.parent.mkdir()
    local.write_text((RECIPES / "text" / "sst2.yaml").read_text().replace("name: sst2", "name: my-sst2"))
    with pytest.raises(SystemExit):
        main(["fit", "--config=text/sst2.yaml", "--print_config"])
    assert yaml.safe_load(capsys.readouterr().out)["trainer"]["logger"]["init_args"]["name"] == "my-sst2"

    line = one_line_error(capsys, ["fit", "--config", "text/no-such.yaml"])
    assert "text/no-such.yaml" in line and "ptft recipes" in line


# --- checkpoints and resuming -------------------------------------------------------------------------------------
def logged_args(tiny_bert, text_files, *extra):
    """A CSV-logged run (the default logger) with a constant learning rate, so that runs can be compared."""
    return ["fit", *text_args(tiny_bert, text_files, "--model.scheduler.name=constant",
                              "--model.scheduler.warmup_ratio=0", "--trainer.enable_progress_bar=false",
                              "--trainer.enable_model_summary=false", "--trainer.num_sanity_val_steps=0", *extra)]


def test_ckpt_path_last_resumes_the_latest_run_in_its_folder(run_cli, tiny_bert, text_files, tmp_path):
    first = run_cli(logged_args(tiny_bert, text_files, "--trainer.max_epochs=2"), quiet=False)
    run = Path(first.trainer.log_dir)
    assert (run / "checkpoints" / "last.ckpt").is_file()  # written by default
    assert first.trainer.global_step == 12  # 96 examples / 16 per batch, 2 epochs

    resumed = run_cli(logged_args(tiny_bert, text_files, "--trainer.max_epochs=3", "--ckpt_path=last"), quiet=False)
    assert Path(resumed.trainer.log_dir) == run  # the same version folder, no new run
    assert resumed.trainer.global_step == 18 and resumed.trainer.current_epoch == 3
    epochs = {int(r["epoch"]) for r in csv.DictReader(open(run / "metrics.csv")) if r.get("val/acc")}
    assert epochs == {0, 1, 2}  # the first run's rows are kept

    straight = run_cli(logged_args(tiny_bert, text_files, "--trainer.max_epochs=3",
                                   "--trainer.logger.init_args.name=straight"), quiet=False)
    for name, value in straight.model.state_dict().items():
        torch.testing.assert_close(resumed.model.state_dict()[name], value, msg=name)


def test_ckpt_path_last_without_a_run_is_one_line(capsys, tmp_path, tiny_bert, text_files, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["ptft"])
    line = one_line_error(capsys, ["fit", *text_args(tiny_bert, text_files), "--ckpt_path=last"])
    assert "no last.ckpt under runs/lightning_logs" in line


class Preempt(L.Callback):
    """Kills the run after step 5, as a preempted machine would."""

    def on_train_batch_end(self, trainer, *args):
        if trainer.global_step == 5:
            raise RuntimeError("preempted")


def test_step_checkpoints_update_last_and_keep_best_on_validation(run_cli, tiny_bert, text_files, tmp_path, recwarn):
    # Preempted at step 5, before any validation: last.ckpt of step 4 survives, and no "best" was scored by a
    # metric that does not exist yet.
    with pytest.raises(RuntimeError, match="preempted"):
        run_cli(["fit", *text_args(tiny_bert, text_files, "--checkpoint.every_n_train_steps=2",
                                   "--trainer.callbacks+=test_cli.Preempt", "--trainer.enable_progress_bar=false")], quiet=False)
    (folder,) = tmp_path.glob("runs/lightning_logs/version_0/checkpoints")
    assert torch.load(folder / "last.ckpt", weights_only=True)["global_step"] == 4
    assert not list(folder.glob("best-*"))
    assert not [w for w in recwarn if "could not find the monitored key" in str(w.message)]
    # A full epoch (6 steps): validation scores the best checkpoint and rewrites last.ckpt; one file each.
    cli = run_cli(["fit", *text_args(tiny_bert, text_files, "--trainer.max_epochs=1",
                                     "--checkpoint.every_n_train_steps=4", "--trainer.enable_progress_bar=false")], quiet=False)
    folder = Path(cli.trainer.checkpoint_callback.dirpath)
    assert cli.trainer.checkpoint_callback.monitor == "val/acc"
    assert sorted(p.name for p in folder.iterdir()) == ["best-0-6.ckpt", "last.ckpt"]
    assert torch.load(folder / "last.ckpt", weights_only=True)["global_step"] == 6


# --- export -------------------------------------------------------------------------------------------------------
def test_export_backbone_writes_the_timm_model_without_its_head(run_cli, image_dirs, tmp_path, capsys):
    import timm

    cli = run_cli([
        "fit", "--model=ptft.vision.ImageClassifier", "--model.model_name=test_resnet", "--model.pretrained=false",
        "--data=ptft.vision.ImageClassificationDataModule", f"--data.train={image_dirs['train']}",
        "--data.image_size=32", "--data.num_workers=0", "--trainer.max_steps=1",
    ])
    capsys.readouterr()
    main(["export", "--backbone", cli.trainer.checkpoint_callback.last_model_path, str(tmp_path / "backbone")])
    assert "--model.pretrained_file=" in capsys.readouterr().out
    backbone = timm.create_model(f"local-dir:{tmp_path / 'backbone'}", pretrained=True, num_classes=0).eval()
    x = torch.randn(2, 3, 32, 32)
    cli.model.eval()
    torch.testing.assert_close(backbone(x), cli.model.model.forward_head(cli.model.model.forward_features(x),
                                                                         pre_logits=True))


# --- keys ---------------------------------------------------------------------------------------------------------
def test_short_keys_on_the_command_line(run_cli, tiny_bert, text_files):
    cli = run_cli(["fit", *text_args(tiny_bert, text_files), "--model.optimizer.lr=3e-5",
                   "--model.init_args.optimizer.weight_decay=0.2", "--trainer.max_steps=1"])
    assert cli.model.optimizer_config.lr == 3e-5 and cli.model.optimizer_config.weight_decay == 0.2


def test_yaml_needs_init_args_under_class_path(run_cli, tiny_bert, text_files, tmp_path):
    """jsonargparse 4.53 reads keys beside ``class_path`` as the *base* class's arguments: recipes keep ``init_args``.

    If this starts passing, jsonargparse accepts the short YAML form: convert the shipped recipes.
    """
    short = {"model": {"class_path": "ptft.text.TextClassifier", "model_name": tiny_bert, "optimizer": {"lr": 3e-5}}}
    (tmp_path / "short.yaml").write_text(yaml.safe_dump(short))
    data = text_args(tiny_bert, text_files)[2:]
    with pytest.raises(PtftError, match="the class's arguments go under init_args"):
        run_cli(["fit", "--config", str(tmp_path / "short.yaml"), *data, "--trainer.max_steps=1"])
    full = {"model": {"class_path": "ptft.text.TextClassifier",
                      "init_args": {"model_name": tiny_bert, "optimizer": {"lr": 3e-5}}}}
    (tmp_path / "full.yaml").write_text(yaml.safe_dump(full))
    cli = run_cli(["fit", "--config", str(tmp_path / "full.yaml"), *data, "--trainer.max_steps=1"])
    assert cli.model.optimizer_config.lr == 3e-5


@pytest.mark.parametrize(("typo", "suggestion"), [
    ("--model.init_args.optimiser.lr=1e-3", "--model.init_args.optimizer.lr"),
    ("--model.optimizer.layer_deacy=0.8", "--model.optimizer.layer_decay"),
    ("--trainer.max_epoch=3", "--trainer.max_epochs"),
    ("--checkpoint.save_lats=true", "--checkpoint.save_last"),
])
def test_mistyped_key_is_one_line_with_the_closest_key(capsys, tmp_path, monkeypatch, tiny_bert, text_files, typo,
                                                       suggestion):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["ptft"])
    line = one_line_error(capsys, ["fit", *text_args(tiny_bert, text_files), typo])
    assert line == f"ptft: error: unknown option --{typo[2:].split('=')[0]}; did you mean {suggestion}?"


def test_mistyped_key_under_a_recipe(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["ptft"])
    line = one_line_error(capsys, ["fit", "--config", "text/sst2.yaml", "--model.init_args.optimiser.lr=1e-3"])
    assert line.endswith("; did you mean --model.init_args.optimizer.lr?")
    line = one_line_error(capsys, ["fit", "--config", "text/sst2.yaml", "--data.init_args.max_lenght=64"])
    assert line.endswith("; did you mean --data.init_args.max_length?")


def test_fit_help_says_config_takes_a_shipped_recipe(capsys, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["ptft"])
    with pytest.raises(SystemExit) as exc:
        main(["fit", "--help"])
    assert exc.value.code == 0
    assert "shipped with ptft" in " ".join(capsys.readouterr().out.split())


# --- learning-rate finder -----------------------------------------------------------------------------------------
def test_lr_find_sweeps_every_group_at_its_ratio_and_prints_the_overrides(capsys, tiny_bert, text_files, monkeypatch,
                                                                        tmp_path):
    monkeypatch.chdir(tmp_path)
    model = TextClassifier(model_name=tiny_bert, optimizer={"lr": 1e-3, "layer_decay": 0.5, "head_lr": 4e-3})
    ratios = torch.tensor([g["lr"] for g in model.param_groups()]) / 1e-3
    assert len(set(ratios.tolist())) == 4  # embeddings, 2 layers, head
    used = []
    hook = register_optimizer_step_post_hook(
        lambda opt, *_: used.append([g["lr"] for g in opt.param_groups]))
    try:
        main(["lr-find", "--num_training=20", "--min_lr=1e-5", "--max_lr=1e-1", f"--plot={tmp_path / 'lr.png'}",
              *text_args(tiny_bert, text_files, "--model.optimizer.lr=1e-3", "--model.optimizer.layer_decay=0.5",
                         "--model.optimizer.head_lr=4e-3", "--trainer.logger=false",
                         "--trainer.enable_progress_bar=false")])
    finally:
        hook.remove()
    assert len(used) == 20
    swept = torch.tensor(used) / ratios  # the common lr of each step, seen from every group
    torch.testing.assert_close(swept, swept[:, :1].expand_as(swept))
    assert swept[0, 0] == pytest.approx(1e-5) and swept[-1, 0] > 1e-2
    out = capsys.readouterr().out
    assert (tmp_path / "lr.png").stat().st_size > 1000
    suggestion = float(out.split("suggested learning rate: ")[1].split()[0])
    assert f"use it with: --model.optimizer.lr={suggestion:.3g} --model.optimizer.head_lr={suggestion * 4:.3g}" in out


class TwoStiffnesses(L.LightningModule):
    """Two least-squares problems; ``b`` is ``1 / ratio`` times stiffer and trains at ``ratio`` times the lr.

    With the ratio kept, both follow the same path as ``a`` alone: the best lr is ``a``'s.
    """

    def __init__(self, ratio: float | None) -> None:
        super().__init__()
        self.lr, self.ratio = 1e-3, ratio
        self.a, self.b = torch.nn.Parameter(torch.zeros(4)), torch.nn.Parameter(torch.zeros(4))

    def training_step(self, batch, batch_idx):
        target = batch[0][0]
        loss = 0.5 * ((self.a - target) ** 2).sum()
        return loss if self.ratio is None else loss + 0.5 / self.ratio * ((self.b - target) ** 2).sum()

    def configure_optimizers(self):
        if self.ratio is None:
            return torch.optim.SGD([self.a], lr=self.lr)
        return torch.optim.SGD([{"params": [self.a], "lr": self.lr}, {"params": [self.b], "lr": self.lr * self.ratio}])

    def train_dataloader(self):
        return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.ones(100, 4)), batch_size=1)


def test_lr_find_suggestion_under_group_ratios_matches_the_problem_without_groups(tmp_path):
    from lightning.pytorch.tuner import Tuner

    from ptft.commands import find_lr
    from helpers import trainer

    sweep = {"min_lr": 1e-6, "max_lr": 10.0}
    known = find_lr(trainer(tmp_path, max_epochs=1), TwoStiffnesses(None), num_training_steps=100, **sweep)
    kept = find_lr(trainer(tmp_path, max_epochs=1), TwoStiffnesses(0.1), num_training_steps=100, **sweep)
    assert kept.suggestion() == pytest.approx(known.suggestion())
    # Lightning's own finder gives both groups the same lr: the stiff group diverges early, the suggestion drops.
    plain = Tuner(trainer(tmp_path, max_epochs=1)).lr_find(TwoStiffnesses(0.1), num_training=100, **sweep)
    assert plain.suggestion() < known.suggestion() / 3


def test_version_help_and_recipes_answer_without_importing_torch():
    """``ptft --version``, ``ptft --help`` and ``ptft recipes`` must answer at once: no torch, no Lightning imported."""
    import subprocess
    import sys

    import ptft

    for args in (["--version"], ["--help"], ["recipes"]):
        code = (f"import sys; from ptft.cli import main; main({args!r}); "
                "loaded = [m for m in ('torch', 'lightning', 'transformers') if m in sys.modules]; "
                "assert not loaded, loaded")
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, (args, done.stderr[-2000:])
        if args == ["--version"]:
            assert done.stdout.strip() == f"ptft {ptft.__version__}"
