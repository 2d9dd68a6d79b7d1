"""Speech recognition: CTC fine-tuning of wav2vec2-style models with a character vocabulary built from the training
transcripts, greedy decoding, WER and CER from torchmetrics.

The vocabulary is the module's ``label_names`` (linked from the data by the CLI, saved in checkpoints, checked when one
is loaded): ``<pad>`` (id 0, also the CTC blank), ``<unk>``, ``|`` (the word delimiter, for spaces), then the
characters of the training transcripts. Decoding is greedy: the most likely token per frame, repeats collapsed,
blanks dropped.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn
from torchmetrics import MetricCollection

from ptft.audio.data import AudioClassificationDataModule, AudioDataset
from ptft.core.errors import PtftError
from ptft.core.files import FileSource
from ptft.core.hf import HFModule, build_hf_model
from ptft.core.classification import LabelledModule

PAD, UNK, WORD = "<pad>", "<unk>", "|"


def build_vocabulary(transcripts: list[str]) -> list[str]:
    """``<pad>``, ``<unk>``, ``|`` and the sorted characters of ``transcripts`` (spaces become ``|``)."""
    chars = sorted({c for text in transcripts for c in text} - {" "})
    return [PAD, UNK, WORD, *chars]


def encode_transcript(text: str, index: dict[str, int]) -> list[int]:
    return [index[WORD] if c == " " else index[c] for c in text]


class SpeechRecognitionDataModule(AudioClassificationDataModule):
    """Speech with transcripts, for CTC: CSV files of ``path,transcript`` (paths relative to the CSV).

    Transcripts are normalised (lower-cased when ``lowercase``, runs of spaces collapsed) and become character ids
    of the vocabulary built from the training transcripts (or given). A validation or test transcript with a
    character the vocabulary lacks stops with one line naming it. Reading, resampling, checks and augmentation are
    :class:`ptft.audio.AudioClassificationDataModule`'s; training clips are used whole (``clip_seconds: null``), since a
    crop would cut words out of the transcript.

    Args:
        train: Training CSV.
        val: Validation CSV; held out from ``train`` when missing.
        test: Test CSV.
        predict: Audio to transcribe: a folder or zip of audio files at any depth, or a CSV with the path column.
        vocabulary: The token list in id order (a pretrained CTC model's); ``None`` builds it from ``train``.
        path_column: CSV column with file paths.
        transcript_column: CSV column with transcripts.
        lowercase: Lower-case transcripts (and the vocabulary built from them).
        max_seconds: Longest training clip kept (longer ones are dropped with a warning); ``None`` keeps all.
        **kwargs: Reading and loader options of :class:`ptft.audio.AudioClassificationDataModule` (``sampling_rate``,
            ``resample``, ``augment``, ``feature_extractor``, ``on_bad_audio``, ``on_silent``, ``batch_size``,
            ``eval_batch_size``, ``val_fraction``, ``seed``, ``num_workers``).
    """

    def __init__(
        self,
        train: str | None = None,
        val: str | None = None,
        test: str | None = None,
        predict: str | None = None,
        vocabulary: list[str] | None = None,
        path_column: str = "path",
        transcript_column: str = "transcript",
        lowercase: bool = True,
        max_seconds: float | None = None,
        **kwargs: Any,
    ) -> None:
        for split, location in (("train", train), ("val", val), ("test", test)):
            if location is not None and not location.lower().endswith(".csv"):
                raise PtftError(f"{split}: speech recognition reads a CSV of {path_column},{transcript_column}; got {location!r}")
        if kwargs.pop("clip_seconds", None) is not None:
            raise PtftError("speech recognition trains on whole clips (a crop would cut words out of the transcript): "
                            "drop clip_seconds; max_seconds drops long clips instead")
        if kwargs.pop("train_per_class", None) is not None:
            raise PtftError("train_per_class draws clips per class; transcripts have no classes: subsample the CSV")
        super().__init__(train=train, val=val, test=test, predict=predict, labels=vocabulary, path_column=path_column,
                         label_column=transcript_column, clip_seconds=None, **kwargs)
        self.lowercase = lowercase
        self.max_seconds = max_seconds
        for split, samples in self.samples.items():
            if samples is not None:
                pairs = [(source, self.normalise(text)) for source, text in samples[0]]
                empty = [describe_row(source) for source, text in pairs if not text]
                if empty:
                    raise PtftError(f"{split}: {len(empty)} empty transcript(s), first: {empty[0]}")
                self.samples[split] = (pairs, [text for _, text in pairs])

    def normalise(self, text: str) -> str:
        text = " ".join((text or "").split())
        return text.lower() if self.lowercase else text

    def discover_labels(self) -> list[str]:
        train = self.samples["train"]
        if self.given_labels is not None:
            names = list(self.given_labels)
        elif train is None:
            raise PtftError("without training transcripts, give the vocabulary: data.init_args.vocabulary=[...]")
        else:
            names = build_vocabulary(train[1])
        for split in ("train", "val", "test"):
            if self.samples[split] is not None:
                self.check_characters(split, self.samples[split][1], names)
        return names

    @staticmethod
    def check_characters(split: str, transcripts: list[str], names: list[str]) -> None:
        known = set(names) | {" "}
        for row, text in enumerate(transcripts):
            unknown = sorted(set(text) - known)
            if unknown:
                raise PtftError(
                    f"{split} transcript {row + 1} ({text[:40]!r}) has character(s) {unknown} outside the vocabulary "
                    f"({len(names)} tokens, built from the training transcripts): add them to the training data, or "
                    "give data.init_args.vocabulary"
                )

    def check(self, split: str, rows: list[tuple[FileSource, str | None]]) -> list[tuple[FileSource, str | None]]:
        rows = super().check(split, rows)
        if split != "train" or self.max_seconds is None:
            return rows
        from ptft.audio.io import audio_info

        infos = audio_info([source for source, _ in rows])  # cached by the check above
        kept = [row for row, info in zip(rows, infos) if info[0] / info[1] <= self.max_seconds]
        if len(kept) < len(rows):
            from lightning.pytorch.utilities import rank_zero_warn

            rank_zero_warn(f"dropping {len(rows) - len(kept)} training clip(s) longer than max_seconds={self.max_seconds}")
        return kept

    def build(self, split: str, rows: list[tuple[FileSource, str | None]]) -> AudioDataset:
        index = {name: i for i, name in enumerate(self.label_names)}
        labels = None if split == "predict" else [encode_transcript(text, index) for _, text in rows]
        return self.clips(split, [source for source, _ in rows], labels)  # whole clips: clip_seconds is None


def describe_row(source: FileSource) -> str:
    from ptft.core.files import describe

    return describe(source)


class SpeechRecognizer(HFModule, LabelledModule):
    """CTC speech recognition with any ``AutoModelForCTC`` model (wav2vec2, HuBERT, WavLM, data2vec-audio).

    A pretrained speech encoder gets a new CTC head over the data's character vocabulary (``label_names``). Freeze
    the convolutional feature encoder with the ``ptft.core.FreezeFeatureEncoder`` callback, as the wav2vec2 papers
    and transformers' CTC example do.

    Args:
        model_name: Hugging Face hub name (``facebook/wav2vec2-base``) or a local folder with ``config.json``,
            weights and ``preprocessor_config.json``.
        pretrained: Load the pretrained weights; ``False`` builds the architecture with random weights.
        model_config: Config overrides (``{mask_time_prob: 0.05, layerdrop: 0.0, ctc_zero_infinity: true}``); a dict
            holding ``model_type`` is a complete config.
        **kwargs: ``num_labels`` / ``label_names`` (the vocabulary, linked from the data) and the shared fine-tuning
            arguments of :class:`ptft.core.FineTuneModule`.
    """

    checkpoint_monitor = ("val/wer", "min")

    def __init__(
        self, model_name: str, pretrained: bool = True, model_config: dict[str, Any] | None = None, **kwargs: Any
    ) -> None:
        super().__init__(**kwargs)
        from transformers import AutoModelForCTC

        if self.label_names[0] != PAD:
            raise PtftError(f"the vocabulary must start with {PAD!r} (the CTC blank), got {self.label_names[:3]}")
        self.model_name = model_name
        self.feature_extractor_name = model_name
        self.sampling_rate: int | None = None
        overrides = dict(model_config or {})
        defaults = {"ctc_loss_reduction": "mean", "ctc_zero_infinity": True}  # run_speech_recognition_ctc's
        overrides.update({k: v for k, v in defaults.items() if k not in overrides})
        # The CTC head follows the vocabulary: a pretrained model's head of another size is re-initialised.
        model = build_hf_model(AutoModelForCTC, model_name, pretrained, overrides, vocab_size=self.num_labels,
                               pad_token_id=0)
        architecture = model.config.to_dict()
        self.set_model(model)
        self._save_hparams(pretrained=False, model_config=architecture)

    def build_metrics(self) -> MetricCollection:
        from torchmetrics.text import CharErrorRate, WordErrorRate

        return MetricCollection({"wer": WordErrorRate(), "cer": CharErrorRate()})

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Per-frame token logits ``(batch, frames, vocabulary)``."""
        return self.model(**{k: v for k, v in batch.items() if k != "labels"}).logits

    def step(self, batch: dict[str, Any], stage: str) -> tuple[torch.Tensor, Any]:
        out = self.model(**batch)
        return out.loss, out.logits.detach()

    def frame_lengths(self, batch: dict[str, torch.Tensor], frames: int) -> torch.Tensor:
        mask = batch.get("attention_mask")
        if mask is None:
            return torch.full((batch["input_values"].shape[0],), frames, device=batch["input_values"].device)
        return self.model._get_feat_extract_output_lengths(mask.sum(-1)).clamp(max=frames)

    def decode(self, logits: torch.Tensor, lengths: torch.Tensor) -> list[str]:
        """Greedy CTC decoding: best token per frame, repeats collapsed, blanks and padding frames dropped."""
        ids = logits.argmax(-1).tolist()
        texts = []
        for row, n in zip(ids, lengths.tolist()):
            tokens, previous = [], None
            for token in row[:n]:
                if token != previous and token != 0:
                    tokens.append(self.label_names[token])
                previous = token
            texts.append("".join(" " if t == WORD else t for t in tokens).strip())  # <unk> kept, as transformers decodes
        return texts

    def references(self, labels: torch.Tensor) -> list[str]:
        return ["".join(" " if self.label_names[i] == WORD else self.label_names[i] for i in row if i >= 0)
                for row in labels.tolist()]

    def update_metrics(self, stage: str, outputs: Any, batch: dict[str, Any]) -> None:
        if stage == "train":  # decoding every training batch costs time and says little
            return
        predictions = self.decode(outputs, self.frame_lengths(batch, outputs.shape[1]))
        metrics = self.metrics[f"{stage}_"]
        metrics.update(predictions, self.references(batch["labels"]))
        self.log_dict(metrics, on_step=False, on_epoch=True, prog_bar=stage == "val", batch_size=len(predictions))

    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> dict[str, Any]:
        logits = self(batch)
        return {"transcripts": self.decode(logits, self.frame_lengths(batch, logits.shape[1]))}

    def prediction_rows(self, outputs: dict[str, Any]) -> list[dict[str, Any]]:
        return [{"transcript": text} for text in outputs["transcripts"]]

    def save_model(self, model: nn.Module, folder: str) -> None:
        """``save_pretrained`` plus a ``Wav2Vec2Processor`` (the feature extractor and a CTC tokenizer of this
        vocabulary), so that transformers' ``pipeline("automatic-speech-recognition", folder)`` transcribes."""
        import json
        import tempfile

        from transformers import Wav2Vec2CTCTokenizer, Wav2Vec2Processor

        model.save_pretrained(folder)
        with tempfile.TemporaryDirectory() as tmp:
            vocab = Path(tmp) / "vocab.json"
            vocab.write_text(json.dumps({name: i for i, name in enumerate(self.label_names)}))
            tokenizer = Wav2Vec2CTCTokenizer(str(vocab), pad_token=PAD, unk_token=UNK, word_delimiter_token=WORD)
        extractor = getattr(getattr(getattr(self, "_trainer", None), "datamodule", None), "extractor", None)
        if extractor is None:
            from transformers import AutoFeatureExtractor

            from ptft.core.hub import resolve_model_name

            extractor = AutoFeatureExtractor.from_pretrained(resolve_model_name(self.model_name))
        Wav2Vec2Processor(feature_extractor=extractor, tokenizer=tokenizer).save_pretrained(folder)
