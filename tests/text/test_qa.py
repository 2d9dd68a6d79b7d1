"""Extractive question answering: SQuAD files, windows, answer post-processing, learning, prediction, errors."""

from __future__ import annotations

import csv
import json
import random
import re
from pathlib import Path

import pytest
import torch
from conftest import FILLER
from helpers import trainer

from ptft.core.errors import PtftError
from ptft.core.optim import OptimizerConfig
from ptft.text.qa import QuestionAnswerer, QuestionAnsweringDataModule, best_answers

COLORS = ["red", "green", "blue", "yellow", "purple", "orange", "black", "white", "pink", "brown", "turquoise", "crimson"]
SMALL = {"max_length": 32, "doc_stride": 8}  # ~3 windows per 40-60 word context: many answers lie in a late window


def qa_rows(n: int, seed: int) -> list[dict]:
    """Contexts of 40-60 filler words holding one colour word, the answer to "what color is it ?"."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        words = [rng.choice(FILLER) for _ in range(rng.randint(40, 60))]
        at = rng.randrange(len(words))
        words[at] = answer = rng.choice(COLORS)
        start = len(" ".join(words[:at])) + (at > 0)
        rows.append({"id": f"q{seed}-{i}", "question": "what color is it ?", "context": " ".join(words),
                     "answers": {"text": [answer], "answer_start": [start]}})
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def write_squad(path: Path, rows: list[dict], impossible: int = 0) -> str:
    """A nested SQuAD v2 file: one paragraph per row, plus ``impossible`` unanswerable questions."""
    paragraphs = [{"context": r["context"], "qas": [{
        "id": r["id"], "question": r["question"], "is_impossible": False,
        "answers": [{"text": t, "answer_start": s} for t, s in zip(r["answers"]["text"], r["answers"]["answer_start"])],
    }]} for r in rows]
    for i in range(impossible):
        paragraphs[i]["qas"].append({"id": f"none-{i}", "question": "what animal is it ?", "is_impossible": True,
                                     "answers": [], "plausible_answers": [{"text": "cat", "answer_start": 0}]})
    path.write_text(json.dumps({"version": "v2.0", "data": [{"title": "colours", "paragraphs": paragraphs}]}))
    return str(path)


def data_module(tiny_bert: str, **kwargs) -> QuestionAnsweringDataModule:
    dm = QuestionAnsweringDataModule(tokenizer=tiny_bert, **{**SMALL, **kwargs})
    dm.setup("fit")
    return dm


def test_squad_json_is_flattened_and_every_window_labels_the_answer_or_cls(tiny_bert, tmp_path):
    rows = qa_rows(12, seed=0)
    squad = write_squad(tmp_path / "train.json", rows, impossible=2)
    dm = data_module(tiny_bert, train_file=squad, val_file=squad, batch_size=4)
    train = dm.raw()["train"]
    assert len(train) == 14 and set(train.column_names) == {"id", "question", "context", "answers"}
    assert len(dm.datasets["train"]) > 2 * 14  # windows
    tokenizer = dm.tokenizer
    for window in dm.datasets["train"]:
        s, e = window["start_positions"], window["end_positions"]
        assert s == e == 0 or tokenizer.decode(window["input_ids"][s:e + 1]) in COLORS

    gold = {r["id"]: r for r in rows}
    late = 0
    for example in dm.datasets["val"]:  # one row per question with all its windows
        assert len(example["input_ids"]) >= 2
        positions = list(zip(example["start_positions"], example["end_positions"], example["offsets"]))
        if example["id"].startswith("none-"):
            assert example["answer_texts"] == [] and all(s == e == 0 for s, e, _ in positions)
            continue
        answer = gold[example["id"]]["answers"]
        char_start = answer["answer_start"][0]
        char_end = char_start + len(answer["text"][0])
        for s, e, offsets in positions:
            context = [o for o in offsets if o[0] >= 0]
            holds = context[0][0] <= char_start and char_end <= context[-1][1]
            assert (s, e) != (0, 0) if holds else (s, e) == (0, 0)
            if holds:
                assert (offsets[s][0], offsets[e][1]) == (char_start, char_end)
        late += positions[0][:2] == (0, 0)  # the first window misses the answer
    assert late >= 3

    batch = next(iter(dm.val_dataloader()))
    assert batch["window_example"].tolist() == sorted(batch["window_example"].tolist())
    assert batch["offsets"].shape[:2] == batch["input_ids"].shape and len(batch["contexts"]) == 4


def reference_answer(start, end, offsets, cls, n_best, max_len):
    """Brute force over every (start, end) pair of the n-best tokens inside the context."""
    best = (float("-inf"), None, None)
    inside = [k for k in range(len(start)) if offsets[k][0] >= 0]
    top_s = sorted(inside, key=lambda k: -start[k])[:n_best]
    top_e = sorted(inside, key=lambda k: -end[k])[:n_best]
    for s in top_s:
        for e in top_e:
            if s <= e < s + max_len and start[s] + end[e] > best[0]:
                best = (start[s] + end[e], (offsets[s][0], offsets[e][1]), (s, e))
    return best, start[cls] + end[cls]


def test_best_answers_match_a_brute_force_search_and_handle_no_answer():
    torch.manual_seed(0)
    contexts = ["alpha beta gamma delta epsilon zeta eta theta", "one two three four"]
    # 3 windows of 8 tokens: example 0 has windows 0 and 1, example 1 has window 2; tokens 0-2 are CLS / question.
    word_offsets = [[(m.start(), m.end()) for m in re.finditer(r"\S+", c)] for c in contexts]
    offsets = torch.full((3, 8, 2), -1)
    for w, (example, first) in enumerate([(0, 0), (0, 3), (1, 0)]):
        for k in range(3, 8):
            if first + k - 3 < len(word_offsets[example]):
                offsets[w, k] = torch.tensor(word_offsets[example][first + k - 3])
    batch = {"offsets": offsets, "cls_index": torch.zeros(3, dtype=torch.long), "contexts": contexts,
             "window_example": torch.tensor([0, 0, 1]), "attention_mask": torch.ones(3, 8, dtype=torch.long)}
    start, end = torch.randn(3, 8), torch.randn(3, 8)
    start[:, 1] = end[:, 1] = 50.0  # a question token: never part of an answer
    for n_best, max_len in [(20, 30), (2, 2), (3, 1)]:
        answers = best_answers(start, end, batch, n_best=n_best, max_answer_length=max_len)
        for i, (text, score) in enumerate(answers):
            windows = [w for w in range(3) if batch["window_example"][w] == i]
            refs = [reference_answer(start[w].tolist(), end[w].tolist(), offsets[w].tolist(), 0, n_best, max_len)
                    for w in windows]
            w = max(range(len(refs)), key=lambda k: refs[k][0][0])
            (_, span, tokens), _ = refs[w]
            assert text == (contexts[i][span[0]:span[1]] if span else "")
            # the span's probability: start x end softmax in the window it came from
            s, e = tokens
            expected = (start[windows[w]].softmax(-1)[s] * end[windows[w]].softmax(-1)[e]).item()
            assert score == pytest.approx(expected, rel=1e-5)

    # No answer: the smallest null score (CLS start + end) over an example's windows against its best span.
    span_text = best_answers(start, end, batch)[0][0]
    start[:, 0], end[:, 0] = 4.0, 4.0
    start[0, 0] = end[0, 0] = -10.0  # window 0 is sure the answer is in it: null score -20 for example 0
    best_span = max(reference_answer(start[w].tolist(), end[w].tolist(), offsets[w].tolist(), 0, 20, 30)[0][0]
                    for w in (0, 1))
    assert best_answers(start, end, batch, allow_no_answer=True)[0][0] == span_text  # -20 never beats a span
    start[0, 0] = end[0, 0] = 30.0  # now window 1's null score (8) is the smallest
    assert 8.0 > best_span
    text, score = best_answers(start, end, batch, allow_no_answer=True)[0]
    assert text == ""
    torch.testing.assert_close(score, (start[1].softmax(-1)[0] * end[1].softmax(-1)[0]).item())
    threshold = 8.0 - best_span + 0.1
    assert best_answers(start, end, batch, allow_no_answer=True, null_score_threshold=threshold)[0][0] == span_text
    assert best_answers(start, end, batch)[0][0] == span_text  # SQuAD v1: always a span


def test_learns_to_extract_answers_across_windows_and_predicts(tiny_bert, tmp_path):
    import lightning as L

    from ptft.core import WritePredictions

    L.seed_everything(0)
    files = {"train": write_jsonl(tmp_path / "train.jsonl", qa_rows(160, seed=1)),
             "val": write_jsonl(tmp_path / "val.jsonl", qa_rows(48, seed=2))}
    predict_rows = [{k: r[k] for k in ("id", "question", "context")} for r in qa_rows(16, seed=3)]
    files["predict"] = write_jsonl(tmp_path / "predict.jsonl", predict_rows)
    model = QuestionAnswerer(tiny_bert, optimizer=OptimizerConfig(lr=1e-3, weight_decay=0.0))
    dm = QuestionAnsweringDataModule(train_file=files["train"], val_file=files["val"], predict_file=files["predict"],
                                     batch_size=16, eval_batch_size=16, **SMALL)
    dm.connect(model)
    writer = WritePredictions(str(tmp_path / "predictions.csv"))
    t = trainer(tmp_path, max_steps=40, callbacks=[writer], limit_val_batches=0)
    before = trainer(tmp_path).validate(model, dm, verbose=False)[0]
    t.fit(model, dm)
    after = trainer(tmp_path).validate(model, dm, verbose=False)[0]
    print(f"QA before: EM {before['val/exact_match']:.1f} F1 {before['val/f1']:.1f}; "
          f"after 40 steps: EM {after['val/exact_match']:.1f} F1 {after['val/f1']:.1f}")
    # A constant colour would get ~1/12 right; the untrained model picks filler words.
    assert before["val/exact_match"] < 20
    assert after["val/exact_match"] >= 80 and after["val/f1"] >= 80

    trainer(tmp_path, callbacks=[writer]).predict(model, dm, return_predictions=False)
    with open(tmp_path / "predictions.csv") as f:
        written = list(csv.DictReader(f))
    assert [r["id"] for r in written] == [r["id"] for r in predict_rows]
    assert set(written[0]) == {"id", "question", "answer", "score"}
    gold = {r["id"]: r["answers"]["text"][0] for r in qa_rows(16, seed=3)}
    assert sum(r["answer"] == gold[r["id"]] for r in written) >= 12
    assert all(0.0 < float(r["score"]) <= 1.0 for r in written)


@pytest.mark.parametrize("recipe", ["recipes/text/squad.yaml", "recipes/text/squad-v2.yaml"])
def test_recipe_trains_two_steps(recipe, run_recipe, tiny_bert, tmp_path):
    rows = qa_rows(24, seed=4)
    if recipe.endswith("v2.yaml"):  # nested SQuAD v2 files with unanswerable questions
        train, val = write_squad(tmp_path / "train.json", rows[:16], 4), write_squad(tmp_path / "val.json", rows[16:], 2)
    else:
        train, val = write_jsonl(tmp_path / "train.jsonl", rows[:16]), write_jsonl(tmp_path / "val.jsonl", rows[16:])
    cli = run_recipe(recipe, [
        f"--model.init_args.model_name={tiny_bert}", f"--data.init_args.train_file={train}",
        f"--data.init_args.val_file={val}", "--data.init_args.max_length=32", "--data.init_args.doc_stride=8",
        "--data.init_args.batch_size=4", "--trainer.val_check_interval=2",
    ])
    assert cli.trainer.global_step == 2
    assert isinstance(cli.model, QuestionAnswerer)
    assert {"val/exact_match", "val/f1"} <= set(cli.trainer.callback_metrics)
    from ptft.core.module import load_checkpoint

    reloaded = load_checkpoint(cli.trainer.checkpoint_callback.best_model_path)
    assert isinstance(reloaded, QuestionAnswerer) and reloaded.allow_no_answer == recipe.endswith("v2.yaml")


def squad_row(**changes) -> dict:
    row = {"id": "q7", "question": "what color is it ?", "context": "the room was red and quite nice",
           "answers": {"text": ["red"], "answer_start": [13]}}
    return {**row, **changes}


@pytest.mark.parametrize(
    ("row", "message"),
    [
        ({k: v for k, v in squad_row().items() if k != "question"}, "has no column 'question'"),
        (squad_row(answers={"text": ["red"], "answer_start": [10]}),
         ("answer 'red' of question 'q7' is not at answer_start 10 (the context has 'as ' there; the answer is at 13): "
          "fix answer_start, or set data.init_args.align_answers=true")),
        (squad_row(answers={"text": ["red"], "answer_start": [99]}), "answer_start 99 of question 'q7' is outside"),
        (squad_row(answers={"text": ["blue"], "answer_start": [13]}), "answer 'blue' of question 'q7' does not occur"),
        (squad_row(answers={"text": ["red", "the"], "answer_start": [13]}), "2 answer texts but 1 answer_start"),
        (squad_row(question="what " * 40), "cannot split into windows: "),
    ],
    ids=["missing-column", "misplaced-answer", "start-out-of-range", "answer-not-in-context", "ragged-answers",
         "question-too-long"],
)
def test_bad_input_is_one_line_error(row, message, tiny_bert, tmp_path):
    path = write_jsonl(tmp_path / "train.jsonl", [row] * 4)
    with pytest.raises(PtftError) as err:
        data_module(tiny_bert, train_file=path, val_file=path)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_align_answers_uses_the_nearest_occurrence_and_bad_squad_files_fail(tiny_bert, tmp_path):
    path = write_jsonl(tmp_path / "train.jsonl", [squad_row(answers={"text": ["red"], "answer_start": [10]})] * 2)
    dm = data_module(tiny_bert, train_file=path, val_file=path, align_answers=True)
    window = dm.datasets["train"][0]
    assert dm.tokenizer.decode(window["input_ids"][window["start_positions"]:window["end_positions"] + 1]) == "red"

    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"data": [{"paragraphs": [{"context": "x", "qas": [{"id": "1"}]}]}]}))
    with pytest.raises(PtftError, match="not a valid SQuAD file"):
        data_module(tiny_bert, train_file=str(bad))
    with pytest.raises(PtftError, match="doc_stride"):
        QuestionAnsweringDataModule(train_file=path, max_length=32, doc_stride=16)
