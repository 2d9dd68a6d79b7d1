"""ptft: pre-train and fine-tune Hugging Face and timm models on PyTorch Lightning."""

__version__ = "0.1.0"
