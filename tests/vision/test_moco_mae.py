import copy
from pathlib import Path

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from conftest import write_images
from helpers import trainer, weights

from ptft.cli import main as ptft_main
from ptft.core.errors import PtftError
from ptft.core.module import load_checkpoint
from ptft.vision import ImageClassifier
from ptft.vision.mae import MAE, masked_patch_loss, patchify, random_masking
from ptft.vision.moco import MoCo, info_nce, momentum_at
from ptft.vision.pretrain import UnlabeledImageDataModule

TINY = "test_resnet"
VIT = "test_vit"
VIT_KWARGS = {"img_size": 32, "patch_size": 4}  # 64 patches of 4 x 4 px
SMALL_DECODER = {"decoder_dim": 32, "decoder_depth": 1, "decoder_heads": 2}
SGD = {"name": "sgd", "lr": 0.5, "momentum": 0.0, "weight_decay": 0.0}
CONSTANT = {"name": "constant", "warmup_ratio": 0.0}


def write_patterns(root: Path, n: int, size: int = 32, seed: int = 0) -> str:
    """A flat folder of ``n`` distinct images: random 4x4 colour grids (each image its own instance)."""
    from PIL import Image

    root.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    for i in range(n):
        grid = torch.randint(0, 256, (4, 4, 3), generator=g, dtype=torch.uint8)
        Image.fromarray(grid.numpy()).resize((size, size), Image.NEAREST).save(root / f"{i:03d}.png")
    return str(root)


def mild_data(images: str, batch_size: int, **kwargs) -> UnlabeledImageDataModule:
    return UnlabeledImageDataModule(train=images, val=images, image_size=32, batch_size=batch_size, num_workers=0, blur_prob=0.0,
                                    scale=(0.5, 1.0), color_jitter=0.2, grayscale_prob=0.0, seed=0, **kwargs)


def smooth_images(n: int, seed: int = 0) -> torch.Tensor:
    """Random images with structure inside every 4-px patch (bilinear upsampling of 8 x 8 noise)."""
    g = torch.Generator().manual_seed(seed)
    return F.interpolate(torch.randn(n, 3, 8, 8, generator=g), size=32, mode="bilinear", align_corners=False)


# --- MoCo -----------------------------------------------------------------------------------------------------------
def test_moco_key_encoder_moves_only_by_momentum(tmp_path):
    """After one step: key = m * key_before + (1 - m) * query_after; the key encoder has no gradient nor optimizer slot."""
    images = write_patterns(tmp_path / "images", 8)
    torch.manual_seed(0)
    model = MoCo(TINY, queue_size=32, momentum=0.9, momentum_schedule="constant", optimizer=SGD, scheduler=CONSTANT)
    query_before, key_before = weights(model.model), dict(model.key_encoder.named_parameters())
    key_before = {n: p.detach().clone() for n, p in key_before.items()}
    for name, value in key_before.items():  # the key encoder starts as a copy of the query encoder
        torch.testing.assert_close(value, query_before[name], rtol=0, atol=0)
    run = trainer(tmp_path, max_steps=1, limit_val_batches=0)
    run.fit(model, mild_data(images, 8))

    query_after = dict(model.model.named_parameters())
    moved = 0
    for name, key in model.key_encoder.named_parameters():
        assert not key.requires_grad and key.grad is None, name
        expected = 0.9 * key_before[name] + 0.1 * query_after[name].detach()
        torch.testing.assert_close(key.detach(), expected, msg=name)
        moved += not torch.equal(query_after[name], query_before[name])
    assert moved > 10  # the query encoder did train: the check above is not 0.9 * x + 0.1 * x
    optimized = {id(p) for group in run.optimizers[0].param_groups for p in group["params"]}
    assert optimized == {id(p) for p in model.model.parameters()}
    assert optimized.isdisjoint(id(p) for p in model.key_encoder.parameters())


def test_moco_momentum_schedule():
    assert momentum_at(0, 100, 0.99, "cosine") == pytest.approx(0.99)
    assert momentum_at(50, 100, 0.99, "cosine") == pytest.approx(0.995)
    assert momentum_at(100, 100, 0.99, "cosine") == pytest.approx(1.0)
    assert momentum_at(70, 100, 0.99, "constant") == 0.99


def test_moco_queue_fills_with_normalized_keys_and_wraps():
    torch.manual_seed(0)
    model = MoCo(TINY, projection_dim=8, queue_size=10)
    initial = model.queue.clone()
    torch.testing.assert_close(initial.norm(dim=1), torch.ones(10))  # random unit vectors until keys arrive

    views = torch.randn(3, 2, 3, 32, 32)
    model.step({"pixel_values": views}, "val")  # evaluation reads the queue, never writes it
    assert torch.equal(model.queue, initial) and model.queue_ptr == 0

    model.step({"pixel_values": views}, "train")  # 3 images x 2 views: 6 keys
    with torch.no_grad():
        keys = F.normalize(model.key_encoder(views.transpose(0, 1).flatten(0, 1)), dim=1)
    torch.testing.assert_close(model.queue[:6], keys)
    torch.testing.assert_close(model.queue[:6].norm(dim=1), torch.ones(6))
    assert torch.equal(model.queue[6:], initial[6:]) and model.queue_ptr == 6

    model.step({"pixel_values": views}, "train")  # 6 more: 4 fill the end, 2 wrap to the start
    torch.testing.assert_close(model.queue[6:], keys[:4])
    torch.testing.assert_close(model.queue[:2], keys[4:])
    torch.testing.assert_close(model.queue[2:6], keys[2:6])  # the first step's, not yet overwritten
    assert model.queue_ptr == 2

    many = F.normalize(torch.randn(13, 8), dim=1)  # more keys than room: the newest 10
    model.enqueue(many)
    torch.testing.assert_close(model.queue.roll(-2, dims=0), many[3:])
    assert model.queue_ptr == 2


def test_info_nce_matches_a_reference():
    q, k, queue = torch.randn(4, 8), torch.randn(4, 8), F.normalize(torch.randn(6, 8), dim=1)
    loss, correct = info_nce(q, k, queue, 0.2)
    qn, kn = F.normalize(q, dim=1), F.normalize(k, dim=1)
    expected = [torch.logsumexp(torch.cat([(qn[i] @ kn[i])[None], queue @ qn[i]]) / 0.2, 0) - qn[i] @ kn[i] / 0.2
                for i in range(4)]
    torch.testing.assert_close(loss, torch.stack(expected).mean())
    assert torch.equal(correct, ((qn * kn).sum(1) > (qn @ queue.T).max(1).values).float())


def moco_eval(model: MoCo, views: torch.Tensor, others: torch.Tensor) -> tuple[float, float]:
    """InfoNCE of fixed queries (view 1) against their keys (view 2) and the keys of other images, in eval mode."""
    model.eval()
    with torch.no_grad():
        q = model.model(views[:, 0])
        k = model.key_encoder(views[:, 1])
        negatives = F.normalize(model.key_encoder(others.transpose(0, 1).flatten(0, 1)), dim=1)
    model.train()
    loss, correct = info_nce(q, k, negatives, model.temperature)
    return loss.item(), correct.mean().item()


def test_moco_learns_to_find_the_other_view(tmp_path):
    L.seed_everything(0)
    images = write_patterns(tmp_path / "flat", 48)
    model = MoCo(TINY, temperature=0.2, queue_size=64, momentum=0.9, optimizer={"lr": 1e-2, "weight_decay": 0.0})
    dm = mild_data(images, 16)
    dm.connect(model)
    dm.setup("fit")
    torch.manual_seed(1)
    views = torch.stack([dm.datasets["train"][i]["pixel_values"] for i in range(48)])  # fixed augmented pairs
    before = moco_eval(model, views[:16], views[16:])
    L.Trainer(max_steps=40, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
              enable_model_summary=False, limit_val_batches=0).fit(model, dm)
    after = moco_eval(model, views[:16], views[16:])
    # 16 queries, each against its key and 64 keys of 32 other images. Chance: loss ln(65) = 4.17; the random network
    # already tells some images apart by colour. Measured: loss 4.17 -> 2.61, top-1 0.38 -> 0.63.
    assert after[0] < before[0] - 0.5, (before, after)
    assert after[1] >= before[1] + 0.15, (before, after)


def test_moco_export_writes_the_query_backbone(tmp_path):
    torch.manual_seed(0)
    moco = MoCo(TINY, queue_size=16)
    with torch.no_grad():  # a key encoder unlike the query encoder: the file must hold the query's weights
        for p in moco.key_encoder.parameters():
            p.add_(1.0)
    moco.export(str(tmp_path / "backbone"))  # what `ptft export` does
    from safetensors.torch import load_file

    stored = load_file(tmp_path / "backbone" / "model.safetensors")
    assert not any(k.startswith(("projector", "key_encoder", "queue", "fc")) for k in stored)
    torch.manual_seed(1)
    clf = ImageClassifier(TINY, num_labels=3, pretrained_file=str(tmp_path / "backbone" / "model.safetensors"))
    loaded = clf.model.state_dict()
    for name, value in moco.model.backbone.state_dict().items():
        torch.testing.assert_close(loaded[name], value, rtol=0, atol=0, msg=name)


def test_moco_errors():
    with pytest.raises(PtftError, match="two views per image"):
        MoCo(TINY, queue_size=8).step({"pixel_values": torch.randn(2, 3, 32, 32)}, "train")
    with pytest.raises(PtftError, match="temperature must be > 0"):
        MoCo(TINY, temperature=0)
    with pytest.raises(PtftError, match="momentum must be in"):
        MoCo(TINY, momentum=1.5)
    with pytest.raises(PtftError, match="remove model.peft"):
        MoCo(TINY, peft={"method": "lora", "target_modules": ["conv1"]})


def test_moco_recipe_then_ptft_export(run_recipe, tmp_path):
    images = write_patterns(tmp_path / "images", 24)
    cli = run_recipe("recipes/vision/moco.yaml", [
        f"--model.init_args.model_name={TINY}", f"--data.init_args.train={images}", "--data.init_args.batch_size=8",
        "--data.init_args.num_workers=0", f"--trainer.default_root_dir={tmp_path}",
    ])
    assert cli.trainer.global_step == 2 and isinstance(cli.model, MoCo)
    assert cli.model.queue_ptr == 2 * 2 * 8  # two steps of 8 images x 2 views
    ckpt = next(tmp_path.rglob("last.ckpt"))
    # The checkpoint holds the key encoder and the queue: a resumed run continues them.
    resumed = load_checkpoint(str(ckpt))
    assert torch.equal(resumed.queue, cli.model.queue) and resumed.queue_ptr == cli.model.queue_ptr
    for (name, key), (_, saved) in zip(cli.model.key_encoder.state_dict().items(), resumed.key_encoder.state_dict().items()):
        torch.testing.assert_close(saved, key, rtol=0, atol=0, msg=name)
    ptft_main(["export", str(ckpt), str(tmp_path / "out")])
    clf = ImageClassifier(TINY, num_labels=2, pretrained_file=str(tmp_path / "out" / "model.safetensors"))
    torch.testing.assert_close(clf.model.conv1[0].weight, cli.model.model.backbone.conv1[0].weight)


class SaveQueue(L.Callback):
    """Writes each rank's first training batch and its queue after the first step."""

    def __init__(self, folder: str) -> None:
        self.folder = folder
        self.batch = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.batch = batch["pixel_values"].clone()

    def on_train_end(self, trainer, pl_module) -> None:
        torch.save({"batch": self.batch, "queue": pl_module.queue.clone(), "ptr": pl_module.queue_ptr.clone()},
                   Path(self.folder) / f"rank{trainer.global_rank}.pt")


def test_moco_under_ddp_enqueues_the_keys_of_every_rank(tmp_path):
    """2 processes x 4 images (gloo, CPU): after one step both queues hold the same 16 keys, rank 0's then rank 1's,
    each the key encoder's output on that rank's batch."""
    images = write_patterns(tmp_path / "train", 8)
    torch.manual_seed(0)
    model = MoCo(TINY, projection_dim=16, queue_size=40, optimizer=SGD, scheduler=CONSTANT)
    key_encoder = copy.deepcopy(model.key_encoder)  # the one that computes the first step's keys
    initial = model.queue.clone()
    run = trainer(tmp_path, devices=2, strategy="ddp_spawn", max_steps=1, limit_val_batches=0,
                  callbacks=[SaveQueue(str(tmp_path))])
    run.fit(model, mild_data(images, 4))
    saved = [torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1)]
    assert all(s["ptr"] == 16 for s in saved)  # 2 ranks x 4 images x 2 views
    torch.testing.assert_close(saved[0]["queue"], saved[1]["queue"], rtol=0, atol=0)
    assert torch.equal(saved[0]["queue"][16:], initial[16:])
    assert not torch.equal(saved[0]["batch"], saved[1]["batch"])  # the ranks saw different images
    key_encoder.train()  # as in training: BatchNorm normalises with each rank's own batch statistics
    with torch.no_grad():
        for rank in (0, 1):
            keys = F.normalize(key_encoder(saved[rank]["batch"].transpose(0, 1).flatten(0, 1)), dim=1)
            torch.testing.assert_close(saved[0]["queue"][rank * 8 : rank * 8 + 8], keys, msg=f"rank {rank}'s keys")


# --- MAE ------------------------------------------------------------------------------------------------------------
def small_mae(**kwargs) -> MAE:
    return MAE(VIT, model_kwargs=VIT_KWARGS, **{**SMALL_DECODER, **kwargs})


def test_random_masking_keeps_exactly_the_unmasked_share():
    tokens = torch.randn(5, 64, 8)
    for ratio, keep in ((0.75, 16), (0.5, 32), (0.9, 6)):
        kept, mask, restore = random_masking(tokens, ratio)
        assert kept.shape == (5, keep, 8)
        assert torch.equal(mask.sum(1), torch.full((5,), 64.0 - keep))
        for b in range(5):  # the kept tokens are exactly the unmasked ones
            visible = tokens[b][mask[b] == 0]
            assert torch.equal(torch.sort(kept[b], dim=0).values, torch.sort(visible, dim=0).values)
        # restore puts [kept, masked] back in image order
        masked = tokens.gather(1, torch.argsort(mask, dim=1, stable=True)[:, keep:, None].expand(-1, -1, 8))
        shuffled = torch.cat([kept, torch.zeros_like(masked)], dim=1).gather(1, restore[..., None].expand(-1, -1, 8))
        torch.testing.assert_close(shuffled * (1 - mask)[..., None], tokens * (1 - mask)[..., None])
    masks = torch.stack([random_masking(tokens, 0.75)[1] for _ in range(3)])
    assert not torch.equal(masks[0], masks[1])  # a new random mask per call and per example
    assert not torch.equal(masks[0, 0], masks[0, 1])


def test_mae_encoder_sees_only_the_visible_patches():
    torch.manual_seed(0)
    mae = small_mae().eval()
    images, noise = smooth_images(2), torch.rand(2, 64)
    latent, mask, _ = mae.model.encode(images, noise)
    assert latent.shape == (2, 1 + 16, 64)  # class token + 16 of 64 patches
    pixels_mask = mask.reshape(2, 1, 8, 8).repeat_interleave(4, 2).repeat_interleave(4, 3)
    changed_hidden = images + 5 * torch.randn_like(images) * pixels_mask
    torch.testing.assert_close(mae.model.encode(changed_hidden, noise)[0], latent, rtol=0, atol=0)
    changed_visible = images + 5 * torch.randn_like(images) * (1 - pixels_mask)
    assert not torch.allclose(mae.model.encode(changed_visible, noise)[0], latent)


def test_mae_loss_counts_only_the_masked_patches():
    torch.manual_seed(0)
    mae = small_mae()
    images, noise = smooth_images(2), torch.rand(2, 64)
    pred, mask = mae.model(images, noise)
    assert pred.shape == (2, 64, 4 * 4 * 3) and mask.sum() == 2 * 48
    target = patchify(images, (4, 4))
    torch.testing.assert_close(target[0, 9].reshape(4, 4, 3), images[0, :, 4:8, 4:8].permute(1, 2, 0))  # row 1, col 1
    for norm_pix in (True, False):
        loss = masked_patch_loss(pred, target, mask, norm_pix)
        # other pixels in the visible patches of the target: the same loss
        other_visible = torch.where(mask[..., None].bool(), target, torch.randn_like(target))
        torch.testing.assert_close(masked_patch_loss(pred, other_visible, mask, norm_pix), loss, rtol=0, atol=0)
        other_hidden = torch.where(mask[..., None].bool(), torch.randn_like(target), target)
        assert not torch.allclose(masked_patch_loss(pred, other_hidden, mask, norm_pix), loss)
        # a reference: the mean squared error over the masked patches' pixels
        t = target
        if norm_pix:
            t = (t - t.mean(-1, keepdim=True)) / (t.var(-1, keepdim=True) + 1e-6).sqrt()
        torch.testing.assert_close(loss, (pred - t)[mask.bool()].pow(2).mean())
    grad = torch.autograd.grad(masked_patch_loss(pred, target, mask, True), pred)[0]
    assert grad[mask == 0].abs().max() == 0 and grad[mask == 1].abs().max() > 0


def test_mae_loss_falls_on_a_fixed_batch():
    torch.manual_seed(0)
    mae = small_mae()
    images, noise = smooth_images(8), torch.rand(8, 64)

    def loss() -> float:
        with torch.no_grad():
            pred, mask = mae.model(images, noise)
            return masked_patch_loss(pred, patchify(images, (4, 4)), mask, True).item()

    before = loss()
    optimizer = torch.optim.AdamW(mae.model.parameters(), lr=2e-3)
    for _ in range(40):  # a new random mask every step, as in training
        step_loss, _ = mae.step({"pixel_values": images}, "train")
        optimizer.zero_grad()
        step_loss.backward()
        optimizer.step()
    after = loss()
    # Measured: about 1.0 -> 0.6 (a per-patch-standardised target: predicting zeros scores 1.0).
    assert after < 0.8 * before, (before, after)


def test_mae_export_loads_into_image_classifier(tmp_path):
    torch.manual_seed(0)
    mae = small_mae()
    mae.export(str(tmp_path / "encoder"))
    from safetensors.torch import load_file

    assert not any(k.startswith(("decoder", "head")) for k in load_file(tmp_path / "encoder" / "model.safetensors"))
    torch.manual_seed(1)
    clf = ImageClassifier(VIT, num_labels=3, model_kwargs=VIT_KWARGS,
                          pretrained_file=str(tmp_path / "encoder" / "model.safetensors"))
    loaded = clf.model.state_dict()
    source = mae.model.backbone.state_dict()
    assert set(loaded) - set(source) == {"head.weight", "head.bias"}
    for name, value in source.items():
        torch.testing.assert_close(loaded[name], value, rtol=0, atol=0, msg=name)


def test_mae_takes_one_view_and_stops_on_bad_input(tmp_path):
    images = write_images(tmp_path / "images", per_class=2, size=32)
    dm = UnlabeledImageDataModule(train=images, val=images, image_size=32, batch_size=4, num_workers=0, views=1)
    mae = small_mae()
    dm.connect(mae)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert batch["pixel_values"].shape == (4, 3, 32, 32)
    torch.manual_seed(0)
    one, _ = mae.step(batch, "train")
    torch.manual_seed(0)  # two views: the first one is used
    two, _ = mae.step({"pixel_values": torch.stack([batch["pixel_values"], -batch["pixel_values"]], 1)}, "train")
    torch.testing.assert_close(one, two)
    assert mae.data_config()["input_size"] == (3, 32, 32)  # the model_kwargs' size, not test_vit's 160

    with pytest.raises(PtftError, match="MAE needs a timm Vision Transformer .* 'test_resnet' is a ResNet"):
        MAE(TINY)
    with pytest.raises(PtftError, match="mask_ratio 1.0 keeps 0 of 64 patches"):
        small_mae(mask_ratio=1.0)
    with pytest.raises(PtftError, match="decoder_dim"):
        small_mae(decoder_dim=30)
    with pytest.raises(PtftError, match="views must be 1"):
        UnlabeledImageDataModule(train=images, views=3)


def test_mae_recipe_then_ptft_export(run_recipe, tmp_path):
    images = write_images(tmp_path / "images", per_class=8, size=32)
    cli = run_recipe("recipes/vision/mae.yaml", [
        f"--model.init_args.model_name={VIT}", f"--data.init_args.train={images}", "--data.init_args.batch_size=8",
        "--data.init_args.num_workers=0", f"--trainer.default_root_dir={tmp_path}",
    ])
    assert cli.trainer.global_step == 2 and isinstance(cli.model, MAE)
    ckpt = next(tmp_path.rglob("last.ckpt"))
    ptft_main(["export", str(ckpt), str(tmp_path / "out")])
    clf = ImageClassifier(VIT, num_labels=2, model_kwargs=VIT_KWARGS,
                          pretrained_file=str(tmp_path / "out" / "model.safetensors"))
    torch.testing.assert_close(clf.model.patch_embed.proj.weight, cli.model.model.backbone.patch_embed.proj.weight)
    torch.testing.assert_close(clf.model.pos_embed, cli.model.model.backbone.pos_embed)
