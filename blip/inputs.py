"""Where images come from: image files, directories of images and webdataset shards, as (name, PIL image)."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

IMAGE_EXTS = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}


def iter_inputs(inputs: list[str], stats: Any = None, strict: bool = False) -> Iterator[tuple[str, Any]]:
    """Yield (name, PIL RGB image) for image files, directories of images, and webdataset shards.

    Samples that cannot be used (a corrupt shard sample, an image in a directory that does not decode or is absurdly
    sized) are skipped and counted by reason in `stats` (a blip.data.shards.SampleStats), or with `strict` an
    InputError naming the file or sample. An image file given by name that cannot be used is always an InputError.
    """
    from blip.data.shards import SampleStats, expand_shards, iter_shard
    from blip.errors import InputError

    stats = stats if stats is not None else SampleStats()
    for item in inputs:
        p = Path(item)
        if p.is_file() and p.suffix.lower() in IMAGE_EXTS:
            yield str(p), _image(p, stats, strict=True)
        elif p.is_dir() and not any(p.glob("*.tar")):
            files = sorted(f for f in p.rglob("*") if f.suffix.lower() in IMAGE_EXTS and f.is_file())
            if not files:
                raise InputError(f"{p}: no images ({', '.join(sorted(IMAGE_EXTS))}) and no .tar shards")
            for f in files:
                image = _image(f, stats, strict)
                if image is not None:
                    yield str(f), image
        else:
            for shard in expand_shards(item):
                for s in iter_shard(shard, stats, strict, need_caption=False):  # captioning needs no caption
                    yield f"{Path(shard).name}/{s['key']}", s["image"]


def _image(p: Path, stats: Any, strict: bool) -> Any:
    """One image file through the shard reader's checks (decode, size, decompression bombs): the RGB image, or
    None after counting why it is skipped; with `strict` an InputError naming the file instead."""
    from blip.data.images import BadSample, decode_image
    from blip.errors import InputError

    try:
        image = decode_image(p.read_bytes())
    except BadSample as e:
        if strict:
            raise InputError(f"cannot use image {p}: {e.reason} ({e.detail})") from None
        stats.add_bad(e.reason)
        return None
    except OSError as e:
        if strict:
            raise InputError(f"cannot read image {p}: {e.strerror or e}") from None
        stats.add_bad("undecodable_image")
        return None
    stats.good += 1
    return image


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
