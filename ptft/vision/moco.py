"""Momentum-contrast pre-training (MoCo v2) of timm backbones on unlabelled images.

Same data and export as SimCLR (:mod:`ptft.vision.pretrain`): two augmented views per image, and ``ptft export``
writes the query encoder's backbone alone as timm ``model.safetensors``::

    ptft fit --config recipes/vision/moco.yaml
    ptft export runs/moco/version_0/checkpoints/last.ckpt backbone/
    ptft fit --config recipes/vision/cifar10.yaml --model.init_args.model_name=resnet18 \\
        --model.init_args.pretrained_file=backbone/model.safetensors
"""

from __future__ import annotations

import copy
import math
from typing import Any, Literal

import torch
import torch.nn.functional as F

from ptft.core.errors import PtftError
from ptft.vision.modules import create_timm_model
from ptft.vision.pretrain import BackbonePretraining, ContrastiveNet, ProjectionHead


def info_nce(
    q: torch.Tensor, k: torch.Tensor, queue: torch.Tensor, temperature: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """MoCo's InfoNCE: each query ``q`` ``(N, D)`` must pick its key ``k`` ``(N, D)`` among the ``queue`` ``(K, D)``.

    ``q`` and ``k`` are normalized here, the queue's rows already are. Returns the mean loss and, per query, whether
    the positive scored above every negative (positive top-1 among K + 1).
    """
    q, k = F.normalize(q.float(), dim=1), F.normalize(k.float(), dim=1)
    logits = torch.cat([(q * k).sum(1, keepdim=True), q @ queue.float().T], dim=1) / temperature
    targets = torch.zeros(q.shape[0], dtype=torch.long, device=q.device)  # the positive is column 0
    return F.cross_entropy(logits, targets), (logits.argmax(dim=1) == 0).float()


def momentum_at(step: int, total: int, base: float, schedule: Literal["constant", "cosine"]) -> float:
    """Key-encoder momentum after ``step`` of ``total`` optimizer steps: ``base`` throughout, or (``cosine``, BYOL and
    MoCo v3) rising from ``base`` to 1 as ``1 - (1 - base) * (cos(pi * step / total) + 1) / 2``."""
    if schedule == "constant" or total <= 0:
        return base
    return 1.0 - (1.0 - base) * (math.cos(math.pi * min(step, total) / total) + 1.0) / 2.0


class MoCo(BackbonePretraining):
    """Self-supervised momentum-contrast pre-training (MoCo v2: He et al., 2020; Chen et al., 2020) of any timm backbone.

    A query encoder (backbone + MLP projection head) is trained to match each view's projection with the key of the
    other view, computed by a key encoder, against a queue of ``queue_size`` keys of earlier batches. The key encoder
    is not trained: after each optimizer step it moves towards the query encoder, ``key = m * key + (1 - m) * query``,
    so that the keys in the queue stay consistent although they come from many steps. The loss is symmetric (each view
    is a query once) and both views' keys are enqueued; under DDP every process's keys are gathered first, so the
    queues of all processes hold the same keys. Negatives come from the queue, not the batch: small batches work.

    MoCo's shuffled BatchNorm is left out. Without it the query and its key see BatchNorm statistics of the same
    images, a cue that can help find the positive among queued keys of other batches; on GPUs under DDP use
    ``trainer.sync_batchnorm=true`` (MoCo v3's choice), or a backbone without BatchNorm (a ViT).

    The key encoder and the queue are part of the checkpoint (a resumed run continues them) but not of the optimizer.
    ``{stage}/pos_acc`` is the fraction of queries whose key beats every queued key (chance: 1 / (queue_size + 1)).
    ``ptft export`` writes the query encoder's backbone alone (no projection head, no key encoder) for fine-tuning with
    ``pretrained_file``.

    Args:
        model_name: timm model name (``resnet50``, ``vit_small_patch16_224``…); its pooled features are projected.
        pretrained: Start from pretrained weights (continued, in-domain pre-training) instead of random ones.
        pretrained_file: Local weights file (``.safetensors`` or ``.pth``) to start from.
        model_kwargs: Extra ``timm.create_model`` arguments, e.g. ``{drop_path_rate: 0.1}``.
        projection_dim: Output size of the projection head (the size of the queued keys).
        projection_hidden_dim: Hidden size of the projection head; defaults to the backbone's feature size.
        temperature: InfoNCE temperature (MoCo v2: 0.2; smaller is sharper).
        queue_size: Keys kept as negatives. Each step adds 2 x the global batch (both views); any size works, the
            queue wraps around. MoCo: 65,536 for ImageNet; a few thousand for small data sets.
        momentum: Key-encoder momentum ``m`` (MoCo v2: 0.999; 0.99 suits short runs, whose key encoder must keep up).
        momentum_schedule: ``constant``, or ``cosine``: ``m`` rises to 1 by the last step (BYOL, MoCo v3).
        **kwargs: The shared arguments of :class:`ptft.core.FineTuneModule` (``optimizer``, ``scheduler``, ``l1``,
            ``l2_sp``, ``checkpoint_weights``, ``compile``, ``gradient_checkpointing``). ``peft`` is not supported:
            MoCo trains the whole encoder.
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
        queue_size: int = 65536,
        momentum: float = 0.99,
        momentum_schedule: Literal["constant", "cosine"] = "cosine",
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if temperature <= 0:
            raise PtftError(f"temperature must be > 0, got {temperature}")
        if queue_size < 1:
            raise PtftError(f"queue_size must be >= 1, got {queue_size}")
        if not 0.0 <= momentum <= 1.0:
            raise PtftError(f"momentum must be in [0, 1] (MoCo: 0.99-0.999), got {momentum}")
        if self.peft_config is not None:
            raise PtftError("MoCo trains the whole encoder (its key encoder follows every weight): remove model.peft")
        self.model_name = model_name
        self.temperature = temperature
        self.momentum = momentum
        self.momentum_schedule = momentum_schedule
        backbone = create_timm_model(model_name, pretrained, pretrained_file, num_classes=0, **(model_kwargs or {}))
        # Pooled output size (models with a pre-logits layer, e.g. MobileNetV3, pool to head_hidden_size).
        features = getattr(backbone, "head_hidden_size", None) or backbone.num_features
        import timm.data

        self._data_config = timm.data.resolve_data_config(model=backbone)
        query = ContrastiveNet(backbone, ProjectionHead(features, projection_hidden_dim or features, projection_dim))
        # Starts equal to the query encoder (MoCo). Outside self.model: not in the optimizer's groups, nor in L2-SP,
        # nor exported; a submodule all the same, so it is in the state dict and a resumed run continues it.
        self.key_encoder = copy.deepcopy(query).requires_grad_(False)
        self.set_model(query)
        # Random unit vectors until real keys replace them, as in MoCo.
        self.register_buffer("queue", F.normalize(torch.randn(queue_size, projection_dim), dim=1))
        self.register_buffer("queue_ptr", torch.zeros((), dtype=torch.long))
        self._save_hparams(pretrained=False, pretrained_file=None)

    def step(self, batch: dict[str, Any], stage: str) -> tuple[torch.Tensor, Any]:
        views = batch["pixel_values"]
        if views.ndim != 5 or views.shape[1] != 2:
            raise PtftError(f"MoCo needs two views per image (B, 2, C, H, W), got {tuple(views.shape)}: "
                            "use ptft.vision.pretrain.UnlabeledImageDataModule")
        n = views.shape[0]
        flat = views.transpose(0, 1).flatten(0, 1)  # one pass: [view 1 of every image, view 2 of every image]
        q = self.model(flat)
        with torch.no_grad():
            k = F.normalize(self.key_encoder(flat).float(), dim=1)
        # A copy: the enqueue below writes the buffer in place, which the matmul's backward still needs.
        negatives = self.queue.clone().detach()
        loss1, correct1 = info_nce(q[:n], k[n:], negatives, self.temperature)
        loss2, correct2 = info_nce(q[n:], k[:n], negatives, self.temperature)
        if stage == "train":
            self.enqueue(k)
        return (loss1 + loss2) / 2, torch.cat([correct1, correct2])

    @torch.no_grad()
    def enqueue(self, keys: torch.Tensor) -> None:
        """Writes this step's keys over the oldest ones, wrapping around; under DDP, every process's keys in rank
        order, so that all queues stay equal."""
        if self._trainer is not None and self.trainer.world_size > 1:
            keys = self.all_gather(keys).flatten(0, 1)
        size = self.queue.shape[0]
        keys = keys[-size:]  # more keys than room: the newest ones
        rows = (self.queue_ptr + torch.arange(keys.shape[0], device=keys.device)) % size
        self.queue[rows] = keys.to(self.queue.dtype)
        self.queue_ptr.copy_((self.queue_ptr + keys.shape[0]) % size)

    def current_momentum(self) -> float:
        """The momentum of the next key-encoder update."""
        if self._trainer is None:
            return self.momentum
        return momentum_at(self.trainer.global_step, int(self.trainer.estimated_stepping_batches), self.momentum,
                           self.momentum_schedule)

    @torch.no_grad()
    def update_key_encoder(self, momentum: float) -> None:
        """``key = momentum * key + (1 - momentum) * query`` for every weight; BatchNorm statistics stay the key
        encoder's own (it runs in training mode, as in MoCo)."""
        for key, query in zip(self.key_encoder.parameters(), self.model.parameters(), strict=True):
            key.lerp_(query.detach(), 1.0 - momentum)

    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        # Right after the step itself: callbacks' on_train_batch_end (checkpoints) run before the module's, and
        # on_before_zero_grad comes after the next batch's forward. Here a checkpoint always holds both encoders as
        # of the same step, and the next keys come from the updated key encoder.
        super().optimizer_step(*args, **kwargs)
        self.update_key_encoder(self.current_momentum())
