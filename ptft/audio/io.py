"""Reading audio without torchaudio: soundfile (libsndfile) decodes, soxr resamples, channels are averaged to mono.

torchaudio is in maintenance mode upstream and pins its own torch; libsndfile reads WAV, FLAC, OGG/Vorbis/Opus and
MP3, and soxr is the resampler sox and many audio libraries use.
"""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np

from ptft.core.data import cached_checks
from ptft.core.errors import PtftError
from ptft.core.files import FileSource, file_stamps, open_file

AUDIO_SUFFIXES = {".wav", ".flac", ".ogg", ".oga", ".opus", ".mp3"}
#: A clip whose peak is below this (-80 dBFS) counts as silent.
SILENCE_PEAK = 1e-4


def _soundfile():
    try:
        import soundfile
    except ImportError as err:  # the audio extra is not installed
        raise PtftError("audio needs soundfile and soxr: pip install 'ptft[audio]'") from err
    return soundfile


def resample(wave: np.ndarray, from_rate: int, to_rate: int) -> np.ndarray:
    """``wave`` (1-D float32) from ``from_rate`` to ``to_rate`` Hz with soxr's high-quality filter."""
    if from_rate == to_rate:
        return wave
    import soxr

    return soxr.resample(wave, from_rate, to_rate, quality="HQ").astype(np.float32, copy=False)


def read_audio(
    source: FileSource, archives: dict[tuple[int, Path], zipfile.ZipFile], sampling_rate: int | None = None
) -> tuple[np.ndarray, int]:
    """A file's samples as 1-D float32 in [-1, 1] and their rate: channels averaged to mono (the mixdown every
    model here expects: a stereo pair's mean), resampled to ``sampling_rate`` when it is given and differs."""
    data, rate = _soundfile().read(open_file(source, archives), dtype="float32", always_2d=True)
    wave = data.mean(axis=1) if data.shape[1] > 1 else data[:, 0]
    if sampling_rate is not None and rate != sampling_rate:
        return resample(wave, rate, sampling_rate), sampling_rate
    return np.ascontiguousarray(wave), rate


_CHECK_ARCHIVES: dict[tuple[int, Path], zipfile.ZipFile] = {}  # each check worker opens an archive once


def probe_audio(sources: list[FileSource]) -> list[list[float] | str]:
    """Each file's ``[frames, sampling rate, channels, peak]`` once libsndfile has decoded it whole, or why it
    cannot be used. Runs in check workers (:func:`ptft.core.data.parallel_map`)."""
    soundfile = _soundfile()
    results: list[list[float] | str] = []
    for source in sources:
        try:
            data, rate = soundfile.read(open_file(source, _CHECK_ARCHIVES), dtype="float32", always_2d=True)
        except (FileNotFoundError, KeyError):  # KeyError: no such member in the archive
            results.append("does not exist")
            continue
        except Exception as err:  # noqa: BLE001 - libsndfile reports every broken file as its own error type
            results.append(f"cannot be read ({type(err).__name__}: {(str(err).splitlines() or [''])[0]})")
            continue
        if len(data) == 0:
            results.append("is empty (0 samples)")
            continue
        if not np.isfinite(data).all():
            results.append("holds NaN or infinite samples")
            continue
        results.append([len(data), rate, data.shape[1], float(np.abs(data).max())])
    return results


def audio_info(sources: list[FileSource]) -> list[list[float] | str]:
    """:func:`probe_audio` of every file: in parallel worker processes, cached by path, size and modification time in
    ``~/.cache/ptft/checks.sqlite`` (a second run over unchanged files reads the cache only)."""
    return cached_checks(sources, file_stamps(sources, "audio-v1"), probe_audio)
