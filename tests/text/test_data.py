import csv

import pytest
import torch
from conftest import sentiment_rows, write_csv

from ptft.core.errors import PtftError
from ptft.text import TextClassificationDataModule


def ready(dm, tiny_bert, stage="fit"):
    dm.tokenizer_name = dm.tokenizer_name or tiny_bert
    dm.setup(stage)
    return dm


def test_label_discovery_and_batches(text_files, tiny_bert):
    dm = TextClassificationDataModule(train_file=text_files["train"], val_file=text_files["val"], batch_size=8)
    assert dm.label_names == ["negative", "positive"]
    assert dm.num_labels == 2
    ready(dm, tiny_bert)
    batches = list(dm.train_dataloader())
    assert batches[0]["input_ids"].shape[0] == 8 and batches[0]["labels"].dtype == torch.long
    # every training row once, each text with its own label (the sampler's order, not the file's)
    with open(text_files["train"]) as f:
        expected = sorted((r["text"], ["negative", "positive"].index(r["label"])) for r in csv.DictReader(f))
    texts = [t for b in batches for t in dm.tokenizer.batch_decode(b["input_ids"], skip_special_tokens=True)]
    got = sorted(zip(texts, [y for b in batches for y in b["labels"].tolist()]))
    assert got == expected


def test_tsv_with_renamed_columns_and_integer_labels(tmp_path, tiny_bert):
    # GLUE-style: unquoted TSV, dev names its text column differently, quotes are literal text
    (tmp_path / "train.tsv").write_text('label\tsentence\n1\ta "great" film\n0\tdull , flat\n1\tlovely\n')
    (tmp_path / "dev.tsv").write_text('label\tcontent\n0\tawful "movie\n1\tfine\n')
    dm = TextClassificationDataModule(
        train_file=str(tmp_path / "train.tsv"), val_file=str(tmp_path / "dev.tsv"), text_column="sentence",
        rename_columns={"content": "sentence"}, labels=["negative", "positive"], tokenizer=tiny_bert, batch_size=2,
    )
    assert dm.label_names == ["negative", "positive"]
    dm.setup("fit")
    assert len(dm.datasets["val"]) == 2
    texts = dm.tokenizer.batch_decode(dm.datasets["val"]["input_ids"][:], skip_special_tokens=True)
    assert any('awful " movie' in t for t in texts)


def test_sentence_pairs(tmp_path, tiny_bert):
    rows = [{"premise": f"a man sleeps {i}", "hypothesis": "a man sleeps", "label": "entailment"} for i in range(4)]
    rows += [{"premise": f"a dog runs {i}", "hypothesis": "a cat sits", "label": "contradiction"} for i in range(4)]
    path = write_csv(tmp_path / "nli.csv", rows)
    dm = TextClassificationDataModule(
        train_file=path, text_column="premise", text_pair_column="hypothesis", tokenizer=tiny_bert, val_fraction=0.25
    )
    dm.setup("fit")
    item = dm.datasets["train"][0]
    second = [t for t, segment in zip(item["input_ids"], item["token_type_ids"]) if segment == 1]
    decoded = dm.tokenizer.decode(second, skip_special_tokens=True)
    assert decoded in {"a man sleeps", "a cat sits"}  # the hypothesis is the second segment


def test_held_out_split_is_seeded_and_disjoint(tmp_path, tiny_bert):
    path = write_csv(tmp_path / "t.csv", sentiment_rows(50, seed=0))

    def split(seed):
        dm = TextClassificationDataModule(train_file=path, tokenizer=tiny_bert, val_fraction=0.2, seed=seed)
        dm.setup("fit")
        return [tuple(x) for x in dm.datasets["train"]["input_ids"][:]], [tuple(x) for x in dm.datasets["val"]["input_ids"][:]]

    train, val = split(1)
    assert len(val) == 10 and len(train) == 40
    assert sorted(split(1)[1]) == sorted(val)
    assert sorted(split(2)[1]) != sorted(val)


def test_length_grouping_reduces_padding(tmp_path, tiny_bert):
    rows = sentiment_rows(256, seed=0)
    path = write_csv(tmp_path / "t.csv", rows)

    def padded_fraction(group):
        dm = TextClassificationDataModule(train_file=path, tokenizer=tiny_bert, group_by_length=group, batch_size=16)
        dm.setup("fit")
        batches = list(dm.train_dataloader())
        assert sum(len(b["labels"]) for b in batches) == len(dm.datasets["train"])
        total = sum(b["attention_mask"].numel() for b in batches)
        return 1 - sum(b["attention_mask"].sum().item() for b in batches) / total

    assert padded_fraction(True) < 0.5 * padded_fraction(False)


def test_jsonl(tmp_path, tiny_bert):
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join('{"review": "%s", "stars": %d}' % (r["text"], i % 3) for i, r in enumerate(sentiment_rows(12, 0))))
    dm = TextClassificationDataModule(train_file=str(path), text_column="review", label_column="stars", tokenizer=tiny_bert)
    assert dm.label_names == ["0", "1", "2"]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"train_file": "nope.csv"}, "train_file: 'nope.csv' does not exist"),
        ({"text_column": "review"}, "has no column 'review'"),
        ({"label_column": "stars"}, "has no column 'stars'"),
    ],
)
def test_bad_input_errors(text_files, kwargs, message):
    with pytest.raises(PtftError, match=message):
        dm = TextClassificationDataModule(**{"train_file": text_files["train"], **kwargs})
        dm.label_names


def test_eval_labels_never_seen_in_training(tmp_path, text_files):
    val = write_csv(tmp_path / "v.csv", [{"text": "meh", "label": "neutral"}, {"text": "ok", "label": "positive"}])
    dm = TextClassificationDataModule(train_file=text_files["train"], val_file=val)
    with pytest.raises(PtftError, match=r"v.csv has labels never seen in training: \['neutral'\]"):
        dm.label_names


def test_dataset_folder_through_hf_datasets(tmp_path, tiny_bert):
    """A `dataset` name goes through datasets.load_dataset: here a local folder of split files (offline)."""
    folder = tmp_path / "reviews"
    folder.mkdir()
    write_csv(folder / "train.csv", sentiment_rows(40, seed=1))
    write_csv(folder / "validation.csv", sentiment_rows(10, seed=2))
    dm = TextClassificationDataModule(dataset=str(folder), tokenizer=tiny_bert, batch_size=8)
    assert dm.label_names == ["negative", "positive"]
    dm.setup("fit")
    assert (len(dm.datasets["train"]), len(dm.datasets["val"])) == (40, 10)


def test_unknown_dataset_offline_is_one_line(tmp_path):
    dm = TextClassificationDataModule(dataset="no-such-user/no-such-dataset")
    with pytest.raises(PtftError, match="cannot load split 'train' of dataset 'no-such-user/no-such-dataset'"):
        dm.label_names


def test_validate_needs_only_a_validation_file(tiny_bert, text_files):
    dm = TextClassificationDataModule(val_file=text_files["val"], labels=["negative", "positive"], tokenizer=tiny_bert)
    dm.setup("validate")
    assert set(dm.datasets) == {"val"} and len(dm.datasets["val"]) == 32
