import json
import zipfile
from pathlib import Path

import lightning as L
import pytest
import torch
from conftest import write_images

from ptft.cli import main as ptft_main
from ptft.core.errors import PtftError
from ptft.vision import ImageClassifier
from ptft.vision.pretrain import SimCLR, UnlabeledImageDataModule, nt_xent

TINY = "test_resnet"


def write_patterns(root: Path, n: int, size: int = 32, seed: int = 0, mirrored: bool = False) -> str:
    """A flat folder of ``n`` distinct images: random 4x4 colour grids (each image its own instance); ``mirrored``
    grids are left-right symmetric, so that a horizontal flip leaves them unchanged."""
    from PIL import Image

    root.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    for i in range(n):
        grid = torch.randint(0, 256, (4, 4, 3), generator=g, dtype=torch.uint8)
        if mirrored:
            grid = torch.cat([grid[:, :2], grid[:, :2].flip(1)], dim=1)
        Image.fromarray(grid.numpy()).resize((size, size), Image.NEAREST).save(root / f"{i:03d}.png")
    return str(root)


def evaluate(model: SimCLR, views: torch.Tensor) -> tuple[float, float]:
    """NT-Xent loss and positive-pair top-1 of fixed pairs of views, in eval mode."""
    model.eval()
    with torch.no_grad():
        z = model.model(views.transpose(0, 1).flatten(0, 1))
    model.train()
    n = views.shape[0]
    loss, correct = nt_xent(z[:n], z[n:], model.temperature)
    return loss.item(), correct.mean().item()


def test_nt_xent_matches_a_reference():
    z1, z2 = torch.randn(4, 8), torch.randn(4, 8)
    loss, correct = nt_xent(z1, z2, 0.5)
    z = torch.nn.functional.normalize(torch.cat([z1, z2]), dim=1)
    sim = z @ z.T / 0.5
    expected = []
    for i in range(8):
        j = (i + 4) % 8
        others = torch.cat([sim[i, :i], sim[i, i + 1 :]])
        expected.append(torch.logsumexp(others, 0) - sim[i, j])
    torch.testing.assert_close(loss, torch.stack(expected).mean())
    assert correct.shape == (8,)


def test_nt_xent_of_one_rank_among_gathered_views_is_its_share_of_the_whole_batch():
    """The loss of rank r's views against every rank's views, averaged over the ranks, is the one-process loss."""
    z1, z2 = torch.randn(6, 8, requires_grad=True), torch.randn(6, 8, requires_grad=True)
    whole, correct = nt_xent(z1, z2, 0.3)
    shares = [nt_xent(z1[r * 3 : (r + 1) * 3], z2[r * 3 : (r + 1) * 3], 0.3, z1, z2, rank=r) for r in (0, 1)]
    torch.testing.assert_close((shares[0][0] + shares[1][0]) / 2, whole)
    torch.testing.assert_close(torch.cat([torch.cat([c[:3], c[3:]]) for _, c in shares]).sum(), correct.sum())
    assert not torch.allclose(nt_xent(z1[:3], z2[:3], 0.3)[0], shares[0][0])  # local negatives only: another loss


def test_simclr_evaluation_values_are_averaged_over_ranks():
    """val / test loss and pos_acc are epoch means over every rank (a checkpoint monitor must agree across ranks)."""
    model = SimCLR(TINY)
    calls = {}
    model.log = lambda name, value, **kwargs: calls.__setitem__(name, kwargs)
    batch = {"pixel_values": torch.randn(3, 2, 3, 32, 32)}
    model.training_step(batch, 0)
    model.validation_step(batch, 0)
    model.test_step(batch, 0)
    assert [calls[f"{s}/pos_acc"].get("sync_dist", False) for s in ("train", "val", "test")] == [False, True, True]
    assert [calls[f"{s}/loss"].get("sync_dist", False) for s in ("train", "val", "test")] == [False, True, True]


def simclr_run(tmp_path: Path, name: str, images: str, val: str, batch_size: int, devices: int, model: SimCLR):
    """One SGD step on the whole training folder (one batch across all devices), then validation. BatchNorm layers
    are kept in eval mode (per-device batch statistics would differ from one device's, SyncBatchNorm needs a GPU),
    and the augmentation leaves the mirrored images unchanged: both runs see the same views."""
    from helpers import SaveRankWeights, trainer

    from ptft.core.freezing import FreezeSchedule

    folder = tmp_path / name
    folder.mkdir()
    data = UnlabeledImageDataModule(train=images, val=val, image_size=32, batch_size=batch_size, num_workers=0,
                                    scale=(1.0, 1.0), color_jitter=0.0, grayscale_prob=0.0, blur_prob=0.0)
    run = trainer(folder, devices=devices, strategy="ddp_spawn" if devices > 1 else "auto", max_steps=1,
                  callbacks=[FreezeSchedule(freeze_bn="all"), SaveRankWeights(str(folder))])
    run.fit(model, data)
    return {k: float(v) for k, v in run.callback_metrics.items()}, folder


def test_simclr_under_ddp_takes_negatives_from_every_rank(tmp_path):
    """2 processes x 4 images give the loss and the weight update of 1 process with the 8 images (gloo, CPU)."""
    import copy

    from helpers import weights

    images = write_patterns(tmp_path / "train", 8, mirrored=True)
    val = write_patterns(tmp_path / "val", 8, seed=1, mirrored=True)
    torch.manual_seed(0)
    model = SimCLR(TINY, temperature=0.5, optimizer={"name": "sgd", "lr": 0.5, "momentum": 0.0, "weight_decay": 0.0},
                   scheduler={"name": "constant", "warmup_ratio": 0.0})
    start = weights(model.model)
    single, one = simclr_run(tmp_path, "single", images, val, 8, 1, copy.deepcopy(model))
    ddp, two = simclr_run(tmp_path, "ddp", images, val, 4, 2, copy.deepcopy(model))
    # val/loss: each rank's 4 images against all 8; the logged value is the mean over ranks.
    assert abs(ddp["val/loss"] - single["val/loss"]) < 1e-5, (ddp, single)
    assert abs(ddp["val/pos_acc"] - single["val/pos_acc"]) < 1e-6
    expected = torch.load(one / "rank0.pt")
    for rank in (0, 1):
        got = torch.load(two / f"rank{rank}.pt")
        for name in ("backbone.conv1.0.weight", "projector.0.weight", "projector.3.weight"):
            step, expected_step = got[name] - start[name], expected[name] - start[name]
            assert expected_step.abs().max() > 1e-4, name  # the step moved the weights: gradients flowed
            torch.testing.assert_close(step, expected_step, rtol=1e-3, atol=1e-6, msg=f"rank {rank}: {name}")


def test_simclr_learns_to_find_the_other_view(tmp_path):
    L.seed_everything(0)
    images = write_patterns(tmp_path / "flat", 32)
    model = SimCLR(TINY, temperature=0.2, optimizer={"lr": 1e-2, "weight_decay": 0.0})
    # milder augmentation than the recipe's, so that a 0.37M-parameter network learns it in a few dozen steps
    dm = UnlabeledImageDataModule(train=images, image_size=32, batch_size=16, num_workers=0, blur_prob=0.0,
                                  scale=(0.5, 1.0), color_jitter=0.2, grayscale_prob=0.0, val_fraction=0.1,
                                  seed=42)
    dm.connect(model)
    dm.setup("fit")
    torch.manual_seed(1)
    views = torch.stack([dm.datasets["train"][i]["pixel_values"] for i in range(16)])  # fixed augmented pairs
    assert views.shape == (16, 2, 3, 32, 32)
    loss_before, acc_before = evaluate(model, views)
    trainer = L.Trainer(max_steps=36, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0)
    trainer.fit(model, dm)
    loss_after, acc_after = evaluate(model, views)
    # Chance: loss ln(31) = 3.43, top-1 1/31. A random network already pairs some views by colour (about 0.3);
    # measured: loss 3.43 -> 1.40, top-1 0.34 -> 0.63.
    assert loss_after < loss_before - 1.0, (loss_before, loss_after)
    assert acc_after >= acc_before + 0.15 and acc_after >= 0.5, (acc_before, acc_after)


def test_simclr_export_loads_into_image_classifier(tmp_path):
    torch.manual_seed(0)
    simclr = SimCLR(TINY)
    simclr.export(str(tmp_path / "backbone"))  # what `ptft export` does
    file = tmp_path / "backbone" / "model.safetensors"
    config = json.loads((tmp_path / "backbone" / "config.json").read_text())
    assert config["num_classes"] == 0 and config["architecture"] == TINY
    from safetensors.torch import load_file

    assert not any(k.startswith(("projector", "fc")) for k in load_file(file))  # projection head left out

    torch.manual_seed(1)  # a different random init: equality below can only come from the file
    clf = ImageClassifier(TINY, num_labels=3, pretrained_file=str(file))
    source = simclr.model.backbone.state_dict()
    loaded = clf.model.state_dict()
    assert set(loaded) - set(source) == {"fc.weight", "fc.bias"}
    for name, value in source.items():
        torch.testing.assert_close(loaded[name], value, rtol=0, atol=0, msg=name)
    assert clf.model.fc.out_features == 3


def test_unlabelled_data_from_folders_zips_and_bad_inputs(tmp_path, image_dirs):
    # class folders are ignored: every image counts
    assert len(UnlabeledImageDataModule(train=image_dirs["train"]).images["train"]) == 36
    L.seed_everything(7)  # seed=None: the data seed (held-out split, batch order) is seed_everything's
    assert UnlabeledImageDataModule(train=image_dirs["train"]).seed == 7
    assert UnlabeledImageDataModule(train=image_dirs["train"], seed=3).seed == 3
    with zipfile.ZipFile(tmp_path / "imgs.zip", "w") as zf:
        for p in sorted(Path(image_dirs["train"]).rglob("*.png")):
            zf.write(p, "data/" + p.relative_to(image_dirs["train"]).as_posix())
    dm = UnlabeledImageDataModule(train=str(tmp_path / "imgs.zip/data"), image_size=32, batch_size=4, num_workers=0)
    dm.connect(SimCLR(TINY))
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert batch["pixel_values"].shape == (4, 2, 3, 32, 32) and "labels" not in batch
    assert not torch.equal(batch["pixel_values"][:, 0], batch["pixel_values"][:, 1])  # two different views

    with pytest.raises(PtftError, match="train: 'missing/dir' does not exist"):
        UnlabeledImageDataModule(train="missing/dir")
    (tmp_path / "empty").mkdir()
    with pytest.raises(PtftError, match="train: no images"):
        UnlabeledImageDataModule(train=str(tmp_path / "empty"))
    (Path(image_dirs["train"]) / "broken.png").write_bytes(b"not an image")
    dm = UnlabeledImageDataModule(train=image_dirs["train"], val=image_dirs["test"], image_size=32, num_workers=0)
    with pytest.raises(PtftError, match=r"1 unreadable image\(s\) in train, first: .*broken.png"):
        dm.setup("fit")
    with pytest.raises(PtftError, match="temperature must be > 0"):
        SimCLR(TINY, temperature=0)
    labelled = {"pixel_values": torch.randn(2, 3, 32, 32), "labels": torch.tensor([0, 1])}
    with pytest.raises(PtftError, match="two views per image"):
        SimCLR(TINY).step(labelled, "train")


def test_simclr_recipe_then_ptft_export(run_recipe, tmp_path):
    images = write_patterns(tmp_path / "images", 24)
    cli = run_recipe("recipes/vision/simclr.yaml", [
        f"--model.init_args.model_name={TINY}", f"--data.init_args.train={images}", "--data.init_args.batch_size=8",
        "--data.init_args.num_workers=0", f"--trainer.default_root_dir={tmp_path}",
    ])
    assert cli.trainer.global_step == 2 and isinstance(cli.model, SimCLR)
    ckpt = next(tmp_path.rglob("last.ckpt"))
    ptft_main(["export", str(ckpt), str(tmp_path / "out")])
    clf = ImageClassifier(TINY, num_labels=2, pretrained_file=str(tmp_path / "out" / "model.safetensors"))
    torch.testing.assert_close(clf.model.conv1[0].weight, cli.model.model.backbone.conv1[0].weight)
    # the checkpoint itself (exported once beside it), and a task with timm's default 1,000 classes
    direct = ImageClassifier(TINY, num_labels=1000, pretrained_file=str(ckpt))
    torch.testing.assert_close(direct.model.conv1[0].weight, cli.model.model.backbone.conv1[0].weight)
    assert direct.model.fc.out_features == 1000


def test_weights_file_that_does_not_fit_is_a_one_line_error(tmp_path):
    from safetensors.torch import save_file

    from ptft.core.errors import PtftError

    weights = SimCLR(TINY).state_dict()  # Lightning-style names (model.backbone.…): timm would skip them silently
    save_file({k: v.contiguous() for k, v in weights.items()}, str(tmp_path / "renamed.safetensors"))
    with pytest.raises(PtftError, match=r"lacks \d+ weights of timm model"):
        ImageClassifier(TINY, num_labels=3, pretrained_file=str(tmp_path / "renamed.safetensors"))


def test_supervised_pretrain_recipe_exports_a_backbone(run_recipe, tmp_path, capsys):
    train = write_images(tmp_path / "train", per_class=6)
    cli = run_recipe("recipes/vision/supervised-pretrain.yaml", [
        f"--model.init_args.model_name={TINY}", f"--data.init_args.train={train}", "--data.init_args.num_workers=0",
        "--data.init_args.batch_size=8", f"--trainer.default_root_dir={tmp_path}",
    ])
    pretrained = cli.model.model.state_dict()
    ckpt = str(next(tmp_path.rglob("last.ckpt")))
    ptft_main(["export", "--backbone", ckpt, str(tmp_path / "backbone")])  # classifier dropped
    assert f"backbone written to {tmp_path / 'backbone' / 'model.safetensors'}" in capsys.readouterr().out
    ptft_main(["export", ckpt, str(tmp_path / "full")])  # classifier kept (3 classes)
    for folder in ("backbone", "full"):
        torch.manual_seed(1)
        # the same number of classes as in pre-training: the classifier is still re-initialised
        clf = ImageClassifier(TINY, num_labels=3, pretrained_file=str(tmp_path / folder / "model.safetensors"))
        loaded = clf.model.state_dict()
        for name, value in pretrained.items():
            if not name.startswith("fc."):
                torch.testing.assert_close(loaded[name], value, rtol=0, atol=0, msg=f"{folder}: {name}")
        assert not torch.equal(loaded["fc.weight"], pretrained["fc.weight"])
    with pytest.raises(SystemExit):  # one-line error, no traceback
        ptft_main(["export", "--backbone", str(tmp_path / "missing.ckpt"), str(tmp_path / "x")])
    err = capsys.readouterr().err.strip()
    assert "missing.ckpt' does not exist" in err and "\n" not in err
