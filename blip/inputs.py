"""Where images come from: image files, directories of images and webdataset shards, as (name, PIL image)."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

IMAGE_EXTS = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}


def iter_inputs(inputs: list[str], stats: Any = None) -> Iterator[tuple[str, Any]]:
    """Yield (name, PIL RGB image) for image files, directories of images, and webdataset shards.

    Corrupt shard samples are skipped and counted in `stats` (a blip.data.shards.SampleStats); an unreadable
    image file given by name is an InputError.
    """
    from PIL import Image

    from blip.data.shards import SampleStats, expand_shards, iter_shard
    from blip.data.transforms import to_rgb
    from blip.errors import InputError

    stats = stats if stats is not None else SampleStats()
    for item in inputs:
        p = Path(item)
        if p.is_file() and p.suffix.lower() in IMAGE_EXTS:
            try:
                with Image.open(p) as im:
                    im.load()  # decode now: the file closes when this block ends
                    rgb = to_rgb(im)
            except Exception as e:  # noqa: BLE001
                raise InputError(f"cannot read image {p}: {e}") from None
            yield str(p), rgb
        elif p.is_dir() and not any(p.glob("*.tar")):
            files = sorted(f for f in p.rglob("*") if f.suffix.lower() in IMAGE_EXTS)
            if not files:
                raise InputError(f"{p}: no images ({', '.join(sorted(IMAGE_EXTS))}) and no .tar shards")
            yield from iter_inputs([str(f) for f in files], stats)
        else:
            for shard in expand_shards(item):
                for s in iter_shard(shard, stats, need_caption=False):  # captioning needs no caption
                    yield f"{Path(shard).name}/{s['key']}", s["image"]


def batches(it: Iterable, n: int) -> Iterator[list]:
    """Consecutive lists of `n` items (the last one shorter)."""
    batch = []
    for x in it:
        batch.append(x)
        if len(batch) == n:
            yield batch
            batch = []
    if batch:
        yield batch
