"""Continued pre-training (MLM / CLM) on raw text, and its checkpoint as the next task's starting point."""

import json
import math
import random
from pathlib import Path

import lightning as L
import pytest
import torch

from ptft.core.errors import PtftError
from ptft.core.optim import OptimizerConfig
from ptft.text.lm import LanguageModel, LanguageModelingDataModule

CYCLES = [["red", "green", "blue", "yellow"], ["one", "two", "three", "four", "five"], ["cat", "dog", "bird"]]
WORDS = [w for cycle in CYCLES for w in cycle]


def cycle_lines(n: int, seed: int) -> list[str]:
    """Lines that repeat one of three word cycles from a random offset: each token follows from its neighbours."""
    rng = random.Random(seed)
    lines = []
    for _ in range(n):
        cycle = rng.choice(CYCLES)
        start = rng.randrange(len(cycle))
        lines.append(" ".join(cycle[(start + i) % len(cycle)] for i in range(rng.randint(20, 40))))
    return lines


def write_lines(path: Path, lines: list[str]) -> str:
    path.write_text("\n".join(lines) + "\n")
    return str(path)


@pytest.fixture(scope="module")
def small_bert(tmp_path_factory) -> str:
    """A 2-layer hidden-32 BERT (masked-LM head) whose word-piece vocabulary is the cycle words; no dropout."""
    from transformers import BertConfig, BertForMaskedLM, BertTokenizer

    path = tmp_path_factory.mktemp("small-bert")
    vocab = {t: i for i, t in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS])}
    tokenizer = BertTokenizer(vocab=vocab)
    config = BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=64, hidden_dropout_prob=0.0,
                        attention_probs_dropout_prob=0.0)
    torch.manual_seed(0)
    BertForMaskedLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def tiny_gpt2(tmp_path_factory) -> str:
    """A 2-layer hidden-32 GPT-2 with a word-level tokenizer that, like GPT-2's, has an EOS but no pad token."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    path = tmp_path_factory.mktemp("tiny-gpt2")
    vocab = {t: i for i, t in enumerate(["<unk>", "<|endoftext|>", *WORDS])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", eos_token="<|endoftext|>",
                                        bos_token="<|endoftext|>")
    config = GPT2Config(vocab_size=len(vocab), n_positions=64, n_embd=32, n_layer=2, n_head=2,
                        bos_token_id=1, eos_token_id=1)
    torch.manual_seed(0)
    GPT2LMHeadModel(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def trainer(steps: int) -> L.Trainer:
    return L.Trainer(max_steps=steps, accelerator="cpu", logger=False, enable_checkpointing=False,
                     enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0)


def perplexity_before_after(model, dm, steps: int) -> tuple[float, float]:
    L.seed_everything(0)
    dm.connect(model)
    before = trainer(steps).validate(model, dm, verbose=False)[0]
    fit = trainer(steps)
    fit.fit(model, dm)
    after = fit.validate(model, dm, verbose=False)[0]
    # val/loss is the mean NLL per predicted token of the whole validation set, val/perplexity its exp
    for result in (before, after):
        assert result["val/perplexity"] == pytest.approx(math.exp(result["val/loss"]), rel=1e-5)
    return before["val/perplexity"], after["val/perplexity"]


def test_mlm_learns_the_cycles(small_bert, tmp_path):
    train = write_lines(tmp_path / "train.txt", cycle_lines(100, seed=1))
    val = write_lines(tmp_path / "val.txt", cycle_lines(30, seed=2))
    model = LanguageModel(small_bert, objective="mlm", optimizer=OptimizerConfig(lr=1e-2))
    dm = LanguageModelingDataModule(train_file=train, val_file=val, block_size=24, batch_size=16)
    before, after = perplexity_before_after(model, dm, steps=60)
    # 12 words: a random model is near 17 (the vocabulary), word frequencies alone give 11.7; knowing which cycle
    # a masked word belongs to gives about 4, its neighbours pin it down
    # a stretch of the batch order: 5.1 measured before the shared data base (core.data) reseeded it, 7.0 after
    assert before > 12 and after < 8, (before, after)
    assert {len(r["input_ids"]) for r in dm.datasets["train"]} == {24}


def test_clm_learns_the_cycles(tiny_gpt2, tmp_path):
    rows = [{"body": line} for line in cycle_lines(100, seed=1)]
    train = tmp_path / "train.jsonl"
    train.write_text("".join(json.dumps(r) + "\n" for r in rows))
    val = write_lines(tmp_path / "val.txt", cycle_lines(30, seed=2))
    model = LanguageModel(tiny_gpt2, objective="clm", optimizer=OptimizerConfig(lr=1e-2))
    dm = LanguageModelingDataModule(train_file=str(train), val_file=val, text_column="body", block_size=32,
                                    batch_size=16)
    before, after = perplexity_before_after(model, dm, steps=40)
    # the first word of a line and the cycle are guesses (about 1 in 12 and 1 in 3), the rest follows
    assert before > 10 and after < 3, (before, after)
    batch = next(iter(dm.train_dataloader()))
    eos = dm.tokenizer.eos_token_id
    assert (batch["input_ids"] == eos).any()  # documents are joined with EOS ...
    assert (batch["labels"] == eos).any()  # ... which is learned, although GPT-2's pad token is EOS too
    assert batch["input_ids"].shape[1] == 32


def test_whole_word_mask_masks_every_piece_of_a_word(tiny_bert, tmp_path):
    # words of several word pieces (MiniLM's vocabulary): "unbelievably" -> un ##bel ##ie ##va ##bly
    words = ["unbelievably", "microscopically", "thermodynamics", "incomprehensibilities", "counterrevolutionaries"]
    lines = [" ".join(random.Random(i).choices(words, k=random.Random(i).randint(3, 8))) for i in range(40)]
    path = write_lines(tmp_path / "words.txt", lines)

    def partial_words(whole_word_mask: bool) -> tuple[int, int]:
        model = LanguageModel(tiny_bert, objective="mlm")
        dm = LanguageModelingDataModule(train_file=path, val_fraction=0.2, block_size=64, line_by_line=True,
                                        batch_size=8, whole_word_mask=whole_word_mask, mlm_probability=0.3)
        dm.connect(model)
        dm.setup("fit")
        torch.manual_seed(0)
        partial = masked = 0
        for batch in dm.train_dataloader():
            for ids, labels in zip(batch["input_ids"], batch["labels"]):
                targets = labels.clone()
                targets[labels == -100] = ids[labels == -100]  # the original tokens
                pieces = dm.tokenizer.convert_ids_to_tokens(targets.tolist())
                word: list[bool] = []
                for piece, is_masked in zip([*pieces, "[SEP]"], [*(labels != -100).tolist(), False]):
                    if not piece.startswith("##") and word:  # a word ended
                        partial += 0 < sum(word) < len(word)
                        masked += all(word)
                        word = []
                    if piece not in ("[CLS]", "[SEP]", "[PAD]"):
                        word.append(is_masked)
        return partial, masked, {len(r["input_ids"]) for r in dm.datasets["train"]}

    partial, masked, lengths = partial_words(whole_word_mask=True)
    assert partial == 0 and masked > 10
    assert max(lengths) <= 64 and len(lengths) > 1  # line_by_line: one line per example, padded per batch
    partial, _, _ = partial_words(whole_word_mask=False)
    assert partial > 10  # token-level masking splits words: the check above can fail


def test_mlm_recipe_checkpoint_starts_a_classifier(tiny_bert, run_recipe, tmp_path, text_files):
    """MLM checkpoint -> TextClassifier(model_name=last.ckpt): same encoder weights, same tokenizer; ptft export."""
    from transformers import AutoModelForMaskedLM, AutoTokenizer

    from ptft.cli import main
    from ptft.text import TextClassificationDataModule, TextClassifier

    corpus = write_lines(tmp_path / "corpus.txt", [r.split(",")[0] for r in Path(text_files["train"]).read_text().splitlines()[1:]])
    run_recipe("recipes/text/mlm.yaml", [
        f"--model.init_args.model_name={tiny_bert}", f"--data.init_args.train_file={corpus}",
        "--data.init_args.block_size=32", "--data.init_args.batch_size=16", "--data.init_args.whole_word_mask=true",
        "--model.init_args.optimizer.lr=1e-2",
    ], steps=2)
    (ckpt,) = tmp_path.rglob("last.ckpt")
    trained = {k[len("model."):]: v for k, v in torch.load(ckpt, weights_only=True)["state_dict"].items()}
    start = AutoModelForMaskedLM.from_pretrained(tiny_bert).state_dict()
    encoder = [k for k in trained if k.startswith("bert.")]
    assert any(not torch.equal(trained[k], start[k]) for k in encoder)  # the MLM steps changed the encoder

    classifier = TextClassifier(str(ckpt), num_labels=2)
    weights = classifier.model.state_dict()
    assert len(encoder) > 20
    for key in encoder:
        torch.testing.assert_close(weights[key], trained[key], rtol=0, atol=0, msg=key)
    dm = TextClassificationDataModule(train_file=text_files["train"], val_file=text_files["val"], batch_size=4)
    dm.connect(classifier)
    dm.setup("fit")
    assert dm.tokenizer.get_vocab() == AutoTokenizer.from_pretrained(tiny_bert).get_vocab()
    assert classifier.training_step(next(iter(dm.train_dataloader())), 0).isfinite()

    main(["export", str(ckpt), str(tmp_path / "exported")])
    exported = AutoModelForMaskedLM.from_pretrained(tmp_path / "exported").state_dict()
    torch.testing.assert_close(exported["cls.predictions.transform.dense.weight"],
                               trained["cls.predictions.transform.dense.weight"], rtol=0, atol=0)
    assert (tmp_path / "exported" / "tokenizer.json").exists()


def test_clm_recipe(tiny_gpt2, run_recipe, tmp_path):
    corpus = write_lines(tmp_path / "corpus.txt", cycle_lines(30, seed=3))  # 2 batches: an epoch, validated
    cli = run_recipe("recipes/text/clm.yaml", [
        f"--model.init_args.model_name={tiny_gpt2}", f"--data.init_args.train_file={corpus}",
        "--data.init_args.block_size=32", "--data.init_args.batch_size=16", "--trainer.accumulate_grad_batches=1",
    ], steps=2)
    assert cli.trainer.global_step == 2
    logged = cli.trainer.callback_metrics  # validated once: perplexity is exp of the per-token validation loss
    assert logged["val/perplexity"].item() == pytest.approx(math.exp(logged["val/loss"].item()), rel=1e-5)
    assert len(list(tmp_path.rglob("last.ckpt"))) == 1


def one_line_error(build) -> str:
    with pytest.raises(PtftError) as err:
        build()
    message = str(err.value)
    assert "\n" not in message
    return message


def test_errors(tiny_bert, tiny_gpt2, tmp_path):
    def setup(model_name, objective="mlm", **data):
        model = LanguageModel(model_name, objective=objective)
        dm = LanguageModelingDataModule(**data)
        dm.connect(model)
        dm.setup("fit")

    text = write_lines(tmp_path / "text.txt", cycle_lines(30, seed=0))
    csv = tmp_path / "no_text.csv"
    csv.write_text("sentence,label\nred green,1\nblue yellow,0\n")
    assert "no column 'text'" in one_line_error(lambda: setup(tiny_bert, train_file=str(csv)))
    (tmp_path / "empty.txt").write_text("")
    assert "has no text" in one_line_error(lambda: setup(tiny_bert, train_file=str(tmp_path / "empty.txt")))
    (tmp_path / "blank.txt").write_text("\n  \n\n")
    assert "has no text" in one_line_error(lambda: setup(tiny_bert, train_file=str(tmp_path / "blank.txt")))
    blank_csv = tmp_path / "blank.csv"
    blank_csv.write_text("text\n\n\" \"\n")
    assert "has no text" in one_line_error(lambda: setup(tiny_bert, train_file=str(blank_csv)))
    message = one_line_error(lambda: LanguageModel(tiny_gpt2, objective="mlm"))
    assert "(gpt2) has no masked language-modelling head" in message and "objective: clm" in message
    message = one_line_error(lambda: setup(tiny_bert, train_file=text, block_size=256))
    assert "block_size=256 exceeds the model's 128 positions" in message
    short = write_lines(tmp_path / "short.txt", ["red green blue", "cat dog", "one two"])
    message = one_line_error(lambda: setup(tiny_bert, train_file=short, val_file=short, block_size=128))
    assert "fewer than one block of 128" in message
    assert "mlm only" in one_line_error(lambda: setup(tiny_gpt2, "clm", train_file=text, block_size=16,
                                                         whole_word_mask=True))
