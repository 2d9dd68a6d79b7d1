"""Prediction files: one row per input, in input order, also when DDP splits the inputs across processes."""

import csv

from conftest import write_csv
from helpers import trainer

from ptft.core import WritePredictions
from ptft.text import TextClassificationDataModule, TextClassifier


def read(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def test_ddp_long_document_predictions_are_per_document(tiny_bert, tmp_path):
    """Under DDP: every rank's rows, in input order, the sampler's padding dropped (5 documents on 2 ranks), and a
    document's windows kept together (one prediction per document, equal to one process's)."""
    rows = [{"text": " ".join(["the movie was really quite"] * 8) + f" {word}", "label": "positive"}
            for word in ("great", "awful", "fine", "poor", "lovely")]
    predict = write_csv(tmp_path / "long.csv", rows)
    model = TextClassifier(tiny_bert, num_labels=2, label_names=["negative", "positive"])
    data = TextClassificationDataModule(predict_file=predict, labels=["negative", "positive"], batch_size=2,
                                        max_length=16, stride=4, long_documents="windows")
    data.connect(model)
    single, ddp = tmp_path / "single.csv", tmp_path / "ddp.csv"
    trainer(tmp_path, callbacks=[WritePredictions(str(single))]).predict(model, data, return_predictions=False)
    trainer(tmp_path, devices=2, strategy="ddp_spawn", callbacks=[WritePredictions(str(ddp))]).predict(
        model, data, return_predictions=False
    )
    expected, got = read(single), read(ddp)
    assert len(expected) == len(got) == 5
    for a, b in zip(got, expected):
        assert abs(float(a["p_positive"]) - float(b["p_positive"])) < 1e-5
