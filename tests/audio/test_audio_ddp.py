"""Epoch metrics of the audio tasks on 2 processes (gloo, fork) equal those of 1 process on the same data.

Validation sets hold a multiple of 2 x the batch size (1), so DistributedSampler pads nothing; accuracy / F1 and
WER / CER come from torchmetrics states summed across ranks, the loss from per-clip values averaged across ranks.
"""

from __future__ import annotations

import pytest
import torch
from audio_signals import write_audio_tree, write_transcribed
from helpers import trainer

from ptft.audio import AudioClassificationDataModule, SpectrogramClassifier, SpeechRecognitionDataModule, SpeechRecognizer


def classification_case(tmp_path, _):
    clips = write_audio_tree(tmp_path / "clips", 2, seed=3)  # 4 kinds x 2 clips of different lengths
    torch.manual_seed(1)
    data = AudioClassificationDataModule(train=clips, val=clips, batch_size=1, num_workers=0)
    model = SpectrogramClassifier("test_resnet", pretrained=False, sampling_rate=8000, num_labels=data.num_labels,
                                  label_names=data.label_names)
    return model, data


def asr_case(tmp_path, ctc_model):
    clips = write_transcribed(tmp_path / "speech", 8, seed=3, rate=8000, letter_s=0.04)
    data = SpeechRecognitionDataModule(train=clips, val=clips, batch_size=1, num_workers=0)
    torch.manual_seed(1)
    model = SpeechRecognizer(ctc_model, num_labels=data.num_labels, label_names=data.label_names)
    return model, data


CASES = {"classification": (classification_case, "val/f1"), "asr": (asr_case, "val/cer")}


def validate(model, data, tmp_path, **kwargs) -> dict[str, float]:
    data.connect(model)
    results = trainer(tmp_path, **kwargs).validate(model, data, verbose=False)[0]
    return {k: float(v) for k, v in results.items()}


@pytest.mark.parametrize("task", list(CASES))
def test_two_processes_log_the_epoch_metrics_of_one(task, tiny_ctc_wav2vec2, tmp_path):
    case, nonzero = CASES[task]
    model, data = case(tmp_path, tiny_ctc_wav2vec2)
    single = validate(model, data, tmp_path)
    model, data = case(tmp_path, tiny_ctc_wav2vec2)  # fresh: nothing of the first run carried over
    ddp = validate(model, data, tmp_path, devices=2, strategy="ddp_fork")
    assert single[nonzero] > 0, single
    assert set(ddp) == set(single)
    for key, value in single.items():
        assert ddp[key] == pytest.approx(value, rel=1e-5, abs=1e-6), (key, ddp, single)
