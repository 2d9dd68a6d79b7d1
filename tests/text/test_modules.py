import torch
from conftest import minilm_dir

from ptft.text import TextClassificationDataModule, TextClassifier


def dropout_modules(model):
    return [m for m in model.modules() if isinstance(m, torch.nn.Dropout) and m.p > 0]


def test_pretrained_model_trains_with_dropout_on_and_evaluates_with_it_off(text_files):
    """Lightning keeps submodules' modes and from_pretrained returns eval mode (PITFALLS: train mode)."""
    import lightning as L

    seen = {}

    class Probe(TextClassifier):
        def training_step(self, batch, batch_idx):
            drops = dropout_modules(self.model)
            seen["train"] = (self.model.training, sum(m.training for m in drops), len(drops))
            # dropout active: the same batch gives different logits twice
            seen["train_differs"] = not torch.equal(self(batch), self(batch))
            return super().training_step(batch, batch_idx)

        def validation_step(self, batch, batch_idx):
            seen["val"] = sum(m.training for m in dropout_modules(self.model))
            seen["val_same"] = torch.equal(self(batch), self(batch))
            return super().validation_step(batch, batch_idx)

    model = Probe(str(minilm_dir()), num_labels=2)
    dm = TextClassificationDataModule(train_file=text_files["train"], val_file=text_files["val"], batch_size=4)
    dm.connect(model)
    trainer = L.Trainer(max_epochs=1, limit_train_batches=1, limit_val_batches=1, num_sanity_val_steps=0, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(model, dm)
    model_training, active, total = seen["train"]
    assert total > 0 and model_training and active == total
    assert seen["train_differs"]
    assert seen["val"] == 0 and seen["val_same"]


def test_steps_predict_and_head_split(tiny_bert, text_files):
    model = TextClassifier(tiny_bert, num_labels=2, label_names=["neg", "pos"])
    dm = TextClassificationDataModule(train_file=text_files["train"], val_file=text_files["val"], batch_size=4)
    dm.connect(model)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    model.eval()  # no dropout: the reference below sees the same logits
    loss = model.training_step(batch, 0)
    torch.testing.assert_close(loss, torch.nn.functional.cross_entropy(model(batch), batch["labels"]))
    out = model.predict_step(batch, 0)
    assert out["probs"].shape == (4, 2)
    torch.testing.assert_close(out["probs"].sum(-1), torch.ones(4))
    assert set(out["labels"]) <= {"neg", "pos"}
    heads = {n for n, _ in model.model.named_parameters() if model.is_head_parameter(n)}
    assert heads == {"classifier.weight", "classifier.bias"}


def test_head_lr_and_no_decay_groups(tiny_bert):
    from ptft.core.optim import OptimizerConfig

    model = TextClassifier(tiny_bert, optimizer=OptimizerConfig(lr=1e-4, head_lr=1e-2, weight_decay=0.1))
    groups = model.param_groups()
    named = {n: g for g in groups for n in g["names"]}
    assert named["classifier.weight"]["lr"] == 1e-2
    assert named["bert.encoder.layer.0.attention.self.query.weight"]["lr"] == 1e-4
    assert named["bert.encoder.layer.0.attention.self.query.bias"]["weight_decay"] == 0.0
    assert named["bert.embeddings.LayerNorm.weight"]["weight_decay"] == 0.0
    assert named["bert.embeddings.word_embeddings.weight"]["weight_decay"] == 0.1


def test_model_config_overrides_and_random_init(tiny_bert):
    model = TextClassifier(tiny_bert, pretrained=False, model_config={"hidden_dropout_prob": 0.3})
    assert model.model.config.hidden_dropout_prob == 0.3
    assert model.hparams.model_config["model_type"] == "bert"


def test_checkpoint_with_another_label_order_is_refused(tiny_bert, tmp_path):
    import pytest

    from ptft.core.errors import PtftError

    model = TextClassifier(tiny_bert, num_labels=2, label_names=["negative", "positive"])
    import lightning as L

    trainer = L.Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False)
    trainer.strategy.connect(model)
    trainer.save_checkpoint(tmp_path / "model.ckpt")
    swapped = TextClassifier(tiny_bert, num_labels=2, label_names=["positive", "negative"])
    checkpoint = torch.load(tmp_path / "model.ckpt", weights_only=True)
    with pytest.raises(PtftError, match="trained with labels \\['negative', 'positive'\\]"):
        swapped.on_load_checkpoint(checkpoint)
    model.on_load_checkpoint(checkpoint)  # the same order loads
