"""Few-shot fine-tuning: k-shot subsets per modality, prediction ensembles, model soups, their commands, the recipe.

Checkpoints come from recipes/text/sst2-fewshot.yaml run for a few steps on a tiny random BERT and generated reviews.
"""

from __future__ import annotations

import csv
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
from conftest import QUIET, REPO, sentiment_rows, write_csv

from ptft.core.errors import PtftError
from ptft.core.module import load_checkpoint
from ptft.transfer.ensemble import data_from_config, ensemble_predictions
from ptft.transfer.soup import HeldOutScore, greedy_soup, read_checkpoint, uniform_soup

RECIPE = REPO / "recipes/text/sst2-fewshot.yaml"
K = 8


def cli(args: list[str]):
    from ptft.cli import run_cli

    sys.argv = ["ptft"]
    return run_cli(args)


@pytest.fixture(scope="module")
def fewshot(tmp_path_factory, tiny_bert):
    """Generated review files, the recipe's data arguments for them, and checkpoints of the recipe at 3 seeds."""
    tmp = tmp_path_factory.mktemp("fewshot")
    files = {split: write_csv(tmp / f"{split}.csv", sentiment_rows(n, seed))
             for split, n, seed in (("train", 64, 1), ("val", 24, 2), ("test", 24, 3))}
    data = [f"--data.init_args.train_file={files['train']}", f"--data.init_args.val_file={files['val']}",
            f"--data.init_args.test_file={files['test']}", "--data.init_args.text_column=text",
            f"--data.init_args.train_per_class={K}"]
    checkpoints, runs = [], []
    for seed in (0, 1, 2):
        run = cli(["fit", "--config", str(RECIPE), *data, *QUIET, f"--model.init_args.model_name={tiny_bert}",
                   f"--seed_everything={seed}", "--trainer.max_epochs=3", "--trainer.enable_checkpointing=false",
                   "--trainer.callbacks=[]", f"--trainer.default_root_dir={tmp}"])
        checkpoints.append(str(tmp / f"seed{seed}.ckpt"))
        run.trainer.save_checkpoint(checkpoints[-1])
        runs.append(run)
    return {"tmp": tmp, "files": files, "data": data, "checkpoints": checkpoints, "runs": runs}


def recipe_data(fewshot, *extra: str):
    return data_from_config(["--config", str(RECIPE), *fewshot["data"], *extra])


# --- the recipe and k-shot subsets --------------------------------------------------------------------------------
def test_fewshot_recipe_trains_on_k_rows_per_class(fewshot):
    """recipes/text/sst2-fewshot.yaml: k rows per class, drawn by the run's seed, trained for its epochs."""
    subsets = []
    for run in fewshot["runs"]:
        train = run.datamodule.datasets["train"]
        assert sorted(train["labels"]) == [0] * K + [1] * K
        assert run.trainer.global_step == 3 * (2 * K // 8)  # 3 epochs of 2 batches of 8
        subsets.append(sorted(map(tuple, train["input_ids"])))
    assert subsets[0] != subsets[1] != subsets[2]  # seed_everything draws another subset


def test_text_subset_is_seeded_and_nested(fewshot):
    def subset(seed: int, k: int) -> list[str]:
        dm = recipe_data(fewshot, f"--data.init_args.seed={seed}", f"--data.init_args.train_per_class={k}")
        return list(dm.split_rows("train")["text"])

    assert subset(0, 4) == subset(0, 4) and subset(0, 4) != subset(1, 4)
    assert set(subset(0, 4)) < set(subset(0, 8))
    with pytest.raises(PtftError, match="train_per_class=40, but class 'negative' has only 32 training row"):
        subset(0, 40)


def test_image_subset_is_stratified_after_the_held_out_split(image_dirs, monkeypatch, tmp_path):
    from ptft.vision import ImageClassificationDataModule

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))

    def split(k: int | None) -> tuple[list[str], list[str]]:
        dm = ImageClassificationDataModule(train=image_dirs["train"], image_size=32, num_workers=0, seed=3,
                                           val_fraction=0.25, train_per_class=k)
        dm.setup("fit")
        return [str(s.root) for s in dm.datasets["train"].images], [str(s.root) for s in dm.datasets["val"].images]

    (train, val), (everything, same_val) = split(2), split(None)
    assert sorted(Path(f).parent.name for f in train) == ["blue"] * 2 + ["green"] * 2 + ["red"] * 2
    assert val == same_val and set(train) <= set(everything)
    with pytest.raises(PtftError, match=r"has only \d+ training row\(s\) after holding out validation"):
        split(12)  # 12 images per class, 9 of them on average left for training


# --- soups --------------------------------------------------------------------------------------------------------
def test_uniform_soup_of_copies_is_the_checkpoint(fewshot):
    path = fewshot["checkpoints"][0]
    soup = uniform_soup([path] * 3)
    original = read_checkpoint(path)["state_dict"]
    assert soup.checkpoint["state_dict"].keys() == original.keys()
    for key, value in original.items():
        assert torch.equal(soup.checkpoint["state_dict"][key], value), key


def test_uniform_soup_is_the_mean_and_evaluates_as_a_checkpoint(fewshot, tmp_path, monkeypatch):
    a, b = fewshot["checkpoints"][:2]
    soup = uniform_soup([a, b])
    soup.save(str(tmp_path / "soup.ckpt"))
    model = load_checkpoint(str(tmp_path / "soup.ckpt"))
    states = [read_checkpoint(p)["state_dict"] for p in (a, b)]
    for key, value in model.state_dict().items():
        if value.is_floating_point():
            torch.testing.assert_close(value, (states[0][key] + states[1][key]) / 2)
        else:  # num_batches_tracked and other integer buffers: the first ingredient's
            assert torch.equal(value, states[0][key])
    assert "optimizer_states" not in soup.checkpoint and soup.checkpoint["ptft_soup"]["method"] == "uniform"
    monkeypatch.chdir(tmp_path)
    run = cli(["test", "--config", str(RECIPE), *fewshot["data"], *QUIET, f"--ckpt_path={tmp_path / 'soup.ckpt'}",
               f"--model.init_args.model_name={fewshot['runs'][0].model.model_name}"])
    assert 0.0 <= run.trainer.callback_metrics["test/acc"] <= 1.0


def noisy_copy(path: str, out: Path, scale: float) -> str:
    checkpoint = read_checkpoint(path)
    g = torch.Generator().manual_seed(0)
    checkpoint["state_dict"] = {
        k: v + scale * torch.randn(v.shape, generator=g) if v.is_floating_point() else v
        for k, v in checkpoint["state_dict"].items()
    }
    torch.save(checkpoint, out)
    return str(out)


def test_greedy_soup_never_scores_below_its_best_ingredient(fewshot, tmp_path):
    candidates = [*fewshot["checkpoints"], noisy_copy(fewshot["checkpoints"][0], tmp_path / "noisy.ckpt", 0.5)]
    soup = greedy_soup(candidates, recipe_data(fewshot), accelerator="cpu")
    assert soup.metric == "val/acc" and set(soup.scores) == set(candidates)
    best = max(candidates, key=soup.scores.__getitem__)
    assert soup.ingredients[0] == best  # the order is decided on the held-out data
    assert soup.score >= soup.scores[best]
    soup.save(str(tmp_path / "greedy.ckpt"))
    rescored = HeldOutScore(load_checkpoint(str(tmp_path / "greedy.ckpt")), recipe_data(fewshot), accelerator="cpu")
    assert rescored(read_checkpoint(str(tmp_path / "greedy.ckpt"))["state_dict"]) == pytest.approx(soup.score)


def test_soup_refuses_other_architectures_and_labels(fewshot, tmp_path):
    path = fewshot["checkpoints"][0]
    checkpoint = read_checkpoint(path)
    dropped = dict(checkpoint, state_dict={k: v for i, (k, v) in enumerate(checkpoint["state_dict"].items()) if i})
    torch.save(dropped, tmp_path / "dropped.ckpt")
    with pytest.raises(PtftError, match=r"have different weights \('model\..*'\): soups need one architecture$"):
        uniform_soup([path, str(tmp_path / "dropped.ckpt")])
    key = next(k for k, v in checkpoint["state_dict"].items() if v.ndim == 2)
    resized = dict(checkpoint, state_dict={**checkpoint["state_dict"], key: torch.zeros(3, 3)})
    torch.save(resized, tmp_path / "resized.ckpt")
    with pytest.raises(PtftError, match=r"is \(3, 3\) in .*resized.ckpt but \(\d+, \d+\) in"):
        uniform_soup([path, str(tmp_path / "resized.ckpt")])
    with pytest.raises(PtftError, match="soup ingredients share one label order"):
        uniform_soup([path, relabelled(path, tmp_path)])


# --- ensembles ----------------------------------------------------------------------------------------------------
def relabelled(path: str, tmp_path: Path) -> str:
    checkpoint = read_checkpoint(path)
    checkpoint["hyper_parameters"] = {**checkpoint["hyper_parameters"], "label_names": ["positive", "negative"]}
    torch.save(checkpoint, tmp_path / "relabelled.ckpt")
    return str(tmp_path / "relabelled.ckpt")


def test_ensemble_probabilities_are_the_mean_of_the_members(fewshot):
    paths = fewshot["checkpoints"][:2]
    data = recipe_data(fewshot)
    result = ensemble_predictions(paths, data, "test", device="cpu")
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False)
    members = []
    for path in paths:  # each member alone, through Lightning's predict loop over the same test batches
        outputs = trainer.predict(load_checkpoint(path), dataloaders=data.test_dataloader())
        members.append(torch.cat([out["probs"] for out in outputs]))
    torch.testing.assert_close(result.probs, torch.stack(members).mean(0))
    labels = torch.cat([batch["labels"] for batch in data.test_dataloader()])
    assert torch.equal(result.labels, labels) and len(labels) == 24
    assert result.accuracy() == (result.probs.argmax(-1) == labels).float().mean().item()


def test_ensemble_refuses_another_label_order(fewshot, tmp_path):
    path = fewshot["checkpoints"][0]
    with pytest.raises(PtftError, match=r"has labels \['positive', 'negative'\], .* has \['negative', 'positive'\]: "
                                        "members must share the label order$"):
        ensemble_predictions([path, relabelled(path, tmp_path)], recipe_data(fewshot), "test", device="cpu")


# --- the commands -------------------------------------------------------------------------------------------------
def test_ensemble_and_soup_commands_run_end_to_end(fewshot, tmp_path, monkeypatch, capsys):
    from ptft.cli import main

    monkeypatch.chdir(tmp_path)
    a, b = fewshot["checkpoints"][:2]
    main(["ensemble", "--config", str(RECIPE), *fewshot["data"], "--checkpoints", a, b, "--output", "preds.csv"])
    out = capsys.readouterr().out
    assert "ensemble of 2 on test (24 examples)" in out and "ensemble (mean probabilities)" in out
    rows = list(csv.DictReader(open(tmp_path / "preds.csv")))
    assert len(rows) == 24 and list(rows[0]) == ["target", "label", "label_id", "p_negative", "p_positive"]

    main(["soup", "--method", "greedy", "--config", str(RECIPE), *fewshot["data"], "--checkpoints", a, b,
          "--output", "soup.ckpt"])
    out = capsys.readouterr().out
    assert "held-out val/acc" in out and "wrote the greedy soup of" in out
    assert load_checkpoint(str(tmp_path / "soup.ckpt")).label_names == ["negative", "positive"]

    with pytest.raises(SystemExit):
        main(["soup", "--method", "greedy", "--checkpoints", a, b, "--output", "soup.ckpt"])
    assert "a greedy soup needs held-out data: add --config RECIPE" in capsys.readouterr().err
