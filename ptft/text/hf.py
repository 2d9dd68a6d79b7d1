"""Text modules' Hugging Face helpers: :mod:`ptft.core.hf`, under the names text modules import."""

from ptft.core.hf import HFModule, build_hf_model

HFTextModule = HFModule

__all__ = ["HFModule", "HFTextModule", "build_hf_model"]
