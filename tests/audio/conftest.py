"""Fixtures of the audio tests: generated clips (tests/audio_signals.py), tiny random speech models (the tiny
wav2vec2 classifier is in tests/conftest.py: multimodal tests use it too)."""

from __future__ import annotations

from pathlib import Path

import pytest
from audio_signals import write_audio_tree


@pytest.fixture
def audio_dirs(tmp_path: Path) -> dict[str, str]:
    return {"train": write_audio_tree(tmp_path / "train", 16, seed=1),
            "val": write_audio_tree(tmp_path / "val", 6, seed=2)}


@pytest.fixture(scope="session")
def tiny_ctc_wav2vec2(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A random 2-layer, hidden-64 wav2vec2 at 8 kHz with pre-LayerNorm blocks (``do_stable_layer_norm``, as
    wav2vec2-large-lv60): unlike post-LN at this size it leaves the all-blank CTC plateau within ~150 steps."""
    from transformers import Wav2Vec2Config, Wav2Vec2FeatureExtractor, Wav2Vec2ForCTC

    path = tmp_path_factory.mktemp("tiny-ctc-wav2vec2")
    config = Wav2Vec2Config(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128, conv_dim=(32, 32, 32),
        conv_stride=(5, 4, 2), conv_kernel=(10, 8, 4), num_feat_extract_layers=3, num_conv_pos_embeddings=16,
        num_conv_pos_embedding_groups=2, feat_extract_norm="layer", do_stable_layer_norm=True, mask_time_prob=0.0,
        layerdrop=0.0, hidden_dropout=0.0, final_dropout=0.0,
    )
    Wav2Vec2ForCTC(config).save_pretrained(path)
    Wav2Vec2FeatureExtractor(sampling_rate=8000, return_attention_mask=True).save_pretrained(path)
    return str(path)


@pytest.fixture(scope="session")
def tiny_speecht5(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A random 2+2-layer, hidden-64 SpeechT5 text-to-speech model (4 frames per decoder step) with a 20-band, 8 kHz
    spectrogram extractor."""
    from transformers import SpeechT5Config, SpeechT5FeatureExtractor, SpeechT5ForTextToSpeech

    path = tmp_path_factory.mktemp("tiny-speecht5")
    config = SpeechT5Config(
        vocab_size=16, hidden_size=64, encoder_layers=2, decoder_layers=2, encoder_attention_heads=2,
        decoder_attention_heads=2, encoder_ffn_dim=128, decoder_ffn_dim=128, speech_decoder_prenet_units=64,
        speech_decoder_postnet_units=64, speech_decoder_postnet_layers=2, num_mel_bins=20, speaker_embedding_dim=8,
        reduction_factor=4, guided_attention_loss_num_heads=2, max_text_positions=64, max_speech_positions=256,
        encoder_max_relative_position=32,
    )
    SpeechT5ForTextToSpeech(config).save_pretrained(path)
    SpeechT5FeatureExtractor(sampling_rate=8000, num_mel_bins=20, fmin=50, fmax=3900).save_pretrained(path)
    return str(path)
