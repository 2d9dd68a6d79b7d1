"""Cross-lingual recipe: train on one language's file, evaluate on another's (labels shared by id)."""

import json
import random

from conftest import write_csv  # noqa: F401  (conftest sets the offline environment)

RECIPE = "recipes/text/xnli-crosslingual.yaml"
WORDS = {
    "en": {"yes": ["a dog runs", "the sun shines"], "filler": ["the", "a", "one", "some", "people", "man", "woman", "child"]},
    "de": {"yes": ["ein hund rennt", "die sonne scheint"], "filler": ["der", "die", "das", "ein", "eine", "leute", "mann", "frau", "kind"]},
}


def nli_rows(language: str, n: int, seed: int) -> list[dict]:
    """Premise / hypothesis pairs: entailment when the hypothesis repeats the premise, else contradiction / neutral."""
    rng = random.Random(seed)
    vocab = WORDS[language]
    rows = []
    for i in range(n):
        premise = " ".join(rng.choice(vocab["filler"]) for _ in range(6)) + " " + rng.choice(vocab["yes"])
        label = i % 3
        hypothesis = premise if label == 0 else " ".join(rng.sample(vocab["filler"], 4))
        rows.append({"premise": premise, "hypothesis": hypothesis, "label": label})
    return rows


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    return str(path)


def test_crosslingual_recipe_trains_on_english_and_evaluates_on_german(run_recipe, tiny_bert, tmp_path):
    train = write_jsonl(tmp_path / "en-train.jsonl", nli_rows("en", 48, seed=1))
    val = write_jsonl(tmp_path / "de-validation.jsonl", nli_rows("de", 24, seed=2))
    test = write_jsonl(tmp_path / "fr-test.jsonl", nli_rows("de", 12, seed=3))
    cli = run_recipe(RECIPE, [
        f"--model.init_args.model_name={tiny_bert}", f"--data.init_args.train_file={train}",
        f"--data.init_args.val_file={val}", f"--data.init_args.test_file={test}", "--trainer.val_check_interval=1.0",
    ])
    assert cli.trainer.global_step == 2
    assert cli.model.label_names == ["entailment", "neutral", "contradiction"]
    assert cli.model.optimizer_config.layer_decay == 0.9
    dm = cli.datamodule
    assert dm.files["train"].name == "en-train.jsonl" and dm.files["val"].name == "de-validation.jsonl"
    # the German validation set was evaluated as given, not held out of the English training set
    assert len(dm.datasets["val"]) == 24 and len(dm.datasets["train"]) == 48
    assert "val/acc" in cli.trainer.callback_metrics
