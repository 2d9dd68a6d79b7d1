"""Post-training dynamic int8 quantization for CPU inference, in process.

What is supported, and why this path:

* **Dynamic int8 of ``Linear`` layers** (weights int8 with one scale per output channel, activations quantized on the fly per batch) with
  ``torch.ao.quantization.quantize_dynamic``: fbgemm / oneDNN int8 kernels on x86, qnnpack on ARM. Measured on
  all-MiniLM-L6-v2 (BertForSequenceClassification), a batch of 32 x 64 tokens, 1 thread, torch 2.14 CPU (AVX512-VNNI):
  fp32 640 ms; ``torch.ao`` dynamic int8 383 ms (1.7x, max |logit diff| 0.02); torchao 0.18's
  ``quantize_(model, Int8DynamicActivationInt8WeightConfig())`` 989 ms eagerly and 709 ms under ``torch.compile``
  (86 s to compile); torchao's int8 weight-only 706 ms. torchao's CPU int8 is slower than fp32 here, so the
  deprecated-but-fast ``torch.ao`` path is used (its deprecation warnings are silenced, nothing else).
  Weights get one scale per output channel: on the SST-2 fine-tuned MiniLM (872 dev sentences) per-tensor scales
  lost 0.8 points (0.8440 vs fp32 0.8521, same class as fp32 on 95.8%), per-channel ones did not (0.8612, 97.5%),
  at the same speed.
* **Saving**: not in PyTorch. A dynamically quantized module holds packed-weight script objects that only a full
  pickle (``torch.load(weights_only=False)``, unsafe for untrusted files) restores. The deployable int8 artifact is an
  ONNX file quantized by onnxruntime (``ptft export CKPT OUT --format onnx-int8``: :mod:`ptft.compress.onnx`); in
  process, quantize the fp32 checkpoint again (under a second for MiniLM).
* **Not supported**: static int8 (calibrated activation ranges) and quantization-aware training. Static int8 of
  transformers needs graph-mode quantization (torchao's pt2e with ``X86InductorQuantizer``) or onnxruntime's
  ``quantize_static`` with a calibration reader; for encoders on CPU dynamic int8 is the usual choice, because
  activation ranges vary per input. Convolutions (timm CNNs) are not quantized dynamically: their int8 path is
  static quantization.
"""

from __future__ import annotations

import copy
import warnings

import torch
from torch import nn

from ptft.core.errors import PtftError


def quantize_dynamic_int8(module_or_model: nn.Module) -> nn.Module:
    """A copy of ``module_or_model`` with every ``nn.Linear`` replaced by a dynamically quantized int8 one, in eval mode.

    Args:
        module_or_model: A ptft module (its ``.model`` is quantized; the copy keeps its ``forward(batch)``) or any
            ``nn.Module``. The original is left untouched, in fp32.

    Returns:
        The quantized copy, for CPU inference (``torch.inference_mode()``); it cannot be trained further.
    """
    if not any(isinstance(m, nn.Linear) for m in module_or_model.modules()):
        raise PtftError(f"{type(module_or_model).__name__} has no Linear layer to quantize (dynamic int8 covers Linear only)")
    # A module attached to a trainer would copy the trainer too.
    trainer = getattr(module_or_model, "_trainer", None)
    quantized = copy.deepcopy(module_or_model, memo={id(trainer): None} if trainer is not None else {})
    quantized = quantized.cpu().float().eval()
    with warnings.catch_warnings():
        # torch 2.14 marks torch.ao.quantization and quantized tensors deprecated in favour of torchao, whose CPU int8
        # was measured slower than fp32 (module docstring): these two notices only.
        warnings.filterwarnings("ignore", message=r"torch\.ao\.quantization is deprecated", category=DeprecationWarning)
        warnings.filterwarnings("ignore", message=r"torch\.quantize_per_tensor.* are deprecated", category=UserWarning)
        from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

        quantize_dynamic(quantized, {nn.Linear: per_channel_dynamic_qconfig}, dtype=torch.qint8, inplace=True)
    return quantized


def is_quantized(layer: nn.Module) -> bool:
    """Whether ``layer`` is a dynamically quantized int8 ``Linear``."""
    from torch.ao.nn.quantized.dynamic import Linear as DynamicLinear

    return isinstance(layer, DynamicLinear)
