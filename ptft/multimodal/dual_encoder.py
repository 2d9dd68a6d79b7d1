"""Contrastive dual encoders: CLIP / SigLIP-family models by name, or a text tower and an image tower assembled.

``DualEncoder`` trains image and text embeddings into one space with CLIP's symmetric InfoNCE or SigLIP's sigmoid loss
(:mod:`ptft.multimodal.losses`), negatives gathered across DDP ranks; validation and test report retrieval
recall@1/5/10 both ways and, when the data has class names, zero-shot accuracy from class prompts; ``ptft predict``
classifies images zero-shot among ``class_names``.
"""

from __future__ import annotations

import math
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics import MetricCollection
from torchmetrics.classification import MulticlassAccuracy

from ptft.core.errors import PtftError
from ptft.core.hf import build_hf_model
from ptft.core.hub import load_pretrained, resolve_model_name
from ptft.core.layers import hf_layer_ids, timm_layer_ids
from ptft.core.module import FineTuneModule
from ptft.core.objectives import Weighting, WeightedObjectives
from ptft.multimodal.fusion import FusionHead
from ptft.multimodal.losses import contrastive_loss, sigmoid_loss
from ptft.multimodal.encoders import AssembledDualEncoder, PretrainedDualEncoder
from ptft.multimodal.metrics import CrossModalRetrieval
from ptft.multimodal.objectives import OBJECTIVES, MaskedLMHead, hard_negatives
from ptft.multimodal.towers import TowerLearningRates, stretched_layer_ids, text_tower

#: CLIP clamps its learned logit scale at log(100): sharper logits than 1/0.01 only destabilise training.
MAX_LOGIT_SCALE = math.log(100.0)


class DualEncoder(TowerLearningRates, FineTuneModule):
    """Image-text contrastive training (CLIP, SigLIP) of a pretrained dual encoder or of two assembled towers.

    Give ``model_name`` (a transformers CLIP / SigLIP-family model by hub name or folder) or both ``text_model`` (any
    Hugging Face text encoder) and ``image_model`` (any timm model), which get projections into a shared space.
    Embeddings are L2-normalised; the loss is CLIP's symmetric InfoNCE with a learned temperature, or SigLIP's
    sigmoid loss with a learned scale and bias. Captions shared by several images in a batch (``"a photo of a
    cat"``) count as positives of each other. Under DDP the embeddings of every rank are gathered with their
    gradients, so N devices with B pairs train as one with N x B.

    Validation and test log the loss, ``image_to_text/recall@k`` and ``text_to_image/recall@k`` (k = 1, 5, 10) over
    the whole set and, when ``class_names`` are known (class-folder data links them), ``zero_shot_acc``: each image
    against one prompt per class. ``ptft predict`` classifies images among ``class_names`` zero-shot.

    Args:
        model_name: A transformers dual encoder (``openai/clip-vit-base-patch32``, ``google/siglip-base-patch16-224``)
            by hub name or local folder.
        text_model: Hugging Face text encoder of an assembled dual encoder (``sentence-transformers/all-MiniLM-L6-v2``
            or a folder).
        image_model: timm image encoder of an assembled dual encoder (``resnet18``, ``vit_small_patch16_224``…).
        audio_model: Hugging Face audio encoder of an assembled audio-text dual encoder (CLAP-style: wav2vec2, HuBERT,
            WavLM by hub name or folder), instead of ``image_model``; its feature extractor preprocesses the clips.
        pretrained: Load pretrained weights (every tower); ``False`` builds them from their configs with random weights.
        image_pretrained: Whether the timm image tower starts from pretrained weights; ``None`` follows ``pretrained``
            (e.g. a pretrained text tower with an image tower from random weights: ``image_pretrained: false``).
        image_pretrained_file: Local weights file of the timm image tower (offline).
        image_kwargs: Extra ``timm.create_model`` arguments of the image tower.
        projection_dim: Shared embedding size of an assembled dual encoder.
        text_pooling: How an assembled text tower's token states become one vector: ``mean`` or ``cls``.
        loss: ``contrastive`` (CLIP's InfoNCE), ``sigmoid`` (SigLIP's), or ``auto``: sigmoid for a pretrained model with
            a logit bias (SigLIP), else contrastive.
        temperature: Starting temperature of an assembled model's contrastive loss (CLIP: 0.07); the sigmoid loss starts
            at SigLIP's scale 10 and bias -10.
        learn_temperature: Learn the logit scale (and bias); ``False`` keeps the starting values.
        class_names: Class names for zero-shot accuracy and prediction; linked from class-folder data by the CLI.
        prompt: The caption of a class for zero-shot scoring, ``{}`` standing for the name.
        tokenizer: Tokenizer for captions and prompts; defaults to the text tower's (``model_name`` or ``text_model``).
        max_length: Longest caption in tokens.
        objectives: Pre-training objectives and their weights: ``contrastive`` (CLIP / SigLIP), ``itm`` (image-text
            matching on hard negatives, through a cross-attention head) and ``mlm`` (masked language modelling on the
            text tower), e.g. ``{contrastive: 1.0, itm: 1.0, mlm: 1.0}``; each is logged as ``<stage>/loss_<name>``.
            ``itm`` and ``mlm`` need an assembled dual encoder (``text_model`` + ``image_model`` or ``audio_model``);
            with clips, each frame is a region of the matching head.
        objective_weighting: ``static`` (the weights as given) or ``learned`` (uncertainty weighting, Kendall et al.
            2018: each loss's weight learned with the model; :class:`ptft.core.WeightedObjectives`).
        mlm_probability: Share of caption tokens masked for ``mlm`` (BERT: 0.15).
        tower_lr: Learning rate of each named tower (``text``, ``vision``, ``projection``, ``scale``), e.g.
            ``{text: 1.0e-5, vision: 1.0e-4}``; layer-wise decay applies below a tower's top. Towers not named keep
            ``optimizer.lr`` (the projections and the scale: ``optimizer.head_lr``).
        **kwargs: The shared arguments of :class:`ptft.core.FineTuneModule` (``optimizer``, ``scheduler``, ``l1``,
            ``l2_sp``, ``peft``, ``checkpoint_weights``, ``compile``, ``gradient_checkpointing``).
    """

    checkpoint_monitor = ("val/loss", "min")

    def __init__(
        self,
        model_name: str | None = None,
        text_model: str | None = None,
        image_model: str | None = None,
        audio_model: str | None = None,
        pretrained: bool = True,
        image_pretrained: bool | None = None,
        image_pretrained_file: str | None = None,
        image_kwargs: dict[str, Any] | None = None,
        projection_dim: int = 256,
        text_pooling: Literal["mean", "cls"] = "mean",
        loss: Literal["auto", "contrastive", "sigmoid"] = "auto",
        temperature: float = 0.07,
        learn_temperature: bool = True,
        class_names: list[str] | None = None,
        prompt: str = "a photo of a {}.",
        tokenizer: str | None = None,
        max_length: int = 64,
        objectives: dict[str, float] | None = None,
        objective_weighting: Weighting = "static",
        mlm_probability: float = 0.15,
        tower_lr: dict[str, float] | None = None,
        **kwargs: Any,
    ) -> None:
        objectives = dict(objectives or {"contrastive": 1.0})
        unknown = sorted(set(objectives) - set(OBJECTIVES))
        if unknown:
            raise PtftError(f"DualEncoder: unknown objective(s) {unknown}; choose among {list(OBJECTIVES)}")
        if model_name is not None and set(objectives) - {"contrastive"}:
            raise PtftError("DualEncoder: objectives itm / mlm need an assembled dual encoder (text_model + "
                            "image_model or audio_model), not model_name")
        if image_model is not None and audio_model is not None:
            raise PtftError("DualEncoder: give image_model (image-text) or audio_model (audio-text), not both")
        other_model = image_model or audio_model
        if not 0 < mlm_probability < 1:
            raise PtftError(f"DualEncoder: mlm_probability must be between 0 and 1, got {mlm_probability}")
        if (model_name is None) == (text_model is None and other_model is None):
            raise PtftError("DualEncoder: give model_name (a CLIP / SigLIP-family model) or text_model and image_model "
                            "/ audio_model (two towers to assemble), not both")
        if model_name is None and (text_model is None or other_model is None):
            raise PtftError("DualEncoder: an assembled dual encoder needs text_model and image_model (or audio_model)")
        if temperature <= 0:
            raise PtftError(f"DualEncoder: temperature must be > 0, got {temperature}")
        if "{}" not in prompt:
            raise PtftError(f"DualEncoder: prompt must contain {{}} where the class name goes, got {prompt!r}")
        self.class_names = list(class_names) if class_names else None
        #: What the text is paired with: ``image`` (images or video clips) or ``audio`` (before the base builds the
        #: metrics, which are named after it).
        self.media: Literal["image", "audio"] = "audio" if audio_model is not None else "image"
        super().__init__(**kwargs)
        self.model_name = model_name or f"{text_model} + {other_model}"  # as ptft inspect-layers names it
        self.text_model_name = text_model
        self.image_model_name = image_model
        #: Audio-text: the data module runs this feature extractor at its sampling rate.
        self.feature_extractor_name = audio_model
        self.sampling_rate: int | None = None
        self.prompt = prompt
        self.tokenizer_name = tokenizer or model_name or text_model
        self.max_length = max_length
        if model_name is not None:
            net = PretrainedDualEncoder(self._load_pretrained_pair(model_name, pretrained))
            self.loss_kind = loss if loss != "auto" else ("sigmoid" if net.logit_bias is not None else "contrastive")
            if self.loss_kind == "sigmoid" and net.logit_bias is None:
                raise PtftError(f"DualEncoder: {model_name!r} has no logit bias for the sigmoid loss; use loss: contrastive")
            self._image_data_config = self._processor_data_config(model_name)
        else:
            self.loss_kind = "contrastive" if loss == "auto" else loss
            text = text_tower(text_model, pretrained)
            if audio_model is not None:
                from transformers import AutoModel

                other = build_hf_model(AutoModel, audio_model, pretrained, None)
                self._image_data_config = {}
            else:
                from ptft.vision.modules import create_timm_model
                import timm.data

                image_pretrained = pretrained if image_pretrained is None else image_pretrained
                other = create_timm_model(image_model, image_pretrained, image_pretrained_file, num_classes=0,
                                          **(image_kwargs or {}))
                self._image_data_config = timm.data.resolve_data_config(model=other)
            sigmoid = self.loss_kind == "sigmoid"
            net = AssembledDualEncoder(text, other, self.media, projection_dim, text_pooling,
                                       logit_scale=math.log(10.0) if sigmoid else math.log(1 / temperature),
                                       logit_bias=-10.0 if sigmoid else None)
        if "itm" in objectives:
            width = net.text.config.hidden_size
            heads = next(h for h in (8, 4, 2, 1) if width % h == 0)
            regions = (net.vision_projection.in_features if self.media == "image"
                       else net.audio_projection.in_features)
            net.itm_head = FusionHead("cross_attention", width, regions, width, 2, 0.1, heads, 1)
        if "mlm" in objectives:
            net.mlm_head = MaskedLMHead(net.text.config.hidden_size, net.text.get_input_embeddings(),
                                        getattr(net.text.config, "layer_norm_eps", 1e-12))
        net.objectives = WeightedObjectives(objectives, objective_weighting)
        #: The data module masks captions for ``mlm`` at this rate (``None``: no masking).
        self.mlm_probability = mlm_probability if "mlm" in objectives else None
        if not learn_temperature:
            for p in (net.logit_scale, net.logit_bias):
                if p is not None:
                    p.requires_grad_(False)
        self._prompt_embeddings: torch.Tensor | None = None
        self.set_model(net)
        self.init_tower_lr(tower_lr)
        self._save_hparams(pretrained=False, image_pretrained=False, image_pretrained_file=None)

    # --- building -------------------------------------------------------------------------------------------
    @staticmethod
    def _load_pretrained_pair(name: str, pretrained: bool) -> nn.Module:
        from transformers import AutoConfig, AutoModel

        name = resolve_model_name(name)
        config = load_pretrained(AutoConfig.from_pretrained, name, "config")
        model = (load_pretrained(AutoModel.from_pretrained, name, config=config, dtype=torch.float32) if pretrained
                 else AutoModel.from_config(config, dtype=torch.float32))
        if not (hasattr(model, "get_text_features") and hasattr(model, "get_image_features")):
            raise PtftError(f"DualEncoder: {name!r} ({type(model).__name__}) is not an image-text dual encoder (no "
                            "get_text_features / get_image_features); assemble one with text_model and image_model")
        return model

    @staticmethod
    def _processor_data_config(name: str) -> dict[str, Any]:
        """The image preprocessing of a transformers dual encoder as a timm data config (size, mean, std)."""
        from transformers import AutoImageProcessor

        processor = load_pretrained(AutoImageProcessor.from_pretrained, resolve_model_name(name), "image processor")
        size = processor.crop_size if getattr(processor, "do_center_crop", False) else processor.size
        side = size.get("height") or size.get("shortest_edge")
        return {"input_size": (3, side, side), "mean": tuple(processor.image_mean), "std": tuple(processor.image_std),
                "interpolation": "bicubic", "crop_pct": 1.0}

    def data_config(self) -> dict[str, Any]:
        """The image tower's preprocessing (input size, mean, std) as timm spells it; the data module reads it."""
        return dict(self._image_data_config)

    # --- towers and layers ----------------------------------------------------------------------------------
    def towers(self) -> dict[str, list[str]]:
        """Parameter-name prefixes (within ``self.model``) of each tower: text, vision, projection, scale."""
        if isinstance(self.model, PretrainedDualEncoder):
            m = self.model.model
            text = [f"model.{n}" for n in ("text_model",) if hasattr(m, n)]
            vision = [f"model.{n}" for n in ("vision_model",) if hasattr(m, n)]
            projection = [f"model.{n}" for n in ("text_projection", "visual_projection") if hasattr(m, n)]
            scale = [f"model.{n}" for n in ("logit_scale", "logit_bias") if hasattr(m, n)]
            return {"text": text, "vision": vision, "projection": projection, "scale": scale}
        other = "vision" if self.media == "image" else "audio"
        towers = {"text": ["text"], other: [other], "projection": ["text_projection", f"{other}_projection"],
                  "scale": ["logit_scale", "logit_bias"]}
        heads = [name for name in ("itm_head", "mlm_head") if hasattr(self.model, name)]
        if heads:  # the objectives' own heads (the MLM decoder is the text tower's tied word embeddings)
            towers["objective_heads"] = heads
        return towers

    def head_modules(self, model: nn.Module) -> list[str]:
        if isinstance(model, PretrainedDualEncoder):
            return ["objectives"]  # every other part of a pretrained dual encoder was trained together
        return ["text_projection", "vision_projection", "audio_projection", "logit_scale", "logit_bias", "itm_head",
                "mlm_head", "objectives"]

    def discover_layers(self, model: nn.Module) -> dict[str, int]:
        """Each tower's own depth (transformers blocks; timm's ``group_matcher``), stretched so both towers' tops meet;
        projections and the logit scale on top."""
        if isinstance(model, PretrainedDualEncoder):
            inner = model.model
            towers = {p: getattr(inner, p) for p in ("text_model", "vision_model") if hasattr(inner, p)}
            per_tower = {f"model.{p}": hf_layer_ids(m, lambda _: False) for p, m in towers.items()}
        else:
            other = ({"vision": timm_layer_ids(model.vision)} if model.media == "image"
                     else {"audio": hf_layer_ids(model.audio, lambda _: False)})
            per_tower = {"text": hf_layer_ids(model.text, lambda _: False), **other}
        return stretched_layer_ids(model, per_tower)

    # --- forward and loss -----------------------------------------------------------------------------------
    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Unit-length embeddings ``(B, D)`` of images ``(B, 3, H, W)``, or of clips ``(B, T, 3, H, W)``: the mean of
        their frames' embeddings (CLIP4Clip's mean pooling, which turns any image-text model into a video-text one)."""
        if pixel_values.ndim == 5:
            batch, frames = pixel_values.shape[:2]
            embeddings = self.model.encode_image(pixel_values.flatten(0, 1)).float()
            return F.normalize(embeddings.view(batch, frames, -1).mean(1), dim=-1)
        return F.normalize(self.model.encode_image(pixel_values).float(), dim=-1)

    def encode_media(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Unit-length embeddings ``(B, D)`` of a batch's images, clips or audio (``input_values``)."""
        if "input_values" in batch:
            return F.normalize(self.model.encode_audio(batch["input_values"], batch.get("audio_mask")).float(), dim=-1)
        return self.encode_images(batch["pixel_values"])

    def encode_texts(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Unit-length text embeddings ``(B, D)``."""
        return F.normalize(self.model.encode_text(input_ids, attention_mask).float(), dim=-1)

    @staticmethod
    def distinct_captions(batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Token ids and masks of each distinct caption of a batch (``groups``), and each pair's index among them
        (``None``: every caption encoded, no groups)."""
        groups = batch.get("groups")
        if groups is None:
            return batch["input_ids"], batch["attention_mask"], None
        distinct, inverse = groups.unique(return_inverse=True)
        first = torch.full((len(distinct),), len(groups), device=groups.device).scatter_reduce(
            0, inverse, torch.arange(len(groups), device=groups.device), reduce="amin")
        ids, mask = batch["input_ids"][first], batch["attention_mask"][first]
        longest = int(mask.sum(1).max())  # the batch was padded for its longest caption, maybe not one of these
        return ids[:, :longest], mask[:, :longest], inverse

    def forward(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Image and caption embeddings of a batch of pairs.

        Each distinct caption (``groups``) is encoded once and shared by its pairs: with class-template captions a
        batch of 128 pairs runs the text tower on 10 captions, not 128 (dropout then draws one mask per caption).
        """
        images = self.encode_media(batch)
        ids, mask, inverse = self.distinct_captions(batch)
        texts = self.encode_texts(ids, mask)
        return images, texts if inverse is None else texts[inverse]

    def contrastive(self, images: torch.Tensor, texts: torch.Tensor, groups: torch.Tensor | None) -> torch.Tensor:
        """The loss of this rank's pairs against every rank's (gathered with gradients under DDP)."""
        scale = self.model.logit_scale.clamp(max=MAX_LOGIT_SCALE)
        world = 1 if self._trainer is None else self.trainer.world_size
        gathered: dict[str, Any] = {}
        if world > 1:  # Lightning's samplers give every rank a batch of the same size
            all_images, all_texts = (self.all_gather(x, sync_grads=True).flatten(0, 1) for x in (images, texts))
            all_groups = None if groups is None else self.all_gather(groups).flatten(0, 1)
            gathered = dict(all_b=all_texts, rank=self.global_rank, all_groups=all_groups)
            if self.loss_kind == "contrastive":
                gathered["all_a"] = all_images
        if self.loss_kind == "sigmoid":
            return sigmoid_loss(images, texts, scale, self.model.logit_bias, groups=groups, **gathered)
        return contrastive_loss(images, texts, scale, groups=groups, **gathered)

    def step(self, batch: dict[str, Any], stage: str) -> tuple[torch.Tensor, Any]:
        objectives: WeightedObjectives = self.model.objectives
        if objectives.names == ["contrastive"]:
            images, texts = self(batch)
            loss = objectives({"contrastive": self.contrastive(images, texts, batch.get("groups"))})
            return loss, (images.detach(), texts.detach())
        net = self.model
        regions, region_mask, embeddings = net.media_states(batch)
        images = F.normalize(embeddings.float(), dim=-1)
        ids, mask, inverse = self.distinct_captions(batch)
        text_states = net.text_states(ids, mask)
        texts = F.normalize(net.project_text(text_states, mask).float(), dim=-1)
        if inverse is not None:
            texts, text_states, mask = texts[inverse], text_states[inverse], mask[inverse]
        losses: dict[str, torch.Tensor] = {}
        size = len(images)
        if "contrastive" in objectives.weights:
            losses["contrastive"] = self.contrastive(images, texts, batch.get("groups"))
        if "itm" in objectives.weights:
            losses["itm"], accuracy = self.image_text_matching(regions, region_mask, text_states, mask, images, texts,
                                                               batch)
            self.log(f"{stage}/itm_acc", accuracy, batch_size=size, sync_dist=stage != "train")
        if "mlm" in objectives.weights:
            losses["mlm"], accuracy = self.masked_language_modelling(batch)
            self.log(f"{stage}/mlm_acc", accuracy, batch_size=size, sync_dist=stage != "train")
        for name, value in losses.items():
            self.log(f"{stage}/loss_{name}", value, batch_size=size, sync_dist=stage != "train")
        if stage == "train" and objectives.weighting == "learned":
            self.log_dict({f"train/weight_{n}": w for n, w in objectives.effective_weights().items()}, batch_size=size)
        return objectives(losses), (images.detach(), texts.detach())

    def image_text_matching(self, regions: torch.Tensor, region_mask: torch.Tensor, text_states: torch.Tensor,
                            text_mask: torch.Tensor, images: torch.Tensor, texts: torch.Tensor, batch: dict[str, Any]
                            ) -> tuple[torch.Tensor, torch.Tensor]:
        """ITM loss and accuracy: each true pair (label 1), each image (clip, sound) with a hard-negative caption and
        each caption with a hard-negative image (label 0), through the cross-attention head over the media's regions.
        Evaluation draws its negatives from a generator seeded by the batch's first index, so validation losses
        compare across epochs."""
        generator = None
        if not self.training and "indices" in batch:
            generator = torch.Generator(images.device).manual_seed(int(batch["indices"][0]))
        with torch.no_grad():
            (image_rows, caption_picks), (caption_rows, image_picks) = hard_negatives(
                images @ texts.T, batch.get("groups"), generator)
        all_rows = torch.arange(len(images), device=images.device)
        media_index = torch.cat([all_rows, image_rows, image_picks])
        text_index = torch.cat([all_rows, caption_picks, caption_rows])
        labels = torch.cat([torch.ones_like(all_rows), torch.zeros_like(image_rows), torch.zeros_like(caption_rows)])
        logits = self.model.itm_head(text_states[text_index], text_mask[text_index], regions[media_index],
                                     region_mask[media_index])
        return F.cross_entropy(logits.float(), labels), (logits.argmax(-1) == labels).float().mean()

    def masked_language_modelling(self, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        """Cross-entropy and accuracy of the masked caption tokens (``mlm_input_ids`` / ``mlm_labels``, masked by
        the data)."""
        if "mlm_labels" not in batch:
            raise PtftError("the mlm objective needs masked captions: use a ptft.multimodal data module (ImageText-, "
                            "VideoText- or AudioTextDataModule: they mask them when the model asks)")
        states = self.model.text_states(batch["mlm_input_ids"], batch["attention_mask"])
        labels = batch["mlm_labels"]
        chosen = labels != -100
        if not chosen.any():  # no token masked in this batch (very short captions): nothing to learn, no NaN
            return states.sum() * 0.0, states.new_zeros(())
        logits = self.model.mlm_head(states[chosen]).float()
        return F.cross_entropy(logits, labels[chosen]), (logits.argmax(-1) == labels[chosen]).float().mean()

    # --- metrics ----------------------------------------------------------------------------------------------
    def build_metrics(self) -> MetricCollection | None:
        metrics: dict[str, Any] = {"retrieval": CrossModalRetrieval((self.media, "text"), (1, 5, 10))}
        if self.class_names:
            metrics["zero_shot_acc"] = MulticlassAccuracy(num_classes=len(self.class_names), average="micro")
        return MetricCollection(metrics)

    def update_metrics(self, stage: str, outputs: Any, batch: dict[str, Any]) -> None:
        if stage == "train":  # retrieval within one batch says little; evaluation scores the whole set
            return
        images, texts = outputs
        metrics = self.metrics[f"{stage}_"]
        metrics["retrieval"].update(images, texts, groups=batch.get("groups"), indices=batch.get("indices"))
        if "zero_shot_acc" in metrics and "labels" in batch:
            metrics["zero_shot_acc"].update(images @ self.prompt_embeddings().T, batch["labels"])

    def epoch_metrics(self, stage: str) -> dict[str, torch.Tensor] | None:
        """Recall@k both ways over every rank's pairs, and zero-shot accuracy (the base logs and resets them)."""
        metrics = self.metrics[f"{stage}_"]
        results = dict(metrics["retrieval"].compute())
        if "zero_shot_acc" in metrics and metrics["zero_shot_acc"].update_count:
            results["zero_shot_acc"] = metrics["zero_shot_acc"].compute()
        self._prompt_embeddings = None  # the text tower changes between epochs
        return {f"{stage}/{name}": value for name, value in results.items()}

    # --- zero-shot ------------------------------------------------------------------------------------------------
    def tokenizer(self) -> Any:
        from transformers import AutoTokenizer

        if getattr(self, "_tokenizer", None) is None:
            self._tokenizer = load_pretrained(AutoTokenizer.from_pretrained, resolve_model_name(self.tokenizer_name),
                                              "tokenizer")
        return self._tokenizer

    def prompts(self) -> list[str]:
        if not self.class_names:
            raise PtftError("zero-shot classification needs class names: set model.init_args.class_names (class-folder "
                            "data links them)")
        return [self.prompt.format(name.replace("_", " ")) for name in self.class_names]

    @torch.no_grad()
    def prompt_embeddings(self) -> torch.Tensor:
        """Unit text embeddings ``(classes, D)`` of the class prompts, computed once per evaluation epoch."""
        if self._prompt_embeddings is None:
            tokens = self.tokenizer()(self.prompts(), padding=True, truncation=True, max_length=self.max_length,
                                      return_tensors="pt").to(self.device)
            was_training = self.model.training
            self.model.eval()
            self._prompt_embeddings = self.encode_texts(tokens["input_ids"], tokens["attention_mask"])
            self.model.train(was_training)
        return self._prompt_embeddings

    def on_predict_epoch_start(self) -> None:
        self._prompt_embeddings = None

    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> dict[str, Any]:
        """Zero-shot class probabilities of each image among ``class_names`` (softmax of the scaled similarities)."""
        scale = self.model.logit_scale.clamp(max=MAX_LOGIT_SCALE).exp()
        probs = (scale * self.encode_media(batch) @ self.prompt_embeddings().T).softmax(-1)
        ids = probs.argmax(-1)
        return {"label_ids": ids, "labels": [self.class_names[i] for i in ids.tolist()], "probs": probs}

    def prediction_rows(self, outputs: dict[str, Any]) -> list[dict[str, Any]]:
        """``label``, ``label_id`` and one probability column per class (``p_<name>``)."""
        return [{"label": label, "label_id": label_id, **{f"p_{n}": round(p, 6) for n, p in zip(self.class_names, probs)}}
                for label, label_id, probs in zip(outputs["labels"], outputs["label_ids"].tolist(), outputs["probs"].tolist())]
