"""The strong image-classification recipe's pieces, through timm: augmentation, mixup/CutMix, drop path, EMA,
channels_last, test-time flips, and the recipes that use them."""

import lightning as L
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import write_images
from lightning.pytorch.callbacks import EMAWeightAveraging
from timm.data.mixup import mixup_target

from ptft.core.errors import PtftError
from ptft.core.optim import OptimizerConfig, SchedulerConfig
from ptft.vision import ImageClassificationDataModule, ImageClassifier
from ptft.vision.mixing import BatchMixer, MixupConfig


def steps_of(transform):
    return {type(t).__name__: t for t in transform.transforms}


def test_augmentation_options_reach_timm_transform(image_dirs):
    dm = ImageClassificationDataModule(
        train=image_dirs["train"], image_size=32, auto_augment="rand-m9-mstd0.5-inc1", hflip=0.3, scale=(0.5, 1.0),
        ratio=(0.8, 1.25), re_prob=0.25, re_mode="pixel", re_count=2, augment={"vflip": 0.2}, num_workers=0,
    )
    steps = steps_of(dm.transform(training=True))
    assert list(steps) == ["RandomResizedCropAndInterpolation", "RandomHorizontalFlip", "RandomVerticalFlip",
                           "RandAugment", "MaybeToTensor", "Normalize", "RandomErasing"]  # no colour jitter with AA
    crop = steps["RandomResizedCropAndInterpolation"]
    assert crop.size == (32, 32) and crop.scale == (0.5, 1.0) and crop.ratio == (0.8, 1.25)
    assert steps["RandomHorizontalFlip"].p == 0.3 and steps["RandomVerticalFlip"].p == 0.2
    rand = steps["RandAugment"]
    assert rand.num_layers == 2 and {op.magnitude for op in rand.ops} == {9}
    assert {op.magnitude_std for op in rand.ops} == {0.5}
    assert "PosterizeIncreasing" in {op.name for op in rand.ops}  # inc1: the severity-increasing op set
    erase = steps["RandomErasing"]
    assert (erase.probability, erase.mode, erase.max_count, erase.device) == (0.25, "pixel", 2, "cpu")
    # evaluation stays deterministic: no augmentation step
    assert list(steps_of(dm.transform(training=False))) == ["Resize", "CenterCrop", "MaybeToTensor", "Normalize"]
    # ... and the augmented images load
    dm.connect(ImageClassifier("test_resnet", num_labels=3, pretrained=False))
    dm.setup("fit")
    assert next(iter(dm.train_dataloader()))["pixel_values"].shape == (32, 3, 32, 32)  # 36 images, 4 held out


def test_default_policies_and_trivialaugment(image_dirs):
    def train_steps(**kwargs):
        dm = ImageClassificationDataModule(train=image_dirs["train"], image_size=32, num_workers=0, **kwargs)
        return steps_of(dm.transform(training=True))

    default = train_steps()  # timm's defaults, as before: random-resized crop, flip, colour jitter
    assert list(default) == ["RandomResizedCropAndInterpolation", "RandomHorizontalFlip", "ColorJitter",
                             "MaybeToTensor", "Normalize"]
    assert default["RandomResizedCropAndInterpolation"].scale == (0.08, 1.0)
    assert default["ColorJitter"].brightness == (0.6, 1.4) and default["RandomHorizontalFlip"].p == 0.5
    assert "ColorJitter" not in train_steps(color_jitter=0)
    assert "RandomHorizontalFlip" not in train_steps(hflip=0)
    assert train_steps(color_jitter=[0.1, 0.2, 0.3, 0.05])["ColorJitter"].hue == (-0.05, 0.05)
    for policy in ("original", "v0", "original-mstd0.5"):
        assert len(train_steps(auto_augment=policy)["AutoAugment"].policy) == 25
    trivial = train_steps(auto_augment="trivialaugment")
    assert list(trivial) == ["RandomResizedCropAndInterpolation", "RandomHorizontalFlip", "TrivialAugmentWide",
                             "MaybeToTensor", "Normalize"]
    assert trivial["TrivialAugmentWide"].fill == [124, 116, 104]  # the mean colour, as timm fills


def test_zero_bit_posterize_gives_a_black_image_instead_of_a_pillow_error(image_dirs):
    # timm asks Pillow for 0 bits at RandAugment inc1 magnitude 10 (reached by m9 + noise) and in AutoAugment v0;
    # Pillow >= 12 raises ValueError there, which stopped a real run mid-epoch.
    from PIL import Image

    image = Image.new("RGB", (32, 32), (200, 120, 40))
    for policy, name in (("rand-m10-p1.0-inc1", "PosterizeIncreasing"), ("v0", "Posterize")):
        dm = ImageClassificationDataModule(train=image_dirs["train"], image_size=32, auto_augment=policy, num_workers=0)
        step = steps_of(dm.transform(training=True))["RandAugment" if policy.startswith("rand") else "AutoAugment"]
        ops = getattr(step, "ops", None) or [op for sub in step.policy for op in sub]
        op = min((op for op in ops if op.name == name), key=lambda op: op.level_fn(op.magnitude, op.hparams))
        assert op.level_fn(op.magnitude, op.hparams) == (0,)  # 0 bits to keep
        op.prob = 1.0
        assert np.asarray(op(image)).max() == 0


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"auto_augment": "randaugment"}, r"augmentation \(auto_augment='randaugment'\): .*examples: rand-m9"),
        ({"auto_augment": "autoaugment"}, "Unknown AA policy autoaugment"),
        ({"auto_augment": "rand-x9"}, "Unknown RandAugment config section"),
        ({"color_jitter": [0.4, 0.4]}, "color_jitter: give one value or 3-4"),
        ({"augment": {"re_prob": 0.5}}, "augment.re_prob: use data.init_args.re_prob instead"),
        ({"augment": {"sharpen": 1}}, r"\(sharpen=1\): create_transform\(\) got an unexpected keyword argument"),
    ],
)
def test_bad_augmentation_is_a_one_line_error(tmp_path, kwargs, message):
    # raised before the (missing) images are looked at
    with pytest.raises(PtftError, match=message):
        ImageClassificationDataModule(train=str(tmp_path / "absent"), **kwargs)


def test_mixup_makes_soft_targets_and_leaves_odd_examples_whole():
    np.random.seed(0)
    mixer = BatchMixer(MixupConfig(mixup_alpha=0.8, cutmix_alpha=0.0), num_classes=3, label_smoothing=0.0)
    images, labels = torch.randn(5, 3, 8, 8), torch.tensor([0, 1, 2, 1, 2])
    original = images.clone()
    mixed, targets = mixer(images, labels)
    torch.testing.assert_close(images, original)  # the batch itself is not mixed in place
    torch.testing.assert_close(targets.sum(-1), torch.ones(5))
    lam = targets[0, 0].item()  # example 0 (label 0) is mixed with its mirror, example 3 (label 1)
    assert 0 < lam < 1
    torch.testing.assert_close(targets[:4], lam * F.one_hot(labels[:4], 3) + (1 - lam) * F.one_hot(labels[:4].flip(0), 3))
    torch.testing.assert_close(mixed[:4], lam * original[:4] + (1 - lam) * original[:4].flip(0))
    torch.testing.assert_close(mixed[4], original[4])  # the odd one out stays whole, one-hot
    torch.testing.assert_close(targets[4], torch.tensor([0.0, 0.0, 1.0]))
    smoothed = BatchMixer(MixupConfig(), num_classes=3, label_smoothing=0.3)(images, labels)[1]
    assert smoothed.min() >= 0.1 - 1e-6  # smoothing spreads 0.3 over 3 classes: no target below 0.1
    torch.testing.assert_close(smoothed[4], mixup_target(labels[4:], 3, 1.0, 0.3)[0])
    with pytest.raises(PtftError, match="mixup: set mixup_alpha or cutmix_alpha above 0"):
        MixupConfig.coerce({"mixup_alpha": 0.0, "cutmix_alpha": 0.0})


def fit(model, dm, steps, **trainer_args):
    trainer = L.Trainer(max_steps=steps, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0, **trainer_args)
    trainer.fit(model, dm)
    return trainer


def test_mixup_cutmix_training_learns_the_colours(image_dirs):
    torch.manual_seed(0)
    np.random.seed(0)
    model = ImageClassifier("test_resnet", num_labels=3, pretrained=False, label_smoothing=0.1,
                            mixup=MixupConfig(mixup_alpha=0.8, cutmix_alpha=1.0),
                            optimizer=OptimizerConfig(lr=3e-3, weight_decay=0.0),
                            scheduler=SchedulerConfig(name="constant", warmup_ratio=0.0))
    dm = ImageClassificationDataModule(train=image_dirs["train"], test=image_dirs["test"], image_size=32,
                                       scale=(0.5, 1.0), batch_size=8, num_workers=0)
    seen = []
    original_step = model.step

    def record(batch, stage):
        loss, (logits, labels) = original_step(batch, stage)
        if stage == "train":
            seen.append((loss.item(), labels))
        return loss, (logits, labels)

    model.step = record
    mixer, targets = model.mixer, []

    def spy(images, labels):
        mixed = mixer(images, labels)
        targets.append(mixed[1])
        return mixed

    model.mixer = spy
    trainer = fit(model, dm, steps=40, limit_val_batches=0)
    assert len(targets) == 40 and targets[0].shape == (8, 3)
    assert min(t.max().item() for t in targets) < 0.9 - 0.1 / 3  # soft: below a smoothed one-hot's top value
    losses = [loss for loss, _ in seen]
    assert all(np.isfinite(losses))
    assert all(labels.dtype == torch.long for _, labels in seen)  # train accuracy: argmax of the soft targets
    train_acc = trainer.callback_metrics["train/acc"].item()  # logged per epoch
    test_acc = trainer.test(model, dm, verbose=False)[0]["test/acc"]
    print(f"mixup/cutmix: loss {losses[0]:.3f} -> {np.mean(losses[-5:]):.3f} (last 5), train acc (last epoch, "
          f"dominant labels) {train_acc:.3f}, test acc {test_acc:.3f}")
    assert test_acc >= 0.75  # chance is 1/3


def test_drop_path_rate_reaches_the_model():
    model = ImageClassifier("test_vit", num_labels=3, pretrained=False, model_kwargs={"drop_path_rate": 0.2})
    rates = [getattr(block.drop_path1, "drop_prob", 0.0) for block in model.model.blocks]  # Identity at rate 0
    torch.testing.assert_close(rates, torch.linspace(0, 0.2, len(rates)).tolist())  # timm's linear schedule
    plain = ImageClassifier("test_vit", num_labels=3, pretrained=False)
    assert not any(hasattr(block.drop_path1, "drop_prob") for block in plain.model.blocks)


def test_channels_last_model_and_inputs_give_the_same_logits():
    torch.manual_seed(0)
    default = ImageClassifier("test_resnet", num_labels=3, pretrained=False).eval()
    fast = ImageClassifier("test_resnet", num_labels=3, pretrained=False, channels_last=True).eval()
    fast.model.load_state_dict(default.model.state_dict())
    conv = fast.model.conv1[0].weight
    assert conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()
    assert default.model.conv1[0].weight.is_contiguous()
    seen = []
    handle = fast.model.conv1[0].register_forward_pre_hook(lambda m, args: seen.append(args[0]))
    batch = {"pixel_values": torch.randn(2, 3, 32, 32)}
    with torch.no_grad():
        torch.testing.assert_close(fast(batch), default(batch), rtol=1e-4, atol=1e-5)
    handle.remove()
    assert seen[0].is_contiguous(memory_format=torch.channels_last)


def test_hflip_tta_averages_the_logits_of_both_views():
    torch.manual_seed(0)
    model = ImageClassifier("test_resnet", num_labels=3, pretrained=False, tta="hflip")
    batch = {"pixel_values": torch.randn(4, 3, 32, 32), "labels": torch.tensor([0, 1, 2, 0])}
    model.eval()
    with torch.no_grad():
        once, flipped = model.model(batch["pixel_values"]), model.model(batch["pixel_values"].flip(-1))
        expected = (once + flipped) / 2
        torch.testing.assert_close(model(batch), expected)
        torch.testing.assert_close(model.step(batch, "val")[1][0], expected)
        probs = model.predict_step(batch, 0)["probs"]
        torch.testing.assert_close(probs, expected.softmax(-1))
        assert not torch.allclose(once, expected)  # the flip changes something
        model.train()  # training steps see one view
        model.model.eval()  # (BatchNorm statistics fixed, to compare)
        torch.testing.assert_close(model(batch), once)
    with pytest.raises(PtftError, match="tta must be 'none' or 'hflip'"):
        ImageClassifier("test_resnet", num_labels=3, pretrained=False, tta="five-crop")


def test_mixup_and_tta_settings_survive_a_checkpoint(image_dirs, tmp_path):
    model = ImageClassifier("test_resnet", num_labels=3, pretrained=False, channels_last=True, tta="hflip",
                            mixup=MixupConfig(cutmix_alpha=0.0, cutmix_minmax=(0.2, 0.8)))
    dm = ImageClassificationDataModule(train=image_dirs["train"], image_size=32, batch_size=8, num_workers=0)
    trainer = fit(model, dm, steps=1, limit_val_batches=1, default_root_dir=tmp_path)
    trainer.save_checkpoint(tmp_path / "last.ckpt")
    from ptft.core.module import load_checkpoint

    reloaded = load_checkpoint(str(tmp_path / "last.ckpt"))  # weights_only: hparams hold plain values
    assert reloaded.mixup_config == model.mixup_config and reloaded.tta == "hflip" and reloaded.channels_last


RECIPES = ["recipes/vision/imagenet-style.yaml", "recipes/vision/cifar10.yaml", "recipes/vision/cifar10-lpft.yaml"]


@pytest.mark.parametrize("recipe", RECIPES)
def test_recipe_runs_two_steps(run_recipe, tmp_path, recipe):
    train = write_images(tmp_path / "train", per_class=6)
    test = write_images(tmp_path / "test", per_class=2, seed=1)
    cli = run_recipe(recipe, [
        "--model.init_args.model_name=test_resnet", "--model.init_args.pretrained=false",
        f"--data.init_args.train={train}", f"--data.init_args.test={test}", "--data.init_args.num_workers=0",
        "--data.init_args.image_size=32", "--data.init_args.batch_size=8",
    ])
    assert cli.trainer.global_step == 2
    if recipe.endswith("imagenet-style.yaml"):
        model = cli.model
        assert model.mixup_config is not None and model.tta == "hflip" and model.channels_last
        assert model.model.layer4[0].drop_path.drop_prob > 0
        steps = steps_of(cli.datamodule.transform(training=True))
        assert "RandAugment" in steps and steps["RandomErasing"].probability > 0
        ema = next(c for c in cli.trainer.callbacks if isinstance(c, EMAWeightAveraging))
        assert ema._average_model.n_averaged.item() == 2  # updated after each optimizer step
        # at the end of fit the module holds the averaged weights
        for averaged, current in zip(ema._average_model.module.parameters(), model.parameters()):
            torch.testing.assert_close(averaged, current)
        # the best checkpoint holds the averaged weights and reloads with ptft's weights-only loader
        from ptft.core.module import load_checkpoint

        checkpoint = torch.load(cli.trainer.checkpoint_callback.best_model_path, weights_only=True)
        assert "current_model_state" in checkpoint  # Lightning keeps the raw weights beside the average
        reloaded = load_checkpoint(cli.trainer.checkpoint_callback.best_model_path)
        assert reloaded.tta == "hflip" and reloaded.mixup_config == model.mixup_config
