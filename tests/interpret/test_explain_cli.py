"""``ptft explain`` as a user runs it: a checkpoint trained from a shipped recipe, every method, files a person opens."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import REPO, sentiment_rows, write_csv, write_images
from PIL import Image

from ptft.cli import main


def is_png(path: Path) -> bool:
    with Image.open(path) as image:
        return image.format == "PNG" and image.size[0] > 10 and image.size[1] > 10


def fit_recipe(run_cli, tmp_path: Path, recipe: str, overrides: list[str]) -> Path:
    """Trains ``recipe`` one epoch (a few steps) with its own logger and checkpointing; returns the checkpoint it wrote."""
    run_cli(["fit", "--config", str(REPO / recipe), *overrides, "--trainer.max_epochs=1", "--trainer.accelerator=cpu",
             "--trainer.num_sanity_val_steps=0", "--trainer.enable_progress_bar=false",
             f"--trainer.logger.init_args.save_dir={tmp_path / 'runs'}", "--trainer.callbacks=[]"], quiet=False)
    checkpoints = sorted((tmp_path / "runs").rglob("*.ckpt"))
    assert checkpoints, "the recipe wrote no checkpoint"
    return checkpoints[-1]


@pytest.fixture
def text_checkpoint(run_cli, tiny_bert, tmp_path) -> Path:
    train = write_csv(tmp_path / "train.csv", sentiment_rows(32, 1))
    val = write_csv(tmp_path / "val.csv", sentiment_rows(12, 2))
    return fit_recipe(run_cli, tmp_path, "recipes/text/sst2.yaml", [
        f"--model.init_args.model_name={tiny_bert}", f"--data.init_args.train_file={train}",
        f"--data.init_args.val_file={val}", "--data.init_args.text_column=text", "--data.init_args.rename_columns=null",
        "--data.init_args.batch_size=8"])


def explain(*args: str) -> None:
    main(["explain", *args])


def test_text_methods_from_the_run_folder_config(text_checkpoint, shap_without_jit, capsys):
    run = text_checkpoint.parent.parent
    assert (run / "config.yaml").is_file()  # what `ptft explain` reads when --config is not given
    for method, expected in [("ig", {"0000-ig.png", "0000-ig.html", "0002-ig.png"}),
                             ("attention", {"0000-attention.png", "0000-attention.html"}),
                             ("shap", {"0000-shap.png", "0000-shap.html"}),
                             ("tsne", {"embeddings-tsne.png", "embeddings.npz"}),
                             ("errors", {"confusion.png", "per_class.csv", "mistakes.csv"})]:
        count = [] if method == "tsne" else ["--num_samples", "3"]  # t-SNE: the whole split (12)
        explain("--ckpt_path", str(text_checkpoint), "--method", method, *count)
        folder = run / "explain" / method
        names = {p.name for p in folder.iterdir()}
        assert expected <= names, (method, sorted(names))
        assert "index.html" in names and all(is_png(p) for p in folder.glob("*.png"))
        assert f"open {folder / 'index.html'}" in capsys.readouterr().out
    assert {p.name for p in (run / "explain" / "ig").glob("*-ig.png")} == {"0000-ig.png", "0001-ig.png", "0002-ig.png"}
    assert "0000-ig.png" in (run / "explain" / "ig" / "index.html").read_text()


def test_vision_and_audio_methods(run_cli, tmp_path):
    from audio_signals import write_audio_tree

    train, test = write_images(tmp_path / "train", 6), write_images(tmp_path / "test", 2, seed=1)
    images = ["--model.init_args.pretrained=false", f"--data.init_args.train={train}",
              f"--data.init_args.val={test}", "--data.init_args.test=null", "--data.init_args.num_workers=0",
              "--data.init_args.batch_size=4"]
    cnn = fit_recipe(run_cli, tmp_path / "cnn", "recipes/vision/cifar10.yaml",
                     ["--model.init_args.model_name=test_resnet", *images])
    vit = fit_recipe(run_cli, tmp_path / "vit", "recipes/vision/cifar10.yaml", [
        "--model.init_args.model_name=vit_tiny_patch16_224",
        "--model.init_args.model_kwargs={img_size: 32, patch_size: 8, depth: 2, embed_dim: 32, num_heads: 2}", *images])
    for tag, checkpoint, method in [("cnn", cnn, "gradcam"), ("cnn", cnn, "gradcam++"), ("vit", vit, "attention"),
                                    ("vit", vit, "gradcam")]:
        out = tmp_path / "out" / f"{tag}-{method}"
        explain("--ckpt_path", str(checkpoint), "--method", method, "--num_samples", "2", "--output", str(out))
        pictures = sorted(p.name for p in out.glob("*.png"))
        assert len(pictures) == 2 and all(is_png(out / p) for p in pictures), (method, pictures)

    audio = fit_recipe(run_cli, tmp_path / "audio", "recipes/audio/keyword-cnn.yaml", [
        "--model.init_args.model_name=test_resnet", "--model.init_args.pretrained=false",
        f"--data.init_args.train={write_audio_tree(tmp_path / 'wav-train', 6, seed=1)}",
        f"--data.init_args.val={write_audio_tree(tmp_path / 'wav-val', 2, seed=2)}", "--data.init_args.test=null",
        "--data.init_args.num_workers=0", "--data.init_args.batch_size=4"])
    explain("--ckpt_path", str(audio), "--method", "saliency", "--num_samples", "2")
    out = audio.parent.parent / "explain" / "saliency"
    assert sorted(p.name for p in out.glob("*.png")) == ["0000-saliency.png", "0001-saliency.png"]


def test_one_line_errors(text_checkpoint, tmp_path, capsys):
    with pytest.raises(SystemExit) as stop:
        explain("--ckpt_path", str(tmp_path / "missing.ckpt"), "--method", "ig")
    assert stop.value.code == 2 and "checkpoint not found" in capsys.readouterr().err
    with pytest.raises(SystemExit) as stop:  # a text model has no Grad-CAM layer
        explain("--ckpt_path", str(text_checkpoint), "--method", "gradcam", "--num_samples", "1")
    err = capsys.readouterr().err
    assert stop.value.code == 2 and err.startswith("ptft: error:") and len(err.strip().splitlines()) == 1
    lonely = tmp_path / "lonely.ckpt"
    lonely.write_bytes(text_checkpoint.read_bytes())
    with pytest.raises(SystemExit) as stop:  # no run folder around it: the recipe must be named
        explain("--ckpt_path", str(lonely), "--method", "ig")
    assert stop.value.code == 2 and "give --config" in capsys.readouterr().err
