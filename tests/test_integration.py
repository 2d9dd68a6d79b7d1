"""Real data from ../shared/data (skipped when absent): a pretrained text model and a small image model."""

import random
import zipfile
from pathlib import Path

import pytest
from conftest import REPO, SHARED_DATA, minilm_dir

pytestmark = pytest.mark.integration


def need(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"{path} not available")
    return path


def test_minilm_on_2000_sst2_sentences_reaches_078_dev_accuracy(run_cli, tmp_path):
    sst2 = need(SHARED_DATA / "sst2")
    header, *rows = (sst2 / "train.tsv").read_text().splitlines()
    random.Random(0).shuffle(rows)
    (tmp_path / "train2000.tsv").write_text("\n".join([header, *rows[:2000]]) + "\n")
    cli = run_cli([
        "fit", "--config", str(REPO / "recipes/text/sst2.yaml"),
        f"--model.init_args.model_name={minilm_dir()}",
        f"--data.init_args.train_file={tmp_path / 'train2000.tsv'}", f"--data.init_args.val_file={sst2 / 'dev.tsv'}",
        # small-data settings (the recipe's 5e-5 / batch 32 suit the full 67k sentences): more, larger steps
        "--model.init_args.optimizer.lr=1e-4", "--data.init_args.batch_size=16",
        "--trainer.max_epochs=1", "--trainer.callbacks=[]",
    ])
    dev_acc = cli.trainer.callback_metrics["val/acc"].item()
    print(f"SST-2 dev accuracy after 1 epoch on 2,000 sentences: {dev_acc:.4f}")
    assert len(cli.datamodule.datasets["val"]) == 872
    assert dev_acc >= 0.78


def extract_subset(archive: Path, split: str, per_class: int, dest: Path) -> str:
    with zipfile.ZipFile(archive) as zf:
        names = sorted(n for n in zf.namelist() if n.startswith(f"{split}/") and n.endswith(".jpg"))
        by_class: dict[str, list[str]] = {}
        for n in names:
            by_class.setdefault(n.split("/")[1], []).append(n)
        for members in by_class.values():
            for n in members[:per_class]:
                zf.extract(n, dest)
    return str(dest / split)


def test_small_timm_model_on_2000_cifar10_images_beats_chance(run_cli, tmp_path):
    archive = need(SHARED_DATA / "cifar10" / "cifar10-jpg.zip")
    train = extract_subset(archive, "train", 200, tmp_path)
    test = extract_subset(archive, "test", 50, tmp_path)
    cli = run_cli([
        "fit", "--config", str(REPO / "recipes/vision/cifar10.yaml"),
        "--model.init_args.model_name=resnet10t", "--model.init_args.pretrained=false",
        f"--data.init_args.train={train}", f"--data.init_args.val={test}", "--data.init_args.test=null",
        "--trainer.max_epochs=4", "--trainer.callbacks=[]", "--data.init_args.batch_size=64",
    ])
    acc = cli.trainer.callback_metrics["val/acc"].item()
    print(f"CIFAR-10 (500 test images) accuracy of resnet10t from scratch, 2,000 images x 4 epochs: {acc:.4f}")
    assert acc >= 0.25  # chance is 0.10
