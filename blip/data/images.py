"""Image bytes -> RGB PIL images: decoding with sanity checks, and any PIL mode to 8-bit RGB.

Kept free of torch so that shard tools (and the demo world's worker processes) start fast.
"""

from __future__ import annotations

import io
import os
import warnings
from pathlib import Path

import numpy as np
from PIL import Image

from blip.errors import InputError

MIN_SIDE = 4
MAX_ASPECT = 30.0
MAX_PIXELS = Image.MAX_IMAGE_PIXELS or 89_478_485
"""Absurd dimensions: a side under MIN_SIDE px (tracking pixels), a side ratio over MAX_ASPECT, or more pixels
than Pillow's decompression-bomb limit."""


class BadSample(Exception):
    """A sample that must be skipped; `reason` is one of blip.data.shards.REASONS."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason, self.detail = reason, detail


_WHITE = (255, 255, 255)


def to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL image as 8-bit RGB.

    RGB passes through untouched. Alpha (RGBA, LA, PA, palette with transparency) is composited on white, as
    img2dataset does, rather than dropped (dropping shows the often-black colour under transparent pixels).
    16-bit and 32-bit integer images are scaled to 8 bits instead of clipped (Pillow's convert("RGB") turns most
    of a 16-bit image white); float images are taken as [0, 1] if they fit, else [0, 255]. Everything else
    (L, 1, CMYK, YCbCr, LAB, HSV, P) goes through Pillow's convert.
    """
    mode = img.mode
    if mode == "RGB":
        return img
    if mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
        mode = img.mode
        if mode == "RGB":
            return img
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, _WHITE + (255,))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if mode.startswith("I;16") or mode == "I":
        a = np.asarray(img).astype(np.float64)
        if mode.startswith("I;16") or a.size and a.max() > 255:
            a = a / 257.0  # 0..65535 -> 0..255
        return Image.fromarray(np.clip(np.rint(a), 0, 255).astype(np.uint8), "L").convert("RGB")
    if mode == "F":
        a = np.asarray(img).astype(np.float64)
        if a.size and a.min() >= 0.0 and a.max() <= 1.0:
            a = a * 255.0
        return Image.fromarray(np.clip(np.rint(a), 0, 255).astype(np.uint8), "L").convert("RGB")
    return img.convert("RGB")


def decode_image(data: bytes) -> Image.Image:
    """Bytes -> fully loaded RGB image, or BadSample(empty_image | absurd_size | undecodable_image).

    The size is checked from the header, before the pixels are decoded.
    """
    if not data:
        raise BadSample("empty_image", "zero bytes")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
        w, h = img.size
    except Image.DecompressionBombError as e:
        raise BadSample("absurd_size", str(e)) from None
    except Exception as e:  # noqa: BLE001 - any decoder failure is a bad sample
        raise BadSample("undecodable_image", f"{type(e).__name__}: {e}") from None
    if min(w, h) < MIN_SIDE or max(w, h) > MAX_ASPECT * min(w, h) or w * h > MAX_PIXELS:
        raise BadSample("absurd_size", f"{w}x{h}")
    try:
        img.load()
        return to_rgb(img)
    except Exception as e:  # noqa: BLE001
        raise BadSample("undecodable_image", f"{type(e).__name__}: {e}") from None


def load_image_file(path: str | os.PathLike, param: str = "image") -> Image.Image:
    """One image file -> RGB image, with decode_image's checks; anything else (a missing path, a directory, a
    shard, a non-image, a decompression bomb) is an InputError naming `param` and the file."""
    p = Path(path).expanduser()
    if p.is_dir():
        raise InputError(f"{param}: {p} is a directory; expected one image file", param=param)
    try:
        data = p.read_bytes()
    except FileNotFoundError:
        raise InputError(f"{param}: {p}: no such file", param=param) from None
    except OSError as e:
        raise InputError(f"{param}: cannot read {p}: {e.strerror or e}", param=param) from None
    try:
        return decode_image(data)
    except BadSample as e:
        hint = " (a webdataset shard: pass one image file)" if p.suffix.lower() == ".tar" else ""
        raise InputError(f"{param}: {p} is not a usable image{hint}: {e.reason} ({e.detail})", param=param) from None
