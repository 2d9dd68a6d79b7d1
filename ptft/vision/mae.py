"""Masked-autoencoder pre-training (MAE) of timm Vision Transformers on unlabelled images.

The encoder is the timm ViT itself; ``ptft export`` writes it alone (no decoder) as timm ``model.safetensors``::

    ptft fit --config recipes/vision/mae.yaml
    ptft export runs/mae/version_0/checkpoints/last.ckpt backbone/
    ptft fit --config recipes/vision/cifar10.yaml --model.init_args.model_name=vit_tiny_patch16_224 \\
        --model.init_args.model_kwargs='{img_size: 32, patch_size: 4}' \\
        --model.init_args.pretrained_file=backbone/model.safetensors
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ptft.core.errors import PtftError
from ptft.vision.modules import create_timm_model
from ptft.vision.pretrain import BackbonePretraining


def patchify(images: torch.Tensor, patch_size: tuple[int, int]) -> torch.Tensor:
    """``(B, C, H, W)`` -> ``(B, h * w, ph * pw * C)``: one row per patch, in the row-major order of the ViT's tokens."""
    b, c, height, width = images.shape
    ph, pw = patch_size
    h, w = height // ph, width // pw
    return images.reshape(b, c, h, ph, w, pw).permute(0, 2, 4, 3, 5, 1).reshape(b, h * w, ph * pw * c)


def random_masking(
    tokens: torch.Tensor, mask_ratio: float, noise: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Keeps a random ``int(N * (1 - mask_ratio))`` of each example's ``N`` tokens (MAE's per-example shuffle).

    Returns the kept tokens ``(B, keep, D)``, the mask ``(B, N)`` (1 = masked, 0 = kept) and the permutation that puts
    ``[kept tokens, masked tokens]`` back in place. ``noise`` ``(B, N)`` decides which tokens stay (the smallest).
    """
    b, n, d = tokens.shape
    keep = int(n * (1 - mask_ratio))
    if noise is None:
        noise = torch.rand(b, n, device=tokens.device)
    shuffle = noise.argsort(dim=1)
    restore = shuffle.argsort(dim=1)
    kept = tokens.gather(1, shuffle[:, :keep, None].expand(-1, -1, d))
    mask = torch.ones(b, n, device=tokens.device)
    mask[:, :keep] = 0
    return kept, mask.gather(1, restore), restore


def masked_patch_loss(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, norm_pix: bool) -> torch.Tensor:
    """Mean squared error per patch, averaged over the masked patches alone (``mask`` 1): visible patches add nothing.

    ``norm_pix`` standardises each target patch by its own mean and variance (MAE's better-representation variant).
    """
    target = target.float()
    if norm_pix:
        target = (target - target.mean(dim=-1, keepdim=True)) / (target.var(dim=-1, keepdim=True) + 1e-6) ** 0.5
    per_patch = (pred.float() - target).pow(2).mean(dim=-1)
    return (per_patch * mask).sum() / mask.sum()


class MAEDecoder(nn.Module):
    """MAE's lightweight decoder: the encoded visible tokens plus a shared mask token at every masked position, fixed
    2-D sin-cos positions, a few transformer blocks and a linear prediction of each patch's pixels."""

    def __init__(
        self, encoder_dim: int, dim: int, depth: int, heads: int, patch_pixels: int, prefix_tokens: int
    ) -> None:
        super().__init__()
        from timm.models.vision_transformer import Block

        self.prefix_tokens = prefix_tokens
        self.embed = nn.Linear(encoder_dim, dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.blocks = nn.Sequential(*[Block(dim, heads, mlp_ratio=4.0, qkv_bias=True) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.pred = nn.Linear(dim, patch_pixels)
        nn.init.normal_(self.mask_token, std=0.02)
        for module in self.modules():  # MAE's initialisation
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)

    def forward(self, latent: torch.Tensor, restore: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """``latent`` ``(B, prefix + kept, D)`` -> predicted pixels of every patch ``(B, h * w, ph * pw * C)``."""
        from timm.layers import build_sincos2d_pos_embed

        x = self.embed(latent)
        prefix, visible = x[:, : self.prefix_tokens], x[:, self.prefix_tokens :]
        b, n, dim = visible.shape[0], restore.shape[1], x.shape[-1]
        patches = torch.cat([visible, self.mask_token.expand(b, n - visible.shape[1], -1)], dim=1)
        patches = patches.gather(1, restore[..., None].expand(-1, -1, dim))  # back in image order
        positions = build_sincos2d_pos_embed(list(grid), dim=dim, device=x.device, dtype=x.dtype)
        x = self.blocks(torch.cat([prefix, patches + positions], dim=1))  # the class token keeps no position, as in MAE
        return self.pred(self.norm(x)[:, self.prefix_tokens :])


class MAENet(nn.Module):
    """A timm ViT (the encoder, run on the visible patches alone) and an MAE decoder."""

    def __init__(self, backbone: nn.Module, decoder: MAEDecoder, mask_ratio: float) -> None:
        super().__init__()
        self.backbone = backbone
        self.decoder = decoder
        self.mask_ratio = mask_ratio

    @property
    def patch_size(self) -> tuple[int, int]:
        return tuple(self.backbone.patch_embed.patch_size)

    def encode(
        self, pixel_values: torch.Tensor, noise: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The encoder on the visible patches: latent ``(B, prefix + kept, D)``, mask ``(B, N)`` and the restoring
        permutation (see :func:`random_masking`)."""
        vit = self.backbone
        # timm's own embedding (patch projection, class / register tokens, positions) on every patch, then the
        # masking: positions stay right for any ViT variant (class token with or without a position, registers).
        x = vit._pos_embed(vit.patch_embed(pixel_values))
        prefix = vit.num_prefix_tokens
        visible, mask, restore = random_masking(x[:, prefix:], self.mask_ratio, noise)
        x = vit.norm_pre(torch.cat([x[:, :prefix], visible], dim=1))
        return vit.norm(vit.blocks(x)), mask, restore

    def forward(self, pixel_values: torch.Tensor, noise: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Predicted pixels of every patch ``(B, N, ph * pw * C)`` and the mask ``(B, N)`` (1 = masked)."""
        latent, mask, restore = self.encode(pixel_values, noise)
        ph, pw = self.patch_size
        grid = (pixel_values.shape[-2] // ph, pixel_values.shape[-1] // pw)
        return self.decoder(latent, restore, grid), mask


class MAE(BackbonePretraining):
    """Self-supervised masked-autoencoder pre-training (MAE, He et al., 2021) of a timm Vision Transformer.

    Each image is cut into the ViT's patches and a random ``mask_ratio`` of them is hidden. The encoder — the timm
    ViT's own patch embedding, positions, blocks and norm — sees the visible patches alone (a quarter of the tokens by
    default: cheap); a small transformer decoder gets the encoded patches plus a mask token at every hidden position
    and predicts the pixels of every patch. The loss is the squared error on the hidden patches only. ``val/loss`` is
    measured on random masks too. ``ptft export`` writes the encoder alone (the timm ViT, no decoder) for fine-tuning
    with ``ImageClassifier(model_name=<same>, model_kwargs=<same>, pretrained_file=...)``.

    Takes one view per image (``UnlabeledImageDataModule(views=1)``, ``(B, C, H, W)``); of two views
    (``(B, 2, C, H, W)``) it uses the first.

    Args:
        model_name: timm Vision Transformer name (``vit_base_patch16_224``, ``vit_tiny_patch16_224``, ``deit_small_…``).
        pretrained: Start from pretrained weights (continued, in-domain pre-training) instead of random ones.
        pretrained_file: Local weights file (``.safetensors`` or ``.pth``) to start from.
        model_kwargs: Extra ``timm.create_model`` arguments: ``{img_size: 32, patch_size: 4}`` for 32-px images.
        mask_ratio: Fraction of the patches hidden from the encoder (MAE: 0.75).
        decoder_dim: Width of the decoder's tokens (MAE: 512).
        decoder_depth: Transformer blocks in the decoder (MAE: 8; 1 fine-tunes nearly as well).
        decoder_heads: Attention heads per decoder block (MAE: 16); must divide ``decoder_dim``.
        norm_pix_loss: Standardise each target patch by its own mean and variance (MAE's default for its best
            representations); ``false`` reconstructs the (normalised) pixels themselves.
        **kwargs: The shared arguments of :class:`ptft.core.FineTuneModule` (``optimizer``, ``scheduler``, ``l1``,
            ``l2_sp``, ``peft``, ``checkpoint_weights``, ``compile``, ``gradient_checkpointing``).
    """

    head_name = "decoder"

    def __init__(
        self,
        model_name: str,
        pretrained: bool = False,
        pretrained_file: str | None = None,
        model_kwargs: dict[str, Any] | None = None,
        mask_ratio: float = 0.75,
        decoder_dim: int = 512,
        decoder_depth: int = 8,
        decoder_heads: int = 16,
        norm_pix_loss: bool = True,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        from timm.models import VisionTransformer

        if decoder_dim % decoder_heads or decoder_dim % 4:
            raise PtftError(f"decoder_dim ({decoder_dim}) must be a multiple of 4 (sin-cos positions) and of "
                            f"decoder_heads ({decoder_heads})")
        if decoder_depth < 1:
            raise PtftError(f"decoder_depth must be >= 1, got {decoder_depth}")
        backbone = create_timm_model(model_name, pretrained, pretrained_file, num_classes=0, **(model_kwargs or {}))
        if not isinstance(backbone, VisionTransformer) or backbone.pos_embed is None:
            raise PtftError(f"MAE needs a timm Vision Transformer with position embeddings (vit_*, deit_*), "
                            f"{model_name!r} is a {type(backbone).__name__}; for CNNs use ptft.vision.SimCLR or MoCo")
        patches = backbone.patch_embed.num_patches
        keep = int(patches * (1 - mask_ratio))
        if not 0 < keep < patches:
            raise PtftError(f"mask_ratio {mask_ratio} keeps {keep} of {patches} patches: choose it so that at least one "
                            "patch is hidden and one visible (MAE: 0.75)")
        self.model_name = model_name
        self.norm_pix_loss = norm_pix_loss
        import timm.data

        # timm resolves the input size from the pretrained config, which ignores an img_size given in model_kwargs.
        self._data_config = timm.data.resolve_data_config(model=backbone)
        self._data_config["input_size"] = (backbone.patch_embed.proj.in_channels, *backbone.patch_embed.img_size)
        ph, pw = backbone.patch_embed.patch_size
        decoder = MAEDecoder(backbone.embed_dim, decoder_dim, decoder_depth, decoder_heads,
                             ph * pw * backbone.patch_embed.proj.in_channels, backbone.num_prefix_tokens)
        self.set_model(MAENet(backbone, decoder, mask_ratio))
        self._save_hparams(pretrained=False, pretrained_file=None)

    def step(self, batch: dict[str, Any], stage: str) -> tuple[torch.Tensor, Any]:
        images = batch["pixel_values"]
        if images.ndim == 5:  # two views from a contrastive data module: MAE needs one
            images = images[:, 0]
        if images.ndim != 4:
            raise PtftError(f"MAE needs images (B, C, H, W), got {tuple(images.shape)}: use "
                            "ptft.vision.pretrain.UnlabeledImageDataModule with views: 1")
        pred, mask = self.model(images)
        return masked_patch_loss(pred, patchify(images, self.model.patch_size), mask, self.norm_pix_loss), None

    def update_metrics(self, stage: str, outputs: Any, batch: dict[str, Any]) -> None:
        """Nothing beyond the reconstruction loss (no positive pairs to score)."""
