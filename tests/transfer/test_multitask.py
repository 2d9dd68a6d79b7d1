"""Multi-task fine-tuning: task sampling, per-task heads and metrics, loss weighting, DDP, export, recipes."""

from __future__ import annotations

import json
import random
from collections import Counter
from pathlib import Path

import lightning as L
import pytest
import torch
from conftest import sentiment_rows, write_csv
from helpers import trainer

from ptft.core.data import EpochSeededSampler
from ptft.core.errors import PtftError
from ptft.text.data import TextClassificationDataModule
from ptft.text.token import TokenClassificationDataModule
from ptft.transfer.multitask import MultiTaskModule
from ptft.transfer.multitask_export import load_task_module
from ptft.transfer.multitask_data import MultiTaskDataModule, TaskSampler, task_probabilities
from ptft.vision.data import ImageClassificationDataModule

TEXT_RECIPE = "recipes/text/multitask.yaml"
VISION_RECIPE = "recipes/vision/multitask.yaml"
PEOPLE, PLACES = ["alice", "maria", "john", "peter", "olga", "yuki"], ["paris", "berlin", "tokyo", "lima", "oslo"]
FILLER = ["the", "a", "then", "we", "they", "quickly", "old", "friend", "was", "and"]
TAGS = ["O", "B-PER", "B-LOC"]
#: Four colours: task "colour" names them, task "tone" tells bright (green, yellow) from dark (red, blue).
SHADES = {"red": (200, 30, 30), "green": (40, 210, 60), "blue": (30, 40, 200), "yellow": (230, 220, 40)}
TONE = {"red": "dark", "blue": "dark", "green": "bright", "yellow": "bright"}


# --- generated data -----------------------------------------------------------------------------------------------
def ner_rows(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        words, tags = [], []
        for _ in range(rng.randint(2, 4)):
            if rng.random() < 0.4:
                words, tags = words + [rng.choice(PEOPLE), "said"], tags + ["B-PER", "O"]
            elif rng.random() < 0.7:
                words, tags = words + ["in", rng.choice(PLACES)], tags + ["O", "B-LOC"]
            else:
                words, tags = words + [rng.choice(FILLER)], tags + ["O"]
        rows.append({"tokens": words, "ner_tags": tags})
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def text_files(tmp_path: Path, train: int = 48, val: int = 16) -> dict[str, str]:
    return {
        "sst_train": write_csv(tmp_path / "sst-train.csv", sentiment_rows(train, seed=1)),
        "sst_val": write_csv(tmp_path / "sst-val.csv", sentiment_rows(val, seed=2)),
        "ner_train": write_jsonl(tmp_path / "ner-train.jsonl", ner_rows(train, seed=3)),
        "ner_val": write_jsonl(tmp_path / "ner-val.jsonl", ner_rows(val, seed=4)),
    }


def text_data(files: dict[str, str], batch_size: int = 8, **kwargs) -> MultiTaskDataModule:
    return MultiTaskDataModule(
        tasks={
            "sst": TextClassificationDataModule(train_file=files["sst_train"], val_file=files["sst_val"],
                                                labels=["negative", "positive"], batch_size=batch_size, max_length=32),
            "ner": TokenClassificationDataModule(train_file=files["ner_train"], val_file=files["ner_val"],
                                                 labels=TAGS, batch_size=batch_size, max_length=32),
        },
        **kwargs,
    )


def text_model(tiny_bert: str, data: MultiTaskDataModule, **kwargs) -> MultiTaskModule:
    L.seed_everything(0)
    kwargs = {"optimizer": {"lr": 2e-3}, "scheduler": {"name": "constant", "warmup_ratio": 0.0},
              "tasks": {"sst": {"kind": "sequence"}, "ner": {"kind": "token"}}, **kwargs}
    model = MultiTaskModule(tiny_bert, label_names=data.label_names, **kwargs)
    data.connect(model)
    return model


def write_shades(root: Path, per_class: int, seed: int) -> list[tuple[str, str]]:
    """Noisy solid-colour PNGs; returns (path, colour) of each."""
    from PIL import Image

    g = torch.Generator().manual_seed(seed)
    root.mkdir(parents=True, exist_ok=True)
    rows = []
    for name, rgb in SHADES.items():
        for i in range(per_class):
            noise = torch.randint(-30, 30, (16, 16, 3), generator=g)
            pixels = (torch.tensor(rgb) + noise).clamp(0, 255).to(torch.uint8).numpy()
            Image.fromarray(pixels).save(root / f"{name}-{i:02d}.png")
            rows.append((f"{name}-{i:02d}.png", name))
    return rows


def image_csvs(tmp_path: Path, per_class: int = 8) -> dict[str, str]:
    """Train / val CSVs of the same images for two tasks: ``colour`` (4-way) and ``tone`` (2-way)."""
    files = {}
    for split, n, seed in (("train", per_class, 0), ("val", 4, 1)):
        rows = write_shades(tmp_path / split, n, seed)
        files[f"colour_{split}"] = write_csv(tmp_path / split / "colour.csv", [{"path": p, "label": c} for p, c in rows])
        files[f"tone_{split}"] = write_csv(tmp_path / split / "tone.csv", [{"path": p, "label": TONE[c]} for p, c in rows])
    return files


def image_data(files: dict[str, str], **kwargs) -> MultiTaskDataModule:
    common = {"image_size": 32, "num_workers": 0, "batch_size": 8, "hflip": 0.0, "color_jitter": 0.0, "scale": (0.8, 1.0)}
    return MultiTaskDataModule(
        tasks={task: ImageClassificationDataModule(train=files[f"{task}_train"], val=files[f"{task}_val"], **common)
               for task in ("colour", "tone")},
        **kwargs,
    )


def image_model(data: MultiTaskDataModule, **kwargs) -> MultiTaskModule:
    L.seed_everything(0)
    kwargs = {"optimizer": {"lr": 3e-3}, "scheduler": {"name": "constant", "warmup_ratio": 0.0}, **kwargs}
    model = MultiTaskModule("test_resnet", tasks={"colour": "image", "tone": "image"}, label_names=data.label_names,
                            pretrained=False, **kwargs)
    data.connect(model)
    return model


# --- sampling -----------------------------------------------------------------------------------------------------
def test_task_probabilities_follow_sizes_to_the_power_one_over_t():
    assert task_probabilities({"a": 900, "b": 100}, 1.0) == pytest.approx({"a": 0.9, "b": 0.1})
    assert task_probabilities({"a": 900, "b": 100}, 2.0) == pytest.approx({"a": 0.75, "b": 0.25})  # 30 : 10
    assert task_probabilities({"a": 10**9, "b": 1}, 0.01)["b"] == 0.0  # no overflow
    with pytest.raises(PtftError, match="temperature"):
        task_probabilities({"a": 1}, 0.0)


def loaders(sizes: dict[str, int], rank: int, batch_size: int = 10) -> dict[str, torch.utils.data.DataLoader]:
    """Each task's loader as a task data module builds it on process ``rank`` of 2."""
    out = {}
    for name, n in sizes.items():
        sampler = EpochSeededSampler(n, seed=7, batch_size=batch_size, num_replicas=2, rank=rank)
        out[name] = torch.utils.data.DataLoader(list(range(n)), batch_size=batch_size, sampler=sampler)
    return out


@pytest.mark.parametrize("sampling, temperature, expected", [("proportional", 1.0, 0.9), ("temperature", 2.0, 0.75)])
def test_sampled_tasks_come_at_the_right_frequency_seeded_and_alike_on_every_rank(sampling, temperature, expected):
    sizes = {"big": 900, "small": 100}
    ranks = [TaskSampler(loaders(sizes, rank), sampling, sizes, temperature, seed=3, steps=20_000) for rank in (0, 1)]
    order = ranks[0].order()
    assert Counter(order)["big"] / len(order) == pytest.approx(expected, abs=0.01)
    assert ranks[1].order() == order  # every process trains the same task at every step
    first = [next(iter(r)) for r in ranks]
    assert list(first[0]) == list(first[1]) and not torch.equal(*[next(iter(b.values())) for b in first])  # own shards
    for r in ranks:
        r.sampler.set_epoch(1)  # what Lightning calls before an epoch
    assert ranks[0].order() == ranks[1].order() != order  # a new draw each epoch...
    assert ranks[0].loaders["big"].sampler.epoch == 1  # ...and a new batch order in every task
    again = TaskSampler(loaders(sizes, 0), sampling, sizes, temperature, seed=3, steps=20_000)
    again.set_epoch(1)
    assert again.order() == ranks[0].order()  # seeded


def test_sequential_and_default_epoch_lengths():
    sizes = {"a": 40, "b": 20}  # 2 processes x batches of 10: 2 and 1 batches per process
    sequential = TaskSampler(loaders(sizes, 0), "sequential", sizes, 1.0, seed=0)
    assert sequential.order() == ["a", "a", "b"] and len(sequential) == 3
    assert [list(batch) for batch in sequential] == [["a"], ["a"], ["b"]]
    drawn = TaskSampler(loaders(sizes, 0), "proportional", sizes, 1.0, seed=0, steps=50)
    assert len(list(drawn)) == 50  # tasks start over when their batches run out


def test_bad_settings_are_one_line_errors(tiny_bert, tmp_path):
    files = text_files(tmp_path)
    with pytest.raises(PtftError, match="sampling must be"):
        text_data(files, sampling="random")
    data = text_data(files)
    with pytest.raises(PtftError, match=r"no label names for tasks \['ner'\]"):
        MultiTaskModule(tiny_bert, tasks={"sst": "sequence", "ner": "token"}, label_names={"sst": ["a", "b"]})
    with pytest.raises(PtftError, match="head must be one of"):
        MultiTaskModule(tiny_bert, tasks={"sst": {"kind": "sequence", "head": "linear"}}, label_names={"sst": ["a"]})
    with pytest.raises(PtftError, match="one modality"):
        MultiTaskModule(tiny_bert, tasks={"a": "sequence", "b": "image"}, label_names={"a": ["x"], "b": ["y"]})
    swapped = MultiTaskModule(tiny_bert, tasks={"sst": "token", "ner": "sequence"}, label_names=data.label_names)
    with pytest.raises(PtftError, match="'sst' is a token task, but its data is a TextClassificationDataModule"):
        data.connect(swapped)


# --- training -----------------------------------------------------------------------------------------------------
class HeadUpdates(L.Callback):
    """Per step: the tasks of the batch, and which parts of the network changed."""

    def __init__(self) -> None:
        self.steps: list[tuple[list[str], set[str]]] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.before = {n: p.detach().clone() for n, p in pl_module.model.named_parameters()}
        self.tasks = list(batch)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        changed = {n for n, p in pl_module.model.named_parameters() if not torch.equal(p, self.before[n])}
        parts = {".".join(n.split(".")[:2]) if n.startswith(("heads.", "objectives.")) else "backbone" for n in changed}
        self.steps.append((self.tasks, parts))


def test_every_step_updates_the_backbone_and_only_the_drawn_tasks_heads(tiny_bert, tmp_path):
    """AdamW with weight decay: a head without a gradient would still move if it were handed zeros instead of None."""
    data = text_data(text_files(tmp_path), sampling="temperature", temperature=1.5, steps_per_epoch=6)
    model = text_model(tiny_bert, data, weighting="learned", optimizer={"lr": 1e-3, "weight_decay": 0.1})
    record = HeadUpdates()
    trainer(tmp_path, max_steps=6, limit_val_batches=0, callbacks=[record]).fit(model, data)
    assert len(record.steps) == 6 and {t for tasks, _ in record.steps for t in tasks} == {"sst", "ner"}
    for tasks, parts in record.steps:
        assert len(tasks) == 1
        assert parts == {"backbone", f"heads.{tasks[0]}", f"objectives.{tasks[0]}"}, (tasks, parts)
    # round robin: every head, every step
    data = text_data(text_files(tmp_path), sampling="round_robin")
    model = text_model(tiny_bert, data)
    record = HeadUpdates()
    trainer(tmp_path, max_steps=2, limit_val_batches=0, callbacks=[record]).fit(model, data)
    assert [(sorted(t), p) for t, p in record.steps] == [(["ner", "sst"], {"backbone", "heads.sst", "heads.ner"})] * 2


def reference_scores(model: MultiTaskModule, data: MultiTaskDataModule) -> dict[str, float]:
    """Accuracy, entity F1 and losses computed by hand from the model's outputs on each task's validation loader."""
    from seqeval.metrics import f1_score

    model.eval()
    out: dict[str, float] = {}
    with torch.no_grad():
        hits = losses = count = 0
        for batch in data.tasks["sst"].val_dataloader():
            logits = model("sst", batch)
            hits += (logits.argmax(-1) == batch["labels"]).sum().item()
            losses += torch.nn.functional.cross_entropy(logits, batch["labels"]).item() * len(logits)
            count += len(logits)
        out.update({"val/sst/acc": hits / count, "val/sst/loss": losses / count})
        gold, guess, losses, count = [], [], 0.0, 0
        for batch in data.tasks["ner"].val_dataloader():
            logits = model("ner", batch)
            losses += torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch["labels"].flatten(),
                                                        ignore_index=-100, reduction="sum").item()
            count += (batch["labels"] != -100).sum().item()  # a mean over every labelled token
            for row in range(len(logits)):
                words = batch["word_ids"][row]
                first = [i for i in range(len(words)) if words[i] >= 0 and (i == 0 or words[i] != words[i - 1])]
                gold.append([TAGS[batch["labels"][row, i]] for i in first])
                guess.append([TAGS[logits[row, i].argmax()] for i in first])
        out.update({"val/ner/f1": f1_score(gold, guess), "val/ner/loss": losses / count})
    out["val/mean_score"] = (out["val/sst/acc"] + out["val/ner/f1"]) / 2
    out["val/loss"] = out["val/sst/loss"] + out["val/ner/loss"]  # static weights 1.0
    return out


def test_metrics_are_logged_per_task_and_equal_a_reference(tiny_bert, tmp_path):
    data = text_data(text_files(tmp_path), batch_size=6)  # 16 validation rows: a short last batch
    model = text_model(tiny_bert, data)
    trainer(tmp_path, max_steps=8, limit_val_batches=0).fit(model, data)  # something above chance to compare
    results = trainer(tmp_path).validate(model, data, verbose=False)[0]
    expected = {f"val/{t}/{m}" for t, ms in (("sst", ("acc", "f1", "loss")), ("ner", ("precision", "recall", "f1", "acc", "loss")))
                for m in ms} | {"val/mean_score", "val/loss"}
    assert set(results) == expected
    reference = reference_scores(model, data)
    assert reference["val/ner/f1"] > 0  # agreement is not 0 == 0
    for key, value in reference.items():
        assert results[key] == pytest.approx(value, rel=1e-5, abs=1e-6), key
    assert MultiTaskModule.checkpoint_monitor == ("val/mean_score", "max")


def test_learned_weighting_learns_one_log_variance_per_task(tiny_bert, tmp_path):
    data = text_data(text_files(tmp_path))
    model = text_model(tiny_bert, data, weighting="learned", tasks={"sst": {"kind": "sequence", "weight": 2.0},
                                                                   "ner": {"kind": "token"}})
    objectives = model.model.objectives
    with torch.no_grad():
        objectives["sst"].log_vars["sst"].fill_(0.5)
    losses = {"sst": torch.tensor(0.8), "ner": torch.tensor(1.2)}
    # w * (exp(-s) * L + s) per task; ner's s is still 0
    torch.testing.assert_close(model.objective(losses), 2.0 * (torch.exp(torch.tensor(-0.5)) * 0.8 + 0.5) + 1.2)
    torch.testing.assert_close(model.objective({"ner": losses["ner"]}), torch.tensor(1.2))  # a step without sst
    groups = model.param_groups()
    top = max(g["layer"] for g in groups)
    assert {n for g in groups if g["layer"] == top for n in g["names"]} >= {"objectives.sst.log_vars.sst", "heads.sst.classifier.weight"}
    start = {t: objectives[t].log_vars[t].item() for t in ("sst", "ner")}
    run = trainer(tmp_path, max_steps=4, limit_val_batches=0, logger=L.pytorch.loggers.CSVLogger(tmp_path), log_every_n_steps=1)
    run.fit(model, data)
    assert all(objectives[t].log_vars[t].item() != start[t] for t in start)
    assert {"train/sst/weight", "train/ner/weight", "train/sst/loss", "train/ner/loss", "train/loss"} <= set(run.logged_metrics)


def test_two_tasks_trained_jointly_both_learn(tmp_path):
    data = image_data(image_csvs(tmp_path, per_class=8), sampling="proportional")
    model = image_model(data)
    run = trainer(tmp_path, max_epochs=6)
    run.fit(model, data)
    scores = {k: float(v) for k, v in run.callback_metrics.items()}
    assert scores["val/colour/acc"] > 0.6, scores  # chance: 0.25
    assert scores["val/tone/acc"] > 0.8, scores  # chance: 0.5
    assert scores["val/mean_score"] == pytest.approx((scores["val/colour/acc"] + scores["val/tone/acc"]) / 2)


# --- export -------------------------------------------------------------------------------------------------------
def test_export_writes_task_folders_their_single_task_modules_load(tiny_bert, tmp_path):
    """Sequence (attention pooling), token (linear: a Hugging Face folder) and token (LSTM) heads."""
    from ptft.text.modules import TextClassifier
    from ptft.text.token import TokenClassifier

    files = text_files(tmp_path)
    data = text_data(files)
    data.tasks["tags"] = TokenClassificationDataModule(train_file=files["ner_train"], val_file=files["ner_val"],
                                                       labels=TAGS, batch_size=8, max_length=32)
    tasks = {"sst": {"kind": "sequence", "head": "attention"}, "ner": "token", "tags": {"kind": "token", "head": "lstm"}}
    model = text_model(tiny_bert, data, tasks=tasks)
    trainer(tmp_path, max_steps=2, limit_val_batches=0).fit(model, data)
    model.export(str(tmp_path / "export"))
    model.eval()
    for task, cls in (("sst", TextClassifier), ("ner", TokenClassifier), ("tags", TokenClassifier)):
        single = load_task_module(str(tmp_path / "export" / task)).eval()
        assert type(single) is cls and single.label_names == data.label_names[task]
        batch = next(iter(data.tasks[task].val_dataloader()))
        torch.testing.assert_close(single(batch), model(task, batch), rtol=1e-4, atol=1e-5)
    with pytest.raises(PtftError, match="ptft_task.json"):
        load_task_module(str(tmp_path))


def test_image_export_loads_as_an_image_classifier_with_the_trained_head(tmp_path):
    from ptft.vision.modules import ImageClassifier

    data = image_data(image_csvs(tmp_path, per_class=2))
    model = image_model(data)
    data.setup("fit")
    model.export(str(tmp_path / "export"))
    model.eval()
    single = load_task_module(str(tmp_path / "export" / "tone")).eval()
    assert isinstance(single, ImageClassifier) and single.label_names == ["bright", "dark"]
    batch = next(iter(data.tasks["tone"].val_dataloader()))
    torch.testing.assert_close(single(batch), model("tone", batch), rtol=1e-4, atol=1e-5)


# --- DDP ----------------------------------------------------------------------------------------------------------
def test_two_processes_log_the_validation_metrics_of_one(tiny_bert, tmp_path):
    """2 processes (gloo, ddp_fork) train 2 drawn-task steps, then score every task as 1 process does. Every
    validation set is a multiple of 2 x the batch size: DistributedSampler pads nothing."""
    data = text_data(text_files(tmp_path, val=16), batch_size=4, sampling="proportional")
    model = text_model(tiny_bert, data)
    with pytest.raises(Exception, match="ddp_find_unused_parameters_true"):
        trainer(tmp_path, max_steps=1, devices=2, strategy="ddp_fork", limit_val_batches=0).fit(model, data)
    run = trainer(tmp_path, max_steps=2, devices=2, strategy="ddp_fork_find_unused_parameters_true", limit_val_batches=0)
    run.fit(model, data)  # rank 0's weights come back to this process
    single = trainer(tmp_path).validate(model, data, verbose=False)[0]
    ddp = trainer(tmp_path, devices=2, strategy="ddp_fork").validate(model, data, verbose=False)[0]
    assert single["val/ner/f1"] > 0 and set(ddp) == set(single)
    for key, value in single.items():
        assert ddp[key] == pytest.approx(value, rel=1e-5, abs=1e-6), (key, ddp, single)


# --- recipes and checkpoints --------------------------------------------------------------------------------------
def test_text_recipe_trains_and_its_checkpoint_reloads(run_recipe, tiny_bert, tmp_path):
    from ptft.core.module import load_checkpoint

    files = text_files(tmp_path)
    tasks = "--data.init_args.tasks"
    cli = run_recipe(TEXT_RECIPE, [
        f"--model.init_args.backbone={tiny_bert}", "--data.init_args.steps_per_epoch=2",  # a validation, a checkpoint
        f"{tasks}.sentiment.init_args.train_file={files['sst_train']}",
        f"{tasks}.sentiment.init_args.val_file={files['sst_val']}", f"{tasks}.sentiment.init_args.text_column=text",
        f"{tasks}.ner.init_args.train_file={files['ner_train']}",
        # jsonargparse 4.53 reads "null" inside a task's override as the string 'None': a file instead
        f"{tasks}.ner.init_args.val_file={files['ner_val']}", f"{tasks}.ner.init_args.test_file={files['ner_val']}",
    ], steps=2)
    assert cli.trainer.global_step == 2
    assert cli.model.label_names == {"sentiment": ["negative", "positive"], "ner": TAGS[:1] + ["B-LOC", "B-PER"]}
    assert "val/mean_score" in cli.trainer.callback_metrics
    best = next((tmp_path / "runs").rglob("best-*.ckpt"))
    loaded = load_checkpoint(str(best))
    assert isinstance(loaded, MultiTaskModule) and loaded.label_names == cli.model.label_names
    batch = next(iter(cli.datamodule.tasks["sentiment"].val_dataloader()))
    torch.testing.assert_close(loaded.eval()("sentiment", batch), cli.model.cpu().eval()("sentiment", batch))


def test_vision_recipe_trains(run_recipe, tmp_path):
    files = image_csvs(tmp_path, per_class=2)
    tasks = "--data.init_args.tasks"
    overrides = ["--model.init_args.backbone=test_resnet", "--model.init_args.pretrained=false"]
    for task, name in (("coarse", "tone"), ("fine", "colour")):
        overrides += [f"{tasks}.{task}.init_args.train={files[f'{name}_train']}",
                      f"{tasks}.{task}.init_args.val={files[f'{name}_val']}",
                      f"{tasks}.{task}.init_args.test={files[f'{name}_val']}", f"{tasks}.{task}.init_args.num_workers=0"]
    overrides.append(f"{tasks}.coarse.init_args.labels=[bright, dark]")
    cli = run_recipe(VISION_RECIPE, overrides, steps=2)
    assert cli.trainer.global_step == 2
    assert set(cli.model.label_names) == {"coarse", "fine"}
