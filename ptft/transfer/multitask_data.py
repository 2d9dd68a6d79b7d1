"""Several tasks' data at once: one existing ptft data module per task, batches tagged with their task.

Each task keeps its own data module (reading, tokenising, augmentation, checks, held-out split, batch size);
:class:`MultiTaskDataModule` only decides which task's batches a training step gets:

* ``round_robin`` -- one batch of every task per step (Lightning's ``CombinedLoader`` in ``max_size_cycle`` mode:
  an epoch ends with the longest task, shorter ones start over);
* ``min_size`` -- one batch of every task per step, the epoch ends with the shortest task;
* ``sequential`` -- every batch of the first task, then of the next (one task per step);
* ``proportional`` / ``temperature`` -- each step draws one task with probability ``p_i ∝ n_i ** (1 / T)``
  (``n_i`` training examples; ``proportional`` is ``T = 1``, a large ``T`` approaches uniform: the sampling of
  multilingual and multi-task models such as mT5 and MT-DNN, which keeps small tasks from being drowned out).

A training batch is ``{task: batch}`` (one key per task of the step); validation and test run every task's own
loader, one after the other (``dataloader_idx`` ``i`` is task :attr:`MultiTaskDataModule.eval_tasks` ``[stage][i]``).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any, Literal

import torch
from lightning.fabric.utilities.data import _set_sampler_epoch
from lightning.pytorch.utilities import CombinedLoader

from ptft.core.data import FineTuneDataModule
from ptft.core.errors import PtftError

Sampling = Literal["round_robin", "min_size", "sequential", "proportional", "temperature"]
SAMPLINGS = ("round_robin", "min_size", "sequential", "proportional", "temperature")
#: The samplings that give a step one task's batch: the other heads get no gradient on that step.
ONE_TASK_PER_STEP = ("sequential", "proportional", "temperature")


def task_probabilities(sizes: dict[str, int], temperature: float) -> dict[str, float]:
    """``p_i = n_i ** (1 / T) / sum_j n_j ** (1 / T)`` for each task's training-set size ``n_i``."""
    if temperature <= 0:
        raise PtftError(f"temperature must be > 0 (1: proportional to the data, large: uniform), got {temperature}")
    # In log space: sizes of millions with T < 1 would overflow a float power.
    logs = {name: math.log(max(n, 1)) / temperature for name, n in sizes.items()}
    top = max(logs.values())
    weights = {name: math.exp(v - top) for name, v in logs.items()}
    total = sum(weights.values())
    return {name: w / total for name, w in weights.items()}


class TaskSampler:
    """An iterable of ``{task: batch}``, one task per step, for the one-task-per-step samplings.

    The task order of an epoch is drawn from ``seed + epoch`` alone, so every DDP process draws the same task at every
    step (each process reads its own shard of that task's batches) and a rerun draws the same tasks. A task whose
    batches run out within an epoch starts over (in the same order). Lightning calls :meth:`set_epoch` through
    :attr:`sampler`, as it does for a ``DataLoader``'s sampler, and it reaches every task loader's sampler.

    Args:
        loaders: Each task's training loader.
        sampling: ``sequential``, ``proportional`` or ``temperature``.
        sizes: Training examples of each task (the ``n_i`` of the draw).
        temperature: ``T`` of ``temperature`` sampling.
        seed: Seed of the draw.
        steps: Steps per epoch; ``None``: the tasks' batches added up (one pass over each task's data on average
            under ``proportional`` sampling with equal batch sizes).
    """

    def __init__(self, loaders: dict[str, Any], sampling: str, sizes: dict[str, int], temperature: float, seed: int,
                 steps: int | None = None) -> None:
        self.loaders = loaders
        self.sampling = sampling
        self.seed = seed
        self.epoch = 0
        self.steps = steps if steps is not None else sum(len(loader) for loader in loaders.values())
        t = 1.0 if sampling == "proportional" else temperature
        self.probabilities = task_probabilities(sizes, t) if sampling != "sequential" else None

    @property
    def sampler(self) -> TaskSampler:
        """Itself: Lightning calls ``set_epoch`` on a loader's ``sampler`` before each training epoch."""
        return self

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        for loader in self.loaders.values():
            _set_sampler_epoch(loader, epoch)

    def __len__(self) -> int:
        return self.steps

    def order(self) -> list[str]:
        """The task of every step of the current epoch."""
        names = list(self.loaders)
        if self.probabilities is None:  # sequential: each task's batches once, in the given task order
            return [name for name in names for _ in range(len(self.loaders[name]))][: self.steps]
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        weights = torch.tensor([self.probabilities[n] for n in names], dtype=torch.float64)
        drawn = torch.multinomial(weights, self.steps, replacement=True, generator=generator)
        return [names[i] for i in drawn.tolist()]

    def __iter__(self) -> Iterator[dict[str, Any]]:
        iterators: dict[str, Iterator[Any]] = {}
        for name in self.order():
            if name not in iterators:
                iterators[name] = iter(self.loaders[name])
            try:
                batch = next(iterators[name])
            except StopIteration:
                iterators[name] = iter(self.loaders[name])
                batch = next(iterators[name])
            yield {name: batch}


class MultiTaskDataModule(FineTuneDataModule):
    """One ptft data module per task, for :class:`ptft.transfer.MultiTaskModule`: batches tagged with their task.

    In YAML, ``tasks`` maps each task's name to a data module (``class_path`` / ``init_args``), with the same names
    as the model's ``tasks``; command-line overrides reach into it (``--data.init_args.tasks.ner.init_args.batch_size=16``).
    Each task's label names are linked into the model (``label_names``: one list per task).

    Args:
        tasks: Each task's data module by task name (text classification, token classification, image
            classification…); each keeps its own files, batch size, tokenising, augmentation and checks.
        sampling: Which tasks a training step sees: ``round_robin`` (a batch of every task, shorter tasks cycle),
            ``min_size`` (a batch of every task, the epoch ends with the shortest), ``sequential`` (all of one task,
            then the next), ``proportional`` (one task per step, drawn in proportion to its training examples) or
            ``temperature`` (one task per step, ``p_i ∝ n_i ** (1 / temperature)``). The one-task samplings need
            ``strategy: ddp_find_unused_parameters_true`` under DDP (the other heads get no gradient that step).
        temperature: ``T`` of ``temperature`` sampling: 1 is ``proportional``, larger flattens towards uniform (2-5
            is usual; mT5 used 3.33).
        steps_per_epoch: Training steps per epoch of the one-task samplings; ``None`` adds up the tasks' batches.
        seed: Seed of the task draw; by default the one of ``seed_everything``. Each task's data module has its own
            ``seed`` for its held-out split and batch order.
    """

    def __init__(
        self,
        tasks: dict[str, FineTuneDataModule],
        sampling: Sampling = "round_robin",
        temperature: float = 2.0,
        steps_per_epoch: int | None = None,
        seed: int | None = None,
    ) -> None:
        # batch_size 0: every task's data module has its own batch size
        super().__init__(batch_size=0, eval_batch_size=None, num_workers=0, seed=seed)
        if not tasks:
            raise PtftError("give at least one task: data.init_args.tasks={name: {class_path: ..., init_args: ...}}")
        if sampling not in SAMPLINGS:
            raise PtftError(f"sampling must be one of {list(SAMPLINGS)}, got {sampling!r}")
        if temperature <= 0:
            raise PtftError(f"temperature must be > 0, got {temperature}")
        if steps_per_epoch is not None and steps_per_epoch < 1:
            raise PtftError(f"steps_per_epoch must be at least 1, got {steps_per_epoch}")
        bad = [name for name, data in tasks.items() if not isinstance(data, FineTuneDataModule)]
        if bad:
            raise PtftError(f"task {bad[0]!r} is a {type(tasks[bad[0]]).__name__}, not a ptft data module")
        self.tasks = dict(tasks)
        self.sampling = sampling
        self.temperature = temperature
        self.steps_per_epoch = steps_per_epoch
        #: Task of each evaluation loader, by stage (``val``, ``test``): the module maps ``dataloader_idx`` with it.
        self.eval_tasks: dict[str, list[str]] = {}

    @property
    def task_names(self) -> list[str]:
        return list(self.tasks)

    @property
    def label_names(self) -> dict[str, list[str]]:
        """Label names of every task that has them (linked into the model by the CLI)."""
        return {name: list(data.label_names) for name, data in self.tasks.items() if hasattr(data, "label_names")}

    def connect(self, model: Any) -> None:
        expected = getattr(model, "task_names", None)
        if expected is not None and set(expected) != set(self.tasks):
            raise PtftError(f"the data's tasks {sorted(self.tasks)} differ from the model's {sorted(expected)}: "
                            "give data.init_args.tasks and model.init_args.tasks the same names")
        check = getattr(model, "check_task_data", None)
        for name, data in self.tasks.items():
            if check is not None:
                check(name, data)
            data.connect(model)

    # --- Lightning hooks --------------------------------------------------------------------------------------
    def prepare_data(self) -> None:
        for data in self.tasks.values():
            data.prepare_data()

    def setup(self, stage: str) -> None:
        if stage == "predict":
            raise PtftError("predict one task at a time: `ptft export` the multi-task checkpoint, then predict with "
                            "the task's folder (ptft.transfer.load_task_module)")
        for name, data in self._stage_tasks(stage).items():
            data.trainer = self.trainer  # the task loaders shard by the trainer's processes (EpochSeededSampler)
            data.setup(stage)

    def teardown(self, stage: str) -> None:
        for data in self.tasks.values():
            data.teardown(stage)

    def _stage_tasks(self, stage: str) -> dict[str, FineTuneDataModule]:
        """The tasks a stage runs: all of them, but testing only those given test data."""
        if stage != "test":
            return self.tasks
        tested = {name: data for name, data in self.tasks.items() if data.rows("test") is not None}
        if not tested:
            raise PtftError("testing needs test data: set data.init_args.tasks.<task>.init_args.test_file (or test) "
                            "for at least one task")
        return tested

    # --- loaders ----------------------------------------------------------------------------------------------
    def train_dataloader(self) -> Any:
        loaders = {name: data.train_dataloader() for name, data in self.tasks.items()}
        if self.sampling in ("round_robin", "min_size"):
            return CombinedLoader(loaders, mode="max_size_cycle" if self.sampling == "round_robin" else "min_size")
        sizes = {name: len(loader.dataset) for name, loader in loaders.items()}
        return TaskSampler(loaders, self.sampling, sizes, self.temperature, self.seed, self.steps_per_epoch)

    def _eval_loaders(self, stage: str) -> list[Any]:
        tasks = self._stage_tasks(stage)
        self.eval_tasks[stage] = list(tasks)
        return [getattr(data, f"{stage}_dataloader")() for data in tasks.values()]

    def val_dataloader(self) -> list[Any]:
        return self._eval_loaders("val")

    def test_dataloader(self) -> list[Any]:
        return self._eval_loaders("test")

    def predict_dataloader(self) -> Any:
        raise PtftError("predict one task at a time (ptft.transfer.load_task_module on an exported folder)")
