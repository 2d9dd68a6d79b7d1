import pytest

from ptft.core.errors import PtftError
from ptft.core.labels import discover_label_names, encode_labels


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
