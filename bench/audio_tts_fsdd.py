"""Text to speech on spoken digits: does an audio classifier recognise what a SpeechT5 trained here says?

Trains a small SpeechT5 text-to-speech model from its config (no hub here) with recipes/audio/tts-speecht5.yaml on the
Free Spoken Digit Dataset's clips of five speakers (transcripts ``zero`` ... ``nine``, one learned embedding per
speaker), synthesises every digit for every speaker (``--samples`` takes each; SpeechT5's decoder pre-net keeps its
dropout when generating, so takes differ), turns the spectrograms into waveforms with Griffin-Lim, and has the
keyword-cnn recipe, trained on the real clips of the same five speakers (bench/audio_fsdd.py's fold), classify them.
Chance is 0.10. Two references come with it: the classifier on the held-out speaker's real clips, and on real clips
of the training speakers passed through the same log-mel + Griffin-Lim round trip (the vocoder's ceiling).
Writes the section "Audio: speech synthesis (FSDD)" of docs/benchmarks.md.

    python bench/audio_tts_fsdd.py [--epochs 40] [--samples 4] [--holdout george]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _common import REPO, WORK, TrainTimer, run_in_subprocess, write_section  # noqa: E402
from audio_fsdd import FSDD, QUIET, fsdd_folder  # noqa: E402

DIGITS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
RATE = 8000
#: The model trained from its config: 3 + 3 transformer layers of width 192 (SpeechT5-base: 12 + 6 of 768).
ARCHITECTURE = dict(
    hidden_size=192, encoder_layers=3, decoder_layers=3, encoder_attention_heads=4, decoder_attention_heads=4,
    encoder_ffn_dim=768, decoder_ffn_dim=768, speech_decoder_prenet_units=256, speech_decoder_postnet_units=256,
    num_mel_bins=40, speaker_embedding_dim=64, reduction_factor=2, max_text_positions=64, max_speech_positions=512,
)


def model_folder() -> Path:
    """A SpeechT5 config and an 8 kHz, 40-band spectrogram extractor (FSDD is 8 kHz): ``model_name`` of the run."""
    from transformers import SpeechT5Config, SpeechT5FeatureExtractor

    folder = WORK / "tts-speecht5-small"
    folder.mkdir(parents=True, exist_ok=True)
    SpeechT5Config(vocab_size=32, **ARCHITECTURE).save_pretrained(folder)
    SpeechT5FeatureExtractor(sampling_rate=RATE, num_mel_bins=40, fmin=50, fmax=3900).save_pretrained(folder)
    return folder


def transcribed_csvs(holdout: str) -> tuple[Path, Path]:
    """``path,transcript,speaker`` of the five training speakers, and ``path,label`` of the same clips."""
    root = fsdd_folder()
    tts, labels = ["path,transcript,speaker"], ["path,label"]
    for wav in sorted((root / "recordings").glob("*.wav")):
        digit, speaker, _ = wav.stem.split("_")
        if speaker != holdout:
            tts.append(f"recordings/{wav.name},{DIGITS[int(digit)]},{speaker}")
            labels.append(f"recordings/{wav.name},{digit}")
    (root / f"tts-without-{holdout}.csv").write_text("\n".join(tts) + "\n")
    (root / f"labels-without-{holdout}.csv").write_text("\n".join(labels) + "\n")
    return root / f"tts-without-{holdout}.csv", root / f"labels-without-{holdout}.csv"


def train_and_synthesise(holdout: str, epochs: int, samples: int, extra: list[str]) -> dict:
    import numpy as np
    import soundfile
    import torch

    from ptft.audio.io import read_audio
    from ptft.audio.tts import MelInverter
    from ptft.cli import run_cli
    from ptft.core.files import FileSource

    train_csv, labels_csv = transcribed_csvs(holdout)
    out = WORK / f"tts-fsdd-{holdout}"
    sys.argv = ["ptft"]
    cli = run_cli(["--config", str(REPO / "recipes/audio/tts-speecht5.yaml"), f"--model.init_args.model_name={model_folder()}",
                   "--model.init_args.pretrained=false", f"--data.init_args.train={train_csv}", "--data.init_args.val=null",
                   "--data.init_args.val_fraction=0.1", f"--trainer.max_epochs={epochs}", "--seed_everything=0",
                   "--model.init_args.optimizer.lr=1e-3", "--model.init_args.optimizer.head_lr=1e-3",
                   "--data.init_args.batch_size=32", f"--trainer.default_root_dir={out}", *QUIET, *extra], run=False)
    timer = TrainTimer()
    cli.trainer.callbacks.append(timer)
    cli.trainer.fit(cli.model, cli.datamodule)
    val_loss = float(cli.trainer.callback_metrics["val/loss"])
    model, data = cli.model.eval(), cli.datamodule
    index = {name: i for i, name in enumerate(data.label_names)}
    synth = out / "synthesised"
    synth.mkdir(parents=True, exist_ok=True)
    rows, seconds = ["path,label"], []
    torch.manual_seed(0)
    start = time.perf_counter()
    for speaker in data.speaker_names:
        for digit, word in enumerate(DIGITS):
            ids = torch.tensor([[index[c] for c in word]] * samples)
            specs = model.synthesize(ids, torch.ones_like(ids), torch.full((samples,), data.speaker_id(speaker)))
            for take, spec in enumerate(specs):
                wave = model.waveform(spec).numpy()
                path = synth / f"{digit}_{speaker}_{take}.wav"
                soundfile.write(path, wave / max(1e-6, float(np.abs(wave).max())) * 0.9, RATE)
                rows.append(f"{path.name},{digit}")
                seconds.append(len(wave) / RATE)
    synth_seconds = time.perf_counter() - start
    (synth / "labels.csv").write_text("\n".join(rows) + "\n")

    # The vocoder's ceiling: real clips of the training speakers through the same log-mel -> Griffin-Lim round trip.
    inverter = MelInverter(data.extractor, model.griffin_lim_iterations)
    roundtrip = out / "griffin-lim-roundtrip"
    roundtrip.mkdir(parents=True, exist_ok=True)
    real = [line.split(",") for line in labels_csv.read_text().splitlines()[1:]]
    kept = ["path,label"]
    for rel, digit in real[::10]:  # 250 clips, every speaker and digit
        wave, _ = read_audio(FileSource(labels_csv.parent / rel), {}, RATE)
        mel = data.extractor(audio_target=[wave], sampling_rate=RATE, return_tensors="pt")["input_values"][0]
        rebuilt = inverter(mel).numpy()
        soundfile.write(roundtrip / Path(rel).name, rebuilt / max(1e-6, float(np.abs(rebuilt).max())) * 0.9, RATE)
        kept.append(f"{Path(rel).name},{digit}")
    (roundtrip / "labels.csv").write_text("\n".join(kept) + "\n")
    return {"val_loss": val_loss, "train_seconds": timer.seconds, "clips": len(rows) - 1,
            "mean_seconds": float(np.mean(seconds)), "max_seconds": float(np.max(seconds)),
            "synth_seconds": synth_seconds, "synthesised": str(synth / "labels.csv"),
            "roundtrip": str(roundtrip / "labels.csv"), "precision": str(cli.trainer.precision),
            "speakers": data.speaker_names}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=40, help="text-to-speech epochs (40)")
    parser.add_argument("--samples", type=int, default=4, help="takes of every digit per speaker (4)")
    parser.add_argument("--holdout", default="george", help="the speaker left out of both trainings (george)")
    parser.add_argument("--classifier-epochs", type=int, default=15, help="keyword-cnn epochs (the recipe's 15)")
    parser.add_argument("--extra", action="append", default=[], help="a ptft override of the TTS run (repeatable)")
    parser.add_argument("--classifier-extra", action="append", default=[],
                        help="a ptft override of the classifier run (repeatable)")
    parser.add_argument("--one", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print("RESULT " + json.dumps(train_and_synthesise(args.holdout, args.epochs, args.samples, args.extra)))
        return
    if not FSDD.exists():
        sys.exit(f"{FSDD} not found")
    print("training the text-to-speech model ...", flush=True)
    tts = run_in_subprocess(__file__, ["--one", f"--epochs={args.epochs}", f"--samples={args.samples}",
                                       f"--holdout={args.holdout}", *[f"--extra={e}" for e in args.extra]])
    print(f"    val loss {tts['val_loss']:.3f}, training {tts['train_seconds'] / 60:.1f} min; {tts['clips']} clips "
          f"synthesised in {tts['synth_seconds']:.0f} s", flush=True)
    print("training the classifier on the real clips and classifying ...", flush=True)
    also = json.dumps({"synthesised": tts["synthesised"], "roundtrip": tts["roundtrip"]})
    classifier_extra = args.classifier_extra
    clf = run_in_subprocess(str(Path(__file__).parent / "audio_fsdd.py"),
                            ["--one", args.holdout, f"--epochs={args.classifier_epochs}", f"--also-test={also}",
                             *[f"--extra={e}" for e in classifier_extra]])
    command = (f"python bench/audio_tts_fsdd.py{f' --epochs {args.epochs}' if args.epochs != 40 else ''}"
               f"{''.join(f' --classifier-extra={e}' for e in classifier_extra)}"
               f"{f' --samples {args.samples}' if args.samples != 4 else ''}"
               f"{f' --holdout {args.holdout}' if args.holdout != 'george' else ''}"
               f"{''.join(f' --extra={e}' for e in args.extra)}")
    arch = ARCHITECTURE
    table = "\n".join([
        "",
        "",
        f"`{command}` — recipes/audio/tts-speecht5.yaml training a SpeechT5 from its config ({arch['encoder_layers']} + "
        f"{arch['decoder_layers']} layers of width {arch['hidden_size']}, {arch['num_mel_bins']} log-mel bands at 8 kHz, "
        f"reduction factor {arch['reduction_factor']}; AdamW 1e-3, linear decay, {args.epochs} epochs, batch 32) on the "
        f"FSDD clips of {', '.join(tts['speakers'])} (transcripts `zero` … `nine`, a learned embedding per speaker). "
        f"Every digit synthesised {args.samples} times per speaker ({tts['clips']} clips, {tts['mean_seconds']:.2f} s "
        f"on average, longest {tts['max_seconds']:.2f} s) with Griffin-Lim (32 iterations), then classified by "
        f"recipes/audio/keyword-cnn.yaml trained as in bench/audio_fsdd.py ({args.classifier_epochs} epochs"
        f"{''.join(' ' + e for e in classifier_extra)}) on the real clips of the same speakers. Chance 0.10. Precision: {tts['precision']} (`precision: auto`). 2 CPU cores.",
        "",
        "| clips classified | accuracy |",
        "|---|---:|",
        f"| synthesised digits (text to speech, Griffin-Lim) | **{clf['synthesised_acc']:.3f}** |",
        f"| real clips of the training speakers through log-mel -> Griffin-Lim (the vocoder's ceiling) | {clf['roundtrip_acc']:.3f} |",
        f"| real clips of the held-out speaker {args.holdout} | {clf['test_acc']:.3f} |",
        "",
        f"Text-to-speech training {tts['train_seconds'] / 60:.1f} min (validation loss {tts['val_loss']:.3f}); "
        f"classifier training {clf['train_seconds'] / 60:.1f} min.",
    ])
    print(table)
    write_section(table + "\n", "Audio: speech synthesis (FSDD)")


if __name__ == "__main__":
    main()
