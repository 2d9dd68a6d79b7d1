"""Knowledge distillation from any teacher into any ptft student of the same task: logits, and optionally hidden states.

::

    ptft fit --config recipes/text/sst2-distill.yaml \\
        --trainer.callbacks.teacher=runs/sst2/version_0/checkpoints/best.ckpt

The teacher lives in the callback, never in the student: frozen, in eval mode, outside the optimizer and outside the
student's checkpoints. It sees exactly the batch the student's ``forward`` saw (after any in-step mixing), so logits
line up example by example.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import nn

from ptft.core.callbacks import TrainingLossCallback
from ptft.core.errors import PtftError

#: Name of the student module's submodule holding the hidden-state projections (a training aid: see FineTuneModule).
AIDS = "training_aids"


def load_teacher(teacher: str, student: L.LightningModule, teacher_kwargs: dict[str, Any] | None = None) -> nn.Module:
    """The teacher as a ptft module in eval mode with no trainable parameters.

    Args:
        teacher: A ptft checkpoint (``.ckpt``: any module, e.g. a bigger fine-tuned model), or a model name / folder
            that the student's own class loads as ``model_name`` (a fine-tuned Hugging Face folder with its
            classification head, a timm name with ``pretrained_file`` in ``teacher_kwargs``).
        student: The module being trained; its class, label names and data pipeline are the teacher's.
        teacher_kwargs: More constructor arguments of the teacher, when it is built from a name.
    """
    from ptft.core.module import load_checkpoint

    if teacher.endswith(".ckpt"):
        module = load_checkpoint(teacher)
    else:
        labels = {k: getattr(student, k) for k in ("num_labels", "label_names") if hasattr(student, k)}
        module = type(student)(model_name=teacher, **{**labels, **(teacher_kwargs or {})})
    theirs, ours = getattr(module, "label_names", None), getattr(student, "label_names", None)
    if theirs is not None and ours is not None and list(theirs) != list(ours):
        raise PtftError(f"the teacher {teacher} predicts labels {list(theirs)}, the student {list(ours)}: "
                        "distillation needs the same classes in the same order")
    module.eval()
    module.requires_grad_(False)
    return module


def logits_of(output: Any) -> torch.Tensor:
    """The logits in a module's output: the tensor itself, ``output.logits`` or ``output["logits"]``."""
    if isinstance(output, torch.Tensor):
        return output
    logits = getattr(output, "logits", None)
    if logits is None and isinstance(output, dict):
        logits = output.get("logits")
    if not isinstance(logits, torch.Tensor):
        raise PtftError(f"cannot distil a module whose forward returns {type(output).__name__}: it needs logits")
    return logits


def soft_target_loss(
    student: torch.Tensor, teacher: torch.Tensor, temperature: float, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Hinton et al. (2015): ``T^2 * KL(softmax(teacher / T) || softmax(student / T))``, averaged over examples
    (or over the positions ``mask`` keeps, for per-token logits). ``T^2`` keeps its gradients on the scale of the
    hard-label loss whatever the temperature."""
    log_p_student = F.log_softmax(student.float() / temperature, dim=-1)
    log_p_teacher = F.log_softmax(teacher.float() / temperature, dim=-1)
    per_position = F.kl_div(log_p_student, log_p_teacher, log_target=True, reduction="none").sum(-1)
    if mask is not None:
        per_position = per_position[mask]
    return per_position.mean() * temperature**2


def output_size(module: nn.Module, name: str) -> int:
    """Feature size of a block's output: its last LayerNorm / Linear / BatchNorm / Conv in registration order.

    A static reading (no dry run before the optimizer exists) that holds for transformer layers (their final
    LayerNorm or MLP projection) and CNN stages (their last BatchNorm); ``hidden_sizes`` in
    :class:`Distillation` overrides it where it does not.
    """
    for sub in reversed(list(module.modules())):
        if isinstance(sub, nn.LayerNorm) and sub.normalized_shape:
            return int(sub.normalized_shape[-1])
        weight = getattr(sub, "weight", None)
        if type(sub).__name__.endswith("Norm") and isinstance(weight, torch.Tensor) and weight.ndim == 1:
            return int(weight.shape[0])  # RMSNorm and other norms of the hidden size
        if isinstance(sub, nn.Linear):
            return sub.out_features
        if isinstance(sub, nn.modules.batchnorm._BatchNorm):
            return sub.num_features
        if isinstance(sub, nn.modules.conv._ConvNd):
            return sub.out_channels
    raise PtftError(f"cannot tell the output size of {name}: set Distillation's hidden_sizes")


def first_tensor(output: Any) -> torch.Tensor:
    """A block's hidden states: the tensor, or the first tensor of a tuple / ``ModelOutput``."""
    if isinstance(output, torch.Tensor):
        return output
    values = output.values() if isinstance(output, dict) else output
    for value in values:
        if isinstance(value, torch.Tensor):
            return value
    raise PtftError(f"a hooked block returned {type(output).__name__} without a tensor")


class HiddenProjection(nn.Module):
    """Maps the student's feature size to the teacher's on the feature axis (last for tokens, 1 for feature maps)."""

    def __init__(self, student_size: int, teacher_size: int) -> None:
        super().__init__()
        self.linear = nn.Linear(student_size, teacher_size) if student_size != teacher_size else nn.Identity()

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        if hidden.ndim == 4:  # (B, C, H, W): a 1x1 convolution
            return self.linear(hidden.movedim(1, -1)).movedim(-1, 1)
        return self.linear(hidden)


class TeacherLogitCache:
    """Teacher logits by example content, kept in memory and on disk between epochs and runs.

    The key of an example is a hash of its input tensors' bytes (the unpadded part, by ``attention_mask``), so it
    follows the example through any shuffling, batching or padding. Each rank writes its own file; every epoch
    starts from all ranks' files. Inputs that change every epoch (random augmentation) never hit: the callback
    warns when the second epoch's hit rate stays low.
    """

    def __init__(self, folder: str, teacher: str) -> None:
        self.folder = Path(folder)
        identity = teacher
        if os.path.isfile(teacher):  # a retrained teacher at the same path must not reuse old logits
            stat = os.stat(teacher)
            identity += f":{stat.st_size}:{stat.st_mtime_ns}"
        self.prefix = "teacher-logits-" + hashlib.blake2b(identity.encode(), digest_size=8).hexdigest()
        self.logits: dict[bytes, torch.Tensor] = {}
        self.new = 0
        self.hits = self.misses = 0

    @staticmethod
    def keys(batch: dict[str, Any]) -> list[bytes]:
        tensors = {k: v for k, v in batch.items() if isinstance(v, torch.Tensor) and k != "labels"}
        if not tensors:
            raise PtftError("the teacher-logit cache needs tensor inputs in the batch")
        mask = tensors.get("attention_mask")
        lengths = mask.sum(-1).tolist() if mask is not None and mask.ndim == 2 else None
        keys = []
        for i in range(len(next(iter(tensors.values())))):
            digest = hashlib.blake2b(digest_size=16)
            for name in sorted(tensors):
                row = tensors[name][i]
                if lengths is not None and row.ndim >= 1 and row.shape[0] == mask.shape[1]:
                    row = row[: int(lengths[i])]
                digest.update(name.encode())
                digest.update(row.detach().cpu().contiguous().numpy().tobytes())
            keys.append(digest.digest())
        return keys

    def lookup(self, keys: list[bytes]) -> torch.Tensor | None:
        found = [self.logits.get(k) for k in keys]
        if any(f is None for f in found):
            self.misses += len(keys)
            return None
        self.hits += len(keys)
        return torch.stack(found)

    def store(self, keys: list[bytes], logits: torch.Tensor) -> None:
        for key, row in zip(keys, logits.detach().float().cpu()):
            self.logits[key] = row.clone()
        self.new += len(keys)

    def save(self, rank: int) -> None:
        if not self.new:
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        keys = torch.tensor([list(k) for k in self.logits], dtype=torch.uint8)
        tmp = self.folder / f".{self.prefix}-rank{rank}.pt.tmp"
        torch.save({"keys": keys, "logits": torch.stack(list(self.logits.values()))}, tmp)
        tmp.replace(self.folder / f"{self.prefix}-rank{rank}.pt")  # never a half-written cache file
        self.new = 0

    def load(self) -> None:
        for path in sorted(self.folder.glob(f"{self.prefix}-rank*.pt")):
            saved = torch.load(path, map_location="cpu", weights_only=True)
            for key, row in zip(saved["keys"], saved["logits"]):
                self.logits.setdefault(bytes(key.tolist()), row)


class Distillation(TrainingLossCallback):
    """Trains the student on ``(1 - alpha) * task loss + alpha * soft-target loss`` of a frozen teacher's logits,
    plus ``hidden_weight *`` an MSE between chosen student and teacher blocks' outputs (through a learned projection
    when their sizes differ, as TinyBERT).

    The student is the module being fitted; the teacher is built once before training (``setup``) and sees each
    batch exactly as the student's ``forward`` received it. Under mixed precision the teacher runs in the same
    autocast as the student. Validation, test and export see the student only.

    Args:
        teacher: A ptft checkpoint (``.ckpt``), or a model name / folder the student's class loads with its labels
            (e.g. a fine-tuned Hugging Face folder with its classification head).
        temperature: Softening temperature of both distributions (Hinton et al.: 1-20; 2-4 for few classes).
        alpha: Weight of the soft-target loss; ``1 - alpha`` weighs the task's own loss. ``1`` ignores the labels.
        teacher_kwargs: More constructor arguments when the teacher is built from a name (``head``, ``model_kwargs``).
        hidden_layers: Student block -> teacher block whose outputs are matched, as submodule names of the two ptft
            modules (``{model.bert.encoder.layer.1: model.bert.encoder.layer.3}``); ``ptft inspect-layers`` lists them.
        hidden_weight: Weight of the hidden-state MSE.
        hidden_sizes: Student block -> (student size, teacher size), where the blocks' output sizes cannot be read
            from their last LayerNorm / Linear / BatchNorm / Conv.
        cache_dir: Keep the teacher's logits here (by example content) so that later epochs and reruns skip the
            teacher. For inputs that do not change between epochs (text); not with ``hidden_layers``.
    """

    def __init__(
        self,
        teacher: str,
        temperature: float = 2.0,
        alpha: float = 0.5,
        teacher_kwargs: dict[str, Any] | None = None,
        hidden_layers: dict[str, str] | None = None,
        hidden_weight: float = 1.0,
        hidden_sizes: dict[str, tuple[int, int]] | None = None,
        cache_dir: str | None = None,
    ) -> None:
        if temperature <= 0:
            raise PtftError(f"Distillation temperature must be > 0, got {temperature}")
        if not 0 <= alpha <= 1:
            raise PtftError(f"Distillation alpha must be in [0, 1], got {alpha}")
        if cache_dir and hidden_layers:
            raise PtftError("Distillation cannot cache teacher logits while matching hidden states (the teacher "
                            "must run for its hidden states): drop cache_dir or hidden_layers")
        self.teacher_spec = teacher
        self.temperature = temperature
        self.alpha = alpha
        self.teacher_kwargs = teacher_kwargs
        self.hidden_layers = dict(hidden_layers or {})
        self.hidden_weight = hidden_weight
        self.hidden_sizes = {k: tuple(v) for k, v in (hidden_sizes or {}).items()}
        self.cache = TeacherLogitCache(cache_dir, teacher) if cache_dir else None
        self.teacher: nn.Module | None = None
        self._hooks: list[Any] = []
        self._student: dict[str, Any] = {}  # this step's student input and logits
        self._hidden: dict[str, dict[str, torch.Tensor]] = {"student": {}, "teacher": {}}

    # --- set-up -----------------------------------------------------------------------------------------------
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "fit" or self.teacher is not None:
            return
        self.teacher = load_teacher(self.teacher_spec, pl_module, self.teacher_kwargs)
        # Before the optimizer and DDP exist: the projections train with the student and are synced like it.
        if self.hidden_layers:
            projections = nn.ModuleDict()
            for ours, theirs in self.hidden_layers.items():
                student_block, teacher_block = self._block(pl_module, ours, "student"), self._block(self.teacher, theirs, "teacher")
                sizes = self.hidden_sizes.get(ours) or (output_size(student_block, ours), output_size(teacher_block, theirs))
                projections[ours.replace(".", "/")] = HiddenProjection(*sizes)
            aids = getattr(pl_module, AIDS, None)
            if aids is None:
                pl_module.add_module(AIDS, nn.ModuleDict())
                aids = getattr(pl_module, AIDS)
            aids["distillation"] = projections
        self._hooks.append(pl_module.register_forward_hook(self._capture_student))
        for ours, theirs in self.hidden_layers.items():
            self._hooks.append(self._block(pl_module, ours, "student").register_forward_hook(self._capture("student", ours)))
            self._hooks.append(self._block(self.teacher, theirs, "teacher").register_forward_hook(self._capture("teacher", ours)))

    @staticmethod
    def _block(module: nn.Module, name: str, role: str) -> nn.Module:
        try:
            return module.get_submodule(name)
        except AttributeError:
            raise PtftError(f"the {role} has no block {name!r}: list its blocks with `ptft inspect-layers`") from None

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        assert self.teacher is not None
        # Same device and (for "-true" precisions) the same weight dtype as the student.
        self.teacher = trainer.precision_plugin.convert_module(self.teacher.to(pl_module.device))
        self.teacher.eval()
        if self.cache is not None:
            self.cache.load()
        rank_zero_info(f"distilling from {self.teacher_spec} ({type(self.teacher).__name__}, "
                       f"{sum(p.numel() for p in self.teacher.parameters()):,} frozen parameters)")

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        for hook in self._hooks:
            hook.remove()
        self._hooks = []
        self.teacher = None

    # --- hooks ------------------------------------------------------------------------------------------------
    def _capture_student(self, module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        if module.training and args:
            self._student = {"batch": args[0], "logits": logits_of(output)}

    def _capture(self, role: str, key: str) -> Any:
        def hook(module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
            if role == "teacher" or module.training:
                self._hidden[role][key] = first_tensor(output)
        return hook

    # --- the loss ---------------------------------------------------------------------------------------------
    def training_loss(self, module: L.LightningModule, batch: Any, loss: torch.Tensor) -> torch.Tensor:
        if not self._student:
            raise PtftError(f"{type(module).__name__}'s training step did not call the module's forward: "
                            "Distillation needs the student's logits from self(batch)")
        inputs, student = self._student["batch"], self._student["logits"]
        self._student = {}
        teacher = self._teacher_logits(inputs)
        if teacher.shape != student.shape:
            raise PtftError(f"teacher logits {tuple(teacher.shape)} and student logits {tuple(student.shape)} differ: "
                            "the teacher must solve the same task on the same inputs")
        labels = inputs.get("labels") if isinstance(inputs, dict) else None
        mask = None
        if student.ndim == 3 and isinstance(labels, torch.Tensor) and labels.shape == student.shape[:2]:
            mask = labels != -100  # per-token logits: only the positions the task loss counts
        size = student.shape[0]
        soft = soft_target_loss(student, teacher.to(student.device), self.temperature, mask)
        module.log("train/loss_soft", soft, batch_size=size)
        total = (1 - self.alpha) * loss + self.alpha * soft
        if self.hidden_layers:
            hidden = self._hidden_loss(module, inputs)
            module.log("train/loss_hidden", hidden, batch_size=size)
            total = total + self.hidden_weight * hidden
        return total

    def _teacher_logits(self, inputs: Any) -> torch.Tensor:
        assert self.teacher is not None, "Distillation.setup did not run"
        keys = self.cache.keys(inputs) if self.cache is not None else None
        if keys is not None:
            cached = self.cache.lookup(keys)
            if cached is not None:
                return cached
        with torch.no_grad():
            logits = logits_of(self.teacher(inputs))
        if keys is not None:
            if logits.ndim != 2:
                raise PtftError("cache_dir keeps one row of logits per example: per-token tasks run the teacher "
                                "every step (drop cache_dir)")
            self.cache.store(keys, logits)
        return logits

    def _hidden_loss(self, module: L.LightningModule, inputs: Any) -> torch.Tensor:
        projections = getattr(module, AIDS)["distillation"]
        mask = inputs.get("attention_mask") if isinstance(inputs, dict) else None
        losses = []
        for ours in self.hidden_layers:
            student, teacher = self._hidden["student"].pop(ours, None), self._hidden["teacher"].pop(ours, None)
            if student is None or teacher is None:
                raise PtftError(f"the hooked block {ours!r} (or its teacher block) did not run in this step")
            projected = projections[ours.replace(".", "/")](student)
            if projected.shape != teacher.shape:
                raise PtftError(f"student block {ours} gives {tuple(projected.shape)} after projection, its teacher "
                                f"block {self.hidden_layers[ours]} {tuple(teacher.shape)}: pick blocks of equal length")
            error = (projected.float() - teacher.float()).pow(2)
            if mask is not None and error.ndim == 3 and mask.shape == error.shape[:2]:
                keep = mask.bool()
                losses.append(error[keep].mean())  # padding positions carry no meaning
            else:
                losses.append(error.mean())
        return torch.stack(losses).mean()

    # --- cache bookkeeping ------------------------------------------------------------------------------------
    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.cache is not None and trainer.world_size > 1 and trainer.current_epoch > 0:
            trainer.strategy.barrier()  # every rank's file of the last epoch is written
            self.cache.load()
        if self.cache is not None:
            self.cache.hits = self.cache.misses = 0

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.cache is None:
            return
        self.cache.save(trainer.global_rank)
        seen = self.cache.hits + self.cache.misses
        if trainer.current_epoch >= 1 and seen and self.cache.hits / seen < 0.5:
            rank_zero_warn(f"Distillation's teacher-logit cache hit {self.cache.hits / seen:.0%} of this epoch's "
                           "examples: the inputs change between epochs (random augmentation?), so the cache only "
                           "costs memory; drop cache_dir")
