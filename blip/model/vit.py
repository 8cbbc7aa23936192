"""ViT image encoder (timm), keyed as the original `visual_encoder.*` so released checkpoints load as-is.

timm's VisionTransformer already uses the original parameter names (cls_token, pos_embed, patch_embed.proj,
blocks.N.{norm1,attn.qkv,attn.proj,norm2,mlp.fc1,mlp.fc2}, norm) and scaled_dot_product_attention.
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
