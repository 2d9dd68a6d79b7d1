"""Video classification data: class folders of video files or frame folders, or CSV files of ``path,label``.

Splits, the held-out validation split, the seed, checks and loaders come from :mod:`ptft.core.data`; this module adds
listing, frame sampling and the clip transform. One random crop / flip is drawn per clip and applied to all its
frames (torchvision's v2 transforms treat the frames of one call as one batch): a crop that jumped between frames
would be motion the model learns.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import lightning as L
import torch
from torch.utils.data import Dataset

from ptft.core.data import ClassificationDataModule
from ptft.core.errors import PtftError
from ptft.core.files import FileSource, _read_csv, describe, drop_unreadable
from ptft.core.labels import encode_labels, split_label_names
from ptft.video.io import VIDEO_SUFFIXES, Sampling, is_frame_folder, read_frames, sample_indices, video_info

#: One clip: its file or frame folder, its label (``None`` to predict) and, once checked, its frame count.
Row = tuple[FileSource, str | None]


def _clip_entries(folder: Path) -> list[Path]:
    """The clips directly inside ``folder``: video files and frame folders."""
    return [p for p in sorted(folder.iterdir()) if (p.is_file() and p.suffix.lower() in VIDEO_SUFFIXES) or p.is_dir()]


def list_labelled_clips(location: str, arg: str, path_column: str, label_column: str) -> list[Row]:
    """``(clip, label)`` from a class-folder tree (``root/<label>/<video file or frame folder>``) or a CSV of paths
    (relative to the CSV) and labels."""
    if location.lower().endswith(".csv"):
        csv_path, rows = _read_csv(location, arg, [path_column, label_column],
                                   "; set data.init_args.path_column / label_column")
        clips = [(FileSource(csv_path.parent / row[path_column]), row[label_column]) for row in rows]
    else:
        root = Path(location).expanduser()
        if not root.is_dir():
            raise PtftError(f"{arg}: {location!r} is not a folder of class folders nor a .csv file (zip archives of "
                            "videos: extract them first)" if root.exists() else f"{arg}: {location!r} does not exist")
        clips = [(FileSource(p), label.name) for label in sorted(root.iterdir()) if label.is_dir()
                 for p in _clip_entries(label)]
    if not clips:
        raise PtftError(f"{arg}: no clips under {location!r} (expected <root>/<class>/<video file or frame folder>, "
                        f"videos ending in {', '.join(sorted(VIDEO_SUFFIXES))})")
    return clips


def list_clips(location: str, arg: str, path_column: str) -> list[FileSource]:
    """Every video file and frame folder under a folder, at any depth, or the clips a CSV lists."""
    if location.lower().endswith(".csv"):
        csv_path, rows = _read_csv(location, arg, [path_column])
        clips = [FileSource(csv_path.parent / row[path_column]) for row in rows]
    else:
        root = Path(location).expanduser()
        if not root.is_dir():
            raise PtftError(f"{arg}: {location!r} is not a folder of clips nor a .csv file")
        clips = [FileSource(p) for p in sorted(root.rglob("*"))
                 if (p.is_file() and p.suffix.lower() in VIDEO_SUFFIXES) or is_frame_folder(p)]
    if not clips:
        raise PtftError(f"{arg}: no clips (video files or frame folders) under {location!r}")
    return clips


def clip_transform(data_config: dict[str, Any], image_size: int | None, training: bool, scale: tuple[float, float],
                   hflip: float) -> Any:
    """uint8 frames ``(T, 3, H, W)`` -> normalised float frames at the model's input size; one random resized crop
    and flip per clip in training, resize + centre crop (timm's ``crop_pct``) otherwise."""
    from torchvision.transforms import v2

    size = image_size or data_config["input_size"][-1]
    steps: list[Any]
    if training:
        steps = [v2.RandomResizedCrop(size, scale=tuple(scale), antialias=True)]
        if hflip > 0:
            steps.append(v2.RandomHorizontalFlip(hflip))
    else:
        steps = [v2.Resize(int(size / data_config.get("crop_pct", 0.875)), antialias=True), v2.CenterCrop(size)]
    steps += [v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(data_config["mean"]), list(data_config["std"]))]
    return v2.Compose(steps)


class VideoDataset(Dataset):
    """Clips decoded on access: ``num_frames`` frames sampled, transformed together -> ``(T, 3, H, W)``."""

    def __init__(self, clips: list[FileSource], frames: list[int], labels: list[int] | None, num_frames: int,
                 sampling: Sampling, stride: int, training: bool, transform: Any) -> None:
        self.clips = clips
        self.frames = frames
        self.labels = labels
        self.num_frames = num_frames
        self.sampling = sampling
        self.stride = stride
        self.training = training
        self.transform = transform

    def __len__(self) -> int:
        return len(self.clips)

    def item_names(self) -> list[str]:
        """Each clip as given (the ``file`` column of predictions)."""
        return [describe(clip) for clip in self.clips]

    def __getitem__(self, index: int) -> dict[str, Any]:
        indices = sample_indices(self.frames[index], self.num_frames, self.sampling, self.stride, self.training)
        item: dict[str, Any] = {"pixel_values": self.transform(read_frames(self.clips[index], indices))}
        if self.labels is not None:
            item["labels"] = self.labels[index]
        return item


class VideoClassificationDataModule(ClassificationDataModule):
    """Video classification data: video files (decoded with PyAV) or folders of frame images.

    Each split is a class-folder tree (``root/<label>/<clip>``, a clip being a video file or a folder of frame
    images) or a CSV of clip paths (relative to the CSV) and labels; ``predict`` is a folder of clips at any depth
    or a CSV. ``num_frames`` frames are sampled per clip (``sampling``): ``segments`` takes one from each of
    ``num_frames`` equal parts (random within each part in training, the middle otherwise: TSN), ``clip`` takes
    consecutive frames ``frame_stride`` apart (VideoMAE). The model's own frame count and preprocessing are used
    when it has them (``num_frames``, input size, mean, std). Every clip is opened before training (rank 0, in
    parallel; video files cached by size and modification time): unreadable files, empty frame folders and frames of
    mixed sizes follow ``on_bad_video``.

    Args:
        train: Training clips.
        val: Validation clips; held out from ``train`` when missing.
        test: Test clips (``ptft test``).
        predict: Clips to classify.
        labels: Class names in id order; discovered (sorted folder names / CSV labels) when not given.
        path_column: CSV column with clip paths.
        label_column: CSV column with labels.
        num_frames: Frames per clip; ``None`` takes the model's (a transformers video model's ``num_frames``, else 8).
        sampling: ``segments`` (cover the whole clip) or ``clip`` (consecutive frames ``frame_stride`` apart).
        frame_stride: Step between the frames of a ``clip``.
        image_size: Frame size (square) overriding the model's input size.
        scale: Random-resized-crop area range in training.
        hflip: Probability of a horizontal flip of a training clip (0 when left / right motion is the label).
        on_bad_video: ``error`` (stop, naming the first bad clip) or ``skip`` (drop them, warn).
        batch_size: Training batch size per process.
        eval_batch_size: Validation / test / predict batch size; defaults to ``batch_size``.
        val_fraction: Fraction of training clips held out for validation when ``val`` is missing.
        seed: Seed of the held-out split and of the batch order; by default the one of ``seed_everything``.
        num_workers: DataLoader worker processes decoding clips.
    """

    def __init__(
        self,
        train: str | None = None,
        val: str | None = None,
        test: str | None = None,
        predict: str | None = None,
        labels: list[str] | None = None,
        path_column: str = "path",
        label_column: str = "label",
        num_frames: int | None = None,
        sampling: Sampling = "segments",
        frame_stride: int = 4,
        image_size: int | None = None,
        scale: tuple[float, float] = (0.5, 1.0),
        hflip: float = 0.5,
        on_bad_video: Literal["error", "skip"] = "error",
        batch_size: int = 8,
        eval_batch_size: int | None = None,
        val_fraction: float = 0.1,
        seed: int | None = None,
        num_workers: int = 2,
    ) -> None:
        super().__init__(batch_size, eval_batch_size, num_workers, labels, seed, val_fraction)
        self.save_hyperparameters(logger=False)
        if train is None and test is None and predict is None:
            raise PtftError("give train (and optionally val / test) clips, or clips to predict")
        if sampling not in ("segments", "clip"):
            raise PtftError(f"sampling must be 'segments' or 'clip', got {sampling!r}")
        if num_frames is not None and num_frames < 1 or frame_stride < 1:
            raise PtftError(f"num_frames and frame_stride must be >= 1, got {num_frames} and {frame_stride}")
        self.columns = (path_column, label_column)
        self.clips = {split: None if loc is None else list_labelled_clips(loc, split, *self.columns)
                      for split, loc in (("train", train), ("val", val), ("test", test))}
        self.predict_location = predict
        self.given_frames = num_frames
        self.sampling = sampling
        self.frame_stride = frame_stride
        self.image_size = image_size
        self.scale = tuple(scale)
        self.hflip = hflip
        self.on_bad_video = on_bad_video
        self.model_frames: int | None = None
        self.model_data_config: dict[str, Any] | None = None
        self.frame_counts: dict[str, int] = {}

    @property
    def num_frames(self) -> int:
        """Frames per clip: the given value, else the model's, else 8."""
        return self.given_frames or self.model_frames or 8

    def discover_labels(self) -> list[str]:
        """Sorted training labels (or the given ``labels``); validation and test labels must be among them."""
        labels = {split: None if clips is None else [label for _, label in clips] for split, clips in self.clips.items()}
        return split_label_names(labels, self.given_labels, "clips")

    def connect(self, model: L.LightningModule) -> None:
        if not hasattr(model, "data_config"):
            raise PtftError(f"VideoClassificationDataModule feeds a video model (ptft.video.VideoClassifier, "
                            f"HFVideoClassifier), not {type(model).__name__}")
        self.model_data_config = model.data_config()
        self.model_frames = getattr(model, "num_frames", None)
        if self.given_frames and self.model_frames and self.given_frames != self.model_frames:
            raise PtftError(f"num_frames={self.given_frames} but the model takes clips of {self.model_frames} frames: "
                            "drop data.init_args.num_frames")

    # --- the base's hooks ---------------------------------------------------------------------------------------
    def load_split(self, split: str) -> list[Row] | None:
        if split == "predict":
            if self.predict_location is None:
                return None
            return [(clip, None) for clip in list_clips(self.predict_location, "predict", self.columns[0])]
        return self.clips[split]

    def check(self, split: str, rows: list[Row]) -> list[Row]:
        clips = [clip for clip, _ in rows]
        infos = self.on_rank_zero(lambda: video_info(clips))
        problems = [(i, info) for i, info in enumerate(infos) if isinstance(info, str)]
        for clip, info in zip(clips, infos):
            if not isinstance(info, str):
                self.frame_counts[describe(clip)] = int(info[0])
        return drop_unreadable(rows, problems, lambda i: describe(clips[i]), split, self.on_bad_video, "video",
                               "on_bad_video")

    def build(self, split: str, rows: list[Row]) -> VideoDataset:
        if self.model_data_config is None:
            raise PtftError("VideoClassificationDataModule is not connected to a model: call connect(model) first")
        labels = None if split == "predict" else encode_labels([label for _, label in rows], self.label_names, split)
        clips = [clip for clip, _ in rows]
        training = split == "train"
        transform = clip_transform(self.model_data_config, self.image_size, training, self.scale, self.hflip)
        return VideoDataset(clips, [self.frame_counts[describe(c)] for c in clips], labels, self.num_frames,
                            self.sampling, self.frame_stride, training, transform)
