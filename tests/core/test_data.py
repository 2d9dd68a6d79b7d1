"""The data base every modality shares: held-out split, one seed, epoch-seeded DDP order, checks at scale."""

import json
import os
import time
from pathlib import Path

import lightning as L
import pytest
import torch
from helpers import trainer
from lightning.fabric.utilities.distributed import DistributedSamplerWrapper
from torch.utils.data import DistributedSampler, random_split

from ptft.core.data import (
    DEFAULT_SEED,
    CheckCache,
    EpochSeededSampler,
    FineTuneDataModule,
    cached_checks,
    hold_out_indices,
    parallel_map,
    per_class_indices,
)
from ptft.core.errors import PtftError


class Numbers(FineTuneDataModule):
    """The smallest modality: rows are the integers ``0..size-1``; records which rank ran its check."""

    def __init__(self, size: int = 40, val: list[int] | None = None, **kwargs) -> None:
        super().__init__(batch_size=kwargs.pop("batch_size", 4), eval_batch_size=None, num_workers=0, **kwargs)
        self.size = size
        self.val = val
        self.checked_by: tuple[int, int] | None = None

    def load_split(self, split):
        return {"train": list(range(self.size)), "val": self.val}.get(split)

    def check(self, split, rows):
        rank = self.trainer.global_rank if self.trainer is not None else 0
        self.checked_by = self.on_rank_zero(lambda: (rank, os.getpid()))
        return rows

    def build(self, split, rows):
        return list(rows)


def held_out_and_order(seed=None, **kwargs):
    dm = Numbers(seed=seed, **kwargs)
    dm.setup("fit")
    return list(dm.datasets["val"]), [b.tolist() for b in dm.train_dataloader()]


def test_hold_out_is_one_seeded_random_split():
    train, val = hold_out_indices(50, 0.2, seed=3)
    parts = random_split(range(50), [40, 10], generator=torch.Generator().manual_seed(3))
    assert (train, val) == (sorted(parts[0].indices), sorted(parts[1].indices))
    assert hold_out_indices(50, 0.2, seed=4)[1] != val
    assert len(hold_out_indices(7, 0.01, seed=0)[1]) == 1  # at least one validation row
    with pytest.raises(PtftError, match="val_fraction=0.5 of 1 training row"):
        hold_out_indices(1, 0.5, seed=0)
    with pytest.raises(PtftError, match="val_fraction must be between 0 and 1"):
        hold_out_indices(10, 1.0, seed=0)


def test_setup_builds_the_splits_a_stage_needs():
    dm = Numbers(size=10, val=[100, 101])
    dm.setup("validate")
    assert set(dm.datasets) == {"val"} and dm.datasets["val"] == [100, 101]
    dm.setup("fit")
    assert dm.datasets["train"] == list(range(10))  # a given val split: training keeps every row
    with pytest.raises(PtftError, match=r"testing needs test data: set data.init_args.test$"):
        dm.setup("test")
    with pytest.raises(PtftError, match=r"no predict dataset; call setup\('predict'\) first"):
        dm.predict_dataloader()
    held = Numbers(size=10, val_fraction=0.3)
    held.setup("fit")
    assert sorted(held.datasets["train"] + held.datasets["val"]) == list(range(10)) and len(held.datasets["val"]) == 3


def test_seed_everything_drives_the_data_unless_the_data_seed_is_set(monkeypatch):
    monkeypatch.delenv("PL_GLOBAL_SEED", raising=False)
    assert held_out_and_order() == held_out_and_order(seed=DEFAULT_SEED)  # nothing set: the documented default
    L.seed_everything(1, verbose=False)
    first = held_out_and_order()
    assert held_out_and_order() == first
    L.seed_everything(2, verbose=False)
    second = held_out_and_order()
    assert second[0] != first[0] and second[1] != first[1]  # another hold-out and another order
    assert held_out_and_order(seed=7) != second
    explicit = held_out_and_order(seed=7)
    L.seed_everything(1, verbose=False)
    assert held_out_and_order(seed=7) == explicit  # an explicit data seed wins over seed_everything


def test_image_module_holds_out_by_seed_everything(image_dirs, monkeypatch, tmp_path):
    from ptft.vision import ImageClassificationDataModule

    monkeypatch.delenv("PL_GLOBAL_SEED", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))

    def val_files():
        dm = ImageClassificationDataModule(train=image_dirs["train"], image_size=32, num_workers=0)
        dm.setup("validate")
        return [str(s.root) for s in dm.datasets["val"].images]

    L.seed_everything(1, verbose=False)
    one = val_files()
    L.seed_everything(2, verbose=False)
    assert val_files() != one
    L.seed_everything(1, verbose=False)
    assert val_files() == one


class Classes(Numbers):
    """Numbers whose class is ``row % 3``, except that class 2 has only ``rare`` rows (the first ones)."""

    def __init__(self, rare: int = 100, **kwargs) -> None:
        super().__init__(**kwargs)
        self.rare = rare

    def load_split(self, split):
        rows = super().load_split(split)
        if split == "train":
            rows = [r for r in rows if r % 3 != 2 or r // 3 < self.rare]
        return rows

    def label_ids(self, rows):
        return [r % 3 for r in rows]


def few_shot(k, seed=0, **kwargs):
    dm = Classes(size=90, train_per_class=k, seed=seed, **kwargs)
    dm.setup("fit")
    return dm.datasets["train"], dm.datasets["val"]


def test_train_per_class_is_a_seeded_stratified_subset_drawn_after_the_held_out_split():
    train, val = few_shot(4)
    assert sorted(r % 3 for r in train) == [0] * 4 + [1] * 4 + [2] * 4
    everything_train, everything_val = few_shot(None)
    assert val == everything_val  # the held-out split does not depend on k...
    assert set(train) <= set(everything_train) and train == sorted(train)  # ...and k-shot rows come from the rest
    assert few_shot(4) == (train, val)  # same seed, same subset (every rank resolves the same seed)
    assert few_shot(4, seed=1)[0] != train  # another seed, another subset
    assert set(few_shot(2)[0]) <= set(train)  # one permutation for every k: subsets grow with k
    given, _ = few_shot(4, val=[1000])  # a given validation split: drawn from every training row
    assert len(given) == 12 and set(given) != set(train)


def test_per_class_indices_error_names_the_short_class():
    with pytest.raises(PtftError, match=r"^train_per_class=5, but class 'c' has only 4 training row\(s\): lower"):
        per_class_indices([0] * 9 + [1] * 9 + [2] * 4, 5, seed=0, label_names=["a", "b", "c"])
    with pytest.raises(PtftError, match="class 'c' has only 0"):  # a class with no row at all
        per_class_indices([0, 1] * 5, 2, seed=0, label_names=["a", "b", "c"])
    with pytest.raises(PtftError, match="train_per_class must be at least 1"):
        Classes(train_per_class=0)
    with pytest.raises(PtftError, match=r"class 2 has only \d training row\(s\) after holding out validation"):
        few_shot(4, rare=3)
    with pytest.raises(PtftError, match="Numbers has no classes"):
        dm = Numbers(train_per_class=2)
        dm.setup("fit")


def test_sampler_shards_and_pads_like_distributed_sampler():
    samplers = [EpochSeededSampler(10, seed=0, num_replicas=3, rank=r) for r in range(3)]
    reference = [DistributedSampler(range(10), num_replicas=3, rank=r, seed=0) for r in range(3)]
    for s in samplers:
        s.set_epoch(1)
    shards = [list(s) for s in samplers]
    assert [len(s) for s in samplers] == [len(r) for r in reference] == [4, 4, 4]
    order = torch.randperm(10, generator=torch.Generator().manual_seed(1)).tolist()
    padded = order + order[:2]
    assert shards == [padded[r::3] for r in range(3)]


class RecordOrder(L.LightningModule):
    """Writes, per rank, the training indices of every epoch and who ran the data check."""

    def __init__(self, folder: str) -> None:
        super().__init__()
        self.folder = folder
        self.layer = torch.nn.Linear(1, 1)
        self.seen: dict[int, list[int]] = {}

    def training_step(self, batch, batch_idx):
        self.seen.setdefault(self.current_epoch, []).extend(batch.tolist())
        return self.layer(batch.float()[:, None]).sum() * 0.0

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)

    def on_train_end(self) -> None:
        record = {"seen": self.seen, "checked_by": self.trainer.datamodule.checked_by, "pid": os.getpid()}
        (Path(self.folder) / f"rank{self.global_rank}.json").write_text(json.dumps(record))


class Lightning260Wrapper(L.Callback):
    """Lightning 2.6.0's DistributedSamplerWrapper: set_epoch stopped at the wrapper (pytorch-lightning#21454)."""

    def setup(self, trainer, pl_module, stage):
        self.forwarding = DistributedSamplerWrapper.set_epoch
        DistributedSamplerWrapper.set_epoch = DistributedSampler.set_epoch

    def teardown(self, trainer, pl_module, stage):
        DistributedSamplerWrapper.set_epoch = self.forwarding


def test_ddp_training_order_is_new_every_epoch_and_sharded(tmp_path):
    """2 processes (gloo), 3 epochs, even with Lightning 2.6.0's wrapper: each rank reads its shard of the data
    seed's permutation for that epoch (not a reshuffle of it by Lightning's wrapper, which would also scatter
    length-grouped batches), so the order changes every epoch and the ranks' indices are disjoint and cover the data;
    the data check ran on rank 0 only and every rank got its result."""
    data = Numbers(size=16, val=[0], seed=5)
    run = trainer(tmp_path, devices=2, strategy="ddp_spawn", max_epochs=3, callbacks=[Lightning260Wrapper()])
    run.fit(RecordOrder(str(tmp_path)), data)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    for e in range(3):
        permutation = torch.randperm(16, generator=torch.Generator().manual_seed(5 + e)).tolist()
        assert [rank["seen"][str(e)] for rank in ranks] == [permutation[0::2], permutation[1::2]]
    for rank in ranks:
        assert len({tuple(rank["seen"][str(e)]) for e in range(3)}) == 3  # a new order every epoch
    assert ranks[0]["checked_by"] == ranks[1]["checked_by"] == [0, ranks[0]["pid"]]


def test_length_groups_survive_sharding():
    """Each rank's batches hold rows of similar length (Hugging Face's grouping over the global batch)."""
    lengths = torch.randint(1, 500, (800,), generator=torch.Generator().manual_seed(0)).tolist()
    for rank in (0, 1):
        order = list(EpochSeededSampler(800, seed=1, lengths=lengths, batch_size=8, num_replicas=2, rank=rank))
        spread = [max(lengths[i] for i in order[b : b + 8]) - min(lengths[i] for i in order[b : b + 8])
                  for b in range(0, 400, 8)]
        assert sum(spread) / len(spread) < 80  # about 44; shuffled batches of 8: about 390


# --- checks at scale --------------------------------------------------------------------------------------------
def pids(items):
    time.sleep(0.2)  # long enough that every worker takes a chunk
    return [os.getpid() for _ in items]


def squares(items):
    return [i * i for i in items]


def test_parallel_map_keeps_order_across_worker_processes():
    if len(os.sched_getaffinity(0)) < 2:
        pytest.skip("needs 2 CPUs")
    assert parallel_map(squares, range(20), chunk_size=3) == [i * i for i in range(20)]
    assert len(set(parallel_map(pids, range(20), chunk_size=2)) - {os.getpid()}) >= 2


def test_cached_checks_probe_only_new_or_changed_keys(tmp_path):
    cache = CheckCache(tmp_path / "c.sqlite")
    probed = []

    def probe(items):
        probed.extend(items)
        return [f"result of {i}" for i in items]

    stamps = [("a", "1"), ("b", "1"), None]
    assert cached_checks(["A", "B", "C"], stamps, probe, cache) == ["result of A", "result of B", "result of C"]
    probed.clear()
    assert cached_checks(["A", "B", "C"], [("a", "1"), ("b", "2"), None], probe, cache)[1] == "result of B"
    assert probed == ["B", "C"]  # b's stamp changed; an unstamped item is never cached


@pytest.fixture
def counted_probes(tmp_path, monkeypatch):
    """Images probed (opened and verified) by ptft.vision.data, with the cache in a temporary folder."""
    from ptft.vision import data

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    probed: list = []
    real = data.probe_images

    def probe(images):
        probed.extend(images)
        return real(images)

    monkeypatch.setattr(data, "probe_images", probe)
    return probed


def test_image_check_is_cached_and_sees_changed_files(image_dirs, counted_probes):
    from ptft.vision.data import ImageSource, image_sizes

    files = sorted(Path(image_dirs["test"]).rglob("*.png"))
    images = [ImageSource(p) for p in files]
    assert image_sizes(images) == [(24, 24)] * 12 and len(counted_probes) == 12
    counted_probes.clear()
    assert image_sizes(images) == [(24, 24)] * 12 and counted_probes == []  # cached
    files[3].write_bytes(b"not an image any more")  # new size and modification time
    stat = files[5].stat()
    from PIL import Image

    Image.new("RGB", (24, 24)).save(files[5])
    os.utime(files[5], ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    sizes = image_sizes(images)
    assert [i.root for i in counted_probes] == [files[3], files[5]]
    assert sizes[3].startswith("cannot be read (UnidentifiedImageError") and sizes[5] == (24, 24)


def test_rewritten_archive_is_checked_again(image_dirs, counted_probes, tmp_path):
    import zipfile

    from ptft.vision.data import ImageSource, image_sizes

    files = sorted(Path(image_dirs["test"]).rglob("*.png"))
    archive = tmp_path / "images.zip"

    def write(broken: bool) -> list:
        with zipfile.ZipFile(archive, "w") as zf:
            for i, p in enumerate(files):
                zf.writestr(p.name if i else "first.png", b"broken" if broken and i == 0 else p.read_bytes())
        return [ImageSource(Path(n), archive=archive) for n in zipfile.ZipFile(archive).namelist()]

    images = write(broken=False)
    assert image_sizes(images)[0] == (24, 24)
    images = write(broken=True)
    counted_probes.clear()
    assert isinstance(image_sizes(images)[0], str) and len(counted_probes) == len(files)


def test_corrupt_image_stops_with_one_line(image_dirs, counted_probes):
    from ptft.vision import ImageClassificationDataModule

    (Path(image_dirs["train"]) / "red" / "broken.png").write_bytes(b"not an image")
    dm = ImageClassificationDataModule(train=image_dirs["train"], val=image_dirs["test"], image_size=32,
                                       num_workers=0)
    for _ in range(2):  # the second time from the cache: the same error
        with pytest.raises(PtftError) as err:
            dm._rows.clear()
            dm.setup("fit")
        message = str(err.value)
        assert "\n" not in message and message.startswith("1 unreadable image(s) in train, first: ")
        assert "broken.png (cannot be read (UnidentifiedImageError" in message and "on_bad_image=skip" in message
