"""wav2vec 2.0 pre-training on unlabelled generated audio: the contrastive loss falls, and the checkpoint is the
starting point of a classifier (encoder weights carried over, a new head)."""

from __future__ import annotations

import math

import lightning as L
import pytest
import torch
from audio_signals import write_audio_tree
from helpers import trainer

from ptft.audio import AudioClassifier, UnlabeledAudioDataModule, Wav2Vec2Pretrainer
from ptft.core import OptimizerConfig, SchedulerConfig
from ptft.core.errors import PtftError


@pytest.fixture(scope="module")
def tiny_pretraining_config(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A folder with the config (no weights needed: ``pretrained: false``) and feature extractor of a tiny wav2vec2."""
    from transformers import Wav2Vec2Config, Wav2Vec2FeatureExtractor

    path = tmp_path_factory.mktemp("tiny-wav2vec2-pretraining")
    Wav2Vec2Config(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, conv_dim=(32, 32, 32),
        conv_stride=(5, 4, 2), conv_kernel=(10, 8, 4), num_feat_extract_layers=3, num_conv_pos_embeddings=16,
        num_conv_pos_embedding_groups=2, feat_extract_norm="layer", do_stable_layer_norm=True,
        num_codevector_groups=2, num_codevectors_per_group=16, codevector_dim=16, proj_codevector_dim=16,
        num_negatives=8, layerdrop=0.0,
    ).save_pretrained(path)
    Wav2Vec2FeatureExtractor(sampling_rate=8000, return_attention_mask=True).save_pretrained(path)
    return str(path)


def test_contrastive_loss_falls_and_a_classifier_starts_from_it(tiny_pretraining_config, tmp_path):
    L.seed_everything(0)
    audio = write_audio_tree(tmp_path / "audio", 12, seconds=(0.8, 1.2))
    data = UnlabeledAudioDataModule(train=audio, val_fraction=0.25, clip_seconds=0.8, batch_size=8, num_workers=0)
    model = Wav2Vec2Pretrainer(tiny_pretraining_config, mask_time_prob=0.3, mask_time_length=4,
                               optimizer=OptimizerConfig(lr=2e-3), scheduler=SchedulerConfig(name="constant", warmup_ratio=0))
    data.connect(model)
    run = trainer(tmp_path, max_epochs=20, check_val_every_n_epoch=20)
    before = run.validate(model, data, verbose=False)[0]
    run.fit(model, data)
    after = {k: float(v) for k, v in run.callback_metrics.items()}
    # Picking the true latent among 8 negatives: chance is ln(9) = 2.2 per masked frame. 36 clips are learnt well
    # below it; held-out clips improve too (but a set this small is soon over-fitted).
    chance = math.log(1 + model.model.config.num_negatives)
    assert after["train/contrastive_loss"] < 0.8 * chance, (before, after)
    assert after["val/contrastive_loss"] < before["val/contrastive_loss"], (before, after)
    assert after["val/codevector_perplexity"] > 1.0  # the quantiser uses more than one code
    ckpt = tmp_path / "pretrained.ckpt"
    run.save_checkpoint(ckpt)

    # The fine-tuning recipes' way: model_name is the pre-training checkpoint.
    classifier = AudioClassifier(str(ckpt), num_labels=4, label_names=["chirp", "clicks", "high", "low"])
    encoder = dict(model.model.wav2vec2.named_parameters())
    for name, param in classifier.model.wav2vec2.named_parameters():
        assert torch.equal(param, encoder[name]), name
    assert classifier.head_modules(classifier.model) == ["classifier", "projector"]


def test_clips_shorter_than_a_masked_span_are_one_line(tiny_pretraining_config, tmp_path):
    audio = write_audio_tree(tmp_path / "audio", 4, seconds=(0.05, 0.06))
    data = UnlabeledAudioDataModule(train=audio, clip_seconds=None, batch_size=4, num_workers=0)
    model = Wav2Vec2Pretrainer(tiny_pretraining_config, mask_time_length=10)
    data.connect(model)
    with pytest.raises(PtftError, match="not more than mask_time_length=10: use longer clips"):
        trainer(tmp_path, max_steps=1).fit(model, data)


def test_pretrain_recipe(run_recipe, tiny_pretraining_config, tmp_path):
    audio = write_audio_tree(tmp_path / "audio", 6, seconds=(0.8, 1.2))
    cli = run_recipe("recipes/audio/wav2vec2-pretrain.yaml", [
        f"--model.init_args.model_name={tiny_pretraining_config}", f"--data.init_args.train={audio}",
        "--data.init_args.clip_seconds=0.8", "--data.init_args.num_workers=0", "--data.init_args.batch_size=4",
        "--model.init_args.mask_time_length=4"])
    assert cli.trainer.global_step == 2
    assert "train/gumbel_temperature" in cli.trainer.callback_metrics
