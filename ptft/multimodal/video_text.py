"""Clip-caption pairs for video-text contrastive training: the image-text data module with clips instead of images.

Listing, checks, frame sampling and the clip transform come from :mod:`ptft.video`; captions, class names and
batching from :class:`ptft.multimodal.ImageTextDataModule`. The dual encoder embeds a clip as the mean of its frames'
image embeddings (CLIP4Clip's mean pooling), so any image-text model becomes a video-text one.
"""

from __future__ import annotations

from typing import Literal

from torch.utils.data import Dataset

from ptft.core.errors import PtftError
from ptft.core.files import FileSource, describe, drop_unreadable
from ptft.multimodal.data import ImageTextDataModule, Row, _csv_pairs
from ptft.video.data import VideoDataset, clip_transform, list_clips, list_labelled_clips
from ptft.video.io import Sampling, video_info


class VideoTextDataModule(ImageTextDataModule):
    """Clip-caption pairs for :class:`ptft.multimodal.DualEncoder`: video files (PyAV) or frame folders.

    Each split is a CSV of clip paths (relative to the CSV: video files or frame folders) and captions, or a
    class-folder tree (``root/<class>/<clip>``) captioned with ``caption_template``, whose class names become the
    zero-shot classes. ``predict`` is a folder of clips (any depth) or a CSV. ``num_frames`` frames per clip
    (``sampling`` as in :class:`ptft.video.VideoClassificationDataModule`), one crop and flip per clip.

    Args:
        train: Training pairs.
        val: Validation pairs; held out from ``train`` when missing.
        test: Test pairs (``ptft test``).
        predict: Clips to classify zero-shot.
        path_column: CSV column with clip paths.
        caption_column: CSV column with captions.
        caption_template: The caption of a clip in a class folder, ``{}`` standing for the class name.
        class_names: Class names (zero-shot classes) in id order; discovered from the training folders when not given.
        max_length: Longest caption in tokens.
        num_frames: Frames per clip.
        sampling: ``segments`` (one frame from each of ``num_frames`` equal parts) or ``clip`` (consecutive frames
            ``frame_stride`` apart).
        frame_stride: Step between the frames of a ``clip``.
        image_size: Frame size (square) overriding the image tower's input size.
        hflip: Probability of a horizontal flip of a training clip.
        scale: Random-resized-crop area range in training.
        on_bad_video: ``error`` (stop, naming the first bad clip) or ``skip``.
        batch_size: Training batch size per process.
        eval_batch_size: Validation / test / predict batch size; defaults to ``batch_size``.
        val_fraction: Fraction of training pairs held out for validation when ``val`` is missing.
        seed: Seed of the held-out split and of the batch order; by default the one of ``seed_everything``.
        num_workers: DataLoader worker processes.
    """

    def __init__(
        self,
        train: str | None = None,
        val: str | None = None,
        test: str | None = None,
        predict: str | None = None,
        path_column: str = "path",
        caption_column: str = "caption",
        caption_template: str = "a video of {}.",
        class_names: list[str] | None = None,
        max_length: int = 64,
        num_frames: int = 8,
        sampling: Sampling = "segments",
        frame_stride: int = 4,
        image_size: int | None = None,
        hflip: float = 0.5,
        scale: tuple[float, float] = (0.5, 1.0),
        on_bad_video: Literal["error", "skip"] = "error",
        batch_size: int = 32,
        eval_batch_size: int | None = None,
        val_fraction: float = 0.1,
        seed: int | None = None,
        num_workers: int = 2,
    ) -> None:
        if num_frames < 1 or frame_stride < 1:
            raise PtftError(f"num_frames and frame_stride must be >= 1, got {num_frames} and {frame_stride}")
        if sampling not in ("segments", "clip"):
            raise PtftError(f"sampling must be 'segments' or 'clip', got {sampling!r}")
        super().__init__(train, val, test, predict, path_column, caption_column, caption_template, class_names,
                         max_length, image_size, hflip, tuple(scale), 0.0, on_bad_video, batch_size, eval_batch_size,
                         val_fraction, seed, num_workers)
        self.num_frames = num_frames
        self.sampling = sampling
        self.frame_stride = frame_stride
        self.hflip, self.scale = hflip, tuple(scale)
        self.frame_counts: dict[str, int] = {}

    def _list(self, split: str, location: str | None) -> list[Row] | None:
        if location is None:
            return None
        if location.lower().endswith(".csv"):
            return _csv_pairs(location, split, *self.columns)
        clips = list_labelled_clips(location, split, *self.columns)
        return [(clip, self.caption_template.format(label.replace("_", " ")), label) for clip, label in clips]

    def load_split(self, split: str) -> list[Row] | None:
        if split == "predict":
            location = self.locations["predict"]
            return None if location is None else [(c, None, None) for c in list_clips(location, "predict", self.columns[0])]
        return self.pairs[split]

    def check(self, split: str, rows: list[Row]) -> list[Row]:
        clips = [clip for clip, _, _ in rows]
        infos = self.on_rank_zero(lambda: video_info(clips))
        for clip, info in zip(clips, infos):
            if not isinstance(info, str):
                self.frame_counts[describe(clip)] = int(info[0])
        problems = [(i, info) for i, info in enumerate(infos) if isinstance(info, str)]
        return drop_unreadable(rows, problems, lambda i: describe(clips[i]), split, self.on_bad_image, "video",
                               "on_bad_video")

    def media_dataset(self, split: str, items: list[FileSource], labels: list[int] | None) -> Dataset:
        """The clips of a split: ``num_frames`` sampled frames, transformed together for the image tower."""
        training = split == "train"
        transform = clip_transform(self.model_data_config, self.image_size, training, self.scale, self.hflip)
        return VideoDataset(items, [self.frame_counts[describe(c)] for c in items], labels, self.num_frames,
                            self.sampling, self.frame_stride, training, transform)
