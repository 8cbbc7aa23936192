"""ViT image encoder (timm), keyed as the original `visual_encoder.*` so released checkpoints load as-is.

timm's VisionTransformer already uses the original parameter names (cls_token, pos_embed, patch_embed.proj,
blocks.N.{norm1,attn.qkv,attn.proj,norm2,mlp.fc1,mlp.fc2}, norm) and scaled_dot_product_attention.
With `VisionConfig.stem = "conv"` the patch projection is a small convolutional stem (`conv_stem`), keyed
`patch_embed.proj.N.*`: not a BLIP shape, so such a model is never exported to the HF or original formats.
"""

from __future__ import annotations

import math
from functools import partial

import torch
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer
from torch import nn
from torch.utils.checkpoint import checkpoint

from blip.config import VisionConfig


class ViT(VisionTransformer):
    """timm ViT returning all tokens after the final norm; optional checkpointing of the last N blocks."""

    def __init__(self, cfg: VisionConfig):
        super().__init__(
            img_size=cfg.image_size,
            patch_size=cfg.patch_size,
            embed_dim=cfg.width,
            depth=cfg.depth,
            num_heads=cfg.heads,
            mlp_ratio=cfg.mlp_dim / cfg.width,
            qkv_bias=True,
            num_classes=0,
            global_pool="",
            drop_path_rate=cfg.drop_path,
            norm_layer=partial(nn.LayerNorm, eps=cfg.layer_norm_eps),
        )
        assert self.blocks[0].mlp.fc1.out_features == cfg.mlp_dim, "mlp_dim must be representable as a ratio"
        if cfg.stem == "conv":
            self.patch_embed.proj = conv_stem(cfg.patch_size, cfg.width)
        self.grad_ckpt_layers = cfg.grad_ckpt_layers

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> (B, 1 + N, D) token features after the final LayerNorm."""
        x = self.patch_embed(pixel_values)  # (B, N, D)
        x = self._pos_embed(x)  # (B, 1 + N, D) with CLS
        x = self.norm_pre(x)
        first_ckpt = len(self.blocks) - self.grad_ckpt_layers
        for i, blk in enumerate(self.blocks):
            if self.training and i >= first_ckpt and torch.is_grad_enabled():
                x = checkpoint(blk, x, use_reentrant=False)
            else:
                x = blk(x)
        return self.norm(x)


def conv_stem(patch_size: int, width: int) -> nn.Sequential:
    """(B, 3, H, W) -> (B, width, H / patch_size, W / patch_size), like the patch projection it replaces.

    log2(patch_size) stages of 3x3 stride-2 conv + BatchNorm + ReLU whose widths double up to `width` (e.g. 32, 64,
    128, 256 for patch 16 and width 256), then a 1x1 conv: the ViT-C stem of Xiao et al. 2021 ("Early convolutions
    help transformers see better"). It gives a small ViT the locality a 16x16 linear projection lacks.
    """
    from blip.errors import InputError

    stages = patch_size.bit_length() - 1
    if patch_size < 2 or 1 << stages != patch_size:
        raise InputError(f"vision.stem = 'conv' needs a power-of-two patch_size (2, 4, 8, 16, ...), got {patch_size}")
    layers: list[nn.Module] = []
    c_in = 3
    for i in range(stages):
        c_out = max(width >> (stages - 1 - i), 8)
        layers += [nn.Conv2d(c_in, c_out, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU()]
        c_in = c_out
    layers.append(nn.Conv2d(c_in, width, 1))
    return nn.Sequential(*layers)


def interpolate_pos_embed(pos_embed: torch.Tensor, num_patches: int) -> torch.Tensor:
    """Resize a (1, 1 + N, D) position embedding to `num_patches` patches, bicubic, keeping the CLS row.

    Same rule as the original `interpolate_pos_embed` (e.g. 224 px -> 384 px is 14x14 -> 24x24 patches).
    """
    old = pos_embed.shape[1] - 1
    if old == num_patches:
        return pos_embed
    dim = pos_embed.shape[-1]
    old_side, new_side = int(math.isqrt(old)), int(math.isqrt(num_patches))
    cls, grid = pos_embed[:, :1], pos_embed[:, 1:]
    grid = grid.reshape(1, old_side, old_side, dim).permute(0, 3, 1, 2)  # (1, D, s, s)
    grid = F.interpolate(grid.float(), size=(new_side, new_side), mode="bicubic", align_corners=False)
    grid = grid.permute(0, 2, 3, 1).reshape(1, new_side * new_side, dim).to(pos_embed.dtype)  # (1, N', D)
    return torch.cat([cls, grid], dim=1)
