"""Self-supervised pre-training of timm backbones (SimCLR) on unlabelled images, and backbone export.

The backbone is written as a timm state dict (``model.safetensors``, timm's hub layout, projection head or classifier
left out) that every vision fine-tuning module loads with ``pretrained_file``::

    ptft fit --config recipes/vision/simclr.yaml
    ptft export runs/simclr/version_0/checkpoints/<last>.ckpt backbone/          # SimCLR: the backbone only
    ptft export --backbone runs/.../<best>.ckpt backbone/                       # any vision checkpoint, head dropped
    ptft fit --config recipes/vision/cifar10.yaml --model.init_args.model_name=resnet18 \\
        --model.init_args.pretrained_file=backbone/model.safetensors
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Literal

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn

from ptft.core.data import FineTuneDataModule
from ptft.core.errors import PtftError
from ptft.core.layers import timm_layer_ids
from ptft.core.module import FineTuneModule
from ptft.vision.data import ImageDataset, ImageSource, collate, drop_unreadable_images, list_images
from ptft.vision.modules import create_timm_model


# --- data -------------------------------------------------------------------------------------------------------
class TwoViews:
    """Two independent random augmentations of one image, stacked: ``(2, C, H, W)``."""

    def __init__(self, transform: Any) -> None:
        self.transform = transform

    def __call__(self, image: Any) -> torch.Tensor:
        return torch.stack([self.transform(image), self.transform(image)])

    def __repr__(self) -> str:
        return f"TwoViews({self.transform})"


def contrastive_transform(
    size: int,
    mean: tuple[float, ...],
    std: tuple[float, ...],
    scale: tuple[float, float] = (0.2, 1.0),
    color_jitter: float = 0.4,
    grayscale_prob: float = 0.2,
    blur_prob: float = 0.5,
) -> Any:
    """SimCLR's augmentation (Chen et al., 2020) with torchvision transforms v2: random resized crop, flip, colour
    jitter (p=0.8), grayscale, Gaussian blur (kernel ~10% of the size)."""
    from torchvision.transforms import v2

    kernel = max(3, int(0.1 * size) // 2 * 2 + 1)
    s = color_jitter
    return v2.Compose([
        v2.ToImage(),
        v2.RandomResizedCrop(size, scale=tuple(scale), antialias=True),
        v2.RandomHorizontalFlip(),
        v2.RandomApply([v2.ColorJitter(s, s, s, min(s / 4, 0.5))], p=0.8 if s > 0 else 0.0),
        v2.RandomGrayscale(p=grayscale_prob),
        v2.RandomApply([v2.GaussianBlur(kernel, sigma=(0.1, 2.0))], p=blur_prob),
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(mean=list(mean), std=list(std)),
    ])


class UnlabeledImageDataModule(FineTuneDataModule):
    """Unlabelled images for self-supervised pre-training: each example is two augmented views of one image
    (``(2, C, H, W)``: SimCLR, MoCo), or one (``views: 1``, ``(C, H, W)``: MAE).

    A location is a folder of images (flat or nested: class folders are allowed and ignored), a zip archive of one,
    or a folder inside a zip (``cifar10.zip/train``). Every image is checked before training starts (by rank 0 alone
    under DDP, cached by file size and modification time), and the held-out validation split, the seed and the
    loaders are :class:`ptft.core.data.FineTuneDataModule`'s.

    Args:
        train: Training images.
        val: Validation images (``val/loss`` and positive-pair accuracy); held out from ``train`` when missing.
        image_size: Crop size (square); defaults to the model's input size.
        scale: Area range of the random resized crop.
        color_jitter: Strength of brightness / contrast / saturation jitter (hue = strength / 4), applied with p=0.8.
        grayscale_prob: Probability of converting a view to grayscale.
        blur_prob: Probability of a Gaussian blur (use 0 for small images such as CIFAR's 32 px).
        views: Augmented views per image: 2 for contrastive methods, 1 for masked image modelling (MAE, which
            augments with the crop and flip alone: set ``color_jitter``, ``grayscale_prob``, ``blur_prob`` to 0).
        on_bad_image: What to do with images that cannot be read: ``error`` or ``skip``.
        batch_size: Training batch size (images per process; each gives ``views`` views). Contrastive losses like large
            batches; under DDP the negatives come from every process's batch.
        eval_batch_size: Validation batch size; defaults to ``batch_size``.
        val_fraction: Fraction of training images held out for validation when ``val`` is missing.
        seed: Seed of the held-out split and of the batch order; by default the one of ``seed_everything``.
        num_workers: DataLoader worker processes decoding and augmenting images.
    """

    def __init__(
        self,
        train: str | None = None,
        val: str | None = None,
        image_size: int | None = None,
        scale: tuple[float, float] = (0.2, 1.0),
        color_jitter: float = 0.4,
        grayscale_prob: float = 0.2,
        blur_prob: float = 0.5,
        views: Literal[1, 2] = 2,
        on_bad_image: Literal["error", "skip"] = "error",
        batch_size: int = 256,
        eval_batch_size: int | None = None,
        val_fraction: float = 0.05,
        seed: int | None = None,
        num_workers: int = 2,
    ) -> None:
        super().__init__(batch_size, eval_batch_size, num_workers, seed, val_fraction)
        self.save_hyperparameters(logger=False)
        if train is None:
            raise PtftError("give train images: data.init_args.train=<folder, zip or zip/folder>")
        if views not in (1, 2):
            raise PtftError(f"views must be 1 (MAE) or 2 (SimCLR, MoCo), got {views}")
        self.views = views
        self.images = {"train": list_images(train, "train"), "val": list_images(val, "val") if val else None}
        self.image_size = image_size
        self.augment = {"scale": scale, "color_jitter": color_jitter, "grayscale_prob": grayscale_prob,
                        "blur_prob": blur_prob}
        self.on_bad_image = on_bad_image
        self.model_data_config: dict[str, Any] | None = None

    def connect(self, model: L.LightningModule) -> None:
        if hasattr(model, "data_config"):
            self.model_data_config = model.data_config()

    def transform(self) -> Any:
        cfg = self.model_data_config or {}
        size = self.image_size or cfg.get("input_size", (3, 224, 224))[-1]
        mean, std = cfg.get("mean", (0.485, 0.456, 0.406)), cfg.get("std", (0.229, 0.224, 0.225))
        transform = contrastive_transform(size, mean, std, **self.augment)
        return TwoViews(transform) if self.views == 2 else transform

    # --- the base's hooks -----------------------------------------------------------------------------------
    def load_split(self, split: str) -> list[ImageSource] | None:
        return self.images.get(split)

    def check(self, split: str, rows: list[ImageSource]) -> list[ImageSource]:
        return drop_unreadable_images(self, split, rows, rows, self.on_bad_image)

    def build(self, split: str, rows: list[ImageSource]) -> ImageDataset:
        return ImageDataset(rows, None, self.transform())

    def collate_fn(self) -> Any:
        return collate


# --- model ------------------------------------------------------------------------------------------------------
class ProjectionHead(nn.Sequential):
    """SimCLR's MLP projector: Linear -> BatchNorm -> ReLU -> Linear (the loss is computed on its output)."""

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int) -> None:
        super().__init__(nn.Linear(in_dim, hidden_dim, bias=False), nn.BatchNorm1d(hidden_dim), nn.ReLU(inplace=True),
                         nn.Linear(hidden_dim, out_dim))


class ContrastiveNet(nn.Module):
    """A timm backbone with pooled features (``num_classes=0``) followed by a projection head."""

    def __init__(self, backbone: nn.Module, projector: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone
        self.projector = projector

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.projector(self.backbone(pixel_values))


def nt_xent(
    z1: torch.Tensor,
    z2: torch.Tensor,
    temperature: float,
    all_z1: torch.Tensor | None = None,
    all_z2: torch.Tensor | None = None,
    rank: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """NT-Xent (SimCLR): each of the 2N views must pick its partner among the other views.

    ``z1`` / ``z2`` are this process's ``(N, D)`` projections of the first and second views. Under DDP, ``all_z1`` /
    ``all_z2`` are every process's, ``(world_size * N, D)`` in rank order, gathered with their gradients: this
    process's 2N views then pick their partners among all 2·world_size·N - 1 others, and the mean of the processes'
    losses is the loss of one process on the whole batch (as are the gradients DDP averages).

    Returns the mean loss over this process's views and, per view, whether its nearest other view is its partner
    (positive-pair top-1).
    """
    n = z1.shape[0]
    keys1, keys2 = (z1, z2) if all_z1 is None or all_z2 is None else (all_z1, all_z2)
    total = keys1.shape[0]
    queries = F.normalize(torch.cat([z1, z2]).float(), dim=1)
    keys = F.normalize(torch.cat([keys1, keys2]).float(), dim=1)
    logits = queries @ keys.T / temperature
    local = torch.arange(n, device=queries.device) + rank * n  # this process's images among all of them
    own = torch.cat([local, local + total])
    logits[torch.arange(2 * n, device=queries.device), own] = float("-inf")  # a view is not its own positive
    targets = torch.cat([local + total, local])
    return F.cross_entropy(logits, targets), (logits.argmax(dim=1) == targets).float()


class BackbonePretraining(FineTuneModule):
    """What SimCLR, MoCo and MAE share: a timm ``backbone`` under a pre-training head (``projector`` or ``decoder``),
    its preprocessing, its pooled features as the representation, layers from timm with the head on top, and an
    export of the backbone alone (:func:`save_backbone`). Subclasses set ``self._data_config`` and build the network.
    """

    checkpoint_monitor = ("val/loss", "min")
    #: The network's pre-training head, left out of exports and given the top layer index.
    head_name = "projector"

    def data_config(self) -> dict[str, Any]:
        """The backbone's preprocessing (input size, mean, std) as timm resolves it."""
        return dict(self._data_config)

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Pooled backbone features of ``pixel_values`` ``(B, C, H, W)``: the representation, not the head's output."""
        return self.model.backbone(batch["pixel_values"])

    def update_metrics(self, stage: str, outputs: torch.Tensor, batch: dict[str, Any]) -> None:
        # Training: this rank's value per step; val / test: a mean over the epoch's views on every rank.
        train = stage == "train"
        self.log(f"{stage}/pos_acc", outputs.mean(), prog_bar=stage == "val", batch_size=outputs.shape[0],
                 on_step=train, on_epoch=not train, sync_dist=not train)

    def head_modules(self, model: nn.Module) -> list[str]:
        return [self.head_name]

    def discover_layers(self, model: nn.Module) -> dict[str, int]:
        ids = {f"backbone.{n}": i for n, i in timm_layer_ids(model.backbone).items()}
        top = max(ids.values(), default=0) + 1
        ids.update({f"{self.head_name}.{n}": top for n, _ in getattr(model, self.head_name).named_parameters()})
        return ids

    def save_model(self, model: nn.Module, folder: str) -> None:
        """The backbone alone in timm's hub layout (``model.safetensors`` + ``config.json``), the head left out."""
        save_backbone(model.backbone, folder)


class SimCLR(BackbonePretraining):
    """Self-supervised contrastive pre-training (SimCLR, Chen et al., 2020) of any timm backbone.

    Two augmented views of each image pass through the backbone and a projection head; NT-Xent pulls the two views
    together and pushes the other 2N-2 views of the batch apart. Under DDP the batch is every device's: the views are
    gathered with their gradients, so 2 devices × N images train as 1 device with 2N. (BatchNorm statistics stay per
    device; SimCLR's global BatchNorm is ``trainer.sync_batchnorm=true`` on GPUs.) ``val/pos_acc`` is the fraction
    of views whose nearest neighbour in the batch is their partner (chance: 1 / (2N-1)), a cheap proxy for
    representation quality. ``ptft export`` writes the backbone alone (no projection head) for fine-tuning with
    ``pretrained_file``; ``ptft export --backbone`` does the same from a checkpoint.

    Args:
        model_name: timm model name (``resnet50``, ``vit_small_patch16_224``…); its pooled features are projected.
        pretrained: Start from pretrained weights (continued, in-domain pre-training) instead of random ones.
        pretrained_file: Local weights file (``.safetensors`` or ``.pth``) to start from.
        model_kwargs: Extra ``timm.create_model`` arguments, e.g. ``{drop_path_rate: 0.1}``.
        projection_dim: Output size of the projection head.
        projection_hidden_dim: Hidden size of the projection head; defaults to the backbone's feature size.
        temperature: NT-Xent temperature (0.1-0.5; smaller is sharper).
        **kwargs: The shared arguments of :class:`ptft.core.FineTuneModule` (``optimizer``, ``scheduler``, ``l1``,
            ``l2_sp``, ``peft``, ``checkpoint_weights``, ``compile``, ``gradient_checkpointing``).
    """

    def __init__(
        self,
        model_name: str,
        pretrained: bool = False,
        pretrained_file: str | None = None,
        model_kwargs: dict[str, Any] | None = None,
        projection_dim: int = 128,
        projection_hidden_dim: int | None = None,
        temperature: float = 0.2,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if temperature <= 0:
            raise PtftError(f"temperature must be > 0, got {temperature}")
        self.model_name = model_name
        self.temperature = temperature
        backbone = create_timm_model(model_name, pretrained, pretrained_file, num_classes=0, **(model_kwargs or {}))
        # Pooled output size (models with a pre-logits layer, e.g. MobileNetV3, pool to head_hidden_size).
        features = getattr(backbone, "head_hidden_size", None) or backbone.num_features
        import timm.data

        self._data_config = timm.data.resolve_data_config(model=backbone)
        self.set_model(ContrastiveNet(backbone, ProjectionHead(features, projection_hidden_dim or features, projection_dim)))
        self._save_hparams(pretrained=False, pretrained_file=None)

    def step(self, batch: dict[str, Any], stage: str) -> tuple[torch.Tensor, Any]:
        views = batch["pixel_values"]
        if views.ndim != 5 or views.shape[1] != 2:
            raise PtftError(f"SimCLR needs two views per image (B, 2, C, H, W), got {tuple(views.shape)}: "
                            "use ptft.vision.pretrain.UnlabeledImageDataModule")
        n = views.shape[0]
        # One pass over both views: BatchNorm sees the whole 2N batch, as in SimCLR.
        z = self.model(views.transpose(0, 1).flatten(0, 1))
        z1, z2 = z[:n], z[n:]
        world = 1 if self._trainer is None else self.trainer.world_size
        if world == 1:
            return nt_xent(z1, z2, self.temperature)
        # Negatives from every process, as on one device with the whole batch. The gather keeps the gradient (a plain
        # all_gather would cut it); every rank's batch has the same size (Lightning's distributed samplers pad).
        all_z1, all_z2 = (self.all_gather(z_, sync_grads=True).flatten(0, 1) for z_ in (z1, z2))
        return nt_xent(z1, z2, self.temperature, all_z1, all_z2, rank=self.global_rank)


# --- export -----------------------------------------------------------------------------------------------------
def save_backbone(backbone: nn.Module, folder: str) -> Path:
    """Writes a timm model without its classifier as ``folder/model.safetensors`` (+ ``config.json``, num_classes 0).

    Load it with ``ImageClassifier(model_name=<same name>, pretrained_file=folder/model.safetensors)``, or
    ``timm.create_model("local-dir:<folder>", pretrained=True, num_classes=N)``.
    """
    from timm.models import save_for_hf

    backbone = copy.deepcopy(backbone).cpu()
    if backbone.num_classes:
        backbone.reset_classifier(0)
    # config.json describes what the file holds: no classifier.
    backbone.pretrained_cfg = {k: v for k, v in backbone.pretrained_cfg.items() if k not in ("label_names",)}
    backbone.pretrained_cfg["num_classes"] = 0
    save_for_hf(backbone, folder, safe_serialization=True)
    return Path(folder) / "model.safetensors"


def export_backbone(checkpoint: str, folder: str) -> Path:
    """The backbone of a ptft vision checkpoint (SimCLR, or an ImageClassifier with its classifier dropped)."""
    from ptft.core.module import load_checkpoint
    from ptft.core.peft import merge_adapters

    module = load_checkpoint(checkpoint)
    model = merge_adapters(module.model)
    backbone = getattr(model, "backbone", model)
    if not hasattr(backbone, "reset_classifier"):
        raise PtftError(f"{checkpoint} holds a {type(module).__name__}, not a timm image model")
    return save_backbone(backbone, folder)
