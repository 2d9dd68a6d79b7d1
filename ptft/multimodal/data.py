"""Image-caption pairs for contrastive dual encoders: CSV files of (path, caption) or class-folder trees + a template."""

from __future__ import annotations

from typing import Any, Literal

import lightning as L
import torch
from torch.utils.data import Dataset, default_collate

from ptft.core.data import FineTuneDataModule
from ptft.core.errors import PtftError
from ptft.core.files import FileSource, _read_csv, list_files, list_labelled_files
from ptft.vision.data import (
    IMAGE_SUFFIXES,
    ImageDataset,
    augment_options,
    drop_unreadable_images,
    image_transform,
)

#: One row: the image, its caption, and its class name (class-folder data) or ``None``.
Row = tuple[FileSource, str | None, str | None]


class CaptionedDataset(Dataset):
    """Items of a media dataset (images or clips, with labels for zero-shot accuracy) with their tokenised captions,
    caption group ids and dataset indices.

    Captions are tokenised once per distinct caption; a caption's group id is its index among the split's distinct
    captions, so pairs sharing a caption are positives of each other in the loss and the retrieval metrics.
    """

    def __init__(self, media: Dataset, captions: list[str] | None, tokenizer: Any, max_length: int) -> None:
        self.media = media
        self.groups: list[int] | None = None
        self.tokens: list[list[int]] = []
        if captions is not None:
            distinct = sorted(set(captions))
            index = {caption: i for i, caption in enumerate(distinct)}
            self.groups = [index[c] for c in captions]
            self.tokens = tokenizer(distinct, truncation=True, max_length=max_length)["input_ids"]

    def __len__(self) -> int:
        return len(self.media)

    def item_names(self) -> list[str]:
        """Each item's file as given (the ``file`` column of predictions)."""
        return self.media.item_names()

    def __getitem__(self, index: int) -> dict[str, Any]:
        item = {**self.media[index], "indices": index}
        if self.groups is not None:
            item["groups"] = self.groups[index]
            item["input_ids"] = self.tokens[self.groups[index]]
        return item


class PairCollator:
    """Items with token ids -> a batch: the media part collated by ``media_collate`` (default: images stacked;
    audio: padded or run through a feature extractor, its mask renamed ``audio_mask``), the token ids padded with the
    tokenizer's pad id (``attention_mask`` 0 there) and, for a model with the ``mlm`` objective, masked copies of the
    captions (``mlm_input_ids``, ``mlm_labels``: BERT's 80/10/10 masking by transformers'
    ``DataCollatorForLanguageModeling``, in the workers). Picklable for workers."""

    def __init__(self, pad_id: int, masker: Any = None, media_collate: Any = None) -> None:
        self.pad_id = pad_id
        self.masker = masker
        self.media_collate = media_collate

    def __call__(self, items: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        media = [{k: v for k, v in it.items() if k != "input_ids"} for it in items]
        batch = dict(default_collate(media) if self.media_collate is None else self.media_collate(media))
        if "attention_mask" in batch:  # the audio's: the text's attention_mask comes next
            batch["audio_mask"] = batch.pop("attention_mask")
        for key in ("indices", "groups", "labels"):  # what an audio collation leaves out
            if key in items[0] and key not in batch:
                batch[key] = torch.tensor([it[key] for it in items])
        if "input_ids" in items[0]:
            longest = max(len(it["input_ids"]) for it in items)
            ids = torch.full((len(items), longest), self.pad_id, dtype=torch.long)
            mask = torch.zeros((len(items), longest), dtype=torch.long)
            for row, it in enumerate(items):
                ids[row, : len(it["input_ids"])] = torch.tensor(it["input_ids"])
                mask[row, : len(it["input_ids"])] = 1
            batch["input_ids"], batch["attention_mask"] = ids, mask
            if self.masker is not None:
                batch["mlm_input_ids"], batch["mlm_labels"] = self.masker.torch_mask_tokens(ids.clone())
        return batch


def _csv_pairs(location: str, split: str, path_column: str, caption_column: str) -> list[Row]:
    hint = "; set data.init_args.path_column / caption_column"
    csv_path, rows = _read_csv(location, split, [path_column, caption_column], hint)
    if not rows:
        raise PtftError(f"{split}: {csv_path} lists no image")
    for column, what in ((path_column, "an image path"), (caption_column, "a caption")):
        missing = [i for i, row in enumerate(rows) if not (row[column] or "").strip()]
        if missing:
            raise PtftError(f"{csv_path}: {len(missing)} row(s) without {what}, first: data row {missing[0] + 1}")
    return [(FileSource(csv_path.parent / row[path_column]), row[caption_column].strip(), None) for row in rows]


class ImageTextDataModule(FineTuneDataModule):
    """Image-caption pairs for :class:`ptft.multimodal.DualEncoder`, preprocessed for its towers.

    Each split is a CSV of image paths (relative to the CSV) and captions, or a class-folder tree
    (``root/<class>/<image>``, also inside a zip) whose caption is ``caption_template`` with the folder name (``_``
    read as a space): ``"a photo of a {}."`` turns CIFAR-style folders into captioned images, and their class names
    are linked into the model for zero-shot accuracy. ``predict`` is a folder, zip or CSV of images to classify
    zero-shot. Images are checked before training (by rank 0, in parallel, cached), as for image classification.

    Args:
        train: Training pairs.
        val: Validation pairs; held out from ``train`` when missing.
        test: Test pairs (``ptft test``).
        predict: Images to classify zero-shot.
        path_column: CSV column with image paths.
        caption_column: CSV column with captions.
        caption_template: The caption of an image in a class folder, ``{}`` standing for the class name.
        class_names: Class names (zero-shot classes) in id order; discovered from the training folders when not given.
        max_length: Longest caption in tokens (longer ones are truncated).
        image_size: Input size (square) overriding the image tower's default, e.g. 32 for CIFAR-sized images.
        hflip: Probability of a horizontal flip in training.
        scale: Random-resized-crop area range in training (CLIP-style training uses mild crops).
        color_jitter: Colour-jitter strength in training; 0 turns it off.
        on_bad_image: What to do with images that cannot be read: ``error`` or ``skip``.
        batch_size: Training batch size per process (contrastive losses like large ones: every other pair is a
            negative).
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
        caption_template: str = "a photo of a {}.",
        class_names: list[str] | None = None,
        max_length: int = 64,
        image_size: int | None = None,
        hflip: float = 0.5,
        scale: tuple[float, float] = (0.5, 1.0),
        color_jitter: float = 0.0,
        on_bad_image: Literal["error", "skip"] = "error",
        batch_size: int = 64,
        eval_batch_size: int | None = None,
        val_fraction: float = 0.1,
        seed: int | None = None,
        num_workers: int = 2,
    ) -> None:
        super().__init__(batch_size, eval_batch_size, num_workers, seed, val_fraction)
        self.save_hyperparameters(logger=False)
        if train is None and test is None and predict is None:
            raise PtftError("give train (and optionally val / test) image-caption pairs, or images to predict")
        if "{}" not in caption_template:
            raise PtftError(f"caption_template must contain {{}} where the class name goes, got {caption_template!r}")
        self.locations = {"train": train, "val": val, "test": test, "predict": predict}
        self.columns = (path_column, caption_column)
        self.caption_template = caption_template
        self.max_length = max_length
        self.image_size = image_size
        self.augment = augment_options(None, auto_augment=None, hflip=hflip, color_jitter=color_jitter, scale=scale,
                                       ratio=None, re_prob=0.0, re_mode="const", re_count=1)
        self.on_bad_image = on_bad_image
        self.model_data_config: dict[str, Any] | None = None
        self.tokenizer: Any = None
        self.mlm_probability: float | None = None
        self.pairs = {split: self._list(split, loc) for split, loc in self.locations.items() if split != "predict"}
        self.class_names = list(class_names) if class_names else self._discover_classes()

    def _list(self, split: str, location: str | None) -> list[Row] | None:
        if location is None:
            return None
        if location.lower().endswith(".csv"):
            return _csv_pairs(location, split, *self.columns)
        samples, _ = list_labelled_files(location, split, IMAGE_SUFFIXES, *self.columns, kind="images")
        return [(f, self.caption_template.format(label.replace("_", " ")), label) for f, label in samples]

    def _discover_classes(self) -> list[str] | None:
        """Sorted class folders of the training (else test) tree; ``None`` for CSV captions."""
        for split in ("train", "val", "test"):
            rows = self.pairs.get(split)
            if rows is not None:
                names = sorted({label for _, _, label in rows if label is not None})
                return names or None
        return None

    def connect(self, model: L.LightningModule) -> None:
        if not (hasattr(model, "data_config") and hasattr(model, "tokenizer")):
            raise PtftError(f"{type(self).__name__} feeds a dual encoder (ptft.multimodal.DualEncoder), not "
                            f"{type(model).__name__}")
        if getattr(model, "media", "image") != "image":
            raise PtftError(f"{type(self).__name__} feeds images (or clips) to an image-text dual encoder; for an "
                            "audio_model use ptft.multimodal.AudioTextDataModule")
        self.model_data_config = model.data_config()
        self.connect_text(model)

    def connect_text(self, model: L.LightningModule) -> None:
        """The model's tokenizer, and its masking rate when it trains with the ``mlm`` objective."""
        self.tokenizer = model.tokenizer()
        self.mlm_probability = getattr(model, "mlm_probability", None)
        if self.mlm_probability is not None and self.tokenizer.mask_token_id is None:
            raise PtftError(f"the mlm objective needs a tokenizer with a mask token; {self.tokenizer.name_or_path!r} "
                            "has none")

    def load_split(self, split: str) -> list[Row] | None:
        if split == "predict":
            location = self.locations["predict"]
            if location is None:
                return None
            return [(f, None, None) for f in list_files(location, "predict", IMAGE_SUFFIXES, self.columns[0], kind="images")]
        return self.pairs[split]

    def check(self, split: str, rows: list[Row]) -> list[Row]:
        return drop_unreadable_images(self, split, rows, [image for image, _, _ in rows], self.on_bad_image)

    def build(self, split: str, rows: list[Row]) -> CaptionedDataset:
        if self.tokenizer is None:
            raise PtftError("ImageTextDataModule is not connected to a model: call connect(model) first")
        labels = None
        if self.class_names and all(label is not None for _, _, label in rows):
            known = {name: i for i, name in enumerate(self.class_names)}
            unknown = sorted({label for _, _, label in rows if label not in known})
            if unknown:
                raise PtftError(f"{split}: class folder(s) {unknown[:3]} are not among the class names {self.class_names}")
            labels = [known[label] for _, _, label in rows]
        captions = None if split == "predict" else [caption for _, caption, _ in rows]
        return CaptionedDataset(self.media_dataset(split, [item for item, _, _ in rows], labels), captions,
                                self.tokenizer, self.max_length)

    def media_dataset(self, split: str, items: list[FileSource], labels: list[int] | None) -> Dataset:
        """The images of a split, transformed for the image tower (augmented in training)."""
        transform = image_transform(self.model_data_config, self.image_size, None, self.augment, split == "train")
        return ImageDataset(items, labels, transform)

    def collate_fn(self, media_collate: Any = None) -> PairCollator:
        """Images stacked (or ``media_collate``), captions padded, and masked for the ``mlm`` objective."""
        pad = self.tokenizer.pad_token_id if self.tokenizer is not None else None
        masker = None
        if self.mlm_probability is not None:
            from transformers import DataCollatorForLanguageModeling

            masker = DataCollatorForLanguageModeling(self.tokenizer, mlm_probability=self.mlm_probability)
        return PairCollator(0 if pad is None else pad, masker, media_collate)
