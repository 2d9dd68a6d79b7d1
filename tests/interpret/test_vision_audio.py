"""Vision and audio attribution: Grad-CAM / Grad-CAM++ find a planted patch, ViT attention rollout matches a
reference computed from the blocks' own weights, and audio saliency finds the tone burst a spectrogram CNN learned
(and a waveform model's time-frequency shares add up to its input x gradient)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ptft.audio import AudioClassifier, SpectrogramClassifier
from ptft.core.errors import PtftError
from ptft.interpret.audio import saliency_files, saliency_maps, stft_input_x_gradient
from ptft.interpret.vision import (
    display_images,
    gradcam_files,
    gradcam_maps,
    gradcam_plus_plus_files,
    vit_attention_files,
    vit_attention_rollout,
)
from ptft.vision import ImageClassifier

TINY_VIT = {"img_size": 32, "patch_size": 8, "depth": 2, "embed_dim": 32, "num_heads": 2}


def assert_pngs(paths: list[Path], names: list[str]) -> None:
    assert [p.name for p in paths] == names
    for path in paths:
        with Image.open(path) as image:
            assert image.format == "PNG" and min(image.size) > 50


# --- vision -----------------------------------------------------------------------------------------------------
def squares(count: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """32x32 noise with an 8x8 square on a random cell of a 4x4 grid: red for class 0, blue for class 1.
    Returns normalised images (mean 0.5, std 0.5), labels and each square's mask."""
    images = torch.rand(count, 3, 32, 32, generator=generator) * 0.5
    labels = torch.randint(0, 2, (count,), generator=generator)
    cells = torch.randint(0, 4, (count, 2), generator=generator) * 8
    masks = torch.zeros(count, 32, 32, dtype=torch.bool)
    for i, (row, col) in enumerate(cells.tolist()):
        images[i, :, row:row + 8, col:col + 8] = 0.0
        images[i, 2 * int(labels[i]), row:row + 8, col:col + 8] = 1.0
        masks[i, row:row + 8, col:col + 8] = True
    return (images - 0.5) / 0.5, labels, masks


@pytest.fixture(scope="module")
def square_cnn() -> ImageClassifier:
    """test_resnet at output stride 8 (a 4x4 last stage on 32x32 images) trained to tell the squares' colour."""
    torch.manual_seed(0)
    model = ImageClassifier("test_resnet", pretrained=False, num_labels=2, label_names=["red", "blue"],
                            model_kwargs={"output_stride": 8})
    optimizer = torch.optim.Adam(model.model.parameters(), lr=3e-3)
    generator = torch.Generator().manual_seed(0)
    model.train()
    for _ in range(40):
        images, labels, _ = squares(24, generator)
        loss = torch.nn.functional.cross_entropy(model({"pixel_values": images}), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model


@pytest.mark.parametrize("method", ["gradcam", "gradcam++"])
def test_gradcam_heat_lies_on_the_planted_square(square_cnn, method):
    images, labels, masks = squares(16, torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert (square_cnn({"pixel_values": images}).argmax(-1) == labels).float().mean() >= 0.9
    square_cnn.zero_grad(set_to_none=True)
    flags = {name: m.training for name, m in square_cnn.named_modules()}
    maps = gradcam_maps(square_cnn, images, labels, method=method)
    assert maps.shape == (16, 32, 32) and maps.min() >= 0 and maps.max() <= 1
    inside = (maps * masks).flatten(1).sum(1) / masks.flatten(1).sum(1)
    outside = (maps * ~masks).flatten(1).sum(1) / (~masks).flatten(1).sum(1)
    assert (inside > 1.2 * outside).float().mean() >= 0.8, (inside, outside)  # the square is 1/16 of the image
    assert inside.mean() > 1.5 * outside.mean()
    assert {name: m.training for name, m in square_cnn.named_modules()} == flags  # training mode restored
    assert all(p.grad is None for p in square_cnn.parameters())  # no gradients left behind


def test_gradcam_files_and_display_images(square_cnn, tmp_path):
    images, labels, _ = squares(2, torch.Generator().manual_seed(2))
    shown = display_images(square_cnn, images)
    assert shown.shape == (2, 32, 32, 3)
    np.testing.assert_allclose(shown, ((images * 0.5 + 0.5).permute(0, 2, 3, 1)).numpy(), atol=1e-6)
    batch = {"pixel_values": images, "labels": labels}
    assert_pngs(gradcam_files(square_cnn, batch, labels, tmp_path, 10), ["0010-gradcam.png", "0011-gradcam.png"])
    assert_pngs(gradcam_plus_plus_files(square_cnn, batch, labels, tmp_path, 0),
                ["0000-gradcam++.png", "0001-gradcam++.png"])
    with pytest.raises(PtftError, match="not a submodule"):
        gradcam_maps(square_cnn, images, labels, target_layer="layer9")
    with pytest.raises(PtftError, match="one target class per example"):
        gradcam_maps(square_cnn, images, [0])


def test_gradcam_on_a_convnext_uses_its_last_stage():
    model = ImageClassifier("test_convnext", pretrained=False, num_labels=3)
    maps = gradcam_maps(model, torch.randn(2, 3, 64, 64), [0, 2], method="gradcam++")
    assert maps.shape == (2, 64, 64) and torch.isfinite(maps).all()


@pytest.fixture(scope="module")
def tiny_vit() -> ImageClassifier:
    torch.manual_seed(0)
    return ImageClassifier("vit_tiny_patch16_224", pretrained=False, num_labels=3, model_kwargs=TINY_VIT)


def test_gradcam_on_a_vit_lays_tokens_on_the_patch_grid(tiny_vit, tmp_path):
    images = torch.randn(2, 3, 32, 32)
    maps = gradcam_maps(tiny_vit, images, [0, 2])
    assert maps.shape == (2, 32, 32) and maps.max() > 0
    batch = {"pixel_values": images}
    assert_pngs(gradcam_files(tiny_vit, batch, torch.tensor([1, 1]), tmp_path, 0),
                ["0000-gradcam.png", "0001-gradcam.png"])


def reference_rollout(model: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
    """Rollout from attention recomputed with each block's qkv weights on its recorded input (no timm internals)."""
    inputs: list[torch.Tensor] = []
    handles = [b.attn.register_forward_pre_hook(lambda _m, args: inputs.append(args[0])) for b in model.blocks]
    with torch.no_grad():
        model(images)
    for handle in handles:
        handle.remove()
    flow = None
    for block, x in zip(model.blocks, inputs):
        attn = block.attn
        batch, tokens, dim = x.shape
        q, k, _ = attn.qkv(x).reshape(batch, tokens, 3, attn.num_heads, dim // attn.num_heads).permute(2, 0, 3, 1, 4)
        probs = (q @ k.transpose(-2, -1) * attn.scale).softmax(-1).mean(1)
        step = 0.5 * probs + 0.5 * torch.eye(tokens)
        flow = step if flow is None else step @ flow
    return flow[:, 0, 1:].reshape(batch, 4, 4)


def test_attention_rollout_matches_a_reference_and_restores_fused_attention(tiny_vit, tmp_path):
    images = torch.randn(3, 3, 32, 32)
    assert all(b.attn.fused_attn for b in tiny_vit.model.blocks)
    flow = vit_attention_rollout(tiny_vit, images)
    assert flow.shape == (3, 4, 4) and (flow >= 0).all()
    assert (flow.flatten(1).sum(1) <= 1 + 1e-5).all()  # the class token's row: the patches' share of a unit of flow
    torch.testing.assert_close(flow, reference_rollout(tiny_vit.model, images))
    assert all(b.attn.fused_attn for b in tiny_vit.model.blocks)  # SDPA back on
    sharp = vit_attention_rollout(tiny_vit, images, head_fusion="max", discard_ratio=0.5)
    assert sharp.shape == (3, 4, 4) and not torch.allclose(sharp, flow)
    paths = vit_attention_files(tiny_vit, {"pixel_values": images[:1]}, [2], tmp_path, 4)
    assert_pngs(paths, ["0004-attention.png"])


def test_attention_rollout_refuses_a_cnn(square_cnn):
    with pytest.raises(PtftError, match="attention rollout explains timm Vision Transformers"):
        vit_attention_rollout(square_cnn, torch.randn(1, 3, 32, 32))


# --- audio ------------------------------------------------------------------------------------------------------
RATE = 8000
BURST_HZ = (2500.0, 1000.0)  # class 0, class 1
BURST = 1200  # samples: 150 ms of a 500 ms clip


def clips(count: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """0.5 s of noise with a 150 ms tone burst at a random time: 2.5 kHz for class 0, 1 kHz for class 1.
    Returns waveforms, labels and each burst's first sample."""
    labels = torch.arange(count) % 2
    t = torch.arange(BURST) / RATE
    waves = 0.1 * torch.randn(count, RATE // 2, generator=generator)
    starts = torch.randint(0, RATE // 2 - BURST, (count,), generator=generator)
    phases = torch.rand(count, generator=generator) * 6.28
    for i, (label, start) in enumerate(zip(labels.tolist(), starts.tolist())):
        waves[i, start:start + BURST] += 0.3 * torch.sin(2 * torch.pi * BURST_HZ[label] * t + phases[i])
    return waves, labels, starts


@pytest.fixture(scope="module")
def burst_cnn() -> SpectrogramClassifier:
    """test_resnet over 32 log-mel bands trained to tell the bursts apart."""
    torch.manual_seed(0)
    model = SpectrogramClassifier("test_resnet", pretrained=False, sampling_rate=RATE, num_labels=2,
                                  label_names=["2.5 kHz", "1 kHz"], features={"n_mels": 32})
    optimizer = torch.optim.Adam(model.model.parameters(), lr=3e-3)
    generator = torch.Generator().manual_seed(0)
    model.train()
    for _ in range(30):
        waves, labels, _ = clips(16, generator)
        loss = torch.nn.functional.cross_entropy(model({"input_values": waves}), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model


def burst_boxes(model: SpectrogramClassifier, labels: torch.Tensor, starts: torch.Tensor, frames: int) -> torch.Tensor:
    """Masks of each burst's time-frequency box: its frames, and the 5 mel bands around its frequency."""
    frontend = model.frontend
    boxes = torch.zeros(len(labels), frontend.bins, frames, dtype=torch.bool)
    for i, (label, start) in enumerate(zip(labels.tolist(), starts.tolist())):
        band = int(frontend.mel[round(BURST_HZ[label] * frontend.n_fft / RATE)].argmax())
        boxes[i, max(0, band - 2):band + 3, start // frontend.hop:(start + BURST) // frontend.hop + 1] = True
    return boxes


def test_spectrogram_saliency_finds_the_burst(burst_cnn):
    waves, labels, starts = clips(8, torch.Generator().manual_seed(1))
    batch = {"input_values": waves, "labels": labels}
    with torch.no_grad():
        burst_cnn.eval()
        assert (burst_cnn(batch).argmax(-1) == labels).float().mean() >= 0.85
        spec = burst_cnn.spectrogram(batch)
    burst_cnn.train()
    saliency = saliency_maps(burst_cnn, batch, labels)
    assert saliency.shape == spec[:, 0].shape and (saliency >= 0).all()
    assert burst_cnn.training
    # the reference: |spectrogram x d logit / d spectrogram| by hand
    burst_cnn.eval()
    spec.requires_grad_(True)
    burst_cnn.model(spec)[torch.arange(8), labels].sum().backward()
    burst_cnn.train()
    torch.testing.assert_close(saliency, (spec * spec.grad).abs()[:, 0].detach())
    boxes = burst_boxes(burst_cnn, labels, starts, saliency.shape[-1])
    inside = (saliency * boxes).flatten(1).sum(1) / boxes.flatten(1).sum(1)
    outside = (saliency * ~boxes).flatten(1).sum(1) / (~boxes).flatten(1).sum(1)
    assert (inside > 1.3 * outside).all(), (inside / outside)  # the box is ~5% of the spectrogram
    assert inside.mean() > 2 * outside.mean()


def test_spectrogram_saliency_skips_padding_and_writes_pictures(burst_cnn, tmp_path):
    waves, labels, _ = clips(2, torch.Generator().manual_seed(2))
    mask = torch.ones_like(waves, dtype=torch.long)
    mask[1, 2000:] = 0
    batch = {"input_values": waves * mask, "attention_mask": mask, "labels": labels}
    saliency = saliency_maps(burst_cnn, batch, labels)
    frames = int(burst_cnn.frontend.frames(torch.tensor(2000)))
    assert saliency[1, :, frames:].abs().sum() == 0 and saliency[1, :, :frames].sum() > 0
    assert_pngs(saliency_files(burst_cnn, batch, labels, tmp_path, 3), ["0003-saliency.png", "0004-saliency.png"])
    with pytest.raises(PtftError, match="saliency explains ptft.audio"):
        saliency_maps(ImageClassifier("test_resnet", pretrained=False, num_labels=2), batch, labels)


@pytest.fixture
def tiny_ast(tmp_path: Path) -> str:
    """A 1-layer random Audio Spectrogram Transformer over 32 frames x 16 mel bins, with its feature extractor."""
    from transformers import ASTConfig, ASTFeatureExtractor, ASTForAudioClassification

    config = ASTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                       patch_size=16, frequency_stride=16, time_stride=16, max_length=32, num_mel_bins=16)
    ASTForAudioClassification(config).save_pretrained(tmp_path)
    ASTFeatureExtractor(num_mel_bins=16, max_length=32).save_pretrained(tmp_path)
    return str(tmp_path)


def test_hf_filter_bank_saliency_is_bins_by_frames(tiny_ast, tmp_path):
    model = AudioClassifier(tiny_ast, num_labels=2)
    features = torch.randn(2, 32, 16)  # AST: input_values of (frames, bins)
    saliency = saliency_maps(model, {"input_values": features}, [1, 0])
    assert saliency.shape == (2, 16, 32)
    reference = features.clone().requires_grad_(True)
    model.eval()
    model({"input_values": reference})[torch.arange(2), torch.tensor([1, 0])].sum().backward()
    torch.testing.assert_close(saliency, (features * reference.grad).abs().transpose(1, 2))
    assert_pngs(saliency_files(model, {"input_values": features}, [1, 0], tmp_path / "ast", 0),
                ["0000-saliency.png", "0001-saliency.png"])


def test_waveform_saliency_on_the_log_mel_grid(tiny_wav2vec2, tmp_path):
    model = AudioClassifier(tiny_wav2vec2, num_labels=2)
    waves = torch.randn(2, 4000)
    saliency = saliency_maps(model, {"input_values": waves}, [0, 1])
    assert saliency.shape == (2, 64, 4000 // 160 + 1)  # 64 mel bands, 10 ms hops at 16 kHz
    assert (saliency >= 0).all() and (saliency.flatten(1).sum(1) > 0).all()
    # the STFT cells' shares add up to the waveform's own input x gradient
    model.eval()
    forward = lambda x: model({"input_values": x})  # noqa: E731
    cells = stft_input_x_gradient(forward, waves, [0, 1], 400, 160, torch.hann_window(400))
    assert cells.shape == (2, 201, 26)
    reference = waves.clone().requires_grad_(True)
    forward(reference)[torch.arange(2), torch.tensor([0, 1])].sum().backward()
    torch.testing.assert_close(cells.sum((1, 2)), (waves * reference.grad).sum(1), rtol=1e-3, atol=1e-5)
    assert_pngs(saliency_files(model, {"input_values": waves}, [0, 1], tmp_path, 0),
                ["0000-saliency.png", "0001-saliency.png"])


def test_gradcam_picks_a_stage_that_is_not_one_pixel_on_small_images():
    """ResNet-18's layer4 is 1x1 on a 32-pixel image (a uniform heat map): the automatic choice is layer2 there, and
    layer4 at 224 pixels."""
    from ptft.interpret.vision import _target_layer

    torch.manual_seed(0)
    module = ImageClassifier("resnet18", num_labels=3, pretrained=False)
    assert _target_layer(module.model, None, 32)[0] is module.model.layer2  # 4x4 (layer3: 2x2)
    assert _target_layer(module.model, None, 224)[0] is module.model.layer4
    maps = gradcam_maps(module, torch.randn(2, 3, 32, 32), [0, 1])
    assert maps.shape == (2, 32, 32) and all(float(m.std()) > 0.01 for m in maps)  # not one colour
