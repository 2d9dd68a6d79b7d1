"""Continual fine-tuning: a grown classifier keeps the old classes' predictions, label sets that drop or reorder old
classes stop, L2-SP pulls towards the previous model, the EWC penalty and Fisher against a reference computation,
no Fisher recomputation on resume, replay of exactly the requested old examples, and a tiny class-incremental run
where replay keeps the old classes that plain fine-tuning forgets; the shipped recipe runs."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch
from conftest import REPO
from helpers import trainer

from ptft.core.errors import PtftError
from ptft.text import TextClassifier
from ptft.transfer import continual
from ptft.transfer import ewc as ewc_module
from ptft.transfer.continual import ContinualDataModule, ContinueFrom, find_head, load_previous
from ptft.transfer.ewc import EWC, fisher_diagonal
from ptft.vision import ImageClassificationDataModule, ImageClassifier

OLD, NEW = ["a", "b"], ["c", "d"]
COLOURS = {"a": (220, 30, 30), "b": (30, 200, 40), "c": (30, 40, 220), "d": (220, 210, 30)}
SIZE = 16


def write_images(root: Path, classes: list[str], per_class: int, seed: int) -> str:
    """Class folders of noisy solid-colour PNGs (class = colour; other names than a-d cycle through the 4 colours)."""
    from PIL import Image

    g = torch.Generator().manual_seed(seed)
    for k, name in enumerate(classes):
        (root / name).mkdir(parents=True, exist_ok=True)
        rgb = COLOURS.get(name, list(COLOURS.values())[k % len(COLOURS)])
        for i in range(per_class):
            noise = torch.randint(-40, 40, (SIZE, SIZE, 3), generator=g)
            pixels = (torch.tensor(rgb) + noise).clamp(0, 255).to(torch.uint8).numpy()
            Image.fromarray(pixels).save(root / name / f"{i:03d}.png")
    return str(root)


def image_data(root: Path, classes: list[str], labels: list[str], train: int = 16, **kwargs) -> ImageClassificationDataModule:
    return ImageClassificationDataModule(
        train=write_images(root / "train", classes, train, seed=len(classes) + ord(classes[0])),
        test=write_images(root / "test", classes, 8, seed=100 + ord(classes[0])),
        labels=labels, image_size=SIZE, crop_pct=1.0, color_jitter=0, scale=(0.8, 1.0), batch_size=8,
        val_fraction=0.25, num_workers=0, seed=0, **kwargs,
    )


def classifier(labels: list[str], **kwargs) -> ImageClassifier:
    return ImageClassifier(model_name="test_resnet", pretrained=False, num_labels=len(labels), label_names=labels,
                           optimizer={"lr": kwargs.pop("lr", 3e-3)}, scheduler={"name": "constant"}, **kwargs)


@pytest.fixture(scope="module")
def old_run(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A test_resnet trained on classes a / b (the previous task), its checkpoint and data folder."""
    root = tmp_path_factory.mktemp("old")
    L.seed_everything(0)
    model = classifier(OLD)
    data = image_data(root, OLD, OLD)
    t = trainer(root, max_epochs=4, limit_val_batches=0)
    t.fit(model, data)
    path = root / "old.ckpt"
    t.save_checkpoint(path)
    assert t.test(model, data, verbose=False)[0]["test/acc"] == 1.0  # a previous model worth keeping
    return {"ckpt": str(path), "root": root, "model": model}


def batch_of_images(n: int = 6) -> dict[str, torch.Tensor]:
    return {"pixel_values": torch.randn(n, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(3))}


# --- continuing, head growth ------------------------------------------------------------------------------------
def test_grown_head_keeps_old_weights_and_predictions(old_run):
    old = old_run["model"].eval()
    L.seed_everything(1)
    new = classifier(OLD + NEW, l2_sp=0.1)
    fresh_fc = {k: v.clone() for k, v in new.model.fc.state_dict().items()}
    rows = load_previous(new, old_run["ckpt"])
    new.eval()
    batch = batch_of_images()
    with torch.no_grad():
        torch.testing.assert_close(new(batch)[:, :2], old(batch))  # fp32 GEMMs of 4 vs 2 rows round apart
    assert find_head(new.model, 4, new.head_modules(new.model)) == "fc"
    assert torch.equal(new.model.fc.weight[:2], old.model.fc.weight) and torch.equal(new.model.fc.bias[:2], old.model.fc.bias)
    # The new classes' rows are the module's own fresh initialisation, untouched.
    assert torch.equal(new.model.fc.weight[2:], fresh_fc["weight"][2:]) and torch.equal(new.model.fc.bias[2:], fresh_fc["bias"][2:])
    assert set(rows) == {"fc.weight", "fc.bias"} and torch.equal(rows["fc.weight"], old.model.fc.weight)
    # Every other weight and buffer (batch-norm statistics) is the previous model's.
    previous = old.model.state_dict()
    for name, value in new.model.state_dict().items():
        if not name.startswith("fc."):
            assert torch.equal(value, previous[name]), name
    # L2-SP now pulls towards the previous model: zero at its weights.
    assert new._l2_sp_reference and float(new.penalty().detach()) == 0.0


@pytest.mark.parametrize("labels, message", [(["b", "a", "c"], "reorders"), (["a", "c"], r"drops \['b'\]")])
def test_labels_that_drop_or_reorder_old_classes_stop(old_run, labels, message):
    with pytest.raises(PtftError, match=message):
        load_previous(classifier(labels), old_run["ckpt"])


def test_head_that_cannot_be_found_is_a_clear_error():
    conv_head = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Conv2d(8, 3, 1))
    with pytest.raises(PtftError, match="no nn.Linear with 3 outputs"):
        find_head(conv_head, 3)
    assert find_head(torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 3)), 3) == "1"  # the last one


def test_text_classifier_grows_its_head(tiny_bert, tmp_path):
    """The same function for a Hugging Face model: BERT's ``classifier`` grows from 2 to 3 rows."""
    torch.manual_seed(0)
    old = TextClassifier(model_name=tiny_bert, num_labels=2, label_names=["neg", "pos"]).eval()
    path = tmp_path / "old.ckpt"
    torch.save({"state_dict": old.state_dict(), "hyper_parameters": dict(old.hparams)}, path)
    new = TextClassifier(model_name=tiny_bert, num_labels=3, label_names=["neg", "pos", "neutral"])
    load_previous(new, str(path))
    new.eval()
    batch = {"input_ids": torch.tensor([[101, 2023, 2003, 102]]), "attention_mask": torch.ones(1, 4, dtype=torch.long)}
    with torch.no_grad():
        torch.testing.assert_close(new(batch)[:, :2], old(batch))  # fp32 GEMMs of 4 vs 2 rows round apart
    assert new.model.config.num_labels == 3


# --- EWC ---------------------------------------------------------------------------------------------------------
def examples(n: int, num_labels: int) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(5)
    return [{"pixel_values": torch.randn(3, SIZE, SIZE, generator=g), "labels": i % num_labels} for i in range(n)]


def test_fisher_and_ewc_penalty_match_a_reference_computation():
    L.seed_everything(2)
    module = classifier(OLD + NEW)
    data = examples(5, 2)
    fisher = fisher_diagonal(module, data, num_classes=2, labels="given")
    assert all(p.grad is None for p in module.parameters())  # nothing for the optimizer to pick up
    # Reference: one example at a time, squared gradients of log p(y | x) over the first two classes, averaged.
    module.eval()
    expected = {n: torch.zeros_like(p) for n, p in module.model.named_parameters()}
    for ex in data:
        module.zero_grad()
        logits = module.model(ex["pixel_values"][None])[:, :2]
        logits.log_softmax(-1)[0, ex["labels"]].backward()
        for n, p in module.model.named_parameters():
            expected[n] += p.grad.pow(2) / len(data)
    module.zero_grad(set_to_none=True)
    for n in expected:
        torch.testing.assert_close(fisher[n], expected[n], rtol=1e-4, atol=1e-10)
    assert fisher["fc.weight"][2:].abs().sum() == 0 and fisher["fc.weight"][:2].abs().sum() > 0  # new rows are free

    ewc = EWC(strength=7.0)
    ewc.fisher = fisher
    ewc.anchor = {n: p.detach().clone() for n, p in module.model.named_parameters()}
    assert float(ewc.penalty(module).detach()) == 0.0  # at the old weights
    with torch.no_grad():
        for p in module.model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    reference = sum((fisher[n] * (p - ewc.anchor[n]) ** 2).sum() for n, p in module.model.named_parameters()) * 7.0 / 2
    torch.testing.assert_close(ewc.penalty(module), reference)
    # Sampled labels: a different (true-Fisher) estimate, with the same zero rows for the new classes.
    sampled = fisher_diagonal(module, data, num_classes=2, labels="sampled", seed=0)
    assert sampled["fc.weight"][2:].abs().sum() == 0
    torch.testing.assert_close(sampled["fc.weight"], fisher_diagonal(module, data, num_classes=2, seed=0)["fc.weight"])


def test_fisher_is_kept_on_resume_and_read_from_its_file(old_run, tmp_path, monkeypatch):
    old_data = image_data(old_run["root"] / "again", OLD, OLD, train=8)
    new_data = image_data(tmp_path, NEW, OLD + NEW, train=8)
    fisher_file = tmp_path / "fisher.pt"

    def fit(ckpt_path=None, steps=2, **ewc_kwargs):
        L.seed_everything(0)
        ewc = EWC(strength=10.0, samples=6, **ewc_kwargs)
        t = trainer(tmp_path, max_steps=steps, limit_val_batches=0, log_every_n_steps=1,
                    callbacks=[ContinueFrom(old_run["ckpt"]), ewc])
        t.fit(classifier(OLD + NEW), new_data, ckpt_path=ckpt_path)
        return t, ewc

    first_trainer, first = fit(data=old_data, fisher_file=str(fisher_file))
    assert fisher_file.is_file() and "train/ewc" in first_trainer.callback_metrics
    first_trainer.save_checkpoint(tmp_path / "run.ckpt")

    def no_fisher(*args, **kwargs):
        raise AssertionError("the Fisher was computed again")

    monkeypatch.setattr(ewc_module, "fisher_diagonal", no_fisher)
    _, resumed = fit(ckpt_path=str(tmp_path / "run.ckpt"), steps=3, data=old_data)
    for name, value in first.fisher.items():
        assert torch.equal(resumed.fisher[name], value) and torch.equal(resumed.anchor[name], first.anchor[name])
    _, from_file = fit(fisher_file=str(fisher_file))  # a fresh run: no data needed, the file has it
    for name, value in first.fisher.items():
        assert torch.equal(from_file.fisher[name], value)


class SaveFisher(L.Callback):
    """Each rank's Fisher once EWC (earlier in the callback list) has it."""

    def __init__(self, ewc: EWC, folder: Path) -> None:
        self.ewc, self.folder = ewc, folder

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        torch.save(self.ewc.fisher, self.folder / f"fisher{trainer.global_rank}.pt")


def test_fisher_under_ddp_is_the_fisher_of_every_example(old_run, tmp_path):
    """2 processes (gloo, fork) each take every other example (3 and 2 of 5); the summed Fisher is the one of all."""
    old_data = image_data(old_run["root"] / "ddp", OLD, OLD, train=4)  # 8 images, 6 after holding out 2
    L.seed_everything(0)
    module = classifier(OLD + NEW)
    load_previous(module, old_run["ckpt"])
    dataset = continual.example_subset(old_data, module, 5, 0, training=False)
    assert len(dataset) == 5
    single = fisher_diagonal(module, dataset, old_data.collate_fn(), num_classes=2, labels="given")
    ewc = EWC(data=old_data, samples=5, labels="given")
    t = trainer(tmp_path, max_steps=1, limit_val_batches=0, devices=2, strategy="ddp_fork",
                callbacks=[ContinueFrom(old_run["ckpt"]), ewc, SaveFisher(ewc, tmp_path)])
    t.fit(classifier(OLD + NEW), image_data(tmp_path, NEW, OLD + NEW, train=4))
    for rank in (0, 1):
        fisher = torch.load(tmp_path / f"fisher{rank}.pt", weights_only=True)
        for name, value in single.items():
            torch.testing.assert_close(fisher[name], value, rtol=1e-4, atol=1e-12)


# --- replay ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("replay, expected", [(5, 5), (0.5, 12)])
def test_replay_mixes_the_requested_number_of_old_examples(old_run, tmp_path, replay, expected):
    """``old`` has 16 training images per class, 12 of them after holding out a quarter: 24 rows; 0.5 of them is 12."""
    data = ContinualDataModule(new=image_data(tmp_path, NEW, OLD + NEW), old=image_data(tmp_path / "old", OLD, OLD),
                               replay=replay)
    assert data.label_names == OLD + NEW and data.num_labels == 4
    data.connect(old_run["model"])
    data.setup("fit")
    labels = torch.cat([b["labels"] for b in data.train_dataloader()])
    assert len(labels) == 24 + expected  # the new training rows, all of them, plus the replayed ones
    assert int((labels < 2).sum()) == expected and int((labels >= 2).sum()) == 24
    val = torch.cat([b["labels"] for b in data.val_dataloader()])
    assert set(val.tolist()) == {0, 1, 2, 3}  # validation on every class seen


def test_new_labels_must_extend_the_old_ones(tmp_path):
    data = ContinualDataModule(new=image_data(tmp_path, NEW, NEW + OLD), old=image_data(tmp_path / "old", OLD, OLD))
    with pytest.raises(PtftError, match="must start with the previous ones"):
        data.label_names


# --- a class-incremental run -------------------------------------------------------------------------------------
def test_replay_keeps_old_classes_that_plain_fine_tuning_forgets(old_run, tmp_path):
    """Task 2 trains on classes c / d only. Plain fine-tuning then calls every old image c or d; replaying 8 old
    images keeps a / b. Without the replayed images (replay 0) the run is plain fine-tuning, step for step."""
    scores = {}
    for name, replay in {"plain": 0, "replay": 8}.items():
        L.seed_everything(0)
        data = ContinualDataModule(new=image_data(tmp_path, NEW, OLD + NEW),
                                   old=image_data(old_run["root"] / "again", OLD, OLD), replay=replay)
        model = classifier(OLD + NEW)
        t = trainer(tmp_path / name, max_epochs=4, limit_val_batches=0, callbacks=[ContinueFrom(old_run["ckpt"])])
        t.fit(model, data)
        scores[name] = continual.evaluate_old_and_new(t, model, data)
    assert scores["plain"]["test/new/acc"] >= 0.9 and scores["replay"]["test/new/acc"] >= 0.9
    assert scores["plain"]["test/old/acc"] <= 0.5
    assert scores["replay"]["test/old/acc"] >= scores["plain"]["test/old/acc"] + 0.4
    assert scores["replay"]["test/all/acc"] > scores["plain"]["test/all/acc"]


# --- the recipe --------------------------------------------------------------------------------------------------
CIFAR_OLD = ["airplane", "automobile", "bird", "cat", "deer"]
CIFAR_NEW = ["dog", "frog", "horse", "ship", "truck"]


def test_continual_recipe_runs(run_cli, run_recipe, tmp_path):
    """The documented two steps: recipes/vision/cifar10.yaml on classes 0-4, then the continual recipe from its
    last.ckpt (the path the recipe names), with replay and a test on old, new and all classes."""
    old = {s: write_images(tmp_path / "old" / s, CIFAR_OLD, 3, seed=i) for i, s in enumerate(("train", "test"))}
    new = {s: write_images(tmp_path / "new" / s, CIFAR_NEW, 3, seed=2 + i) for i, s in enumerate(("train", "test"))}
    tiny = ["--model.init_args.model_name=test_resnet", "--model.init_args.pretrained=false", "--trainer.max_steps=2",
            "--trainer.limit_val_batches=1", "--trainer.num_sanity_val_steps=0"]
    run_cli(["fit", "--config", str(REPO / "recipes/vision/cifar10.yaml"), *tiny, f"--data.init_args.train={old['train']}",
             f"--data.init_args.test={old['test']}", "--data.init_args.num_workers=0",
             "--trainer.logger.init_args.name=cifar10-old", "--trainer.logger.init_args.save_dir=runs"], quiet=False)
    assert (tmp_path / "runs/cifar10-old/version_0/checkpoints/last.ckpt").is_file()
    data = "--data.init_args"
    cli = run_recipe("recipes/vision/cifar10-continual.yaml", [
        "--model.init_args.model_name=test_resnet", f"{data}.new.init_args.train={new['train']}",
        f"{data}.new.init_args.test={new['test']}", f"{data}.old.init_args.train={old['train']}",
        f"{data}.old.init_args.test={old['test']}", f"{data}.new.init_args.num_workers=0",
        f"{data}.old.init_args.num_workers=0", f"{data}.replay=4",
    ])
    assert cli.trainer.global_step == 2 and cli.model.label_names == CIFAR_OLD + CIFAR_NEW
    assert any(isinstance(c, ContinueFrom) and c.head_reference for c in cli.trainer.callbacks)
    scores = continual.evaluate_old_and_new(cli.trainer, cli.model, cli.datamodule)
    assert {"test/old/acc", "test/new/acc", "test/all/acc"} <= set(scores)
