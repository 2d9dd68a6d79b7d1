"""Generated audio for the audio tests: tones, chirps and clicks, as class folders of files."""

from __future__ import annotations

from pathlib import Path

import numpy as np

RATE = 8000
#: Class -> signal: a low tone, a high tone, a rising chirp, a click train (each with noise and random phase).
KINDS = ("low", "high", "chirp", "clicks")


def signal(kind: str, seconds: float, rate: int, rng: np.random.Generator) -> np.ndarray:
    t = np.arange(round(seconds * rate)) / rate
    if kind == "low":
        wave = np.sin(2 * np.pi * rng.uniform(250, 350) * t + rng.uniform(0, 6.3))
    elif kind == "high":
        wave = np.sin(2 * np.pi * rng.uniform(1500, 1800) * t + rng.uniform(0, 6.3))
    elif kind == "chirp":
        f0 = rng.uniform(300, 500)
        wave = np.sin(2 * np.pi * (f0 * t + 1500 * t**2 / (2 * seconds)))
    else:
        wave = np.zeros_like(t)
        period = round(rate / rng.uniform(8, 12))
        wave[rng.integers(0, period):: period] = 1.0
    wave = 0.5 * wave + 0.05 * rng.standard_normal(len(t))
    return (wave * rng.uniform(0.3, 1.0)).astype(np.float32)


def write_audio_tree(root: Path, per_class: int, seed: int = 0, rate: int = RATE, kinds=KINDS,
                     seconds: tuple[float, float] = (0.4, 0.8), suffix: str = ".wav") -> str:
    """``root/<kind>/<i>.wav`` clips of random length in ``seconds``."""
    import soundfile

    rng = np.random.default_rng(seed)
    for kind in kinds:
        (root / kind).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            soundfile.write(root / kind / f"{i:03d}{suffix}", signal(kind, rng.uniform(*seconds), rate, rng), rate)
    return str(root)


#: Speech stand-in: each letter a short tone of its own pitch, a space a pause.
LETTER_HZ = {"a": 500.0, "b": 1000.0, "c": 1800.0, "d": 2800.0}


def spoken(text: str, rate: int, rng: np.random.Generator, letter_s: float = 0.08) -> np.ndarray:
    """``text`` (letters of :data:`LETTER_HZ` and spaces) as a waveform: a tone per letter, a pause per space."""
    n = round(letter_s * rate)
    t = np.arange(n) / rate
    parts = [np.zeros(n // 2)]
    for ch in text:
        parts.append(np.zeros(n) if ch == " " else np.sin(2 * np.pi * LETTER_HZ[ch] * t) * np.hanning(n))
    parts.append(np.zeros(n // 2))
    wave = 0.5 * np.concatenate(parts) + 0.01 * rng.standard_normal(sum(len(p) for p in parts))
    return wave.astype(np.float32)


def write_transcribed(root: Path, count: int, seed: int = 0, rate: int = 16000, letter_s: float = 0.08) -> str:
    """``root/clips/<i>.wav`` and ``root/transcripts.csv`` (``path,transcript``): two random words of 2-3 letters."""
    import soundfile

    rng = np.random.default_rng(seed)
    (root / "clips").mkdir(parents=True, exist_ok=True)
    lines = ["path,transcript"]
    for i in range(count):
        words = ["".join(rng.choice(list(LETTER_HZ), size=rng.integers(2, 4))) for _ in range(2)]
        text = " ".join(words)
        soundfile.write(root / "clips" / f"{i:03d}.wav", spoken(text, rate, rng, letter_s), rate)
        lines.append(f"clips/{i:03d}.wav,{text.upper()}")
    (root / "transcripts.csv").write_text("\n".join(lines) + "\n")
    return str(root / "transcripts.csv")
