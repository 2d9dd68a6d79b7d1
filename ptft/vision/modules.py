"""Vision task modules."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from ptft.core.errors import PtftError
from ptft.core.hub import resolve_model_name
from ptft.core.layers import timm_layer_ids
from ptft.core.classification import ClassificationModule
from ptft.vision.mixing import BatchMixer, MixupConfig


def resolve_weights_file(pretrained_file: str) -> Path:
    """The local weights file ``pretrained_file`` names: a ``.safetensors`` / ``.pth`` file as is, or for a ptft
    checkpoint (``.ckpt``: pre-training, an earlier fine-tune) its exported weights; one-line error when missing."""
    path = Path(pretrained_file).expanduser()
    if not path.is_file():
        raise PtftError(f"pretrained_file {pretrained_file!r} does not exist")
    if path.suffix == ".ckpt":
        path = Path(resolve_model_name(str(path))) / "model.safetensors"
    return path


def create_timm_model(name: str, pretrained: bool, pretrained_file: str | None, **kwargs: Any) -> torch.nn.Module:
    """``timm.create_model`` with pretrained weights from the hub or a local file, and one-line errors."""
    import timm

    path = None
    if pretrained_file is not None:
        path = resolve_weights_file(pretrained_file)
        # timm's documented way to load a local weights file (.safetensors / .pth) with the model's own adaptation
        # (input-channel and position-embedding resizing). num_classes -1 never equals the model's, so timm always
        # drops a stored classifier: the new task gets a new head, also with 1,000 classes or from a backbone-only file.
        kwargs["pretrained_cfg_overlay"] = {"file": str(path), "num_classes": -1}
        pretrained = True
    try:
        model = timm.create_model(name, pretrained=pretrained, **kwargs)
        if path is not None:
            check_backbone_loaded(model, name, path)
        return model
    except RuntimeError as err:
        if "Unknown model" in str(err):
            raise PtftError(f"unknown timm model {name!r}; list them with: python -c \"import timm; print(timm.list_models('*{name.split('.')[0][:6]}*'))\"") from err
        raise
    except (OSError, ValueError) as err:
        raise PtftError(
            f"cannot load pretrained weights for timm model {name!r} (hub unreachable?): {str(err).splitlines()[0]}. "
            "Offline, give a local weights file: --model.init_args.pretrained_file=/path/to/model.safetensors"
        ) from err


def check_backbone_loaded(model: torch.nn.Module, name: str, path: Path) -> None:
    """timm loads non-strictly once it drops the classifier: weights whose names match nothing would stay random.

    ``model`` is a timm model or a timm feature extractor (``features_only``, as smp's ``tu-`` encoders and detection
    backbones use): its wrapper renames flattened stages (``stages_0`` for ``stages.0``), mapped back here.
    """
    from timm.models import load_state_dict

    stored = set(load_state_dict(str(path)))
    head = model.pretrained_cfg.get("classifier") or ()
    heads = tuple(f"{h}." for h in ((head,) if isinstance(head, str) else head))

    def found(key: str) -> bool:
        return key in stored or re.sub(r"^(\w+?)_(\d+)\.", r"\1.\2.", key) in stored

    missing = sorted(k for k, _ in model.named_parameters() if not k.startswith(heads) and not found(k))
    if missing:
        raise PtftError(
            f"pretrained_file {path} lacks {len(missing)} weights of timm model {name!r} (first: {missing[0]}); give "
            "the weights of the same architecture (ptft export CKPT DIR writes DIR/model.safetensors, or the .ckpt)"
        )
    if hasattr(model, "num_classes"):  # feature extractors have none
        model.pretrained_cfg = {**model.pretrained_cfg, "num_classes": model.num_classes}


class ImageClassifier(ClassificationModule):
    """Image classification with any timm model.

    Args:
        model_name: timm model name, with an optional pretrained tag (``resnet50.a1_in1k``, ``vit_small_patch16_224``),
            or ``hf-hub:timm/<name>``.
        pretrained: Load pretrained weights from the hub (or from ``pretrained_file``).
        pretrained_file: Local weights file (``.safetensors`` or ``.pth``) to load instead of the hub.
        model_kwargs: Extra ``timm.create_model`` arguments, e.g. ``{drop_rate: 0.1, drop_path_rate: 0.1}``
            (``drop_path_rate``: stochastic depth, the rate of the deepest block, for models with residual blocks).
        mixup: Mixup / CutMix of training batches with timm's ``Mixup`` and ``SoftTargetCrossEntropy``; targets are
            smoothed by ``label_smoothing``. Training accuracy then counts each mixed image's dominant label (the
            argmax of its soft target). ``None``: no mixing.
        channels_last: Keep the model and the input batches in ``torch.channels_last`` memory format (faster
            convolutions on GPUs with mixed precision).
        tta: Test-time augmentation at validation, test and predict: ``hflip`` averages the logits of each image and
            its horizontal mirror; ``none`` runs the image once.
        **kwargs: The shared fine-tuning arguments of :class:`ptft.core.ClassificationModule` (``num_labels``,
            ``label_names``, ``label_smoothing``, ``optimizer``, ``scheduler``, ``l1``, ``l2_sp``, ``peft``,
            ``checkpoint_weights``, ``compile``, ``gradient_checkpointing``).
    """

    def __init__(
        self,
        model_name: str,
        pretrained: bool = True,
        pretrained_file: str | None = None,
        model_kwargs: dict[str, Any] | None = None,
        mixup: MixupConfig | None = None,
        channels_last: bool = False,
        tta: Literal["none", "hflip"] = "none",
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if tta not in ("none", "hflip"):
            raise PtftError(f"tta must be 'none' or 'hflip', got {tta!r}")
        self.model_name = model_name
        self.mixup_config = MixupConfig.coerce(mixup)
        self.channels_last = channels_last
        self.tta = tta
        model = create_timm_model(model_name, pretrained, pretrained_file, num_classes=self.num_labels, **(model_kwargs or {}))
        self._data_config = _timm_data_config(model)
        if channels_last:
            model = model.to(memory_format=torch.channels_last)
        self.set_model(model)
        self.mixer = None
        if self.mixup_config is not None:
            from timm.loss import SoftTargetCrossEntropy

            self.mixer = BatchMixer(self.mixup_config, self.num_labels, self.label_smoothing)
            self.soft_target_loss = SoftTargetCrossEntropy()
        # A full checkpoint rebuilds the architecture by name; its weights come from the state dict.
        self._save_hparams(pretrained=False, pretrained_file=None)
        self.hparams["mixup"] = None if self.mixup_config is None else self.mixup_config.as_dict()

    def data_config(self) -> dict[str, Any]:
        """The model's preprocessing (input size, interpolation, mean, std, crop) as timm resolves it."""
        return dict(self._data_config)

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        images = batch["pixel_values"]
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        logits = self.model(images)
        if self.tta == "hflip" and not self.training:
            logits = (logits + self.model(images.flip(-1))) / 2
        return logits

    def step(self, batch: dict[str, Any], stage: str) -> tuple[torch.Tensor, Any]:
        if stage != "train" or self.mixer is None:
            return super().step(batch, stage)
        images, targets = self.mixer(batch["pixel_values"], batch["labels"])
        logits = self({"pixel_values": images})
        # fp32: timm's loss takes a log_softmax, which CPU bf16 autocast leaves in bf16 (cross_entropy it upcasts).
        # Accuracy of a mixed batch: against each image's dominant label, not the original one.
        return self.soft_target_loss(logits.float(), targets), (logits.detach(), targets.argmax(dim=-1))

    def head_modules(self, model: nn.Module) -> list[str]:
        classifier = model.pretrained_cfg.get("classifier") or ()
        return [classifier] if isinstance(classifier, str) else list(classifier)

    def discover_layers(self, model: nn.Module) -> dict[str, int]:
        return timm_layer_ids(model)

    def save_model(self, model: nn.Module, folder: str) -> None:
        """timm's hub layout (config.json + model.safetensors): ``timm.create_model("local-dir:<folder>", pretrained=True)``."""
        from timm.models import save_for_hf

        model.pretrained_cfg = {**model.pretrained_cfg, "label_names": self.label_names}
        save_for_hf(model, folder, safe_serialization=True)


def _timm_data_config(model: nn.Module) -> dict[str, Any]:
    import timm.data

    return timm.data.resolve_data_config(model=model)
