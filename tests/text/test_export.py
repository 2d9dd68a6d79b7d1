"""``ptft export`` of text checkpoints: ptft heads load back with one line; a model without a tokenizer of its own takes
the data's, and without any the export stops with one line."""

from __future__ import annotations

import pytest
import torch
from helpers import trainer

from ptft.cli import main
from ptft.core.errors import PtftError
from ptft.core.module import load_checkpoint
from ptft.text import TextClassificationDataModule, TextClassifier, TokenClassifier
from ptft.text.heads import EncoderWithHead

BERT = {"model_type": "bert", "vocab_size": 30522, "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
        "intermediate_size": 64, "max_position_embeddings": 128}


def checkpoint(model, data, tmp_path, name: str) -> str:
    """One training step (so the weights are not the initial ones), then a checkpoint with the data's settings."""
    fit = trainer(tmp_path, max_steps=1, limit_val_batches=0)
    fit.fit(model, data)
    path = str(tmp_path / f"{name}.ckpt")
    fit.save_checkpoint(path)
    return path


def texts(tokenizer) -> dict[str, torch.Tensor]:
    return dict(tokenizer(["a lovely film", "the service was awful and slow"], padding=True, return_tensors="pt"))


@pytest.mark.parametrize("head", ["mean", "gru"])
def test_ptft_head_exports_to_a_folder_one_line_loads(head, tiny_bert, text_files, tmp_path):
    from transformers import AutoTokenizer

    torch.manual_seed(0)
    model = TextClassifier(tiny_bert, num_labels=2, label_names=["negative", "positive"], head=head)
    data = TextClassificationDataModule(train_file=text_files["train"], batch_size=8)
    main(["export", checkpoint(model, data, tmp_path, head), str(tmp_path / "out")])

    loaded = EncoderWithHead.from_pretrained(tmp_path / "out")  # the one-liner docs/text.md gives
    batch = texts(AutoTokenizer.from_pretrained(tmp_path / "out"))
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batch), model(batch))
    assert loaded.config.id2label == {0: "negative", 1: "positive"}


def test_token_rnn_head_loads_back_too(tiny_bert, tmp_path):
    torch.manual_seed(0)
    model = TokenClassifier(tiny_bert, num_labels=3, label_names=["O", "B-PER", "I-PER"], head="lstm").eval()
    model.export(str(tmp_path / "out"))
    loaded = EncoderWithHead.from_pretrained(tmp_path / "out")
    batch = {"input_ids": torch.tensor([[101, 2000, 2001, 102]]), "attention_mask": torch.ones(1, 4, dtype=torch.long)}
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batch), model(batch))


def test_model_built_from_a_config_exports_with_the_data_tokenizer_or_stops(tiny_bert, text_files, tmp_path, capsys):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    torch.manual_seed(0)
    model = TextClassifier("no-such-model", pretrained=False, model_config=BERT, num_labels=2)
    data = TextClassificationDataModule(train_file=text_files["train"], tokenizer=tiny_bert, batch_size=8)
    main(["export", checkpoint(model, data, tmp_path, "config"), str(tmp_path / "out")])
    exported = AutoModelForSequenceClassification.from_pretrained(tmp_path / "out").eval()
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "out")
    assert tokenizer.get_vocab() == AutoTokenizer.from_pretrained(tiny_bert).get_vocab()
    batch = texts(tokenizer)
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(exported(**batch).logits, model(batch))

    # saved without its data module: no tokenizer anywhere, nothing is written
    bare = trainer(tmp_path)
    bare.strategy.connect(model)
    bare.save_checkpoint(tmp_path / "bare.ckpt")
    with pytest.raises(SystemExit):
        main(["export", str(tmp_path / "bare.ckpt"), str(tmp_path / "nothing")])
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error.startswith("ptft: error: cannot export: no tokenizer found at 'no-such-model'"), error
    assert not (tmp_path / "nothing").exists()
    with pytest.raises(PtftError, match="set data.init_args.tokenizer when training"):
        load_checkpoint(str(tmp_path / "bare.ckpt")).export(str(tmp_path / "nothing"))
