"""Model configuration: dataclasses for the two towers and the whole BLIP model, plus named sizes.

Sizes: `tiny` (tests and the laptop demo), `base` (ViT-B/16 + BERT-base, the paper's main model), `large`
(ViT-L/16 + BERT-base text, as the paper). Token ids default to bert-base-uncased + [DEC] (30522) + [ENC] (30523).
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal

from blip.errors import InputError


@dataclass
class VisionConfig:
    image_size: int = 224
    patch_size: int = 16
    width: int = 768
    depth: int = 12
    heads: int = 12
    mlp_dim: int = 3072
    layer_norm_eps: float = 1e-6
    drop_path: float = 0.0
    """Stochastic depth rate (the original uses 0.1 for ViT-L)."""
    grad_ckpt_layers: int = 0
    """Activation-checkpoint the last N blocks while training (the original's ckpt_layer)."""
    stem: Literal["none", "conv"] = "none"
    """How pixels become patch tokens. "none": BLIP's single Conv2d(kernel = stride = patch_size), the only shape
    Hugging Face BLIP and the original checkpoints know. "conv": a small convolutional stem instead (log2(patch_size)
    3x3 stride-2 conv + BatchNorm + ReLU stages, widths doubling up to `width`, then a 1x1 conv; Xiao et al. 2021,
    "Early convolutions help transformers see better"): a tiny ViT trained briefly on few images learns shapes with
    it and barely without it (docs/demo-capfilt.md). Such a model cannot be exported to the HF or .pth formats."""

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2


@dataclass
class TextConfig:
    vocab_size: int = 30524
    hidden: int = 768
    layers: int = 12
    heads: int = 12
    mlp_dim: int = 3072
    max_positions: int = 512
    layer_norm_eps: float = 1e-12
    dropout: float = 0.0
    """Hidden and attention dropout (BERT uses 0.1 during pre-training)."""


@dataclass
class BlipConfig:
    vision: VisionConfig = field(default_factory=VisionConfig)
    text: TextConfig = field(default_factory=TextConfig)
    embed_dim: int = 256
    """Width of the ITC projection space (vision_proj / text_proj)."""
    text_encoder: bool = True
    """Build the text encoder (+ projections, ITM head): needed for ITC/ITM (filter, retrieval)."""
    text_decoder: bool = True
    """Build the image-grounded text decoder (LM head): needed for captioning."""
    share_text: bool = True
    """Encoder and decoder share everything except self-attention (the paper's best setting)."""
    tie_lm_head: bool = True
    """The LM head (`text_decoder.cls.predictions.decoder.weight`) is the decoder's word-embedding matrix, as in
    every released BLIP model. False keeps a separate head matrix: what the original code built under
    transformers 5 trains (it no longer ties), and what loading such a checkpoint gives (never silently tied)."""
    pad_token_id: int = 0
    cls_token_id: int = 101
    sep_token_id: int = 102
    bos_token_id: int = 30522
    enc_token_id: int = 30523

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> BlipConfig:
        return from_dict(cls, d)


def from_dict(cls: type, d: dict[str, Any], where: str = "") -> Any:
    """Build a (nested) dataclass from a dict; unknown keys and wrong types raise InputError naming the key."""
    if not isinstance(d, dict):
        raise InputError(f"{where or cls.__name__}: expected a table, got {type(d).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - set(fields))
    if unknown:
        raise InputError(f"unknown key(s) {', '.join(where + k for k in unknown)}; known: {', '.join(sorted(fields))}")
    kwargs = {}
    hints = _type_hints(cls)
    for k, v in d.items():
        t = hints[k]
        if dataclasses.is_dataclass(t):
            kwargs[k] = from_dict(t, v, where=f"{where}{k}.")
        else:
            kwargs[k] = check_type(v, t, f"{where}{k}")
    return cls(**kwargs)


def _type_hints(cls: type) -> dict[str, Any]:
    import typing

    return typing.get_type_hints(cls)


def check_type(value: Any, t: Any, key: str) -> Any:
    """Validate a config value against a field type; ints are accepted for floats. Returns the (coerced) value."""
    import types
    import typing

    origin = typing.get_origin(t)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(t)
        if value is None and type(None) in args:
            return None
        for a in args:
            if a is type(None):
                continue
            try:
                return check_type(value, a, key)
            except InputError:
                pass
        raise InputError(f"{key}: expected {t}, got {value!r}")
    if origin in (list, tuple):
        if not isinstance(value, list | tuple):
            raise InputError(f"{key}: expected a list, got {value!r}")
        args = typing.get_args(t)
        inner = args[0] if args else Any
        return [check_type(v, inner, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise InputError(f"{key}: expected a table, got {value!r}")
        kt, vt = typing.get_args(t) or (Any, Any)
        return {check_type(k, kt, f"{key} key"): check_type(v, vt, f"{key}.{k}") for k, v in value.items()}
    if origin is typing.Literal:
        if value not in typing.get_args(t):
            raise InputError(f"{key}: expected one of {list(typing.get_args(t))}, got {value!r}")
        return value
    if t is Any:
        return value
    if t is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if t is bool and not isinstance(value, bool):
        raise InputError(f"{key}: expected true/false, got {value!r}")
    if t is int and isinstance(value, bool):
        raise InputError(f"{key}: expected an integer, got {value!r}")
    if isinstance(t, type) and not isinstance(value, t):
        raise InputError(f"{key}: expected {t.__name__}, got {type(value).__name__} {value!r}")
    return value


def _text_base(vocab_size: int) -> TextConfig:
    return TextConfig(vocab_size=vocab_size, hidden=768, layers=12, heads=12, mlp_dim=3072, dropout=0.1)


SIZES = ("tiny", "base", "large")


def model_config(
    size: str, vocab_size: int | None = None, image_size: int = 224, tokenizer: Any = None, **overrides: Any
) -> BlipConfig:
    """A fresh-model config for a named size. `tiny` is small enough to pre-train on a laptop CPU in minutes.

    With `tokenizer` (a blip.tokenizer.Tokenizer) the vocabulary size and every special token id come from it;
    without, bert-base-uncased + [DEC] + [ENC] (vocab_size 30524) is assumed.
    """
    if vocab_size is None:
        vocab_size = len(tokenizer) if tokenizer is not None else 30524
    if size == "tiny":
        vision = VisionConfig(image_size=image_size, patch_size=16, width=256, depth=2, heads=4, mlp_dim=1024)
        text = TextConfig(vocab_size=vocab_size, hidden=256, layers=2, heads=4, mlp_dim=1024, max_positions=64)
    elif size == "base":
        vision = VisionConfig(image_size=image_size, width=768, depth=12, heads=12, mlp_dim=3072)
        text = _text_base(vocab_size)
    elif size == "large":
        vision = VisionConfig(image_size=image_size, width=1024, depth=24, heads=16, mlp_dim=4096, drop_path=0.1)
        text = _text_base(vocab_size)
    else:
        raise InputError(f"unknown model size {size!r}; choose one of {', '.join(SIZES)}")
    cfg = BlipConfig(vision=vision, text=text, bos_token_id=vocab_size - 2, enc_token_id=vocab_size - 1)
    if tokenizer is not None:
        cfg = dataclasses.replace(
            cfg,
            pad_token_id=tokenizer.pad_id,
            cls_token_id=tokenizer.cls_id,
            sep_token_id=tokenizer.sep_id,
            bos_token_id=tokenizer.bos_id,
            enc_token_id=tokenizer.enc_id,
        )
    return dataclasses.replace(cfg, **overrides)


def deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """A copy of `base` with `over` merged in, table by table; `over` wins on values (config file < flags < overrides,
    task defaults < user config, recipe defaults < step keys)."""
    out = copy.deepcopy(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out
