"""Seq2seq generation: a tiny random T5 learns a synthetic translation, recipes run, predictions and errors."""

import csv
import random
from pathlib import Path

import pytest
import torch
from conftest import write_csv

from ptft.core.errors import PtftError
from ptft.core.optim import OptimizerConfig, SchedulerConfig
from ptft.text.seq2seq import Seq2SeqDataModule, Seq2SeqGenerator

# "Translation" of a set of words: each source word has a fixed target word, and the target lists them in the
# dictionary's order, whatever the source order (so the model must look up every word and order by content).
DICTIONARY = {
    "one": "red", "two": "blue", "three": "green", "four": "black",
    "five": "white", "six": "cat", "seven": "dog", "eight": "bird",
}
PREFIX = "translate :"
WORDS = [*DICTIONARY, *DICTIONARY.values(), "translate", "summarize", ":"]


def pairs(n: int, seed: int) -> list[dict[str, str]]:
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        words = rng.sample(list(DICTIONARY), rng.randint(3, 6))
        ordered = sorted(words, key=list(DICTIONARY).index)
        rows.append({"source": " ".join(words), "target": " ".join(DICTIONARY[w] for w in ordered)})
    return rows


def word_tokenizer():
    """A word-level tokenizer over the task's words with T5-style specials (<pad> 0, </s> 1 appended, <unk> 2)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["<pad>", "</s>", "<unk>", "<s>", *WORDS])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>", bos_token="<s>")


@pytest.fixture(scope="module")
def tiny_seq2seq(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Local folders of a 2-layer random T5 and BART sharing the word tokenizer (as save_pretrained writes)."""
    import transformers as tf

    tokenizer = word_tokenizer()
    specials = {"pad_token_id": 0, "eos_token_id": 1, "bos_token_id": 3}
    torch.manual_seed(0)
    models = {
        # T5 starts decoding from <pad>, BART from </s>.
        "t5": tf.T5ForConditionalGeneration(tf.T5Config(
            vocab_size=len(tokenizer), d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=4, dropout_rate=0.0,
            decoder_start_token_id=0, **specials)),
        "bart": tf.BartForConditionalGeneration(tf.BartConfig(
            vocab_size=len(tokenizer), d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=2,
            decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=64,
            decoder_start_token_id=1, forced_bos_token_id=None, forced_eos_token_id=None, **specials)),
    }
    folders = {}
    for name, model in models.items():
        folder = tmp_path_factory.mktemp(f"tiny-{name}")
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        folders[name] = str(folder)
    return folders


@pytest.fixture
def pair_files(tmp_path: Path) -> dict[str, str]:
    return {
        "train": write_csv(tmp_path / "train.csv", pairs(256, seed=1)),
        "val": write_csv(tmp_path / "val.csv", pairs(32, seed=2)),
        "predict": write_csv(tmp_path / "predict.csv", [{"source": r["source"]} for r in pairs(6, seed=3)]),
    }


def trainer(**kwargs):
    import lightning as L

    return L.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                     enable_model_summary=False, num_sanity_val_steps=0, **kwargs)


def test_tiny_t5_learns_translation_bleu_chrf_rouge(tiny_seq2seq, pair_files):
    model = Seq2SeqGenerator(
        tiny_seq2seq["t5"], optimizer=OptimizerConfig(lr=3e-3, weight_decay=0.0),
        scheduler=SchedulerConfig(name="constant", warmup_ratio=0.0), max_new_tokens=10,
    )
    assert model.checkpoint_monitor == ("val/bleu", "max")
    dm = Seq2SeqDataModule(train_file=pair_files["train"], val_file=pair_files["val"], test_file=pair_files["val"],
                           source_prefix=PREFIX, batch_size=16)
    dm.connect(model)
    fit = trainer(max_steps=60, check_val_every_n_epoch=100)
    (before,) = fit.validate(model, dm, verbose=False)
    fit.fit(model, dm)
    (after,) = fit.validate(model, dm, verbose=False)
    print(f"untrained: {before}\ntrained:   {after}")
    assert set(after) == {"val/loss", "val/bleu", "val/chrf", "val/rouge1", "val/rouge2", "val/rougeL"}
    assert before["val/bleu"] < 0.1 and before["val/chrf"] < 0.2
    assert after["val/bleu"] > before["val/bleu"] + 0.6
    assert after["val/chrf"] > before["val/chrf"] + 0.6
    assert after["val/rouge2"] > before["val/rouge2"] + 0.6
    (test,) = fit.test(model, dm, verbose=False)
    assert test["test/bleu"] == pytest.approx(after["val/bleu"]) and test["test/chrf"] == pytest.approx(after["val/chrf"])


def test_encoding_prefix_labels_and_generation_switch(tiny_seq2seq, pair_files):
    model = Seq2SeqGenerator(tiny_seq2seq["t5"], metrics=["chrf"], generate_every_n_epochs=0)
    assert model.checkpoint_monitor == ("val/loss", "min")
    assert not model.generates("val") and model.generates("test")
    dm = Seq2SeqDataModule(train_file=pair_files["train"], val_file=pair_files["val"], source_prefix=PREFIX,
                           batch_size=4, max_target_length=3)
    dm.connect(model)
    dm.setup("fit")
    batch = next(iter(dm.val_dataloader()))
    tok = dm.tokenizer
    assert tok.convert_ids_to_tokens(batch["input_ids"][0][:2].tolist()) == ["translate", ":"]
    assert batch["labels"].shape[1] == 3  # truncated to max_target_length
    assert batch["target_text"][0].count(" ") >= 2  # metrics score the full target text
    padded = next(iter(dm.train_dataloader()))["labels"]
    assert padded.shape[1] == 3 and batch["source_text"][0] in {r["source"] for r in pairs(32, seed=2)}
    model.eval()
    loss, generated = model.step(batch, "val")
    logits = model(batch).logits
    torch.testing.assert_close(loss, torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch["labels"].flatten()))
    assert generated is None
    _, generated = model.step(batch, "test")
    # padding in a batch changes nothing: each source generates the same text alone
    alone = [model.generate({k: batch[k][i : i + 1] for k in ("input_ids", "attention_mask")})[0] for i in range(4)]
    assert generated == alone and len(generated) == 4


def test_translation_recipe_trains_and_predicts(run_recipe, run_cli, tiny_seq2seq, pair_files, tmp_path):
    from lightning.pytorch.callbacks import ModelCheckpoint

    recipe = "recipes/text/translation.yaml"
    overrides = [
        f"--model.init_args.model_name={tiny_seq2seq['t5']}", "--model.init_args.max_new_tokens=8",
        "--data.init_args.dataset=null", f"--data.init_args.train_file={write_csv(tmp_path / 'small.csv', pairs(16, 5))}",
        f"--data.init_args.val_file={pair_files['val']}", "--data.init_args.source_column=source",
        "--data.init_args.target_column=target", "--data.init_args.batch_size=8", "--model.init_args.num_beams=2",
    ]
    cli = run_recipe(recipe, overrides)
    assert cli.trainer.global_step == 2
    # The CLI's default best checkpoint follows the module instance's first metric.
    (checkpoint,) = [c for c in cli.trainer.callbacks if isinstance(c, ModelCheckpoint)]
    assert checkpoint.monitor == "val/bleu" and checkpoint.best_model_path
    assert "val/bleu" in cli.trainer.callback_metrics
    # A full checkpoint reloads outside the CLI (architecture in its hyperparameters) and generates.
    from ptft.core.module import load_checkpoint

    reloaded = load_checkpoint(checkpoint.best_model_path)
    assert isinstance(reloaded, Seq2SeqGenerator) and reloaded.checkpoint_monitor == ("val/bleu", "max")
    batch = Seq2SeqDataModule(predict_file=pair_files["predict"], tokenizer=tiny_seq2seq["t5"])
    batch.setup("predict")
    assert len(reloaded.predict_step(next(iter(batch.predict_dataloader())), 0)["predictions"]) == 6

    run_cli(["predict", "--config", str(Path(__file__).parents[2] / recipe), *overrides,
             f"--data.init_args.predict_file={pair_files['predict']}", f"--ckpt_path={checkpoint.best_model_path}"])
    with open("runs/translation/predictions.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["source"] for r in rows] == [r["source"] for r in pairs(6, seed=3)]  # input order
    assert list(rows[0]) == ["source", "prediction"]
    assert all(set(r["prediction"].split()) <= set(WORDS) for r in rows)


def test_summarization_recipe_with_bart(run_recipe, tiny_seq2seq, pair_files, tmp_path):
    from lightning.pytorch.callbacks import ModelCheckpoint

    cli = run_recipe("recipes/text/summarization.yaml", [
        f"--model.init_args.model_name={tiny_seq2seq['bart']}", "--model.init_args.max_new_tokens=8",
        "--data.init_args.dataset=null", f"--data.init_args.train_file={write_csv(tmp_path / 'small.csv', pairs(16, 5))}",
        f"--data.init_args.val_file={pair_files['val']}", "--data.init_args.source_column=source",
        "--data.init_args.target_column=target", "--data.init_args.batch_size=8", "--model.init_args.num_beams=2",
    ])
    assert cli.trainer.global_step == 2
    (checkpoint,) = [c for c in cli.trainer.callbacks if isinstance(c, ModelCheckpoint)]
    assert checkpoint.monitor == "val/rougeL"
    assert {"val/rouge1", "val/rouge2", "val/rougeL"} <= set(cli.trainer.callback_metrics)


def test_nested_translation_column_is_flattened(tiny_seq2seq, tmp_path):
    import json

    path = tmp_path / "wmt.jsonl"
    path.write_text("".join(json.dumps({"translation": {"en": r["source"], "de": r["target"]}}) + "\n" for r in pairs(8, 1)))
    dm = Seq2SeqDataModule(train_file=str(path), val_file=str(path), tokenizer=tiny_seq2seq["t5"],
                           source_column="translation.en", target_column="translation.de")
    dm.setup("fit")
    assert len(dm.datasets["train"]) == 8 and dm.datasets["val"][0]["target_text"] in {r["target"] for r in pairs(8, 1)}
    with pytest.raises(PtftError, match=r"has no column 'translation.fr' \(columns: \['translation.en', 'translation.de'\]\)"):
        Seq2SeqDataModule(train_file=str(path), tokenizer=tiny_seq2seq["t5"], source_column="translation.en",
                          target_column="translation.fr").setup("fit")


def test_one_line_errors(tiny_seq2seq, tiny_bert, tmp_path):
    rows = pairs(8, 1)
    good = write_csv(tmp_path / "good.csv", rows)
    with pytest.raises(PtftError, match=r"has no column 'text'.*set data.init_args.source_column"):
        Seq2SeqDataModule(train_file=good, tokenizer=tiny_seq2seq["t5"], source_column="text").setup("fit")
    with pytest.raises(PtftError, match=r"has no column 'translation'.*set data.init_args.target_column"):
        Seq2SeqDataModule(train_file=good, tokenizer=tiny_seq2seq["t5"], target_column="translation.de").setup("fit")

    rows[3]["target"], rows[6]["target"] = "", "   "
    bad = write_csv(tmp_path / "bad.csv", rows)
    with pytest.raises(PtftError, match=r"bad.csv: 2 of 8 rows have an empty 'target' \(first: row 3"):
        Seq2SeqDataModule(train_file=bad, tokenizer=tiny_seq2seq["t5"]).setup("fit")

    with pytest.raises(PtftError, match=r"is a 'bert' model, not an encoder-decoder.*encoder belongs to ptft.text.TextClassifier") as err:
        Seq2SeqGenerator(tiny_bert)
    assert "\n" not in str(err.value)
    from transformers import GPT2Config

    gpt2 = tmp_path / "gpt2"
    GPT2Config(n_layer=1, n_embd=16, n_head=2).save_pretrained(gpt2)
    with pytest.raises(PtftError, match=r"is a 'gpt2' model.*decoder-only model belongs to ptft.text.LanguageModel"):
        Seq2SeqGenerator(str(gpt2))
    with pytest.raises(PtftError, match="unknown metrics"):
        Seq2SeqGenerator(tiny_seq2seq["t5"], metrics=["bleu"])
