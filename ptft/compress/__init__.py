"""Compression of fine-tuned models: pruning with fine-tuning recovery, dynamic int8 quantization for CPU inference,
and ONNX export checked with onnxruntime (``ptft export CKPT OUT --format onnx|onnx-int8``).

ONNX needs ``onnx``, ``onnxscript`` and ``onnxruntime``, imported only by :mod:`ptft.compress.onnx`'s functions.
"""

from ptft.compress.onnx import argmax_agreement, check_onnx_parity, export_onnx, quantize_onnx_int8
from ptft.compress.prune import Pruning, prune_module, sparsity
from ptft.compress.quantize import quantize_dynamic_int8

__all__ = [
    "Pruning",
    "argmax_agreement",
    "check_onnx_parity",
    "export_onnx",
    "prune_module",
    "quantize_dynamic_int8",
    "quantize_onnx_int8",
    "sparsity",
]
