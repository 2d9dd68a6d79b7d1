"""Every recipe parses, instantiates with a tiny model and generated data, and trains for 2 steps.

Classification recipes are run here with generated data; every other task's test file runs its own recipes (it
knows how to generate that task's data), and :func:`test_every_recipe_is_run_by_a_test` checks none is forgotten.
"""

from pathlib import Path

import pytest
import yaml
from conftest import REPO, sentiment_rows, write_csv, write_images

from ptft.cli import RECIPES as SHIPPED

RECIPES = sorted(SHIPPED.rglob("*.yaml"))  # the packaged copies (ptft/recipes), the only ones
HERE = ("ptft.text.TextClassificationDataModule", "ptft.vision.ImageClassificationDataModule")
# Recipes that need a previous run's checkpoint (a teacher) are run by their own tests, which train one first.
NEEDS_CHECKPOINT = ("ptft.transfer.Distillation",)
# Strategies Lightning runs only on GPUs: tests/test_ddp_recipes.py runs their recipes on CPU its own way.
GPU_ONLY = ("lightning.pytorch.strategies.FSDPStrategy", "lightning.pytorch.strategies.DeepSpeedStrategy")
CLASSIFICATION = [r for r in RECIPES if yaml.safe_load(r.read_text())["data"]["class_path"] in HERE
                  and not any(c in r.read_text() for c in NEEDS_CHECKPOINT + GPU_ONLY)]


def test_recipes_folder_is_the_shipped_one():
    """``recipes/...`` (docs, recipe headers, tests) and ``ptft/recipes/...`` (the package) are the same files."""
    assert (REPO / "recipes").resolve() == SHIPPED
    assert len(RECIPES) > 20


def test_every_recipe_is_run_by_a_test():
    tests = "\n".join(p.read_text() for p in (REPO / "tests").rglob("test_*.py") if p.name != "test_recipes.py")
    for recipe in sorted(set(RECIPES) - set(CLASSIFICATION)):
        name = f"recipes/{recipe.relative_to(SHIPPED).as_posix()}"  # the path the task tests use
        assert name in tests, f"{name} is not run by any test: run it in its task's test file (see run_recipe)"


def model_class(recipe: Path) -> type:
    import importlib

    module, name = yaml.safe_load(recipe.read_text())["model"]["class_path"].rsplit(".", 1)
    return getattr(importlib.import_module(module), name)


def test_transformer_recipes_clip_gradients():
    """Every Hugging Face-model recipe clips the gradient norm, as HF Trainer (``max_grad_norm=1.0``) and BERT do.

    Without it the NER recipe learned nothing on WNUT-17 (entity F1 0.00 after 3 epochs, docs/benchmarks.md).
    """
    from ptft.core.hf import HFModule

    transformers = [r for r in RECIPES if issubclass(model_class(r), HFModule)]
    assert len(transformers) >= 15  # the check below must not pass on an empty list
    unclipped = []
    for recipe in transformers:
        trainer = yaml.safe_load(recipe.read_text())["trainer"]
        if not trainer.get("gradient_clip_val") or trainer.get("gradient_clip_algorithm", "norm") != "norm":
            unclipped.append(recipe.relative_to(SHIPPED).as_posix())
    assert not unclipped, f"these transformer recipes do not clip the gradient norm: {unclipped}"


def text_overrides(init: dict, tmp: Path, tiny_bert: str) -> list[str]:
    text, label = init.get("text_column", "text"), init.get("label_column", "label")
    names = init.get("labels")
    renamed_from = {new: old for old, new in (init.get("rename_columns") or {}).items()}

    def rows(n, seed, column):
        out = []
        for r in sentiment_rows(n, seed):
            value = r["label"] == "positive" if names else r["label"]
            row = {label: int(value) % len(names) if names else value, column: r["text"]}
            if init.get("text_pair_column"):
                row[init["text_pair_column"]] = r["text"]
            out.append(row)
        return out

    train = write_csv(tmp / "train.csv", rows(48, 1, text))
    val = write_csv(tmp / "val.csv", rows(16, 2, renamed_from.get(text, text)))
    args = [f"--model.init_args.model_name={tiny_bert}", f"--data.init_args.train_file={train}"]
    args += [f"--data.init_args.val_file={val}", "--data.init_args.test_file=null", "--data.init_args.predict_file=null"]
    return args


def vision_overrides(init: dict, tmp: Path) -> list[str]:
    train, test = write_images(tmp / "train", 6), write_images(tmp / "test", 2, seed=1)
    return [
        "--model.init_args.model_name=test_resnet", "--model.init_args.pretrained=false",
        f"--data.init_args.train={train}", f"--data.init_args.test={test}", "--data.init_args.num_workers=0",
    ]


@pytest.mark.parametrize("recipe", CLASSIFICATION, ids=[str(r.relative_to(SHIPPED)) for r in CLASSIFICATION])
def test_recipe_trains_two_steps(recipe, run_cli, tiny_bert, tmp_path):
    config = yaml.safe_load(recipe.read_text())
    data_class = config["data"]["class_path"]
    init = config["data"]["init_args"]
    if data_class.startswith("ptft.text."):
        overrides = text_overrides(init, tmp_path, tiny_bert)
    elif data_class.startswith("ptft.vision."):
        overrides = vision_overrides(init, tmp_path)
    else:
        pytest.fail(f"no tiny stand-in for {data_class}: add one to this test")
    cli = run_cli(
        ["fit", "--config", str(recipe), *overrides, "--trainer.max_steps=2", "--trainer.accelerator=cpu",
         "--trainer.limit_val_batches=1", "--trainer.num_sanity_val_steps=0", "--trainer.enable_progress_bar=false",
         f"--trainer.logger.init_args.save_dir={tmp_path / 'runs'}"],
        quiet=False,
    )
    assert cli.trainer.global_step == 2
    package = type(cli.model).__module__.rsplit(".", 1)[0]  # ptft.text.modules -> ptft.text
    assert f"{package}.{type(cli.model).__name__}" == config["model"]["class_path"]
