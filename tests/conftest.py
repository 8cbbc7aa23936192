"""Shared test setup: no network, and small generic factories for images and raw tar shards."""

from __future__ import annotations

import io
import os
import tarfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _encode(img: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format={"jpg": "JPEG", "jpeg": "JPEG"}.get(fmt, fmt.upper()))
    return buf.getvalue()


@pytest.fixture
def image_bytes() -> Callable[..., bytes]:
    """`image_bytes(fmt="png", size=(32, 24), seed=0, mode="RGB")`: a random image, encoded."""

    def make(fmt: str = "png", size: tuple[int, int] = (32, 24), seed: int = 0, mode: str = "RGB") -> bytes:
        rng = np.random.default_rng(seed)
        arr = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
        return _encode(Image.fromarray(arr, "RGB").convert(mode), fmt)

    return make


@pytest.fixture
def raw_tar() -> Callable[[Path, list[tuple[str, bytes]]], Path]:
    """`raw_tar(path, [(member name, bytes), ...])`: a tar with exactly these members, in this order."""

    def make(path: Path, members: list[tuple[str, bytes]]) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tf:
            for name, data in members:
                ti = tarfile.TarInfo(name)
                ti.size = len(data)
                tf.addfile(ti, io.BytesIO(data))
        return path

    return make
