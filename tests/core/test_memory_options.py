"""Memory options: gradient checkpointing (also above frozen layers and under LoRA), gradient accumulation, LoRA over
a bf16 or 4-bit (NF4) frozen base."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from helpers import RecordLrs, changed, trainer, weights
from torch.utils.data import DataLoader

from ptft.core import FreezeSchedule, PeftConfig
from ptft.core.errors import PtftError
from ptft.core.grad_checkpointing import enable_gradient_checkpointing
from ptft.text import TextClassifier
from ptft.vision import ImageClassifier

pytest.importorskip("peft")

SENTENCES = ["a great film", "an awful plot", "lovely acting and a fine score", "broken, dull, far too long",
             "superb", "terrible pacing but good sound", "the best of the year", "useless"]
NO_DROPOUT = {"hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0, "classifier_dropout": 0.0}


def text_batches(tiny_bert: str, batch_size: int, repeat: int = 1) -> list[dict[str, torch.Tensor]]:
    """The 8 sentences (``repeat`` times), padded to one length, in batches of ``batch_size``, in order."""
    from transformers import AutoTokenizer

    encoded = AutoTokenizer.from_pretrained(tiny_bert)(SENTENCES * repeat, padding="max_length", max_length=12,
                                                       return_tensors="pt")
    encoded = dict(encoded, labels=torch.tensor([1, 0, 1, 0, 1, 0, 1, 0] * repeat))
    n = len(SENTENCES) * repeat
    return [{k: v[i:i + batch_size] for k, v in encoded.items()} for i in range(0, n, batch_size)]


class KeepGradients(L.Callback):
    """Copies every gradient just before the optimizer step."""

    def __init__(self) -> None:
        self.grads: dict[str, torch.Tensor] = {}

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        self.grads = {n: p.grad.detach().clone() for n, p in pl_module.model.named_parameters() if p.grad is not None}


def one_step_gradients(module: L.LightningModule, batches: list, tmp_path, callbacks=(), **kwargs) -> dict:
    keep = KeepGradients()
    fit = trainer(tmp_path, max_steps=1, callbacks=[*callbacks, keep], **kwargs)
    fit.fit(module, DataLoader(batches, batch_size=None))
    return keep.grads


def assert_same_gradients(plain: dict, checkpointed: dict, blocks: list[str]) -> None:
    assert plain.keys() == checkpointed.keys()
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], rtol=1e-4, atol=1e-6, msg=name)
    for block in blocks:  # the checkpointed blocks do get gradients, and not zeros
        grads = [g for n, g in plain.items() if block in n]
        assert grads and all(g.abs().sum() > 0 for g in grads), block


# --- gradient checkpointing ---------------------------------------------------------------------------------------
def test_checkpointing_above_frozen_embeddings_keeps_the_gradients_of_a_bert(tiny_bert, tmp_path):
    batches = text_batches(tiny_bert, 4)
    grads = {}
    for on in (False, True):
        L.seed_everything(0)  # same head, same dropout masks (checkpointing replays the RNG state)
        model = TextClassifier(tiny_bert, num_labels=2, gradient_checkpointing=on)
        assert model.model.is_activation_checkpointing == on
        freeze = FreezeSchedule(freeze=["bert.embeddings.*"])  # ptft's own freezing
        grads[on] = one_step_gradients(model, batches, tmp_path, callbacks=[freeze])
    assert not any("embeddings" in n for n in grads[True])
    assert_same_gradients(grads[False], grads[True], ["encoder.layer.0.", "encoder.layer.1."])


VIT_STEM = ["patch_embed.*", "cls_token", "pos_embed"]


def vit_step(tmp_path, on: bool) -> dict:
    L.seed_everything(0)
    model = ImageClassifier("test_vit", num_labels=3, pretrained=False, gradient_checkpointing=on)
    assert model.model.grad_checkpointing == on
    batches = [{"pixel_values": torch.randn(2, 3, 160, 160), "labels": torch.tensor([0, 2])}]
    return one_step_gradients(model, batches, tmp_path, callbacks=[FreezeSchedule(freeze=VIT_STEM)])


def test_checkpointing_above_a_frozen_stem_keeps_the_gradients_of_a_timm_vit(tmp_path):
    plain, checkpointed = vit_step(tmp_path, False), vit_step(tmp_path, True)
    assert not any(n.startswith("patch_embed") for n in checkpointed)
    assert_same_gradients(plain, checkpointed, ["blocks.0.", "blocks.1."])


def test_reentrant_checkpointing_would_lose_the_blocks_gradients(tmp_path, monkeypatch):
    """Why ptft refuses timm's reentrant mode: above a frozen stem, the checkpointed blocks get no gradient at all."""
    import timm.layers

    monkeypatch.setattr(timm.layers.config, "_USE_REENTRANT_CKPT", True)
    with pytest.raises(PtftError, match="TIMM_REENTRANT_CKPT"):
        ImageClassifier("test_vit", num_labels=3, pretrained=False, gradient_checkpointing=True)

    L.seed_everything(0)
    model = ImageClassifier("test_vit", num_labels=3, pretrained=False)
    model.model.set_grad_checkpointing(True)  # what ptft refuses to do
    batches = [{"pixel_values": torch.randn(2, 3, 160, 160), "labels": torch.tensor([0, 2])}]
    grads = one_step_gradients(model, batches, tmp_path, callbacks=[FreezeSchedule(freeze=VIT_STEM)])
    assert grads and not any(n.startswith("blocks.") for n in grads)  # the head alone learns


def test_checkpointing_under_lora_keeps_the_adapters_gradients(tiny_bert, tmp_path):
    batches = text_batches(tiny_bert, 4)
    grads = {}
    for on in (False, True):
        L.seed_everything(0)
        model = TextClassifier(tiny_bert, num_labels=2, peft=PeftConfig(r=4), gradient_checkpointing=on)
        with torch.no_grad():  # lora_B starts at 0, which leaves lora_A without gradient: make both non-trivial
            for n, p in model.model.named_parameters():
                if "lora_B" in n:
                    p.normal_(std=0.1)
        grads[on] = one_step_gradients(model, batches, tmp_path)
    assert all("lora_" in n or "classifier" in n for n in grads[True])
    adapters = ["layer.0.attention.self.query.lora_A", "layer.1.output.dense.lora_B"]
    assert_same_gradients(grads[False], grads[True], adapters)


def test_checkpointing_a_generative_model_turns_its_cache_off():
    from ptft.text.sft import ChatFineTuner

    llama = {"model_type": "llama", "vocab_size": 64, "hidden_size": 16, "intermediate_size": 32,
             "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 2}
    model = ChatFineTuner("tiny-llama", model_config=llama, num_samples=0, gradient_checkpointing=True)
    assert model.model.is_activation_checkpointing and model.model.config.use_cache is False
    assert model.hparams["gradient_checkpointing"] is True
    assert ChatFineTuner("tiny-llama", model_config=llama, num_samples=0).model.config.use_cache is True


def test_checkpointing_other_models_is_a_one_line_error():
    holder = torch.nn.Sequential(torch.nn.Linear(2, 2))
    with pytest.raises(PtftError, match="^gradient_checkpointing: Sequential is neither a Hugging Face nor a timm"):
        enable_gradient_checkpointing(holder)


# --- gradient accumulation ----------------------------------------------------------------------------------------
def sgd_classifier(tiny_bert: str, **scheduler) -> TextClassifier:
    L.seed_everything(0)
    return TextClassifier(tiny_bert, num_labels=2, model_config=NO_DROPOUT,
                          optimizer={"name": "sgd", "lr": 0.5, "momentum": 0.0, "weight_decay": 0.0},
                          scheduler={"name": "constant", "warmup_ratio": 0.0, **scheduler})


def test_accumulating_4_batches_of_2_is_one_batch_of_8(tiny_bert, tmp_path):
    # Plain SGD: an update proportional to the gradient (Adam's first step would hide a wrong scale).
    start = sgd_classifier(tiny_bert)
    before = weights(start.model)
    big = sgd_classifier(tiny_bert)
    trainer(tmp_path, max_steps=1).fit(big, DataLoader(text_batches(tiny_bert, 8), batch_size=None))
    small = sgd_classifier(tiny_bert)
    fit = trainer(tmp_path, max_steps=1, accumulate_grad_batches=4)
    fit.fit(small, DataLoader(text_batches(tiny_bert, 2), batch_size=None))
    assert len(changed(before, weights(big.model))) > 10
    for name, value in weights(big.model).items():
        torch.testing.assert_close(weights(small.model)[name], value, rtol=1e-4, atol=1e-6, msg=name)


def test_the_schedule_counts_optimizer_steps_not_batches(tiny_bert, tmp_path):
    model = sgd_classifier(tiny_bert, name="linear")
    lrs = RecordLrs()
    fit = trainer(tmp_path, max_epochs=1, accumulate_grad_batches=4, callbacks=[lrs])
    fit.fit(model, DataLoader(text_batches(tiny_bert, 2, repeat=2), batch_size=None))  # 8 batches: 2 optimizer steps
    assert fit.estimated_stepping_batches == 2
    assert [group[0] for group in lrs.lrs] == pytest.approx([0.5, 0.25])  # linear decay over 2 steps, not 8


# --- LoRA over a bf16 base ----------------------------------------------------------------------------------------
def bf16_lora(tiny_bert: str, **kwargs) -> TextClassifier:
    L.seed_everything(0)
    return TextClassifier(tiny_bert, num_labels=2, model_config=NO_DROPOUT,
                          peft=PeftConfig(r=4, base_weights="bf16"), **kwargs)


def test_bf16_base_keeps_adapters_head_and_norms_in_fp32(tiny_bert):
    model = bf16_lora(tiny_bert)
    params = dict(model.model.named_parameters())
    trainable = {n for n, p in params.items() if p.requires_grad}
    assert trainable and all(params[n].dtype == torch.float32 for n in trainable)
    frozen = {n: p.dtype for n, p in params.items() if not p.requires_grad}
    assert frozen["base_model.model.bert.encoder.layer.0.attention.self.query.base_layer.weight"] == torch.bfloat16
    assert frozen["base_model.model.bert.embeddings.word_embeddings.weight"] == torch.bfloat16
    assert frozen["base_model.model.bert.encoder.layer.0.output.LayerNorm.weight"] == torch.float32
    assert {d for n, d in frozen.items() if params[n].dim() >= 2} == {torch.bfloat16}


def test_bf16_base_trains_under_bf16_mixed_and_stops_in_fp32(tiny_bert, tmp_path):
    batches = text_batches(tiny_bert, 4)
    model = bf16_lora(tiny_bert)
    before = weights(model.model)
    trainer(tmp_path, max_steps=2, precision="bf16-mixed").fit(model, DataLoader(batches, batch_size=None))
    moved = changed(before, weights(model.model))
    assert any("lora_B" in n for n in moved) and all("lora_" in n or "classifier" in n for n in moved)

    with pytest.raises(PtftError, match=r"^peft.base_weights=bf16 needs bf16 autocast: set trainer.precision: bf16"):
        trainer(tmp_path, max_steps=1).fit(bf16_lora(tiny_bert), DataLoader(batches, batch_size=None))


@pytest.mark.parametrize("saved", ["trainable", "all"])
def test_bf16_base_checkpoints_reload_the_same_model(saved, tiny_bert, tmp_path):
    from lightning.pytorch.callbacks import ModelCheckpoint

    batches = text_batches(tiny_bert, 4)
    model = bf16_lora(tiny_bert, checkpoint_weights=saved)
    ckpt = ModelCheckpoint(dirpath=tmp_path, filename="last")
    trainer(tmp_path, max_steps=2, precision="bf16-mixed", callbacks=[ckpt], enable_checkpointing=True).fit(
        model, DataLoader(batches, batch_size=None))
    state = torch.load(tmp_path / "last.ckpt", weights_only=True)["state_dict"]
    base = "model.base_model.model.bert.encoder.layer.0.attention.self.query.base_layer.weight"
    assert (base in state) == (saved == "all")
    if saved == "all":
        assert state[base].dtype == torch.bfloat16  # half the size of an fp32 copy

    reloaded = TextClassifier.load_from_checkpoint(tmp_path / "last.ckpt")
    assert changed(weights(model.model), weights(reloaded.model)) == set()
    model.eval()
    reloaded.eval()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        torch.testing.assert_close(reloaded(batches[0]), model(batches[0]))


def test_bf16_base_merges_into_fp32_weights(tiny_bert):
    from ptft.core.peft import merge_adapters

    model = bf16_lora(tiny_bert)
    layer = model.model.base_model.model.bert.encoder.layer[0].attention.self.query
    with torch.no_grad():
        layer.lora_B.default.weight.normal_(std=0.01)
    expected = layer.base_layer.weight.float() + layer.get_delta_weight("default")
    merged = merge_adapters(model.model)
    weight = merged.bert.encoder.layer[0].attention.self.query.weight
    assert weight.dtype == torch.float32
    torch.testing.assert_close(weight, expected)  # the update added in fp32, not rounded to bf16


# --- LoRA over a 4-bit (NF4) base ---------------------------------------------------------------------------------
def changed_values(before: dict, after: dict) -> set[str]:
    """:func:`changed`, by value: bitsandbytes casts a 4-bit layer's bias to its compute dtype (bf16) in place."""
    return {n for n in before if not torch.equal(before[n].float(), after[n].float())}


def test_nf4_base_without_bitsandbytes_is_a_one_line_error(tiny_bert, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # import bitsandbytes raises ImportError
    with pytest.raises(PtftError, match=r"bitsandbytes is not installed; install it with: pip install 'ptft\[qlora\]'"):
        TextClassifier(tiny_bert, num_labels=2, peft=PeftConfig(r=4, base_weights="nf4"), checkpoint_weights="trainable")
    with pytest.raises(PtftError, match="base_weights=nf4 works with method lora only"):
        TextClassifier(tiny_bert, num_labels=2, peft=PeftConfig(method="ia3", base_weights="nf4"),
                       checkpoint_weights="trainable")


def test_nf4_base_trains_on_cpu_and_merges_into_fp32(tiny_bert, tmp_path):
    """bitsandbytes >= 0.48 quantizes and computes 4-bit layers on CPU too (checked with 0.50.2)."""
    bnb = pytest.importorskip("bitsandbytes")
    from ptft.core.peft import merge_adapters

    L.seed_everything(0)
    # Hidden size 64: bitsandbytes' CPU inference kernel (used in eval mode on AVX512-BF16 CPUs) fails on layers with
    # fewer than 64 inputs (0.50.2), which real models never have.
    config = {**NO_DROPOUT, "hidden_size": 64, "intermediate_size": 128}
    model = TextClassifier(tiny_bert, num_labels=2, pretrained=False, model_config=config,
                           peft=PeftConfig(r=4, base_weights="nf4"), checkpoint_weights="trainable")
    query = model.model.base_model.model.bert.encoder.layer[0].attention.self.query
    assert isinstance(query.base_layer, bnb.nn.Linear4bit) and query.base_layer.weight.dtype == torch.uint8
    assert type(query).__module__ == "peft.tuners.lora.bnb"  # PEFT's 4-bit LoRA layer, which merges correctly
    assert not isinstance(model.model.base_model.model.classifier.modules_to_save.default, bnb.nn.Linear4bit)

    before = weights(model.model)
    trainer(tmp_path, max_steps=2).fit(model, DataLoader(text_batches(tiny_bert, 4), batch_size=None))
    moved = changed_values(before, weights(model.model))
    assert any("lora_B" in n for n in moved) and all("lora_" in n or "classifier" in n for n in moved)

    batch = text_batches(tiny_bert, 4)[0]
    model.eval()
    adapted = model(batch)
    dequantized = bnb.functional.dequantize_4bit(query.base_layer.weight.data, query.base_layer.weight.quant_state)
    expected = dequantized.float() + query.get_delta_weight("default")
    merged = merge_adapters(model.model)
    weight = merged.bert.encoder.layer[0].attention.self.query.weight
    assert type(merged.bert.encoder.layer[0].attention.self.query) is torch.nn.Linear and weight.dtype == torch.float32
    torch.testing.assert_close(weight, expected)
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    torch.testing.assert_close(merged(**inputs).logits, adapted, atol=2e-2, rtol=0)  # 4-bit layers compute in bf16


def test_nf4_base_checkpoints_hold_the_adapters_and_reload(tiny_bert, tmp_path):
    pytest.importorskip("bitsandbytes")
    from lightning.pytorch.callbacks import ModelCheckpoint

    with pytest.raises(PtftError, match="base_weights=nf4 needs checkpoint_weights: trainable"):
        TextClassifier(tiny_bert, num_labels=2, peft=PeftConfig(base_weights="nf4"))
    L.seed_everything(0)
    model = TextClassifier(tiny_bert, num_labels=2, model_config=NO_DROPOUT, checkpoint_weights="trainable",
                           peft=PeftConfig(r=4, base_weights="nf4"))
    batches = text_batches(tiny_bert, 4)
    ckpt = ModelCheckpoint(dirpath=tmp_path, filename="last")
    trainer(tmp_path, max_steps=2, callbacks=[ckpt], enable_checkpointing=True).fit(
        model, DataLoader(batches, batch_size=None))
    state = torch.load(tmp_path / "last.ckpt", weights_only=True)["state_dict"]
    trainable = {f"model.{n}" for n, p in model.model.named_parameters() if p.requires_grad}
    assert {k for k in state if k.startswith("model.") and "position_ids" not in k} == trainable  # no 4-bit state

    reloaded = TextClassifier.load_from_checkpoint(tmp_path / "last.ckpt")  # the base quantized again, the same
    assert changed_values(weights(model.model), weights(reloaded.model)) == set()
    model.train()  # (no dropout) bitsandbytes' CPU inference kernel needs layers of >= 64 inputs; this one has 32
    reloaded.train()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(batches[0]), model(batches[0]))
