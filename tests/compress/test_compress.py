"""Compression: pruning during fine-tuning (target sparsity on the backbone only, checkpoints that load into the plain
module), dynamic int8 quantization, ONNX export checked with onnxruntime at other shapes, and ``ptft export
--format onnx-int8``."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch
from helpers import trainer
from torch import nn

from ptft.compress import Pruning, check_onnx_parity, export_onnx, prune_module, quantize_dynamic_int8, sparsity
from ptft.compress.command import export_command
from ptft.compress.prune import backbone_weights
from ptft.compress.quantize import is_quantized
from ptft.core.errors import PtftError
from ptft.core.module import load_checkpoint
from ptft.text import TextClassificationDataModule, TextClassifier, TokenClassifier
from ptft.vision import ImageClassifier

LABELS = ["negative", "positive"]


def classifier(tiny_bert: str) -> TextClassifier:
    torch.manual_seed(0)
    return TextClassifier(tiny_bert, num_labels=2, label_names=LABELS, optimizer={"lr": 1e-3},
                          scheduler={"name": "constant"})


def token_batch(batch_size: int, length: int, seed: int) -> dict[str, torch.Tensor]:
    """Random word pieces with the last positions of the first example padded away."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1000, 5000, (batch_size, length), generator=g)
    mask = torch.ones_like(ids)
    mask[0, length // 2:] = 0
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": torch.zeros_like(ids)}


class SaveAfterFirstEpoch(L.Callback):
    """Saves a checkpoint at the end of epoch 0, while the pruning masks are in place."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.current_epoch == 0:
            trainer.save_checkpoint(self.path)


def test_pruning_callback_reaches_the_target_on_the_backbone_and_checkpoints_load_plainly(tiny_bert, text_files, tmp_path):
    module = classifier(tiny_bert)
    embeddings = module.model.bert.embeddings.word_embeddings.weight.detach().clone()
    data = TextClassificationDataModule(train_file=text_files["train"], labels=LABELS, batch_size=16, max_length=32)
    pruning = Pruning(amount=0.5, epochs=2)
    fit = trainer(tmp_path, max_epochs=3, limit_val_batches=0, callbacks=[pruning, SaveAfterFirstEpoch(tmp_path / "e0.ckpt")])
    fit.fit(module, data)

    for layer, name in backbone_weights(module):  # every Linear of the encoder, pooler included
        weight = getattr(layer, name)
        assert (weight == 0).float().mean().item() == pytest.approx(0.5, abs=1 / weight.numel())
        assert not hasattr(layer, f"{name}_mask") and not layer._forward_pre_hooks  # made permanent
    assert sparsity(module) == pytest.approx(0.5, abs=1e-3)
    assert len(backbone_weights(module)) == 2 * 6 + 1  # q, k, v, attention output, intermediate, output; pooler
    assert (module.model.classifier.weight != 0).all()  # the head stays dense
    assert ((module.model.bert.embeddings.word_embeddings.weight == 0) == (embeddings == 0)).all()  # not pruned

    # Saved mid-training with the masks on: plain weight names, the first step's sparsity (cubic schedule: 7/8 of 50%).
    early = torch.load(tmp_path / "e0.ckpt", weights_only=True)["state_dict"]
    assert not [k for k in early if k.endswith(("_orig", "_mask"))]
    loaded_early = load_checkpoint(str(tmp_path / "e0.ckpt"))
    assert sparsity(loaded_early) == pytest.approx(0.4375, abs=1e-3)
    # Pruned once, pruned for good: every weight zero after the first epoch is still zero at the end.
    for (early_layer, _), (final_layer, _) in zip(backbone_weights(loaded_early), backbone_weights(module)):
        assert (final_layer.weight[early_layer.weight == 0] == 0).all()

    fit.save_checkpoint(tmp_path / "final.ckpt")
    loaded = load_checkpoint(str(tmp_path / "final.ckpt")).eval()
    module.eval()
    batch = token_batch(4, 12, seed=0)
    with torch.no_grad():
        torch.testing.assert_close(loaded(batch), module(batch))
    assert sparsity(loaded) == pytest.approx(0.5, abs=1e-3)


def test_one_shot_structured_pruning_zeroes_whole_rows(tiny_bert):
    module = prune_module(classifier(tiny_bert), amount=0.25, structured=True)
    for layer, _ in backbone_weights(module):
        zero_rows = (layer.weight == 0).all(dim=1).sum().item()
        assert zero_rows == round(0.25 * layer.out_features)
        assert not hasattr(layer, "weight_orig")
    assert (module.model.classifier.weight != 0).all()


def test_dynamic_int8_replaces_linear_layers_and_keeps_predictions(tiny_bert):
    module = classifier(tiny_bert).eval()
    with torch.no_grad():  # larger logits than a random head's, so argmax is decided by the network, not by noise
        module.model.classifier.weight.mul_(50)
    quantized = quantize_dynamic_int8(module)

    linears = [n for n, m in module.named_modules() if isinstance(m, nn.Linear)]
    assert linears and all(is_quantized(quantized.get_submodule(n)) for n in linears)
    assert all(isinstance(module.get_submodule(n), nn.Linear) for n in linears)  # the original stays fp32
    batch = token_batch(64, 16, seed=1)
    with torch.inference_mode():
        reference, logits = module(batch), quantized(batch)
    agree = (logits.argmax(-1) == reference.argmax(-1)).float().mean().item()
    assert agree >= 0.95
    # int8 weights per output channel, activations per batch (one scale for 32-wide hidden states): 3% measured.
    assert (logits - reference).abs().max() <= 0.05 * reference.abs().max()


def test_onnx_export_command_writes_checked_fp32_and_int8_models(tiny_bert, tmp_path, capsys):
    module = classifier(tiny_bert)
    fit = trainer(tmp_path)
    fit.strategy.connect(module)
    fit.save_checkpoint(tmp_path / "model.ckpt")

    out = tmp_path / "onnx"
    export_command([str(tmp_path / "model.ckpt"), str(out), "--format", "onnx-int8"])
    printed = capsys.readouterr().out
    assert "max |logits - PyTorch's|" in printed and "int8 model" in printed
    assert (out / "tokenizer.json").is_file() and (out / "config.json").is_file()
    assert (out / "model.int8.onnx").stat().st_size < 0.6 * (out / "model.onnx").stat().st_size

    module.eval()
    for batch in (token_batch(2, 7, seed=2), token_batch(5, 19, seed=3)):  # dynamic batch and sequence axes
        assert check_onnx_parity(module, out / "model.onnx", batch, atol=1e-4) <= 1e-4


def test_onnx_export_of_an_image_classifier_has_a_dynamic_batch(tmp_path):
    torch.manual_seed(0)
    module = ImageClassifier("test_resnet", num_labels=3, pretrained=False).eval()
    path = export_onnx(module, {"pixel_values": torch.randn(2, 3, 32, 32)}, tmp_path / "model.onnx")
    for size in (2, 5):
        batch = {"pixel_values": torch.randn(size, 3, 32, 32), "labels": torch.zeros(size, dtype=torch.long)}
        assert check_onnx_parity(module, path, batch, atol=1e-4) <= 1e-4
    with pytest.raises(PtftError, match="differ from PyTorch's"):  # the check can fail: another model's logits
        check_onnx_parity(ImageClassifier("test_resnet", num_labels=3, pretrained=False), path, batch)


def test_unsupported_modules_get_one_line_errors(tiny_bert, tmp_path):
    tagger = TokenClassifier(tiny_bert, num_labels=3, label_names=["O", "B-PER", "I-PER"])
    with pytest.raises(PtftError, match="supports TextClassifier and ImageClassifier.*not TokenClassifier"):
        export_onnx(tagger, token_batch(2, 5, seed=0), tmp_path / "tagger.onnx")
    fit = trainer(tmp_path)
    fit.strategy.connect(tagger)
    fit.save_checkpoint(tmp_path / "tagger.ckpt")
    with pytest.raises(PtftError, match="not TokenClassifier"):
        export_command([str(tmp_path / "tagger.ckpt"), str(tmp_path / "out"), "--format", "onnx"])
    with pytest.raises(PtftError, match="drop --format"):
        export_command([str(tmp_path / "tagger.ckpt"), str(tmp_path / "out"), "--backbone", "--format", "onnx"])
    with pytest.raises(PtftError, match="no Linear layer"):
        quantize_dynamic_int8(nn.Sequential(nn.Conv2d(3, 4, 3)))
