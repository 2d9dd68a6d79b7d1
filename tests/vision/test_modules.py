import torch
from safetensors.torch import save_file

from ptft.core.optim import OptimizerConfig
from ptft.vision import ImageClassifier


def test_steps_and_head(image_dirs):
    model = ImageClassifier("test_resnet", num_labels=3, pretrained=False, optimizer=OptimizerConfig(head_lr=1e-2))
    batch = {"pixel_values": torch.randn(2, 3, 32, 32), "labels": torch.tensor([0, 2])}
    loss = model.training_step(batch, 0)
    torch.testing.assert_close(loss, torch.nn.functional.cross_entropy(model(batch), batch["labels"]))
    model.eval()
    probs = model.predict_step(batch, 0)["probs"]
    torch.testing.assert_close(probs, model(batch).softmax(-1))
    heads = {n for g in model.param_groups() if g["lr"] == 1e-2 for n in g["names"]}
    assert heads == {"fc.weight", "fc.bias"}


def test_local_pretrained_file_is_loaded_with_a_new_head(tmp_path):
    import timm

    source = timm.create_model("test_resnet", num_classes=1000)
    save_file(source.state_dict(), tmp_path / "weights.safetensors")
    model = ImageClassifier("test_resnet", num_labels=3, pretrained_file=str(tmp_path / "weights.safetensors"))
    torch.testing.assert_close(model.model.conv1[0].weight, source.conv1[0].weight)
    assert model.model.fc.out_features == 3
    assert model.hparams.pretrained is False and model.hparams.pretrained_file is None  # checkpoints rebuild by name


def test_data_config_follows_the_model():
    model = ImageClassifier("test_vit", num_labels=2, pretrained=False)
    cfg = model.data_config()
    assert cfg["input_size"] == (3, 160, 160) and len(cfg["mean"]) == 3
