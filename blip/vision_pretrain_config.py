"""The configuration of a vision pre-training run (blip.vision_pretrain), apart from the torch code that runs it:
the CLI builds its recipe-step signature from these fields without importing torch (`blipctl --help` stays fast).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal

from blip.config import VisionConfig, from_dict, model_config
from blip.errors import InputError


@dataclass(kw_only=True)
class VisionPretrainConfig:
    train: list[str]
    """Labelled training shards (dir, glob, brace pattern)."""
    out: str
    """Output directory (see the module docstring)."""
    heads: dict[str, int]
    """Head name -> number of classes, e.g. {"shape": 5, "color": 6}; "cls" reads the shards' `cls` member."""
    val: list[str] = field(default_factory=list)
    """Held-out labelled shards: accuracy per head at each log step and at the end."""
    size: Literal["tiny", "base", "large"] = "tiny"
    """The tower's size (as `model.size` of the BLIP that will load it)."""
    image_size: int = 224
    patch_size: int | None = None
    """None keeps the size's 16."""
    stem: Literal["none", "conv"] = "none"
    """As `model.stem` (VisionConfig.stem); the BLIP that loads the tower must use the same."""
    pool: Literal["cls", "mean"] = "cls"
    """What the heads read: the [CLS] token, or the mean of the patch tokens. `mean` makes every patch carry what it
    shows, which is what BLIP's cross-attention reads (the demo's captions name each object's shape)."""
    steps: int = 1000
    batch_size: int = 64
    lr: float = 1e-3
    min_lr: float = 1e-5
    warmup_steps: int = 30
    weight_decay: float = 0.05
    """AdamW decay on weight matrices and conv kernels; biases, norms and embeddings are not decayed."""
    min_scale: float = 1.0
    """RandomResizedCrop minimum scale; 1.0 keeps the whole image (labels that name a position need it)."""
    hflip: bool = False
    """Random horizontal flips (wrong for labels that say left or right)."""
    shuffle_buffer: int = 5000
    """Samples shuffled among while streaming (decoded images: mind the memory at high resolution)."""
    log_every: int = 100
    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    overwrite: bool = False
    """Replace a finished run in `out` (otherwise a complete `out` is an error)."""

    def vision(self) -> VisionConfig:
        overrides = {"stem": self.stem} | ({"patch_size": self.patch_size} if self.patch_size else {})
        return dataclasses.replace(model_config(self.size, image_size=self.image_size).vision, **overrides)


def vision_pretrain_config(d: dict[str, Any]) -> VisionPretrainConfig:
    """A config from a plain dict (TOML data); unknown keys, wrong types and bad values raise InputError naming them."""
    for key in ("train", "out", "heads"):
        if key not in d:
            raise InputError(f"{key}: required", param=key)
    cfg = from_dict(VisionPretrainConfig, d)
    if not cfg.heads:
        raise InputError("heads: at least one head (name = number of classes)", param="heads")
    for name, n in cfg.heads.items():
        if n < 2:
            raise InputError(f"heads.{name}: a head needs at least 2 classes, got {n}", param=f"heads.{name}")
    for key in ("steps", "batch_size", "log_every", "shuffle_buffer", "image_size"):
        if getattr(cfg, key) < 1:
            raise InputError(f"{key}: must be at least 1, got {getattr(cfg, key)}", param=key)
    if not 0.0 < cfg.min_scale <= 1.0:
        raise InputError(f"min_scale: must be in (0, 1], got {cfg.min_scale}", param="min_scale")
    return cfg
