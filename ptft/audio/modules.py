"""Audio classification modules: Hugging Face audio models (wav2vec2, HuBERT, WavLM, AST) and timm CNNs over
spectrograms."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ptft.audio.features import SpecAugmentConfig, Spectrogram, SpectrogramConfig, spec_augment
from ptft.core.errors import PtftError
from ptft.core.hf import HFModule, build_hf_model, label_config
from ptft.core.layers import timm_layer_ids
from ptft.core.classification import ClassificationModule
from ptft.text.heads import EncoderWithHead, SequenceHead, SequenceHeadKind
from ptft.vision.mixing import BatchMixer, MixupConfig
from ptft.vision.modules import create_timm_model


class AudioEncoderWithHead(EncoderWithHead):
    """A bare Hugging Face audio encoder (``AutoModel``: wav2vec2, HuBERT, AST…) with a ptft head on its frames.

    The frame mask comes from the encoder's own ``_get_feature_vector_attention_mask`` (the convolutional feature
    encoder shortens the sequence) when the batch has an ``attention_mask``; every frame counts otherwise.
    ``save_pretrained`` / ``from_pretrained`` as :class:`ptft.text.heads.EncoderWithHead`.
    """

    def forward(self, attention_mask: torch.Tensor | None = None, **inputs: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        if attention_mask is not None:
            inputs["attention_mask"] = attention_mask
        states = self.encoder(**inputs).last_hidden_state
        frames = states.shape[1]
        if attention_mask is not None and hasattr(self.encoder, "_get_feature_vector_attention_mask"):
            mask = self.encoder._get_feature_vector_attention_mask(frames, attention_mask).long()
        else:
            mask = torch.ones(states.shape[:2], dtype=torch.long, device=states.device)
        return self.head(states, mask)


def _check_waveform_mixup(config: MixupConfig | None) -> MixupConfig | None:
    if config is not None and (config.cutmix_alpha > 0 or config.cutmix_minmax is not None):
        raise PtftError("mixup on waveforms: CutMix cuts image boxes; set mixup.cutmix_alpha: 0 (mixup only)")
    return config


class WaveformMixing:
    """Mixup of training waveforms (``mixup``): the module's ``mixer`` and soft-target loss, shared by both models."""

    def init_mixing(self, mixup: MixupConfig | dict | None) -> None:
        self.mixup_config = _check_waveform_mixup(MixupConfig.coerce(mixup))
        self.mixer = None
        if self.mixup_config is not None:
            from timm.loss import SoftTargetCrossEntropy

            self.mixer = BatchMixer(self.mixup_config, self.num_labels, self.label_smoothing)
            self.soft_target_loss = SoftTargetCrossEntropy()

    def step(self, batch: dict[str, Any], stage: str) -> tuple[torch.Tensor, Any]:
        if stage != "train" or self.mixer is None:
            return super().step(batch, stage)  # type: ignore[misc]
        waves, targets = self.mixer(batch["input_values"], batch["labels"])
        mixed = {**batch, "input_values": waves}
        if (mask := batch.get("attention_mask")) is not None:
            # timm mixes each clip with its mirror in the batch: the mix lasts as long as the longer of the two.
            even = len(mask) - len(mask) % 2
            mixed["attention_mask"] = torch.cat([torch.maximum(mask[:even], mask[:even].flip(0)), mask[even:]])
        logits = self(mixed)
        # Accuracy of a mixed batch: against each clip's dominant label.
        return self.soft_target_loss(logits.float(), targets), (logits.detach(), targets.argmax(dim=-1))


class AudioClassifier(WaveformMixing, HFModule, ClassificationModule):
    """Audio classification with any ``AutoModelForAudioClassification`` model: wav2vec2, HuBERT, WavLM, AST…

    Waveforms go through the model's own feature extractor (its ``preprocessor_config.json``: normalisation for
    wav2vec2 / HuBERT, filter banks for AST) in the data workers, at the sampling rate it names. Freeze the
    convolutional feature encoder with the ``ptft.core.FreezeFeatureEncoder`` callback.

    Args:
        model_name: Hugging Face hub name (``facebook/wav2vec2-base``, ``MIT/ast-finetuned-audioset-10-10-0.4593``)
            or a local folder with ``config.json``, weights and ``preprocessor_config.json``.
        pretrained: Load the pretrained weights; ``False`` builds the architecture with random weights.
        model_config: Values overriding the model's config (``{mask_time_prob: 0.05, layerdrop: 0.0}``); a dict
            holding ``model_type`` is a complete config (full checkpoints store the architecture this way).
        head: ``model``: the model's own head (wav2vec2: projector + mean pooling + classifier). Or a ptft head on
            the encoder's frames (padding excluded): ``mean``, ``attention`` pooling, ``lstm`` / ``gru``.
        head_dropout: Dropout before the classifier of a ptft head.
        rnn_size: Hidden size per direction of an ``lstm`` / ``gru`` head (default: half the encoder's).
        mixup: Mixup of training waveforms (timm's ``Mixup`` with ``cutmix_alpha: 0``); ``None``: off.
        **kwargs: The shared fine-tuning arguments of :class:`ptft.core.ClassificationModule`.
    """

    def __init__(
        self,
        model_name: str,
        pretrained: bool = True,
        model_config: dict[str, Any] | None = None,
        head: SequenceHeadKind = "model",
        head_dropout: float = 0.1,
        rnn_size: int | None = None,
        mixup: MixupConfig | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        from transformers import AutoModel, AutoModelForAudioClassification

        self.model_name = model_name
        #: The data module runs this feature extractor and resamples to its ``sampling_rate``.
        self.feature_extractor_name = model_name
        self.sampling_rate: int | None = None
        labels = label_config(self.label_names)
        if head == "model":
            model = build_hf_model(AutoModelForAudioClassification, model_name, pretrained, model_config, **labels)
        else:
            encoder = build_hf_model(AutoModel, model_name, pretrained, model_config, **labels)
            hidden = encoder.config.hidden_size
            model = AudioEncoderWithHead(encoder, SequenceHead(head, hidden, self.num_labels, head_dropout, rnn_size))
        architecture = model.config.to_dict()
        self.set_model(model)
        self.init_mixing(mixup)
        self._save_hparams(pretrained=False, model_config=architecture)
        self.hparams["mixup"] = None if self.mixup_config is None else self.mixup_config.as_dict()

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        out = self.model(**{k: v for k, v in batch.items() if k != "labels"})
        return out if isinstance(out, torch.Tensor) else out.logits

    def head_modules(self, model: nn.Module) -> list[str]:
        return ["head"] if isinstance(model, EncoderWithHead) else super().head_modules(model)


class SpectrogramClassifier(WaveformMixing, ClassificationModule):
    """Audio classification with any timm CNN (or ViT) over log-mel / MFCC / STFT spectrograms of one channel.

    Features are computed on the model's device from waveform batches (:class:`ptft.audio.features.Spectrogram`),
    normalised per clip, masked by SpecAugment in training, and fed to the timm model as 1-channel images
    (``in_chans=1``: timm sums a pretrained first convolution's RGB filters).

    Args:
        model_name: timm model name (``resnet18``, ``efficientnet_b0``, ``hf-hub:timm/<name>``).
        pretrained: Load pretrained (ImageNet) weights from the hub or ``pretrained_file``; they help on spectrograms
            too. ``False`` trains from random weights.
        pretrained_file: Local weights file (``.safetensors`` / ``.pth``, or a ptft ``.ckpt``) instead of the hub.
        model_kwargs: Extra ``timm.create_model`` arguments (``{drop_rate: 0.2}``).
        sampling_rate: The rate clips are resampled to (the data module follows it).
        features: Window, hop, mel bands and kind of the spectrogram (:class:`SpectrogramConfig`).
        spec_augment: SpecAugment frequency / time masks in training (:class:`SpecAugmentConfig`); ``None``: off.
        mixup: Mixup of training waveforms (timm's ``Mixup`` with ``cutmix_alpha: 0``); ``None``: off.
        **kwargs: The shared fine-tuning arguments of :class:`ptft.core.ClassificationModule`.
    """

    def __init__(
        self,
        model_name: str,
        pretrained: bool = True,
        pretrained_file: str | None = None,
        model_kwargs: dict[str, Any] | None = None,
        sampling_rate: int = 16000,
        features: SpectrogramConfig = SpectrogramConfig(),  # noqa: B008 - frozen dataclass: --print_config shows it
        spec_augment: SpecAugmentConfig | None = None,
        mixup: MixupConfig | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.model_name = model_name
        self.sampling_rate = sampling_rate
        self.feature_extractor_name = None
        self.features_config = SpectrogramConfig.coerce(features)
        self.spec_augment = SpecAugmentConfig.coerce(spec_augment)
        self.frontend = Spectrogram(self.features_config, sampling_rate)
        model = create_timm_model(model_name, pretrained, pretrained_file, num_classes=self.num_labels, in_chans=1,
                                  **(model_kwargs or {}))
        self.set_model(model)
        self.init_mixing(mixup)
        self._save_hparams(pretrained=False, pretrained_file=None)
        self.hparams.update(
            features=self.features_config.as_dict(),
            spec_augment=None if self.spec_augment is None else self.spec_augment.as_dict(),
            mixup=None if self.mixup_config is None else self.mixup_config.as_dict(),
        )

    def spectrogram(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The normalised ``(batch, 1, bins, frames)`` features the CNN sees (SpecAugment-masked in training)."""
        feats, _ = self.frontend(batch["input_values"], batch.get("attention_mask"))
        if self.training and self.spec_augment is not None:
            feats = spec_augment(feats, self.spec_augment)
        return feats

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.model(self.spectrogram(batch))

    def head_modules(self, model: nn.Module) -> list[str]:
        classifier = model.pretrained_cfg.get("classifier") or ()
        return [classifier] if isinstance(classifier, str) else list(classifier)

    def discover_layers(self, model: nn.Module) -> dict[str, int]:
        return timm_layer_ids(model)

    def save_model(self, model: nn.Module, folder: str) -> None:
        """timm's hub layout (``timm.create_model("local-dir:<folder>", in_chans=1)``) plus ``ptft_audio.json``:
        the sampling rate and spectrogram settings the model was trained on."""
        from timm.models import save_for_hf

        model.pretrained_cfg = {**model.pretrained_cfg, "label_names": self.label_names}
        save_for_hf(model, folder, safe_serialization=True)
        settings = {"sampling_rate": self.sampling_rate, "features": self.features_config.as_dict()}
        (Path(folder) / "ptft_audio.json").write_text(json.dumps(settings, indent=2) + "\n")
