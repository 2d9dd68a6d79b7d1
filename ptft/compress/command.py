"""``ptft export CKPT OUTPUT [--backbone] [--format hf|onnx|onnx-int8]``: a fine-tuned checkpoint as a deployable
folder."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import torch

from ptft.core.errors import PtftError

FORMATS = ("hf", "onnx", "onnx-int8")
#: Traced with the first batch; the second (other batch size and length) checks the dynamic axes.
TRACE_TEXTS = ["a lovely, moving film", "the service was slow and the food arrived cold"]
CHECK_TEXTS = ["awful", "one of the best books I have read in years, and I read a lot", "fine"]


def export_command(args: list[str]) -> None:
    """``ptft export CKPT OUTPUT``: a plain model folder (adapters merged) loadable without ptft.

    ``--format onnx``: ``OUTPUT/model.onnx`` (dynamic batch and sequence axes, output ``logits``), the tokenizer /
    image processor's files and the labels, checked against PyTorch with onnxruntime. ``--format onnx-int8``: also
    ``OUTPUT/model.int8.onnx``, onnxruntime's dynamic int8 quantization (CPU), its agreement printed. Text and image
    classifiers. ``--backbone``: the backbone of a vision checkpoint alone (timm layout, head dropped), to start
    another run with ``--model.pretrained_file``.
    """
    parser = argparse.ArgumentParser(prog="ptft export", description=export_command.__doc__)
    parser.add_argument("ckpt_path", help="a ptft checkpoint")
    parser.add_argument("output", help="folder to write")
    parser.add_argument("--backbone", action="store_true", help="write the backbone alone (vision checkpoints, hf format)")
    parser.add_argument("--format", default="hf", choices=FORMATS,
                        help="hf: save_pretrained / timm layout (safetensors); onnx: model.onnx; onnx-int8: also "
                             "model.int8.onnx")
    own = parser.parse_args(args)
    if own.backbone:
        if own.format != "hf":
            raise PtftError(f"--backbone writes timm's layout: drop --format {own.format}")
        from ptft.vision.pretrain import export_backbone

        path = export_backbone(own.ckpt_path, own.output)
        print(f"backbone written to {path}; fine-tune with --model.pretrained_file={path}")
        return
    from ptft.core.module import load_checkpoint

    module = load_checkpoint(own.ckpt_path)
    if own.format == "hf":
        module.export(own.output)
        print(f"exported {type(module).__name__} to {own.output}")
        return
    export_onnx_folder(module, Path(own.output), int8=own.format == "onnx-int8")


def export_onnx_folder(module: Any, folder: Path, int8: bool) -> None:
    """``folder/model.onnx`` (+ ``model.int8.onnx``) with the preprocessing files, parity printed."""
    from ptft.compress.onnx import argmax_agreement, check_onnx_parity, export_onnx, module_kind, quantize_onnx_int8
    from ptft.core.peft import merge_adapters

    kind = module_kind(module)
    module.model = merge_adapters(module.model)  # a plain graph: LoRA folded into the weights
    module.eval()
    trace, check = example_batches(module, kind)
    folder.mkdir(parents=True, exist_ok=True)
    path = export_onnx(module, trace, folder / "model.onnx")
    save_preprocessing(module, kind, folder)
    difference = max(check_onnx_parity(module, path, batch) for batch in (trace, check))
    print(f"exported {type(module).__name__} to {path}: max |logits - PyTorch's| {difference:.2g} (onnxruntime, CPU)")
    if int8:
        quantized = quantize_onnx_int8(path, folder / "model.int8.onnx")
        agree = min(argmax_agreement(module, quantized, batch) for batch in (trace, check))
        mb = quantized.stat().st_size / 2**20
        print(f"int8 model {quantized} ({mb:.1f} MB, fp32 {path.stat().st_size / 2**20:.1f} MB): same class as "
              f"PyTorch on {agree:.0%} of the example batch; measure accuracy on your data")


def example_batches(module: Any, kind: str) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """A batch to trace and a differently shaped one to check, built from the module alone (no data module)."""
    if kind == "vision":
        size = tuple(module.data_config()["input_size"])
        generator = torch.Generator().manual_seed(0)
        return ({"pixel_values": torch.randn(2, *size, generator=generator)},
                {"pixel_values": torch.randn(3, *size, generator=generator)})
    tokenizer = module.find_processor()
    if tokenizer is None:
        raise PtftError(f"cannot export {module.model_name!r} to ONNX: no tokenizer found (ptft export CKPT DIR "
                        "explains where it looks)")

    def encode(texts: list[str]) -> dict[str, torch.Tensor]:
        return dict(tokenizer(texts, padding=True, truncation=True, return_tensors="pt"))

    return encode(TRACE_TEXTS), encode(CHECK_TEXTS)


def save_preprocessing(module: Any, kind: str, folder: Path) -> None:
    """What a deployment needs besides the graph: the tokenizer and config (labels) of a text model; the labels and
    timm's preprocessing (input size, mean, std, interpolation, crop) of an image model, as ``config.json``."""
    if kind == "text":
        module.find_processor().save_pretrained(folder)
        config = getattr(module.model, "config", None)
        if config is not None and hasattr(config, "save_pretrained"):
            config.save_pretrained(folder)
        return
    config = {"architecture": module.model_name, "label_names": list(module.label_names), **module.data_config()}
    (folder / "config.json").write_text(json.dumps(config, indent=2, default=list) + "\n")
