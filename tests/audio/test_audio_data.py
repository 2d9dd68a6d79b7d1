"""Audio reading, resampling, augmentation, features and the one-line errors for bad audio, before training."""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from audio_signals import RATE, signal, write_audio_tree

from ptft.audio import AudioClassificationDataModule, SpecAugmentConfig, Spectrogram, SpectrogramConfig, WaveAugment
from ptft.audio.features import spec_augment
from ptft.core.errors import PtftError


class Rate:
    """A stand-in model: only what the data module reads from one."""

    def __init__(self, rate: int) -> None:
        self.sampling_rate = rate
        self.feature_extractor_name = None


def data(train: str, rate: int = RATE, **kwargs) -> AudioClassificationDataModule:
    module = AudioClassificationDataModule(train=train, num_workers=0, batch_size=4, **kwargs)
    module.connect(Rate(rate))
    return module


def test_folder_zip_and_csv_give_the_same_clips(tmp_path):
    root = Path(write_audio_tree(tmp_path / "tree", 3))
    with zipfile.ZipFile(tmp_path / "clips.zip", "w") as zf:
        for f in sorted(root.rglob("*.wav")):
            zf.write(f, f"train/{f.relative_to(root).as_posix()}")
    (tmp_path / "clips.csv").write_text("path,label\n" + "".join(
        f"tree/{f.relative_to(root).as_posix()},{f.parent.name}\n" for f in sorted(root.rglob("*.wav"))))
    waves = []
    for location in (str(root), str(tmp_path / "clips.zip/train"), str(tmp_path / "clips.csv")):
        module = data(location, clip_seconds=None, val_fraction=0.25)
        module.setup("fit")
        assert module.label_names == ["chirp", "clicks", "high", "low"]
        item = module.datasets["val"][0]
        waves.append(item["input_values"])
    assert all(np.array_equal(waves[0], w) for w in waves[1:])


def test_resampled_to_the_models_rate_and_mixed_to_mono(tmp_path):
    import soundfile

    (tmp_path / "a").mkdir(parents=True)
    left = signal("low", 0.5, RATE, np.random.default_rng(0))
    soundfile.write(tmp_path / "a" / "stereo.wav", np.stack([left, np.zeros_like(left)], axis=1), RATE)
    module = data(str(tmp_path), rate=16000, clip_seconds=None, val_fraction=0.5)
    module.connect(Rate(16000))
    module.datasets["x"] = module.build("val", module.rows("train"))
    wave = module.datasets["x"][0]["input_values"]
    assert len(wave) == 2 * len(left)  # 8 kHz -> 16 kHz
    # The mean of the channels: half the left channel's amplitude, same spectrum peak.
    assert np.abs(wave).max() == pytest.approx(np.abs(left).max() / 2, rel=0.05)


def test_rate_mismatch_without_resampling_is_one_line(tmp_path):
    module = data(write_audio_tree(tmp_path / "t", 2), rate=16000, resample=False)
    with pytest.raises(PtftError, match=r"is 8000 Hz, the model expects 16000 Hz: set data.init_args.resample=true"):
        module.setup("fit")


def test_sampling_rate_other_than_the_models_is_refused(tmp_path):
    with pytest.raises(PtftError, match="sampling_rate=22050 but the model expects 8000 Hz"):
        data(write_audio_tree(tmp_path / "t", 2), sampling_rate=22050)


def test_training_clips_are_cropped_evaluation_clips_whole_and_padding_masked(tmp_path):
    module = data(write_audio_tree(tmp_path / "t", 4, seconds=(0.3, 0.9)), clip_seconds=0.5)
    module.setup("fit")
    train = module.datasets["train"]
    lengths = [len(train[i]["input_values"]) for i in range(len(train))]
    assert max(lengths) == 4000 and min(lengths) < 4000  # long clips cropped, short ones not padded here
    batch = module.collate_fn()([train[i] for i in range(len(train))])
    assert (batch["attention_mask"].sum(-1) == torch.tensor(lengths)).all()  # the collation masks the padding
    assert len({len(module.datasets["val"][i]["input_values"]) for i in range(len(module.datasets["val"]))}) > 1
    batch = next(iter(module.val_dataloader()))
    lengths = batch["attention_mask"].sum(-1)
    assert batch["input_values"].shape[1] == lengths.max()
    assert (batch["input_values"][batch["attention_mask"] == 0] == 0).all()


@pytest.mark.parametrize("bad", ["corrupt", "empty"])
def test_unreadable_and_empty_files_stop_before_training_or_are_skipped(tmp_path, bad):
    import soundfile

    root = Path(write_audio_tree(tmp_path / "t", 3))
    target = root / "low" / "bad.wav"
    if bad == "corrupt":
        target.write_bytes(b"RIFF\x00\x00not really a wav file")
    else:
        soundfile.write(target, np.zeros(0, dtype=np.float32), RATE)
    with pytest.raises(PtftError, match=rf"1 unreadable audio file\(s\) in train, first: .*bad.wav .*on_bad_audio=skip"):
        data(str(root)).setup("fit")
    skipping = data(str(root), on_bad_audio="skip")
    with pytest.warns(UserWarning, match="skipping 1 unreadable audio file"):
        skipping.setup("fit")
    assert len(skipping.datasets["train"]) + len(skipping.datasets["val"]) == 12


def test_silent_clip_policy(tmp_path):
    import soundfile

    root = Path(write_audio_tree(tmp_path / "t", 3))
    soundfile.write(root / "high" / "quiet.wav", np.zeros(4000, dtype=np.float32), RATE)
    with pytest.raises(PtftError, match=r"1 silent clip\(s\) .*quiet.wav; remove them or set data.init_args.on_silent"):
        data(str(root), on_silent="error").setup("fit")
    skipping = data(str(root), on_silent="skip")
    with pytest.warns(UserWarning, match="skipping 1 silent clip"):
        skipping.setup("fit")
    assert len(skipping.datasets["train"]) + len(skipping.datasets["val"]) == 12
    keeping = data(str(root))
    with pytest.warns(UserWarning, match=r"1 silent clip\(s\) .* kept"):
        keeping.setup("fit")
    assert len(keeping.datasets["train"]) + len(keeping.datasets["val"]) == 13


def test_csv_without_the_label_column_is_one_line(tmp_path):
    (tmp_path / "clips.csv").write_text("file,label\na.wav,x\n")
    with pytest.raises(PtftError, match="has no column 'path'"):
        AudioClassificationDataModule(train=str(tmp_path / "clips.csv"))


def test_folder_without_audio_is_one_line(tmp_path):
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "notes.txt").write_text("no audio")
    with pytest.raises(PtftError, match=r"no audio files in class folders under .* \.wav"):
        AudioClassificationDataModule(train=str(tmp_path))


def test_augmentation_changes_speed_gain_noise_and_shift():
    torch.manual_seed(0)
    wave = signal("low", 1.0, RATE, np.random.default_rng(0))
    faster = WaveAugment(speed=(1.25, 1.25)).before_crop(wave)
    assert len(faster) == pytest.approx(len(wave) / 1.25, abs=2)
    louder = WaveAugment(gain_db=(6, 6)).after_crop(wave)
    assert np.abs(louder).max() / np.abs(wave).max() == pytest.approx(10 ** (6 / 20), rel=1e-4)
    noisy = WaveAugment(noise_snr_db=(10, 10)).after_crop(wave)
    snr = 10 * np.log10(np.mean(wave**2) / np.mean((noisy - wave) ** 2))
    assert snr == pytest.approx(10, abs=0.5)
    shifted = WaveAugment(shift=0.5).after_crop(wave)
    assert not np.array_equal(shifted, wave) and (shifted == 0).sum() > 100
    with pytest.raises(PtftError, match=r"augment.gain_db: give \[low, high\]"):
        WaveAugment(gain_db=(6, -6))


@pytest.mark.parametrize(("kind", "bins"), [("logmel", 40), ("mfcc", 13), ("stft", 101)])
def test_spectrogram_shapes_and_a_tone_lands_in_its_band(kind, bins):
    rate = 8000
    frontend = Spectrogram(SpectrogramConfig(kind=kind, n_mels=40, n_mfcc=13, normalize=False), rate)
    t = torch.arange(rate) / rate
    tones = torch.stack([torch.sin(2 * torch.pi * 300 * t), torch.sin(2 * torch.pi * 2000 * t)])
    mask = torch.ones_like(tones, dtype=torch.long)
    mask[1, rate // 2 :] = 0
    with torch.autocast("cpu", dtype=torch.bfloat16):
        feats, frames = frontend(tones, mask)
    assert feats.dtype == torch.float32  # computed in fp32 whatever the autocast
    assert feats.shape == (2, 1, bins, rate // 80 + 1)
    assert frames[0].all() and frames[1].sum() == rate // 2 // 80 + 1
    if kind != "mfcc":  # the low tone's energy sits in lower bins than the high tone's
        peak = feats[:, 0, :, 10].argmax(-1)
        assert peak[0] < peak[1]


@pytest.mark.parametrize("normalize", [True, "band"])
def test_normalised_features_ignore_padding(normalize):
    rate = 8000
    frontend = Spectrogram(SpectrogramConfig(n_mels=32, normalize=normalize), rate)
    t = torch.arange(rate) / rate  # a tone over weak noise: low bands far louder than high ones
    wave = torch.sin(2 * torch.pi * 300 * t) + 0.05 * torch.randn(1, rate, generator=torch.Generator().manual_seed(0))
    wave[:, -400:] = 0  # a silent end: its last frames see zeros whether the STFT reflects the clip or the padding
    padded = torch.cat([wave, torch.zeros(1, rate)], dim=1)
    mask = torch.cat([torch.ones(1, rate), torch.zeros(1, rate)], dim=1).long()
    alone, _ = frontend(wave)
    together, frames = frontend(padded, mask)
    n = alone.shape[-1]
    assert frames[0].sum() == n
    assert torch.allclose(alone, together[..., :n], atol=1e-4)  # the padding changes no statistic
    assert (together[..., n:] == 0).all()
    valid = together[0, 0, :, : frames[0].sum()]  # (bins, frames)
    if normalize == "band":  # every band zero-mean, unit-variance over the clip's frames
        assert torch.allclose(valid.mean(1), torch.zeros(32), atol=1e-4)
        assert torch.allclose(valid.var(1, unbiased=False), torch.ones(32), atol=1e-3)
    else:  # over all bands together: the bands' own means differ
        assert abs(valid.mean()) < 1e-4 and abs(valid.var(unbiased=False) - 1) < 1e-3
        assert valid.mean(1).abs().max() > 0.1


def test_spec_augment_masks_bands():
    torch.manual_seed(0)
    feats = torch.ones(8, 1, 32, 50)
    masked = spec_augment(feats, SpecAugmentConfig(freq_masks=2, freq_width=8, time_masks=2, time_width=10))
    zero = masked == 0
    assert zero.any() and not zero.all()
    # Whole frequency rows or time columns are zero, never isolated bins.
    rows, cols = zero.all(-1), zero.all(-2)
    assert (zero == (rows.unsqueeze(-1) | cols.unsqueeze(-2))).all()


def test_no_torchaudio_anywhere():
    """torchaudio is in maintenance mode and pins its own torch: no ptft extra requires it, and the audio code runs
    without importing it."""
    import subprocess
    import sys
    from importlib.metadata import requires

    assert not [r for r in requires("ptft") or [] if r.lower().startswith("torchaudio")]
    code = ("import sys, ptft.audio, ptft.audio.io, ptft.audio.features, ptft.audio.modules; "
            "print('torchaudio' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
