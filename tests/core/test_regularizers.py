"""L1, L2-SP, dropout / drop-path overrides, and Lightning's EMA, SWA, clipping and early stopping from YAML."""

import pytest
import torch
from helpers import trainer

from ptft.text import TextClassificationDataModule, TextClassifier
from ptft.vision import ImageClassifier


def test_l2_sp_penalty_matches_hand_computation_and_survives_checkpoints(tiny_bert, text_files, tmp_path):
    model = TextClassifier(tiny_bert, l2_sp=0.1, l1=0.01)
    start = {n: p.detach().clone() for n, p in model.model.named_parameters()}
    assert model.penalty().item() == pytest.approx(
        0.01 * sum(p.abs().sum().item() for n, p in start.items() if p.ndim > 1), rel=1e-5)
    with torch.no_grad():
        for p in model.model.parameters():
            p.add_(0.01)
    expected = 0.05 * sum(((p - start[n]) ** 2).sum().item() for n, p in model.model.named_parameters()
                          if not n.startswith("classifier"))
    expected += 0.01 * sum(p.abs().sum().item() for p in model.model.parameters() if p.ndim > 1)
    assert model.penalty().item() == pytest.approx(expected, rel=1e-5)

    data = TextClassificationDataModule(train_file=text_files["train"], val_file=text_files["val"], batch_size=16)
    data.connect(model)
    from lightning.pytorch.callbacks import ModelCheckpoint

    trainer(tmp_path, max_steps=2, callbacks=[ModelCheckpoint(dirpath=tmp_path, filename="x")],
            enable_checkpointing=True).fit(model, data)
    reloaded = TextClassifier.load_from_checkpoint(tmp_path / "x.ckpt")
    # the reference is the pretrained start, not the weights the checkpoint was built from
    for name, ref in reloaded._l2_sp_reference.items():
        torch.testing.assert_close(ref, start[name])


def test_penalty_off_by_default(tiny_bert):
    assert TextClassifier(tiny_bert).penalty() is None


def test_dropout_and_drop_path_overrides(tiny_bert):
    text = TextClassifier(tiny_bert, model_config={"hidden_dropout_prob": 0.3, "attention_probs_dropout_prob": 0.2})
    assert text.model.bert.encoder.layer[0].output.dropout.p == 0.3
    assert text.model.config.attention_probs_dropout_prob == 0.2
    vit = ImageClassifier("test_vit", pretrained=False, model_kwargs={"drop_path_rate": 0.2, "drop_rate": 0.1})
    rates = [m.drop_prob for m in vit.model.modules() if type(m).__name__ == "DropPath"]
    assert rates and max(rates) == pytest.approx(0.2)
    assert vit.model.head_drop.p == 0.1


def test_label_smoothing_changes_the_loss(tiny_bert):
    logits, labels = torch.tensor([[4.0, -4.0]]), torch.tensor([0])
    plain, smooth = TextClassifier(tiny_bert), TextClassifier(tiny_bert, label_smoothing=0.2)
    assert smooth.loss(logits, labels) > plain.loss(logits, labels)


def test_lightning_callbacks_ema_swa_clipping_early_stopping(run_cli, tiny_bert, text_files):
    cli = run_cli([
        "fit", "--model=ptft.text.TextClassifier", f"--model.model_name={tiny_bert}",
        "--data=ptft.text.TextClassificationDataModule", f"--data.train_file={text_files['train']}",
        f"--data.val_file={text_files['val']}", "--data.batch_size=16", "--trainer.max_epochs=3",
        "--trainer.gradient_clip_val=0.5",
        "--trainer.callbacks+=lightning.pytorch.callbacks.EMAWeightAveraging",
        "--trainer.callbacks.decay=0.9",
        "--trainer.callbacks+=lightning.pytorch.callbacks.EarlyStopping",
        "--trainer.callbacks.monitor=val/acc", "--trainer.callbacks.mode=max", "--trainer.callbacks.patience=1",
    ])
    names = {type(c).__name__ for c in cli.trainer.callbacks}
    assert {"EMAWeightAveraging", "EarlyStopping"} <= names
    assert cli.trainer.gradient_clip_val == 0.5
    assert cli.trainer.global_step > 0
