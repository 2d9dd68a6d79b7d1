import pytest

from ptft.core.errors import PtftError
from ptft.core.labels import discover_label_names, encode_labels, split_label_names


def test_string_labels_are_sorted_names():
    assert discover_label_names(["pos", "neg", "pos"]) == ["neg", "pos"]


def test_integer_labels_are_ids():
    assert discover_label_names([0, 2, 1, 2]) == ["0", "1", "2"]
    assert discover_label_names([1, 0], names=["negative", "positive"]) == ["negative", "positive"]


def test_given_names_fix_order_and_reject_others():
    assert discover_label_names(["b", "a"], names=["b", "a"]) == ["b", "a"]
    with pytest.raises(PtftError, match=r"\['c'\]"):
        discover_label_names(["a", "c"], names=["a", "b"])


def test_bad_label_ids():
    with pytest.raises(PtftError, match="negative label id"):
        discover_label_names([0, -1])
    with pytest.raises(PtftError, match="only 2 label names"):
        discover_label_names([0, 2], names=["a", "b"])
    with pytest.raises(PtftError, match="empty labels"):
        discover_label_names(["a", None])


def test_encode_and_unseen_labels():
    assert encode_labels(["b", "a", 1], ["a", "b"], "val") == [1, 0, 1]
    with pytest.raises(PtftError, match=r"val.csv has labels never seen in training: \['z'\]"):
        encode_labels(["a", "z"], ["a", "b"], "val.csv")
    with pytest.raises(PtftError, match=r"never seen in training: \['5'\]"):
        encode_labels([5], ["a", "b"], "val")


def test_split_label_names_discovers_from_training_and_checks_the_other_splits():
    assert split_label_names({"train": ["b", "a", "b"], "val": ["a"], "test": None}, None, "clips") == ["a", "b"]
    assert split_label_names({"train": None, "val": ["x"]}, ["x", "y"], "clips") == ["x", "y"]
    with pytest.raises(PtftError, match=r"without training clips, give the label names: data.init_args.labels"):
        split_label_names({"train": None, "test": ["a"]}, None, "clips")
    with pytest.raises(PtftError, match=r"test has labels never seen in training: \['c'\]"):
        split_label_names({"train": ["a", "b"], "test": ["c"]}, None, "rows")
