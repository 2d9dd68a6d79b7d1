"""Self-supervised speech pre-training: wav2vec 2.0's masked contrastive task (transformers' ``Wav2Vec2ForPreTraining``)
on unlabelled audio, exported so that audio classification and CTC speech recognition start from it.

The masking, negative sampling and Gumbel-temperature schedule follow transformers' ``run_wav2vec2_pretraining_no_trainer``
example (``_compute_mask_indices``, ``_sample_negative_indices``; temperature 2.0 -> 0.5, decay 0.999995 per step);
the loss is the model's (contrastive + weighted diversity loss), divided by the number of masked frames as there.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from torch import nn

from ptft.audio.data import AudioDataset, AudioReading
from ptft.audio.io import AUDIO_SUFFIXES
from ptft.core.data import FineTuneDataModule
from ptft.core.errors import PtftError
from ptft.core.files import FileSource, list_files
from ptft.core.hf import HFModule, build_hf_model
from ptft.core.module import FineTuneModule


class UnlabeledAudioDataModule(AudioReading, FineTuneDataModule):
    """Unlabelled audio for pre-training: every audio file under a folder or zip (any depth), or a CSV's path column.

    Clips are resampled to the model's rate, checked before training (:class:`ptft.audio.AudioClassificationDataModule`'s
    rules) and cropped to ``clip_seconds`` for training.

    Args:
        train: Training audio.
        val: Validation audio; held out from ``train`` when missing.
        path_column: CSV column with file paths (when a split is a CSV).
        sampling_rate: The rate clips are resampled to; ``None`` takes the model's feature extractor's.
        resample: Resample files at another rate; ``false`` stops on the first one instead.
        clip_seconds: Length of training crops (wav2vec 2.0 cropped to 250k samples, ~15 s); ``None``: whole clips.
        random_crop: Crop training clips at a random position (``false``: centred).
        augment: Waveform augmentation of training clips (:class:`ptft.audio.WaveAugment`).
        feature_extractor: Hugging Face feature extractor to run on batches; ``None`` takes the model's.
        on_bad_audio: Unreadable or empty files: ``error`` or ``skip``.
        on_silent: Silent files: ``keep`` (warn), ``skip`` or ``error``.
        batch_size: Training batch size.
        eval_batch_size: Validation batch size; defaults to ``batch_size``.
        val_fraction: Fraction of training clips held out for validation when ``val`` is missing.
        seed: Seed of the held-out split and of the batch order; by default the one of ``seed_everything``.
        num_workers: DataLoader worker processes.
    """

    def __init__(
        self,
        train: str | None = None,
        val: str | None = None,
        path_column: str = "path",
        sampling_rate: int | None = None,
        resample: bool = True,
        clip_seconds: float | None = 4.0,
        random_crop: bool = True,
        augment: Any = None,
        feature_extractor: str | None = None,
        on_bad_audio: Literal["error", "skip"] = "error",
        on_silent: Literal["keep", "skip", "error"] = "keep",
        batch_size: int = 16,
        eval_batch_size: int | None = None,
        val_fraction: float = 0.05,
        seed: int | None = None,
        num_workers: int = 2,
    ) -> None:
        super().__init__(batch_size, eval_batch_size, num_workers, seed, val_fraction)
        self.save_hyperparameters(logger=False)
        if train is None:
            raise PtftError("give train audio: data.init_args.train=<folder, zip or CSV>")
        self.init_audio(sampling_rate, resample, clip_seconds, random_crop, augment, feature_extractor, on_bad_audio,
                        on_silent)
        self.files = {split: list_files(loc, split, AUDIO_SUFFIXES, path_column, kind="audio files")
                      if loc is not None else None for split, loc in (("train", train), ("val", val))}

    def load_split(self, split: str) -> list[tuple[FileSource, None]] | None:
        files = self.files.get(split)
        return None if files is None else [(f, None) for f in files]

    def build(self, split: str, rows: list[tuple[FileSource, None]]) -> AudioDataset:
        return self.clips(split, [f for f, _ in rows], None)


class Wav2Vec2Pretrainer(HFModule, FineTuneModule):
    """wav2vec 2.0 pre-training (masked contrastive prediction of quantised latents) with any
    ``AutoModelForPreTraining`` speech model (wav2vec2, wav2vec2-conformer).

    ``ptft export`` (or ``model_name: <this run's .ckpt>`` in a fine-tuning recipe) gives the encoder that
    :class:`ptft.audio.AudioClassifier` and :class:`ptft.audio.SpeechRecognizer` fine-tune; their task heads are new.

    Args:
        model_name: A hub name or folder whose config (and ``preprocessor_config.json``) describe the model, e.g.
            ``facebook/wav2vec2-base`` (with ``pretrained: true`` to continue its pre-training on your audio).
        pretrained: Start from the checkpoint's weights; ``False`` (default) from random weights.
        model_config: Config overrides (``{num_hidden_layers: 4, num_negatives: 50}``); a dict holding
            ``model_type`` is a complete config.
        mask_time_prob: Probability of each frame starting a masked span (wav2vec 2.0: 0.65).
        mask_time_length: Length of a masked span in frames (10).
        gumbel_temperature: ``[start, end, decay per step]`` of the quantiser's Gumbel-softmax temperature.
        **kwargs: The shared fine-tuning arguments of :class:`ptft.core.FineTuneModule`.
    """

    checkpoint_monitor = ("val/loss", "min")

    def __init__(
        self,
        model_name: str,
        pretrained: bool = False,
        model_config: dict[str, Any] | None = None,
        mask_time_prob: float = 0.65,
        mask_time_length: int = 10,
        gumbel_temperature: tuple[float, float, float] = (2.0, 0.5, 0.999995),
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        from transformers import AutoModelForPreTraining

        if not 0 < mask_time_prob < 1:
            raise PtftError(f"mask_time_prob must be in (0, 1), got {mask_time_prob}")
        self.model_name = model_name
        self.feature_extractor_name = model_name
        self.sampling_rate: int | None = None
        self.mask_time_prob = mask_time_prob
        self.mask_time_length = mask_time_length
        self.gumbel = tuple(float(x) for x in gumbel_temperature)
        model = build_hf_model(AutoModelForPreTraining, model_name, pretrained, model_config)
        if not hasattr(model, "set_gumbel_temperature"):
            raise PtftError(f"{model_name!r} builds {type(model).__name__}, not a wav2vec 2.0-style pre-training model")
        architecture = model.config.to_dict()
        self.set_model(model)
        self._save_hparams(pretrained=False, model_config=architecture)

    def forward(self, batch: dict[str, torch.Tensor]) -> Any:
        return self.model(**batch)

    def masks(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """``mask_time_indices`` and ``sampled_negative_indices`` for a batch (drawn from numpy's global stream, which
        Lightning's ``seed_everything`` seeds)."""
        from transformers.models.wav2vec2.modeling_wav2vec2 import _compute_mask_indices, _sample_negative_indices

        waves = batch["input_values"]
        frames = int(self.model._get_feat_extract_output_lengths(torch.tensor(waves.shape[1])))
        mask = batch.get("attention_mask")
        frame_mask = None if mask is None else self.model._get_feature_vector_attention_mask(frames, mask)
        if frames <= self.mask_time_length:
            raise PtftError(f"clips give {frames} frames, not more than mask_time_length={self.mask_time_length}: "
                            "use longer clips (data.init_args.clip_seconds)")
        shape = (waves.shape[0], frames)
        masked = _compute_mask_indices(shape, self.mask_time_prob, self.mask_time_length, attention_mask=frame_mask,
                                       min_masks=2)
        negatives = _sample_negative_indices(shape, self.model.config.num_negatives, mask_time_indices=masked)
        return {"mask_time_indices": torch.tensor(masked, dtype=torch.bool, device=waves.device),
                "sampled_negative_indices": torch.tensor(negatives, dtype=torch.long, device=waves.device)}

    def step(self, batch: dict[str, Any], stage: str) -> tuple[torch.Tensor, Any]:
        masks = self.masks(batch)
        out = self.model(**batch, **masks)
        count = masks["mask_time_indices"].sum().clamp(min=1)
        return out.loss / count, (out, count)

    def update_metrics(self, stage: str, outputs: Any, batch: dict[str, Any]) -> None:
        out, count = outputs
        size = batch["input_values"].shape[0]
        # Training: this rank's value per step (as train/loss); evaluation: epoch means over every rank.
        train = stage == "train"
        self.log_dict({f"{stage}/contrastive_loss": out.contrastive_loss / count,
                       f"{stage}/diversity_loss": out.diversity_loss / count,
                       f"{stage}/codevector_perplexity": out.codevector_perplexity},
                      on_step=train, on_epoch=not train, sync_dist=not train, batch_size=size)

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        start, end, decay = self.gumbel
        temperature = max(start * decay**self.global_step, end)
        self.model.set_gumbel_temperature(temperature)
        # Per step, from global_step alone: the same value on every rank, nothing to reduce.
        self.log("train/gumbel_temperature", temperature, batch_size=batch["input_values"].shape[0])

    def save_model(self, model: nn.Module, folder: str) -> None:
        """``save_pretrained`` plus the feature extractor: a folder ``AudioClassifier`` / ``SpeechRecognizer`` take as
        ``model_name`` (their task heads are initialised there; the pre-training heads are dropped)."""
        model.save_pretrained(folder)
        extractor = getattr(getattr(getattr(self, "_trainer", None), "datamodule", None), "extractor", None)
        if extractor is None:
            from transformers import AutoFeatureExtractor

            from ptft.core.hub import load_pretrained, resolve_model_name

            extractor = load_pretrained(AutoFeatureExtractor.from_pretrained, resolve_model_name(self.model_name),
                                        "feature extractor")
        extractor.save_pretrained(folder)
