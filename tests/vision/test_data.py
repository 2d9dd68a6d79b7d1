import csv
import zipfile
from pathlib import Path

import pytest
import torch

from ptft.core.errors import PtftError
from ptft.vision import ImageClassificationDataModule, ImageClassifier


def zip_tree(root: Path, zip_path: Path, prefix: str = "") -> str:
    with zipfile.ZipFile(zip_path, "w") as zf:
        for p in sorted(root.rglob("*.png")):
            zf.write(p, prefix + p.relative_to(root).as_posix())
    return str(zip_path)


def batches(dm, stage="fit"):
    dm.connect(ImageClassifier("test_resnet", num_labels=3, pretrained=False))
    dm.setup(stage)
    return dm


def test_folder_tree_labels_and_transforms(image_dirs):
    dm = ImageClassificationDataModule(train=image_dirs["train"], image_size=32, batch_size=4, num_workers=0)
    assert dm.label_names == ["blue", "green", "red"]
    batches(dm)
    assert len(dm.datasets["train"]) + len(dm.datasets["val"]) == 36
    batch = next(iter(dm.train_dataloader()))
    assert batch["pixel_values"].shape == (4, 3, 32, 32)
    assert batch["labels"].dtype == torch.long
    val = next(iter(dm.val_dataloader()))["pixel_values"]
    torch.testing.assert_close(val, next(iter(dm.val_dataloader()))["pixel_values"])  # eval is deterministic


def test_zip_archive_and_folder_inside_zip(image_dirs, tmp_path):
    plain = zip_tree(Path(image_dirs["train"]), tmp_path / "a.zip")
    nested = zip_tree(Path(image_dirs["train"]), tmp_path / "b.zip", prefix="train/")
    for location in (plain, nested + "/train"):
        dm = ImageClassificationDataModule(train=location, image_size=32, batch_size=4, num_workers=1)
        assert dm.label_names == ["blue", "green", "red"]
        batches(dm)
        # a worker process reads the archive: every image decodes
        assert sum(len(b["labels"]) for b in dm.train_dataloader()) == len(dm.datasets["train"])


def test_csv_of_paths(image_dirs, tmp_path):
    rows = [{"file": str(p.relative_to(Path(image_dirs["train"]).parent)), "cls": p.parent.name}
            for p in sorted(Path(image_dirs["train"]).rglob("*.png"))]
    with open(tmp_path / "train.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["file", "cls"])
        writer.writeheader()
        writer.writerows(rows)
    dm = ImageClassificationDataModule(train=str(tmp_path / "train.csv"), path_column="file", label_column="cls",
                                       image_size=32, num_workers=0)
    assert dm.num_labels == 3
    batches(dm)
    assert len(dm.datasets["train"]) == 32


def test_unreadable_image_error_or_skip(image_dirs):
    (Path(image_dirs["train"]) / "red" / "broken.png").write_bytes(b"not an image")
    dm = ImageClassificationDataModule(train=image_dirs["train"], val=image_dirs["test"], image_size=32, num_workers=0)
    with pytest.raises(PtftError, match=r"1 unreadable image\(s\) in train, first: .*broken.png"):
        batches(dm)
    dm = ImageClassificationDataModule(train=image_dirs["train"], val=image_dirs["test"], image_size=32,
                                       num_workers=0, on_bad_image="skip")
    with pytest.warns(UserWarning, match="skipping 1 unreadable"):
        batches(dm)
    assert len(dm.datasets["train"]) == 36


def test_bad_locations_and_unseen_labels(image_dirs, tmp_path):
    with pytest.raises(PtftError, match="train: 'missing/dir' does not exist"):
        ImageClassificationDataModule(train="missing/dir")
    (tmp_path / "empty").mkdir()
    with pytest.raises(PtftError, match="no images in class folders"):
        ImageClassificationDataModule(train=str(tmp_path / "empty"))
    (Path(image_dirs["test"]) / "purple").mkdir()
    (Path(image_dirs["test"]) / "red" / "000.png").rename(Path(image_dirs["test"]) / "purple" / "000.png")
    dm = ImageClassificationDataModule(train=image_dirs["train"], val=image_dirs["test"])
    with pytest.raises(PtftError, match=r"val has labels never seen in training: \['purple'\]"):
        dm.label_names
