"""Text to speech: fine-tuning (or training) transformers' SpeechT5 text-to-speech model on transcribed speech.

The model predicts log-mel spectrograms (its feature extractor's: 80 log10 mel bands at 16 kHz, 16 ms hop) from
characters, conditioned on a speaker embedding; the loss is transformers' (L1 on the spectrogram before and after
the post-net, the stop-token BCE, the guided-attention loss). Text is encoded with a character vocabulary built from
the training transcripts (speech recognition's, :mod:`ptft.audio.asr`), so a model can be trained from scratch on any
language without a sentencepiece model; a pretrained checkpoint keeps its encoder, decoder and post-net, and its
text embedding table is rebuilt for that vocabulary. Each speaker of the data gets a learned embedding (SpeechT5
was pretrained with x-vectors; none of the x-vector extractors can be installed without torchaudio or speechbrain).

Waveforms come from a vocoder: transformers' ``SpeechT5HifiGan`` when one is named (``microsoft/speecht5_hifigan`` or a
folder), else Griffin-Lim phase reconstruction of the mel spectrogram (:func:`griffin_lim`), which needs no weights.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset

from ptft.audio.asr import PAD, SpeechRecognitionDataModule, encode_transcript
from ptft.audio.data import AudioDataset
from ptft.core.classification import LabelledModule
from ptft.core.errors import PtftError
from ptft.core.files import FileSource
from ptft.core.hf import HFModule, build_hf_model


def _key(source: FileSource) -> tuple[str, str]:
    return str(source.root), str(source.archive)


class TextToSpeechDataModule(SpeechRecognitionDataModule):
    """Transcribed speech for text to speech: CSV files of ``path,transcript`` and optionally a speaker column.

    Reading, resampling (to the model's feature extractor's rate), file checks, transcript normalisation and the
    character vocabulary are :class:`ptft.audio.SpeechRecognitionDataModule`'s. Batches hold ``input_ids`` (the
    characters), ``labels`` (the clips' log-mel spectrograms from the model's feature extractor, padding ``-100``)
    and ``speakers`` (speaker ids). ``ptft predict`` reads a CSV of texts (the transcript column, and the speaker
    column when there is one) and writes one wav file per row.

    Args:
        train: Training CSV.
        val: Validation CSV; held out from ``train`` when missing.
        test: Test CSV.
        predict: CSV of texts to speak (transcript column; speaker column optional: the first speaker otherwise).
        vocabulary: The character list in id order; ``None`` builds it from ``train``.
        speakers: Speaker names in id order; ``None`` takes the sorted names in ``train``'s speaker column.
        path_column: CSV column with file paths.
        transcript_column: CSV column with transcripts.
        speaker_column: CSV column naming each clip's speaker; ``None``: one speaker.
        lowercase: Lower-case transcripts (and the vocabulary built from them).
        max_seconds: Longest training clip kept (longer ones are dropped with a warning); ``None`` keeps all.
        **kwargs: Reading and loader options of :class:`ptft.audio.AudioClassificationDataModule` (``resample``,
            ``on_bad_audio``, ``on_silent``, ``batch_size``, ``eval_batch_size``, ``val_fraction``, ``seed``,
            ``num_workers``).
    """

    def __init__(
        self,
        train: str | None = None,
        val: str | None = None,
        test: str | None = None,
        predict: str | None = None,
        vocabulary: list[str] | None = None,
        speakers: list[str] | None = None,
        path_column: str = "path",
        transcript_column: str = "transcript",
        speaker_column: str | None = None,
        lowercase: bool = True,
        max_seconds: float | None = None,
        **kwargs: Any,
    ) -> None:
        if kwargs.get("augment") is not None:
            raise PtftError("text to speech learns the recordings as they are: drop data.init_args.augment")
        super().__init__(train=train, val=val, test=test, predict=None,
                         vocabulary=vocabulary, path_column=path_column, transcript_column=transcript_column,
                         lowercase=lowercase, max_seconds=max_seconds, **kwargs)
        self.speaker_column = speaker_column
        self.text_predict = predict
        self.speaker_of: dict[tuple[str, str], str] = {}
        seen: dict[str, set[str]] = {}
        if speaker_column is not None:
            from ptft.core.files import _read_csv

            for split, location in (("train", train), ("val", val), ("test", test)):
                if location is None:
                    continue
                csv_path, rows = _read_csv(location, split, [path_column, speaker_column])
                for row in rows:
                    self.speaker_of[_key(FileSource(csv_path.parent / row[path_column]))] = row[speaker_column]
                seen[split] = {row[speaker_column] for row in rows}
        self.speaker_names = list(speakers) if speakers is not None else (sorted(seen.get("train", ())) or ["speaker"])
        for split, names in seen.items():  # a speaker without training clips would speak with an untrained embedding
            unknown = sorted(names - set(self.speaker_names))
            if unknown:
                raise PtftError(f"{split}: speaker(s) {unknown[:3]} are not among the training speakers "
                                f"{self.speaker_names[:5]} (or data.init_args.speakers)")

    def speaker_id(self, name: str | None) -> int:
        if name is None or name == "":
            return 0
        if name not in self.speaker_names:
            raise PtftError(f"unknown speaker {name!r}: the model knows {self.speaker_names}")
        return self.speaker_names.index(name)

    def load_split(self, split: str) -> Any:
        if split != "predict":
            return super().load_split(split)
        if self.text_predict is None:
            return None
        from ptft.core.files import _read_csv

        _, rows = _read_csv(self.text_predict, "predict", [self.columns[1]])  # the speaker column is optional
        texts = [(self.normalise(row[self.columns[1]]), row.get(self.speaker_column or "", None)) for row in rows]
        if not texts:
            raise PtftError(f"predict: {self.text_predict!r} has no rows")
        empty = [i + 1 for i, (text, _) in enumerate(texts) if not text]
        if empty:
            raise PtftError(f"predict: row {empty[0]} of {self.text_predict!r} has no text to speak")
        self.check_characters("predict", [text for text, _ in texts], self.label_names)
        for _, speaker in texts:
            self.speaker_id(speaker)
        return texts

    def check(self, split: str, rows: Any) -> Any:
        return rows if split == "predict" else super().check(split, rows)

    def build(self, split: str, rows: Any) -> Dataset:
        index = {name: i for i, name in enumerate(self.label_names)}
        if split == "predict":
            return TextsToSpeak([(encode_transcript(text, index), self.speaker_id(speaker), text)
                                 for text, speaker in rows])
        clips = self.clips(split, [source for source, _ in rows], [encode_transcript(t, index) for _, t in rows])
        speakers = [self.speaker_id(self.speaker_of.get(_key(source))) for source, _ in rows]
        return SpeakerClips(clips, speakers)

    def collate_fn(self) -> Any:
        if self.extractor is None or not hasattr(self.extractor, "num_mel_bins"):
            raise PtftError("text to speech needs the model's spectrogram feature extractor (SpeechT5's "
                            "preprocessor_config.json next to the model)")
        return SpeechCollate(self.extractor, self.sampling_rate)


class SpeakerClips(Dataset):
    """An :class:`~ptft.audio.data.AudioDataset` whose items also carry the clip's speaker id."""

    def __init__(self, clips: AudioDataset, speakers: list[int]) -> None:
        self.clips = clips
        self.speakers = speakers

    def __len__(self) -> int:
        return len(self.clips)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return {**self.clips[index], "speakers": self.speakers[index]}


class TextsToSpeak(Dataset):
    """``(character ids, speaker id, text)`` rows to synthesise."""

    def __init__(self, rows: list[tuple[list[int], int, str]]) -> None:
        self.rows = rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> dict[str, Any]:
        ids, speaker, text = self.rows[index]
        return {"labels": ids, "speakers": speaker, "text": text}


class SpeechCollate:
    """Character ids padded with ``<pad>`` (id 0) plus ``attention_mask``; the clips' log-mel spectrograms from the
    feature extractor (``audio_target``), padded frames ``-100`` (ignored by the loss); speaker ids."""

    def __init__(self, extractor: Any, sampling_rate: int) -> None:
        self.extractor = extractor
        self.sampling_rate = sampling_rate

    def __call__(self, items: list[dict[str, Any]]) -> dict[str, Any]:
        texts = [it["labels"] for it in items]
        ids = torch.zeros(len(items), max(len(t) for t in texts), dtype=torch.long)
        for i, t in enumerate(texts):
            ids[i, : len(t)] = torch.tensor(t, dtype=torch.long)
        batch: dict[str, Any] = {"input_ids": ids, "attention_mask": (ids != 0).long(),
                                 "speakers": torch.tensor([it["speakers"] for it in items])}
        if "input_values" in items[0]:
            waves = [np.asarray(it["input_values"], dtype=np.float32) for it in items]
            mels = self.extractor(audio_target=waves, sampling_rate=self.sampling_rate, padding=True,
                                  return_attention_mask=True, return_tensors="pt")
            labels = mels["input_values"].float()
            batch["labels"] = labels.masked_fill(mels["attention_mask"].unsqueeze(-1) == 0, -100.0)
        if "text" in items[0]:
            batch["texts"] = [it["text"] for it in items]
        return batch


def griffin_lim(magnitude: torch.Tensor, n_fft: int, hop: int, window: torch.Tensor, iterations: int = 32,
                momentum: float = 0.99) -> torch.Tensor:
    """Waveform ``(samples,)`` whose STFT magnitude approaches ``magnitude`` ``(n_fft // 2 + 1, frames)``.

    The fast Griffin-Lim algorithm (Perraudin et al. 2013, torchaudio's and librosa's default momentum 0.99). Ours
    because neither torch nor transformers ships one, torchaudio is excluded (it pins its own torch) and librosa
    would add numba for 20 lines.
    """
    generator = torch.Generator().manual_seed(0)
    angles = torch.exp(2j * torch.pi * torch.rand(magnitude.shape, generator=generator)).to(magnitude.device)
    previous = torch.zeros_like(angles)
    length = hop * (magnitude.shape[-1] - 1)
    for _ in range(iterations):
        wave = torch.istft(magnitude * angles, n_fft, hop, window=window, length=length)
        rebuilt = torch.stft(wave, n_fft, hop, window=window, return_complex=True)
        accelerated = rebuilt - (momentum / (1 + momentum)) * previous
        angles = accelerated / accelerated.abs().clamp(min=1e-16)
        previous = rebuilt
    return torch.istft(magnitude * angles, n_fft, hop, window=window, length=length)


class MelInverter(nn.Module):
    """Log10-mel spectrograms of a SpeechT5 feature extractor -> waveforms, by the least-squares inverse of its mel
    filter bank and :func:`griffin_lim`.

    Args:
        extractor: The ``SpeechT5FeatureExtractor`` whose spectrograms are inverted.
        iterations: Griffin-Lim iterations.
    """

    def __init__(self, extractor: Any, iterations: int = 32) -> None:
        super().__init__()
        self.n_fft = int(extractor.n_fft)
        self.hop = int(extractor.sample_stride)
        self.iterations = iterations
        window = torch.zeros(self.n_fft)
        window[: extractor.sample_size] = torch.tensor(np.asarray(extractor.window), dtype=torch.float32)
        self.register_buffer("window", window, persistent=False)
        self.register_buffer("inverse", torch.linalg.pinv(torch.tensor(extractor.mel_filters, dtype=torch.float32)),
                             persistent=False)
        self.mel_floor = float(extractor.mel_floor)

    def forward(self, log_mel: torch.Tensor) -> torch.Tensor:
        """``(frames, mels)`` -> ``(samples,)``."""
        mel = torch.pow(10.0, log_mel.float()).clamp(min=self.mel_floor)  # (frames, mels)
        magnitude = (mel @ self.inverse).clamp(min=0).T  # (freqs, frames)
        return griffin_lim(magnitude, self.n_fft, self.hop, self.window, self.iterations)


class SpeechSynthesizer(HFModule, LabelledModule):
    """Text to speech with transformers' ``SpeechT5ForTextToSpeech`` (``AutoModelForTextToSpectrogram``).

    ``label_names`` is the character vocabulary and ``speaker_names`` the speakers (both linked from the data and
    saved in checkpoints); every speaker has a learned embedding of the model's ``speaker_embedding_dim``.
    ``ptft predict`` writes one wav file per text into ``audio_dir`` and its path in the predictions.

    Args:
        model_name: Hugging Face hub name (``microsoft/speecht5_tts``) or a local folder with ``config.json``, weights
            and ``preprocessor_config.json`` (the spectrogram feature extractor).
        pretrained: Load the pretrained weights; ``False`` builds the architecture with random weights.
        model_config: Config overrides (``{reduction_factor: 2, use_guided_attention_loss: true}``); a dict holding
            ``model_type`` is a complete config.
        speaker_names: Speakers in id order (linked from the data).
        vocoder: ``SpeechT5HifiGan`` hub name or folder turning spectrograms into waveforms; ``None``: Griffin-Lim.
        griffin_lim_iterations: Griffin-Lim iterations when there is no vocoder.
        stop_threshold: Stop-token probability that ends generation.
        max_length_ratio: Longest generated spectrogram, in decoder steps per input character.
        audio_dir: Folder for the wav files of ``ptft predict``.
        **kwargs: ``num_labels`` / ``label_names`` (the character vocabulary, linked from the data) and the shared
            fine-tuning arguments of :class:`ptft.core.FineTuneModule`.
    """

    checkpoint_monitor = ("val/loss", "min")

    def __init__(
        self,
        model_name: str,
        pretrained: bool = True,
        model_config: dict[str, Any] | None = None,
        speaker_names: list[str] | None = None,
        vocoder: str | None = None,
        griffin_lim_iterations: int = 32,
        stop_threshold: float = 0.5,
        max_length_ratio: float = 20.0,
        audio_dir: str = "runs/speech",
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        from transformers import AutoModelForTextToSpectrogram

        if self.label_names[0] != PAD:
            raise PtftError(f"the vocabulary must start with {PAD!r} (padding), got {self.label_names[:3]}")
        self.model_name = model_name
        self.feature_extractor_name = model_name
        self.sampling_rate: int | None = None
        self.speaker_names = list(speaker_names or ["speaker"])
        self.vocoder_name = vocoder
        self.griffin_lim_iterations = griffin_lim_iterations
        self.stop_threshold = stop_threshold
        self.max_length_ratio = max_length_ratio
        self.audio_dir = audio_dir
        overrides = dict(model_config or {})
        if "model_type" not in overrides:
            # transformers' guided-attention loss fails on a step where layerdrop skips every decoder layer (no
            # cross-attentions to guide), certain over a long run of a small decoder: off unless set.
            overrides.setdefault("decoder_layerdrop", 0.0)
        model = build_hf_model(AutoModelForTextToSpectrogram, model_name, pretrained, overrides,
                               vocab_size=self.num_labels, pad_token_id=0)
        architecture = model.config.to_dict()
        # Inside the model, so that the optimizer, freezing schedules and checkpoints treat it as a new head.
        model.add_module("speaker_table", nn.Embedding(len(self.speaker_names), model.config.speaker_embedding_dim))
        self.set_model(model)
        self._vocoder: nn.Module | None = None
        self.output_rate = 16000  # the vocoder's, set when it is loaded
        self._save_hparams(pretrained=False, model_config=architecture, speaker_names=self.speaker_names)

    def head_modules(self, model: nn.Module) -> list[str]:
        """The parts a checkpoint does not provide: the speaker embeddings and the character embeddings (rebuilt
        for the data's vocabulary); ``optimizer.head_lr`` applies to them."""
        return ["speaker_table", "speecht5.encoder.prenet.embed_tokens"]

    def speakers(self, ids: torch.Tensor) -> torch.Tensor:
        """Speaker ids -> the speakers' learned embeddings."""
        return self.model.get_submodule("speaker_table")(ids)

    def trimmed(self, labels: torch.Tensor) -> torch.Tensor:
        """Spectrograms cut to a multiple of the reduction factor, as the decoder emits ``reduction_factor`` frames
        per step (transformers' SpeechT5 fine-tuning guide does the same)."""
        factor = self.model.config.reduction_factor
        return labels[:, : labels.shape[1] - labels.shape[1] % factor]

    def step(self, batch: dict[str, Any], stage: str) -> tuple[torch.Tensor, Any]:
        out = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                         labels=self.trimmed(batch["labels"]), speaker_embeddings=self.speakers(batch["speakers"]))
        return out.loss, None

    @torch.no_grad()
    def synthesize(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, speakers: torch.Tensor) -> list[torch.Tensor]:
        """Log-mel spectrograms ``(frames, mels)``, one per row, generated until the stop token."""
        spectrograms, lengths = self.model.generate(
            input_ids, attention_mask=attention_mask, speaker_embeddings=self.speakers(speakers),
            threshold=self.stop_threshold, maxlenratio=self.max_length_ratio, return_output_lengths=True)
        return [spec[:n] for spec, n in zip(spectrograms, lengths)]

    def vocoder(self) -> nn.Module:
        if self._vocoder is None:
            if self.vocoder_name is not None:
                from transformers import SpeechT5HifiGan

                from ptft.core.hub import load_pretrained, resolve_model_name

                self._vocoder = load_pretrained(SpeechT5HifiGan.from_pretrained, resolve_model_name(self.vocoder_name),
                                                "vocoder")
                self.output_rate = int(self._vocoder.config.sampling_rate)
            else:
                extractor = self.trainer.datamodule.extractor
                self._vocoder = MelInverter(extractor, self.griffin_lim_iterations)
                self.output_rate = int(extractor.sampling_rate)
            self._vocoder.to(self.device).eval()
        return self._vocoder

    def waveform(self, spectrogram: torch.Tensor) -> torch.Tensor:
        return self.vocoder()(spectrogram.float()).flatten().cpu()

    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> dict[str, Any]:
        import soundfile

        specs = self.synthesize(batch["input_ids"], batch["attention_mask"], batch["speakers"])
        folder = Path(self.audio_dir)
        folder.mkdir(parents=True, exist_ok=True)
        rows = []
        for i, (spec, text, speaker) in enumerate(zip(specs, batch["texts"], batch["speakers"].tolist())):
            path = folder / f"rank{self.global_rank}-batch{batch_idx}-{i}.wav"
            wave = self.waveform(spec).numpy()
            soundfile.write(path, wave / max(1e-6, float(np.abs(wave).max())) * 0.9, self.output_rate)
            rows.append({"text": text, "speaker": self.speaker_names[speaker], "path": str(path),
                         "seconds": round(len(wave) / self.output_rate, 3)})
        return {"rows": rows}

    def prediction_rows(self, outputs: dict[str, Any]) -> list[dict[str, Any]]:
        return outputs["rows"]

    def save_model(self, model: nn.Module, folder: str) -> None:
        """``save_pretrained``, the feature extractor, and ``speaker_embeddings.safetensors`` (one row per speaker,
        ``speaker_names.json`` naming them): ``model.generate(ids, speaker_embeddings=row)`` speaks as one."""
        import json

        from safetensors.torch import save_file

        table = model.get_submodule("speaker_table")
        del model.speaker_table  # not a SpeechT5 weight: saved on its own below
        try:
            model.save_pretrained(folder)
        finally:
            model.add_module("speaker_table", table)
        extractor = getattr(getattr(getattr(self, "_trainer", None), "datamodule", None), "extractor", None)
        if extractor is not None:
            extractor.save_pretrained(folder)
        save_file({"speaker_embeddings": table.weight.detach().cpu().contiguous()},
                  str(Path(folder) / "speaker_embeddings.safetensors"))
        (Path(folder) / "speaker_names.json").write_text(json.dumps(self.speaker_names) + "\n")
        (Path(folder) / "vocabulary.json").write_text(json.dumps(self.label_names) + "\n")
