"""Prediction files: one row per input, in input order, also when DDP splits the inputs across processes."""

import csv

from conftest import sentiment_rows, write_csv
from helpers import trainer

from ptft.core import WritePredictions
from ptft.text import TextClassificationDataModule, TextClassifier


def read(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def test_ddp_predictions_are_complete_and_in_input_order(tiny_bert, tmp_path):
    predict = write_csv(tmp_path / "predict.csv", sentiment_rows(7, seed=5))  # 7 rows: the 2-rank sampler pads one
    model = TextClassifier(tiny_bert, num_labels=2, label_names=["negative", "positive"])
    data = TextClassificationDataModule(predict_file=predict, labels=["negative", "positive"], batch_size=2)
    data.connect(model)

    single = tmp_path / "single.csv"
    trainer(tmp_path, callbacks=[WritePredictions(str(single))]).predict(model, data, return_predictions=False)
    ddp = tmp_path / "ddp.csv"
    trainer(tmp_path, devices=2, strategy="ddp_spawn", callbacks=[WritePredictions(str(ddp))]).predict(
        model, data, return_predictions=False
    )
    expected, got = read(single), read(ddp)
    assert len(expected) == 7
    assert [r["label"] for r in got] == [r["label"] for r in expected]
    for a, b in zip(got, expected):
        assert abs(float(a["p_positive"]) - float(b["p_positive"])) < 1e-5
