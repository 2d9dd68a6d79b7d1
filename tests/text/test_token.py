import json
import random
import time

import lightning as L
import pytest
import torch
from conftest import REPO

from ptft.core.errors import PtftError
from ptft.text.token import TokenClassificationDataModule, TokenClassifier
from ptft.text.token_data import EntityScore, align_labels, continuation_ids, read_conll

RECIPE = "recipes/text/ner.yaml"
FIRST = ["alice", "maria", "john", "peter", "anna", "carlos", "yuki", "olga"]
LAST = ["smith", "garcia", "schwarzenegger", "kowalski", "tanaka", "okafor"]
PLACES = ["paris", "berlin", "tokyo", "lagos", "lima", "oslo", "johannesburg", "ljubljana"]
FILLER = ["the", "a", "yesterday", "and", "then", "we", "they", "quickly", "happy", "old", "friend", "city", "was"]
TAGS = ["O", "B-LOC", "B-PER", "I-PER"]


def person(rng):
    first = rng.choice(FIRST + ["jordan"])  # "jordan" is a person here, a place after in / to / from
    if rng.random() < 0.5:
        return [first, rng.choice(LAST)], ["B-PER", "I-PER"]
    return [first], ["B-PER"]


def place(rng):
    return [rng.choice(["in", "to", "from"]), rng.choice(PLACES + ["jordan"])], ["O", "B-LOC"]


def sentence(rng):
    words, tags = [], []
    for _ in range(rng.randint(2, 4)):
        kind = rng.random()
        if kind < 0.35:
            w, t = person(rng)
            w, t = w + [rng.choice(["said", "met", "likes"])], t + ["O"]
        elif kind < 0.65:
            w, t = place(rng)
        else:
            w = [rng.choice(FILLER) for _ in range(rng.randint(1, 3))]
            t = ["O"] * len(w)
        words += w
        tags += t
    return words, tags


def sentences(n, seed):
    rng = random.Random(seed)
    return [sentence(rng) for _ in range(n)]


def write_jsonl(path, rows, tokens="tokens", tags="ner_tags"):
    path.write_text("".join(json.dumps({tokens: w, tags: t}) + "\n" for w, t in rows))
    return str(path)


def write_conll(path, rows):
    """CoNLL-2003 layout: token POS chunk NER, a -DOCSTART- line, blank lines between sentences."""
    lines = ["-DOCSTART- -X- -X- O", ""]
    for words, tags in rows:
        lines += [f"{w} NN I-NP {t}" for w, t in zip(words, tags)] + [""]
    path.write_text("\n".join(lines))
    return str(path)


def trainer(steps, **kwargs):
    return L.Trainer(
        max_steps=steps, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, accelerator="cpu", num_sanity_val_steps=0, **kwargs,
    )


def ner_data(tmp_path, tiny_bert, **kwargs):
    return TokenClassificationDataModule(
        train_file=write_jsonl(tmp_path / "train.jsonl", sentences(160, seed=1)),
        val_file=write_conll(tmp_path / "val.conll", sentences(48, seed=2)),
        tokenizer=tiny_bert, batch_size=16, max_length=64, **kwargs,
    )


def validate(model, dm):
    return {k: float(v) for k, v in trainer(1).validate(model, dm, verbose=False)[0].items()}


def fit(model, dm, steps):
    trainer(steps, max_epochs=100, limit_val_batches=0).fit(model, dm)
    return validate(model, dm)


@pytest.fixture(scope="module")
def trained(tiny_bert, tmp_path_factory):
    """The tiny BERT fine-tuned on the synthetic NER task (shared by the learning and predict tests)."""
    tmp_path = tmp_path_factory.mktemp("ner")
    L.seed_everything(0)
    dm = ner_data(tmp_path, tiny_bert)
    from ptft.core.optim import OptimizerConfig

    model = TokenClassifier(tiny_bert, num_labels=dm.num_labels, label_names=dm.label_names,
                            optimizer=OptimizerConfig(lr=3e-3))
    start = time.time()
    metrics = fit(model, dm, steps=30)
    print(f"head=model: {metrics} in {time.time() - start:.1f}s")
    return model, dm, metrics, tmp_path


# --- reading and aligning -----------------------------------------------------------------------------------------
def test_conll_reader(tmp_path):
    path = tmp_path / "a.conll"
    path.write_text("-DOCSTART- -X- O O\n\nEU NNP B-ORG\nrejects VBZ O\n\n\n\nPeter NNP B-PER\n")
    read = read_conll(path)
    assert read.tokens == [["EU", "rejects"], ["Peter"]]
    assert read.tags == [["B-ORG", "O"], ["B-PER"]]
    assert read.lines == [3, 8]
    assert read_conll(path, tag_column=1).tags == [["NNP", "VBZ"], ["NNP"]]
    assert read_conll(path, tag_column=None).tags is None
    path.write_text("EU B-ORG\nrejects\n")
    with pytest.raises(PtftError, match=r"line 2: expected a token and a tag .*'rejects'"):
        read_conll(path)


def test_first_subtoken_and_all_subtoken_alignment(tiny_bert):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_bert)
    words = ["arnold", "schwarzenegger", "visited", "unbelievably", "paris"]
    tags = ["B-PER", "I-PER", "O", "O", "B-LOC"]
    assert tok.tokenize("schwarzenegger") == ["schwarz", "##ene", "##gger"]
    names = ["O", "B-LOC", "B-PER", "I-LOC", "I-PER"]
    ids = [names.index(t) for t in tags]
    word_ids = tok(words, is_split_into_words=True).word_ids()
    assert word_ids == [None, 0, 1, 1, 1, 2, 3, 3, 3, 3, 3, 4, None]
    first = align_labels(word_ids, ids, False, continuation_ids(names))
    every = align_labels(word_ids, ids, True, continuation_ids(names))
    x = -100
    assert first == [x, 2, 4, x, x, 0, 0, x, x, x, x, 1, x]
    assert every == [x, 2, 4, 4, 4, 0, 0, 0, 0, 0, 0, 1, x]
    # a B- word split into pieces: continuations become I- (when I-X exists, as HF's run_ner)
    split_b = align_labels(word_ids, [2, 2, 0, 0, 1], True, continuation_ids(names))
    assert split_b[1:5] == [2, 2, 4, 4]
    assert align_labels(word_ids, [1, 1, 0, 0, 0], True, continuation_ids(["O", "B-PER"]))[2:5] == [1, 1, 1]  # no I-PER


def test_data_module_batches_both_alignments(tmp_path, tiny_bert):
    rows = [(["arnold", "schwarzenegger", "met", "olga"], ["B-PER", "I-PER", "O", "B-PER"])] * 4
    files = {"train_file": write_jsonl(tmp_path / "t.jsonl", rows), "val_file": write_conll(tmp_path / "v.txt", rows)}
    batches = {}
    for label_all in (False, True):
        dm = TokenClassificationDataModule(**files, tokenizer=tiny_bert, batch_size=2, label_all_tokens=label_all)
        assert dm.label_names == ["O", "B-PER", "I-PER"]
        dm.setup("fit")
        batches[label_all] = next(iter(dm.train_dataloader()))
    x = -100
    assert batches[False]["labels"][0].tolist() == [x, 1, 2, x, x, 0, 1, x]
    assert batches[True]["labels"][0].tolist() == [x, 1, 2, 2, 2, 0, 1, x]
    assert batches[True]["word_ids"][0].tolist() == [-1, 0, 1, 1, 1, 2, 3, -1]
    short = TokenClassificationDataModule(**files, tokenizer=tiny_bert, max_length=5)
    with pytest.warns(UserWarning, match="4 of 4 train sentences are longer than max_length=5"):
        short.setup("fit")


def test_byte_level_tokenizer_gets_the_prefix_space(tmp_path):
    """RoBERTa-style BPE splits pre-split words without a leading space into other pieces ('o', 'lga')."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import RobertaTokenizer

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(["olga met alice in oslo"] * 5, vocab_size=300, special_tokens=["<s>", "<pad>", "</s>"])
    bpe.save_model(str(tmp_path))
    merges = [tuple(line.split()) for line in (tmp_path / "merges.txt").read_text().splitlines()[1:] if line]
    RobertaTokenizer(vocab=json.loads((tmp_path / "vocab.json").read_text()), merges=merges).save_pretrained(tmp_path / "tok")
    rows = [(["olga", "met"], ["B-PER", "O"])]
    dm = TokenClassificationDataModule(train_file=write_jsonl(tmp_path / "t.jsonl", rows), tokenizer=str(tmp_path / "tok"))
    from transformers import AutoTokenizer

    def pieces(tok):
        return tok.convert_ids_to_tokens(tok(["olga", "met"], is_split_into_words=True)["input_ids"])

    assert not any(p.startswith("\u0120") for p in pieces(AutoTokenizer.from_pretrained(tmp_path / "tok")))
    tok = dm.load_tokenizer()
    assert tok.add_prefix_space
    assert sum(p.startswith("\u0120") for p in pieces(tok)) == 2  # each word starts with the space marker


def test_hf_dataset_with_classlabel_ids(tmp_path, tiny_bert):
    """Hugging Face's conll2003 stores tag ids with the names in a ClassLabel feature."""
    import datasets

    features = datasets.Features({
        "tokens": datasets.Sequence(datasets.Value("string")),
        "ner_tags": datasets.Sequence(datasets.ClassLabel(names=["O", "B-PER", "I-PER", "B-LOC"])),
    })
    ds = datasets.Dataset.from_dict({"tokens": [["olga", "in", "oslo"]], "ner_tags": [[1, 0, 3]]}, features=features)
    ds.to_parquet(tmp_path / "train.parquet")
    dm = TokenClassificationDataModule(train_file=str(tmp_path / "train.parquet"), tokenizer=tiny_bert)
    assert dm.label_names == ["O", "B-PER", "I-PER", "B-LOC"]
    plain = datasets.Dataset.from_dict({"tokens": [["olga"]], "ner_tags": [[1]]})
    plain.to_parquet(tmp_path / "ids.parquet")
    with pytest.raises(PtftError, match="integer tags without names"):
        _ = TokenClassificationDataModule(train_file=str(tmp_path / "ids.parquet")).label_names


def test_entity_score_matches_seqeval_and_accumulates():
    from seqeval.metrics import f1_score, precision_score, recall_score

    names = ["O", "B-PER", "I-PER", "B-LOC"]
    gold = [["B-PER", "I-PER", "O", "B-LOC"], ["O", "B-LOC", "B-PER"]]
    pred = [["B-PER", "I-PER", "O", "O"], ["B-PER", "B-LOC", "I-PER"]]

    def tensors(rows, width=6):
        out = torch.full((len(rows), width), -100)
        for i, row in enumerate(rows):
            out[i, 1 : 1 + len(row)] = torch.tensor([names.index(t) for t in row])  # position 0: [CLS]
        return out

    scores = {s: EntityScore(names, s) for s in ("precision", "recall", "f1")}
    for score in scores.values():  # two updates (batches) = one computation over both sentences
        score.update(tensors(pred[:1]).clamp(min=0), tensors(gold[:1]))
        score.update(tensors(pred[1:]).clamp(min=0), tensors(gold[1:]))
    expected = {"precision": precision_score, "recall": recall_score, "f1": f1_score}
    for name, score in scores.items():
        torch.testing.assert_close(score.compute(), torch.tensor(float(expected[name](gold, pred))))
    assert 0 < float(scores["f1"].compute()) < 1
    # a lone I-PER is an entity for conlleval / seqeval's default, not in strict IOB2
    for mode, expected_f1 in (("default", 1.0), ("strict", 0.0)):
        score = EntityScore(names, "f1", mode=mode)
        score.update(torch.tensor([[2, 0]]), torch.tensor([[2, 0]]))
        assert float(score.compute()) == expected_f1


# --- training ---------------------------------------------------------------------------------------------------
def test_tiny_bert_learns_entities(trained):
    model, _, metrics, _ = trained
    # the untrained model scores F1 ~0.1 (see test_lstm_head_trains' "before")
    assert metrics["val/f1"] > 0.6, metrics
    assert metrics["val/acc"] > 0.85, metrics
    assert model.hparams.label_names == ["O", "B-LOC", "B-PER", "I-PER"]
    assert model.checkpoint_monitor == ("val/f1", "max")


def test_lstm_head_trains(tiny_bert, tmp_path):
    from ptft.core.optim import OptimizerConfig

    L.seed_everything(0)
    dm = ner_data(tmp_path, tiny_bert, label_all_tokens=True)
    model = TokenClassifier(tiny_bert, num_labels=dm.num_labels, label_names=dm.label_names, head="lstm",
                            optimizer=OptimizerConfig(lr=3e-3, head_lr=1e-2))
    assert {n.split(".")[0] for n, _ in model.model.named_parameters() if model.is_head_parameter(n)} == {"head"}
    before = validate(model, dm)
    after = fit(model, dm, steps=30)
    print(f"head=lstm: before {before}, after {after}")
    assert after["val/loss"] < 0.5 * before["val/loss"]
    assert after["val/f1"] > 0.6 > before["val/f1"], (before, after)


def test_predict_writes_entities(trained, tiny_bert):
    from ptft.core.callbacks import WritePredictions

    model, _, _, tmp_path = trained
    rows = sentences(20, seed=3)
    path = tmp_path / "predictions.jsonl"
    dm = TokenClassificationDataModule(predict_file=write_jsonl(tmp_path / "p.jsonl", rows, tags="unused"),
                                       tokenizer=tiny_bert, batch_size=8)
    trainer(1, callbacks=[WritePredictions(str(path))]).predict(model, dm)
    out = [json.loads(line) for line in path.read_text().splitlines()]
    assert [r["tokens"] for r in out] == [w for w, _ in rows]
    assert all(len(r["tags"]) == len(r["tokens"]) for r in out)
    found = [(e["type"], e["text"]) for r in out for e in r["entities"]]
    for r in out:
        for e in r["entities"]:
            assert e["text"] == " ".join(r["tokens"][e["start"] : e["end"]])
    gold = [(t[2:], w) for words, tags in rows for w, t in zip(words, tags) if t.startswith("B-")]
    assert len({f for f in found if f[0] == "LOC"} & set(gold)) >= 3, found  # real places came out as LOC


# --- recipe and errors ----------------------------------------------------------------------------------------------
def test_recipe_runs_and_predicts(run_recipe, run_cli, tiny_bert, tmp_path):
    train = write_conll(tmp_path / "train.txt", sentences(24, seed=4))
    val = write_conll(tmp_path / "valid.txt", sentences(8, seed=5))
    data = [f"--model.init_args.model_name={tiny_bert}", f"--data.init_args.train_file={train}",
            f"--data.init_args.val_file={val}", f"--data.init_args.test_file={val}", "--data.init_args.batch_size=4"]
    cli = run_recipe(RECIPE, [*data, "--trainer.val_check_interval=2"])  # validate (and checkpoint) at step 2
    assert cli.trainer.global_step == 2
    assert cli.model.label_names == ["O", "B-LOC", "B-PER", "I-PER"]
    assert "val/f1" in cli.trainer.callback_metrics
    ckpt = cli.trainer.checkpoint_callback.best_model_path
    assert ckpt.endswith(".ckpt")
    from ptft.core.module import load_checkpoint

    reloaded = load_checkpoint(ckpt)  # from the checkpoint alone: architecture and tag names are saved in it
    assert isinstance(reloaded, TokenClassifier) and reloaded.label_names == cli.model.label_names
    words = [w for w, _ in sentences(8, seed=6)]
    (tmp_path / "new.conll").write_text("\n\n".join("\n".join(s) for s in words) + "\n")  # tokens only
    run_cli(["predict", "--config", str(REPO / RECIPE), *data, f"--data.init_args.predict_file={tmp_path / 'new.conll'}",
             f"--ckpt_path={ckpt}"])
    out = [json.loads(line) for line in (tmp_path / "runs/ner/predictions.jsonl").read_text().splitlines()]
    assert [r["tokens"] for r in out] == words and set(out[0]) == {"tokens", "tags", "entities"}


@pytest.mark.parametrize(
    "train, val, message",
    [
        ([{"words": ["a"], "ner_tags": ["O"]}], None, r"has no column 'tokens'.*set data.init_args.tokens_column"),
        ([{"tokens": ["a"], "labels": ["O"]}], None, r"has no column 'ner_tags'.*tags_column"),
        ([{"tokens": ["a"], "ner_tags": ["O"]}, {"tokens": ["a", "b"], "ner_tags": ["O"]}], None,
         r"train.jsonl row 2 has 2 tokens but 1 tags"),
        ([{"tokens": ["a"], "ner_tags": ["B-PER"]}], "olga NNP B-MISC\n",
         r"val.conll has tags never seen in training: \['B-MISC'\] \(first: .*line 1\)"),
        ([{"tokens": ["a"], "ner_tags": ["B-PER"]}], "olga B-PER\nsaid\n", r"val.conll line 2: expected a token"),
    ],
)
def test_one_line_errors(tmp_path, train, val, message):
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in train))
    if val is not None:
        (tmp_path / "val.conll").write_text(val)
    dm = TokenClassificationDataModule(train_file=str(tmp_path / "train.jsonl"),
                                       val_file=str(tmp_path / "val.conll") if val else None)
    with pytest.raises(PtftError, match=message) as err:
        _ = dm.label_names
    assert "\n" not in str(err.value)
