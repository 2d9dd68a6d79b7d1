"""Audio tasks without torchaudio: soundfile decoding, soxr resampling, spectrograms in torch, Hugging Face audio
models and timm CNNs over spectrograms."""

from ptft.audio.asr import SpeechRecognitionDataModule, SpeechRecognizer
from ptft.audio.augment import WaveAugment
from ptft.audio.data import AudioClassificationDataModule
from ptft.audio.features import SpecAugmentConfig, Spectrogram, SpectrogramConfig
from ptft.audio.modules import AudioClassifier, SpectrogramClassifier
from ptft.audio.pretrain import UnlabeledAudioDataModule, Wav2Vec2Pretrainer
from ptft.audio.tts import SpeechSynthesizer, TextToSpeechDataModule

__all__ = [
    "AudioClassificationDataModule",
    "AudioClassifier",
    "SpecAugmentConfig",
    "Spectrogram",
    "SpectrogramClassifier",
    "SpectrogramConfig",
    "SpeechRecognitionDataModule",
    "SpeechRecognizer",
    "SpeechSynthesizer",
    "TextToSpeechDataModule",
    "UnlabeledAudioDataModule",
    "WaveAugment",
    "Wav2Vec2Pretrainer",
]
