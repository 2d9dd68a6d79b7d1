import csv
import zipfile
from pathlib import Path

import pytest
import torch

from ptft.core.errors import PtftError
from ptft.vision import ImageClassificationDataModule, ImageClassifier
from ptft.vision.data import ImageDataset, ImageSource, to_rgb


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
    for ds in (dm.datasets["train"], dm.datasets["val"]):  # each image carries its folder's label id
        assert ds.labels == [dm.label_names.index(s.root.parent.name) for s in ds.images]
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
        _ = dm.label_names


def test_16_bit_greyscale_keeps_its_gradient(tmp_path):
    import numpy as np
    from PIL import Image

    ramp = np.tile(np.linspace(0, 65535, 32).round().astype(np.uint16), (8, 1))  # 16-bit, dark to bright
    Image.fromarray(ramp).save(tmp_path / "ramp.png")
    with Image.open(tmp_path / "ramp.png") as im:
        assert im.mode.startswith("I")
        pixels = np.asarray(to_rgb(im))
    assert pixels.shape == (8, 32, 3) and pixels.dtype == np.uint8
    np.testing.assert_allclose(pixels[0, :, 0], np.linspace(0, 255, 32), atol=1)  # not clipped to white
    item = ImageDataset([ImageSource(tmp_path / "ramp.png")], None, np.asarray)[0]  # what training decodes
    np.testing.assert_array_equal(item["pixel_values"], pixels)
    floats = Image.fromarray(np.linspace(0, 1, 32, dtype=np.float32)[None].repeat(4, 0), mode="F")
    np.testing.assert_allclose(np.asarray(to_rgb(floats))[0, :, 1], np.linspace(0, 255, 32), atol=1)


def test_exif_orientation_is_applied(tmp_path):
    import numpy as np
    from PIL import Image

    stored = np.zeros((20, 40, 3), dtype=np.uint8)  # stored 40 wide, 20 high; a bright top-left corner
    stored[:5, :5] = 255
    exif = Image.Exif()
    exif[0x0112] = 6  # shown turned 90 degrees clockwise: 20 wide, 40 high, the corner at the top right
    Image.fromarray(stored).save(tmp_path / "photo.jpg", exif=exif)
    upright = np.asarray(to_rgb(Image.open(tmp_path / "photo.jpg")))
    assert upright.shape == (40, 20, 3) and upright[:5, -5:].mean() > 200 and upright[:5, :5].mean() < 50


def test_predict_needs_no_labels(image_dirs, tmp_path):
    """Predict images from a CSV with only a path column, a flat zip, or a folder of any depth."""
    root = Path(image_dirs["test"])
    files = sorted(root.rglob("*.png"))
    with open(tmp_path / "predict.csv", "w", newline="") as f:
        f.write("path\n" + "".join(f"{p.relative_to(tmp_path)}\n" for p in files))
    with zipfile.ZipFile(tmp_path / "flat.zip", "w") as zf:
        for p in files:
            zf.write(p, f"{p.parent.name}-{p.name}")
    for location in (str(tmp_path / "predict.csv"), str(tmp_path / "flat.zip"), str(root)):
        if location == str(root):  # images at several depths, some outside any class folder
            (root / "red" / "deeper").mkdir()
            (root / "red" / "000.png").rename(root / "red" / "deeper" / "000.png")
            (root / "blue" / "001.png").rename(root / "loose.png")
        dm = ImageClassificationDataModule(predict=location, labels=["blue", "green", "red"], image_size=32,
                                           batch_size=4, num_workers=0)
        batches(dm, "predict")
        assert len(dm.datasets["predict"]) == 12
        batch = next(iter(dm.predict_dataloader()))
        assert batch["pixel_values"].shape == (4, 3, 32, 32) and "labels" not in batch
        names = dm.datasets["predict"].item_names()  # the predictions' file column: each image as given
        if location.endswith(".zip"):
            assert sorted(names) == sorted(f"{location}/{p.parent.name}-{p.name}" for p in files)
        elif location == str(root):
            assert str(root / "red" / "deeper" / "000.png") in names and str(root / "loose.png") in names
