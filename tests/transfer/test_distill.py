"""Knowledge distillation: the soft-target loss, the frozen teacher kept out of the student, the logit cache, hidden
states, a student initialised from its teacher's blocks, and a distilled student beating an undistilled one."""

from __future__ import annotations

import random
from pathlib import Path

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from conftest import sentiment_rows, write_csv
from helpers import trainer

from ptft.core.errors import PtftError
from ptft.text import TextClassificationDataModule, TextClassifier
from ptft.transfer import Distillation
from ptft.transfer.distill import soft_target_loss

LABELS = ["negative", "positive"]


def data(train: str, val: str, batch_size: int = 16) -> TextClassificationDataModule:
    return TextClassificationDataModule(train_file=train, val_file=val, labels=LABELS, batch_size=batch_size,
                                        max_length=32, seed=0)


def classifier(name: str, **kwargs) -> TextClassifier:
    return TextClassifier(model_name=name, num_labels=2, label_names=LABELS,
                          optimizer={"lr": kwargs.pop("lr", 1e-3)}, scheduler={"name": "constant"}, **kwargs)


@pytest.fixture(scope="module")
def teacher_ckpt(tiny_bert: str, tmp_path_factory: pytest.TempPathFactory) -> str:
    """The tiny BERT fine-tuned on clean synthetic reviews until it is right on held-out ones."""
    root = tmp_path_factory.mktemp("teacher")
    train = write_csv(root / "train.csv", sentiment_rows(256, seed=11))
    val = write_csv(root / "val.csv", sentiment_rows(64, seed=12))
    torch.manual_seed(0)
    model = classifier(tiny_bert)
    t = trainer(root, max_epochs=6, enable_checkpointing=False)
    t.fit(model, data(train, val))
    assert t.callback_metrics["val/acc"] >= 0.95  # a teacher worth distilling
    path = root / "teacher.ckpt"
    t.save_checkpoint(path)
    return str(path)


def test_soft_target_loss_is_hintons_kl_scaled_by_t_squared():
    torch.manual_seed(0)
    student, teacher = torch.randn(5, 3, requires_grad=True), torch.randn(5, 3)
    t = 3.0
    expected = (F.softmax(teacher / t, -1) * (F.log_softmax(teacher / t, -1) - F.log_softmax(student / t, -1))).sum(-1).mean() * t * t
    torch.testing.assert_close(soft_target_loss(student, teacher, t), expected)
    assert soft_target_loss(teacher, teacher, t).abs() < 1e-6
    # Per-token logits: only the kept positions count.
    s, te = torch.randn(2, 4, 3), torch.randn(2, 4, 3)
    mask = torch.tensor([[True, True, False, False], [True, False, False, False]])
    torch.testing.assert_close(soft_target_loss(s, te, 1.0, mask), soft_target_loss(s[mask], te[mask], 1.0))


def noisy_rows(n: int, seed: int, flip: float) -> list[dict[str, str]]:
    rng = random.Random(seed)
    rows = sentiment_rows(n, seed=seed)
    for row in rows:
        if rng.random() < flip:
            row["label"] = LABELS[1 - LABELS.index(row["label"])]
    return rows


def test_distilled_student_beats_the_same_student_without_a_teacher(teacher_ckpt, tmp_path):
    """Labels with 35% flipped: the undistilled student learns the noise, the distilled one (alpha 1) its teacher."""
    train = write_csv(tmp_path / "noisy.csv", noisy_rows(128, seed=21, flip=0.35))
    val = write_csv(tmp_path / "val.csv", sentiment_rows(96, seed=22))
    scores = {}
    for name, callbacks in {"plain": [], "distilled": [Distillation(teacher_ckpt, temperature=2.0, alpha=1.0)]}.items():
        torch.manual_seed(1)
        student = classifier(teacher_ckpt, keep_layers=[0], lr=5e-4)
        t = trainer(tmp_path / name, max_epochs=8, callbacks=callbacks)
        t.fit(student, data(train, val))
        scores[name] = t.validate(student, data(train, val), verbose=False)[0]["val/acc"]
    assert scores["distilled"] >= 0.9, scores
    assert scores["distilled"] >= scores["plain"] + 0.1, scores


def test_teacher_stays_frozen_outside_the_optimizer_and_the_checkpoint(teacher_ckpt, text_files, tmp_path):
    distill = Distillation(teacher_ckpt, alpha=0.5)
    student = classifier(teacher_ckpt, keep_layers=[1])
    seen_modes = []

    t = trainer(tmp_path, max_steps=3, callbacks=[distill], enable_checkpointing=False)
    dm = data(text_files["train"], text_files["val"])
    original = Distillation.training_loss

    def spy(self, module, batch, loss):
        seen_modes.append(self.teacher.training)
        return original(self, module, batch, loss)

    Distillation.training_loss = spy
    try:
        t.fit(student, dm)
    finally:
        Distillation.training_loss = original
    assert seen_modes == [False, False, False]  # eval mode at every step, though Lightning sets train() each epoch
    assert "train/loss_soft" in t.callback_metrics
    optimized = {id(p) for group in t.optimizers[0].param_groups for p in group["params"]}
    assert optimized == {id(p) for p in student.parameters() if p.requires_grad}
    ckpt = tmp_path / "student.ckpt"
    t.save_checkpoint(ckpt)
    state = torch.load(ckpt, weights_only=True)["state_dict"]
    assert all(k.startswith("model.") for k in state), [k for k in state if not k.startswith("model.")]
    # 1 of the teacher's 2 blocks: the student's checkpoint is the student's.
    assert not any(".layer.1." in k for k in state)
    teacher = torch.load(teacher_ckpt, weights_only=True)["state_dict"]
    reloaded = Distillation(teacher_ckpt)
    reloaded.setup(t, student, "fit")
    for name, value in reloaded.teacher.state_dict().items():
        torch.testing.assert_close(value, teacher[name])  # the teacher did not move


def test_student_starts_from_the_teachers_kept_blocks(teacher_ckpt):
    teacher = torch.load(teacher_ckpt, weights_only=True)["state_dict"]
    student = classifier(teacher_ckpt, keep_layers=[1])
    assert student.model.config.num_hidden_layers == 1
    ours = student.model.state_dict()
    for name, value in ours.items():
        source = name.replace("encoder.layer.0.", "encoder.layer.1.")
        torch.testing.assert_close(value, teacher[f"model.{source}"])
    with pytest.raises(PtftError, match="keep_layers"):
        classifier(teacher_ckpt, keep_layers=[2])


def test_teacher_logits_are_cached_by_example_and_reused(teacher_ckpt, text_files, tmp_path):
    calls = []

    def run(name: str, epochs: int) -> Distillation:
        distill = Distillation(teacher_ckpt, cache_dir=str(tmp_path / "cache"))
        t = trainer(tmp_path / name, max_epochs=epochs, callbacks=[distill], limit_val_batches=0)
        original = distill._teacher_logits.__func__

        def counting(self, inputs):
            before = self.cache.misses
            out = original(self, inputs)
            calls.append((name, self.trainer_epoch, self.cache.misses > before))
            return out

        distill.trainer_epoch = 0
        distill._teacher_logits = counting.__get__(distill)

        class TrackEpoch(L.Callback):
            def on_train_epoch_start(self, trainer, pl_module):
                distill.trainer_epoch = trainer.current_epoch

        t.callbacks.append(TrackEpoch())
        torch.manual_seed(0)
        t.fit(classifier(teacher_ckpt, keep_layers=[0]), data(text_files["train"], text_files["val"]))
        return distill

    run("first", 2)
    first = [c for c in calls if c[0] == "first"]
    assert any(miss for _, epoch, miss in first if epoch == 0)
    assert not any(miss for _, epoch, miss in first if epoch == 1)  # the shuffled second epoch: every row cached
    assert list((tmp_path / "cache").glob("teacher-logits-*-rank0.pt"))
    run("second", 1)  # a new run: the file serves from the first step
    assert not any(miss for name, _, miss in calls if name == "second")


def test_cached_logits_equal_the_teachers(teacher_ckpt, text_files, tmp_path):
    distill = Distillation(teacher_ckpt, cache_dir=str(tmp_path / "cache"))
    student = classifier(teacher_ckpt, keep_layers=[0])
    t = trainer(tmp_path, max_steps=1)
    distill.setup(t, student, "fit")
    dm = data(text_files["train"], text_files["val"])
    dm.connect(student)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    fresh = distill._teacher_logits(batch)
    # The same rows, padded longer and in another order, hit the cache.
    order = torch.arange(len(batch["labels"])).flip(0)
    longer = {k: F.pad(v[order], (0, 5)) if v.ndim == 2 else v[order] for k, v in batch.items()}
    cached = distill._teacher_logits(longer)
    assert distill.cache.hits == len(order)
    torch.testing.assert_close(cached, fresh[order].float())


def test_hidden_states_are_matched_through_a_projection(teacher_ckpt, text_files, tmp_path, run_cli):
    distill = Distillation(teacher_ckpt, hidden_layers={"model.bert.encoder.layer.0": "model.bert.encoder.layer.1"})
    # A narrower student (hidden 16 vs the teacher's 32): the projection maps 16 -> 32.
    student = TextClassifier(model_name=teacher_ckpt, pretrained=False, num_labels=2, label_names=LABELS,
                             model_config={"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1})
    t = trainer(tmp_path, max_steps=2, callbacks=[distill], limit_val_batches=1)
    t.fit(student, data(text_files["train"], text_files["val"]))
    projection = student.training_aids["distillation"]["model/bert/encoder/layer/0"].linear
    assert (projection.in_features, projection.out_features) == (16, 32)
    assert t.callback_metrics["train/loss_hidden"] > 0
    ckpt = tmp_path / "student.ckpt"
    t.save_checkpoint(ckpt)
    # Without the callback (test, predict, export) the projection is not part of the model.
    reloaded = TextClassifier.load_from_checkpoint(ckpt)
    assert not hasattr(reloaded, "training_aids")
    with pytest.raises(PtftError, match="has no block"):
        Distillation(teacher_ckpt, hidden_layers={"model.nope": "model.bert.encoder.layer.1"}).setup(t, student, "fit")


def test_teacher_with_other_labels_is_refused(teacher_ckpt, tiny_bert):
    student = TextClassifier(model_name=tiny_bert, num_labels=2, label_names=["neg", "pos"])
    with pytest.raises(PtftError, match="same classes in the same order"):
        Distillation(teacher_ckpt).setup(trainer(Path("."), max_steps=1), student, "fit")


def test_distillation_recipe_runs(teacher_ckpt, text_files, run_recipe):
    cli = run_recipe("recipes/text/sst2-distill.yaml", [
        f"--model.init_args.model_name={teacher_ckpt}", "--model.init_args.keep_layers=[1]",
        f"--trainer.callbacks.teacher={teacher_ckpt}",
        f"--data.init_args.train_file={text_files['train']}", f"--data.init_args.val_file={text_files['val']}",
        "--data.init_args.text_column=text", "--data.init_args.batch_size=8", "--trainer.val_check_interval=2",
    ])
    distill = next(c for c in cli.trainer.callbacks if isinstance(c, Distillation))
    assert distill.teacher_spec == teacher_ckpt
    assert "train/loss_soft" in cli.trainer.callback_metrics


class SaveRankState(L.Callback):
    """Each rank's whole module state (student and projections) and teacher-cache misses per epoch."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.misses: list[int] = []

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        distill = next(c for c in trainer.callbacks if isinstance(c, Distillation))
        if distill.cache is not None:
            self.misses.append(distill.cache.misses)

    def on_train_end(self, trainer, pl_module) -> None:
        torch.save({"state": {k: v.detach().clone() for k, v in pl_module.state_dict().items()}, "misses": self.misses},
                   self.folder / f"rank{trainer.global_rank}.pt")


def test_two_processes_keep_projections_in_sync_and_share_cached_logits(teacher_ckpt, text_files, tmp_path):
    """Under DDP the projections train like the student (equal on both ranks), and each rank's cached teacher logits
    serve the other rank from the second epoch on (DistributedSampler gives it other examples)."""
    hidden = Distillation(teacher_ckpt, hidden_layers={"model.bert.encoder.layer.0": "model.bert.encoder.layer.1"})
    student = TextClassifier(model_name=teacher_ckpt, pretrained=False, num_labels=2, label_names=LABELS,
                             model_config={"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1})
    (tmp_path / "a").mkdir()
    t = trainer(tmp_path, max_steps=3, devices=2, strategy="ddp_fork", limit_val_batches=0,
                callbacks=[hidden, SaveRankState(tmp_path / "a")])
    t.fit(student, data(text_files["train"], text_files["val"]))
    ranks = [torch.load(tmp_path / "a" / f"rank{r}.pt", weights_only=True)["state"] for r in (0, 1)]
    assert any(k.startswith("training_aids.distillation.") for k in ranks[0])
    for key, value in ranks[0].items():
        torch.testing.assert_close(ranks[1][key], value, msg=key)

    (tmp_path / "b").mkdir()
    cached = Distillation(teacher_ckpt, cache_dir=str(tmp_path / "cache"))
    t = trainer(tmp_path, max_epochs=2, devices=2, strategy="ddp_fork", limit_val_batches=0,
                callbacks=[cached, SaveRankState(tmp_path / "b")])
    t.fit(classifier(teacher_ckpt, keep_layers=[0]), data(text_files["train"], text_files["val"]))
    assert sorted(p.name.rsplit("-", 1)[1] for p in (tmp_path / "cache").glob("*.pt")) == ["rank0.pt", "rank1.pt"]
    for r in (0, 1):
        first, second = torch.load(tmp_path / "b" / f"rank{r}.pt", weights_only=True)["misses"]
        assert first > 0 and second == 0, (r, first, second)


def test_vision_teacher_by_timm_name_sees_the_students_mixed_images(image_dirs, tmp_path):
    """A timm teacher built from a name; with Mixup in the student's step, the teacher gets the mixed images the
    student saw (not the batch before mixing), and CNN feature maps are matched through a 1x1 projection."""
    from ptft.vision import ImageClassificationDataModule, ImageClassifier

    dm = ImageClassificationDataModule(train=image_dirs["train"], val=image_dirs["test"], image_size=32, batch_size=6,
                                       num_workers=0)
    student = ImageClassifier(model_name="test_resnet", pretrained=False, num_labels=3,
                              label_names=["blue", "green", "red"], mixup={"mixup_alpha": 0.8, "cutmix_alpha": 0.0})
    distill = Distillation("test_resnet", teacher_kwargs={"pretrained": False}, hidden_layers={"model.layer2": "model.layer2"})
    seen = []
    t = trainer(tmp_path, max_steps=2, callbacks=[distill], limit_val_batches=0)
    original = Distillation._teacher_logits

    def spy(self, inputs):
        seen.append(inputs["pixel_values"].clone())
        return original(self, inputs)

    Distillation._teacher_logits = spy
    student_inputs = []
    handle = student.register_forward_hook(lambda m, args, out: student_inputs.append(args[0]["pixel_values"].clone()))
    try:
        t.fit(student, dm)
    finally:
        Distillation._teacher_logits = original
        handle.remove()
    assert len(seen) == 2
    for teacher_in, student_in in zip(seen, student_inputs):
        torch.testing.assert_close(teacher_in, student_in)
    assert t.callback_metrics["train/loss_hidden"] > 0
