"""PEFT adapters on Hugging Face and timm models; trainable-only checkpoints; merge-and-export."""


import lightning as L
import pytest
import torch
from helpers import changed, trainer, weights
from lightning.pytorch.callbacks import ModelCheckpoint

from ptft.core import PeftConfig
from ptft.text import TextClassificationDataModule, TextClassifier
from ptft.vision import ImageClassifier

pytest.importorskip("peft")


def lora_text(tiny_bert, **kwargs):
    L.seed_everything(0)
    return TextClassifier(tiny_bert, num_labels=2, peft=PeftConfig(**{"method": "lora", "r": 4, **kwargs}),
                          checkpoint_weights="trainable")


@pytest.mark.parametrize("method", ["lora", "loha", "ia3"])
def test_adapters_train_only_adapters_and_head(method, tiny_bert, text_files, tmp_path):
    target = ["query", "value", "dense"] if method == "ia3" else "all-linear"
    model = lora_text(tiny_bert, method=method, target_modules=target)
    trainable = {n for n, p in model.model.named_parameters() if p.requires_grad}
    adapter = {n for n in trainable if not model.is_head_parameter(n)}
    assert adapter and all(("lora_" in n) or ("hada_" in n) or ("ia3_" in n) for n in adapter)
    assert {n for n in trainable if model.is_head_parameter(n)} == {
        "base_model.model.classifier.modules_to_save.default.weight",
        "base_model.model.classifier.modules_to_save.default.bias",
    }
    total = sum(p.numel() for p in model.model.parameters())
    assert sum(p.numel() for n, p in model.model.named_parameters() if n in trainable) < 0.2 * total

    data = TextClassificationDataModule(train_file=text_files["train"], val_file=text_files["val"], batch_size=16)
    data.connect(model)
    before = weights(model.model)
    trainer(tmp_path, max_epochs=1).fit(model, data)
    moved = changed(before, weights(model.model))
    assert moved and all(n in trainable for n in moved)
    # adapters sit in the layer they adapt
    layers = model.layer_ids()
    assert all(layers[n] in (1, 2) for n in adapter)


def test_lora_on_timm_vit():
    model = ImageClassifier("test_vit", num_labels=3, pretrained=False, peft=PeftConfig(target_modules=["qkv", "fc1"]))
    trainable = [n for n, p in model.model.named_parameters() if p.requires_grad]
    assert any("blocks.0.attn.qkv.lora_A" in n for n in trainable)
    assert any(n.endswith("head.modules_to_save.default.weight") for n in trainable)
    batch = {"pixel_values": torch.randn(2, 3, 160, 160), "labels": torch.tensor([0, 2])}
    model.training_step(batch, 0).backward()
    assert model.model.base_model.model.blocks[0].attn.qkv.lora_B.default.weight.grad is not None


def test_trainable_only_checkpoint_resumes_and_reloads(tiny_bert, text_files, tmp_path):
    def fit(root, epochs, ckpt_path=None):
        model = lora_text(tiny_bert)
        data = TextClassificationDataModule(train_file=text_files["train"], val_file=text_files["val"], batch_size=16)
        data.connect(model)
        ckpt = ModelCheckpoint(dirpath=root, filename="{epoch}", save_top_k=-1)
        trainer(root, max_epochs=epochs, callbacks=[ckpt], enable_checkpointing=True).fit(model, data, ckpt_path=ckpt_path)
        return model, data

    full, data = fit(tmp_path / "a", 2)
    ckpt = tmp_path / "a" / "epoch=0.ckpt"
    saved = torch.load(ckpt, weights_only=True)["state_dict"]
    trainable = {f"model.{n}" for n, p in full.model.named_parameters() if p.requires_grad}
    assert {k for k in saved if k.startswith("model.") and "embeddings.position_ids" not in k} == trainable
    full_size = sum(p.numel() for p in full.model.parameters())
    assert sum(v.numel() for k, v in saved.items() if k.startswith("model.")) < 0.2 * full_size

    resumed, _ = fit(tmp_path / "b", 2, ckpt_path=ckpt)
    assert changed(weights(full.model), weights(resumed.model), atol=1e-6) == set()

    reloaded = TextClassifier.load_from_checkpoint(tmp_path / "a" / "epoch=1.ckpt")
    data.setup("fit")
    batch = next(iter(data.val_dataloader()))
    full.eval()
    reloaded.eval()
    torch.testing.assert_close(reloaded(batch), full(batch))


def test_export_merges_adapters_into_a_plain_model(tiny_bert, text_files, tmp_path):
    from transformers import AutoModelForSequenceClassification

    from ptft.cli import main

    model = lora_text(tiny_bert)
    with torch.no_grad():  # a clearly non-zero adapter, so that merging matters
        for n, p in model.model.named_parameters():
            if "lora_B" in n:
                p.normal_()
    data = TextClassificationDataModule(train_file=text_files["train"], val_file=text_files["val"], batch_size=16)
    data.connect(model)
    ckpt = ModelCheckpoint(dirpath=tmp_path, filename="lora")
    trainer(tmp_path, max_steps=1, callbacks=[ckpt], enable_checkpointing=True).fit(model, data)
    main(["export", str(tmp_path / "lora.ckpt"), str(tmp_path / "plain")])

    plain = AutoModelForSequenceClassification.from_pretrained(tmp_path / "plain").eval()
    assert not any("lora" in n for n, _ in plain.named_parameters())
    batch = next(iter(data.val_dataloader()))
    model.eval()
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    adapted = model(batch)
    torch.testing.assert_close(plain(**inputs).logits, adapted)
    with model.model.disable_adapter():  # without the adapter the outputs differ: the merge carried it
        assert not torch.allclose(model(batch), adapted, atol=1e-3)
    assert (tmp_path / "plain" / "tokenizer.json").exists()


def test_freeze_schedule_never_unfreezes_weights_under_adapters(tiny_bert, text_files, tmp_path):
    from ptft.core import FreezeUnfreeze

    model = lora_text(tiny_bert)
    trainable = {n for n, p in model.model.named_parameters() if p.requires_grad}
    data = TextClassificationDataModule(train_file=text_files["train"], val_file=text_files["val"], batch_size=16)
    data.connect(model)
    before = weights(model.model)
    trainer(tmp_path, max_epochs=2, callbacks=[FreezeUnfreeze(unfreeze_at_epoch=1)]).fit(model, data)
    moved = changed(before, weights(model.model))
    assert moved and moved <= trainable
    assert {n for n, p in model.model.named_parameters() if p.requires_grad} == trainable
