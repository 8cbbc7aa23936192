"""Tiny models and data built inside the tests (no network): a small tokenizer, HF BLIP models, images."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from blip.tokenizer import Tokenizer

WORDS = (
    "a red blue green yellow circle square star triangle on the left right top bottom picture of small big there is"
).split()


def tiny_tokenizer() -> Tokenizer:
    return Tokenizer.train([" ".join(WORDS)] * 5 + WORDS, vocab_size=100)


def hf_config(tok: Tokenizer, image_size: int = 32):
    from transformers import BlipConfig

    return BlipConfig(
        text_config=dict(
            vocab_size=len(tok),
            hidden_size=32,
            intermediate_size=37,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=64,
            bos_token_id=tok.bos_id,
            pad_token_id=tok.pad_id,
            sep_token_id=tok.sep_id,
            eos_token_id=tok.sep_id,
        ),
        vision_config=dict(
            hidden_size=32,
            intermediate_size=37,
            num_hidden_layers=2,
            num_attention_heads=4,
            image_size=image_size,
            patch_size=8,
        ),
        image_text_hidden_size=16,
    )


def sharpen(model: torch.nn.Module, factor: float = 3.0, seed: int = 0) -> None:
    """HF's random init gives nearly flat logits; scale the matrices so decoding choices are clear-cut."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.mul_(factor)


def hf_model(kind: str, tok: Tokenizer, out: Path, seed: int = 0):
    """Build, sharpen and save a tiny BlipForConditionalGeneration ('caption') or BlipForImageTextRetrieval."""
    from transformers import BlipForConditionalGeneration, BlipForImageTextRetrieval

    torch.manual_seed(seed)
    cls = BlipForConditionalGeneration if kind == "caption" else BlipForImageTextRetrieval
    m = cls(hf_config(tok)).eval()
    with torch.no_grad():  # transformers initialises the vision tower with std 1e-10: every image would look alike
        for name, p in m.named_parameters():
            if name.startswith("vision_model") and p.dim() > 1:
                p.normal_(0.0, 0.05)
    sharpen(m)
    m.save_pretrained(out)
    tok.save(out)
    return m


def make_images(out: Path, n: int = 3, size: int = 48, seed: int = 0) -> list[Path]:
    rng = np.random.default_rng(seed)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        arr = (rng.random((size, size, 3)) * 255).astype(np.uint8)
        arr[: size // 2, : size // 2] = rng.integers(0, 255, 3)  # a block of colour, so images differ clearly
        p = out / f"img{i}.png"
        Image.fromarray(arr).save(p)
        paths.append(p)
    return paths
