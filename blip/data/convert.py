"""BLIP/LAVIS annotation lists (`[{"image", "caption"}]`) plus an image root -> webdataset shards.

Records that name the same image (the Karpathy train layout: one record per caption) become one sample: `txt` is
the first caption and, when there are several, `json.captions` holds them all (the training loader makes one pair
per caption). Image bytes are copied unchanged; the extension follows the decoded format, not the file name.
`json` keeps the first record's other fields (image, image_id, ...) and adds `source`.
"""

from __future__ import annotations

import io
import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from PIL import Image

from blip.atomic import write_json
from blip.data.images import BadSample, decode_image
from blip.data.shards import SampleStats, ShardWriter
from blip.data.text import pre_caption
from blip.errors import InputError

SOURCES = ("web", "human", "synthetic")
_EXT = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}
SUMMARY = "from_json.json"


def _group(records: list[dict]) -> list[tuple[str, list[str], dict]]:
    """(image, captions, first record's other fields) per image, in first-appearance order."""
    by_image: dict[str, tuple[str, list[str], dict]] = {}
    for r in records:
        caps = r.get("caption")
        caps = [caps] if isinstance(caps, str) else [c for c in (caps or []) if isinstance(c, str)]
        image = r["image"]
        if image not in by_image:
            by_image[image] = (image, [], {k: v for k, v in r.items() if k != "caption"})
        by_image[image][1].extend(caps)
    return list(by_image.values())


def shards_from_json(
    annotations: str | os.PathLike,
    images: str | os.PathLike,
    out: str | os.PathLike,
    maxcount: int = 1000,
    source: str = "web",
    strict: bool = False,
    on_progress: Callable[[int, int], None] | None = None,
) -> dict[str, Any]:
    """Convert; returns the summary (also written to OUT/from_json.json). Missing or undecodable images, and
    images without a usable caption, are skipped and counted (InputError with strict=True)."""
    ann, root, out_dir = Path(annotations), Path(images), Path(out)
    if source not in SOURCES:
        raise InputError(f"source must be one of {', '.join(SOURCES)}, not {source!r}", param="source")
    if maxcount < 1:
        raise InputError(f"maxcount must be at least 1, got {maxcount}", param="maxcount")
    if not ann.is_file():
        raise InputError(f"annotation file {ann} not found")
    if not root.is_dir():
        raise InputError(f"images {root} is not a directory", param="images")
    try:
        records = json.loads(ann.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise InputError(f"{ann}: cannot read annotation JSON: {e}") from None
    if not isinstance(records, list) or not all(isinstance(r, dict) and "image" in r for r in records):
        raise InputError(f"{ann}: expected a list of records like {{'image': path, 'caption': str or [str]}}")
    t0 = time.perf_counter()
    groups = _group(records)
    stats = SampleStats()
    n_captions = 0
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = ann.stem
    with ShardWriter(str(out_dir / f"{stem}-%05d.tar"), maxcount=maxcount) as sink:
        for i, (image, caps, meta) in enumerate(groups):
            if on_progress:
                on_progress(i, len(groups))
            where = f"{ann}: image {image!r}"
            caps = [c.strip() for c in caps if pre_caption(c)]
            try:
                if not caps:
                    raise BadSample("empty_caption" if groups[i][1] else "missing_caption", "no usable caption")
                path = root / image
                try:
                    data = path.read_bytes()
                except OSError as e:
                    raise BadSample("missing_image", f"{path}: {e}") from None
                decode_image(data)
                ext = _EXT.get(Image.open(io.BytesIO(data)).format or "")
                if ext is None:
                    raise BadSample("unsupported_format", f"{path}: not JPEG, PNG or WebP")
            except BadSample as e:
                if strict:
                    raise InputError(f"{where}: {e.reason} ({e.detail})") from None
                stats.add_bad(e.reason)
                continue
            meta = {**meta, "source": source}
            if len(caps) > 1:
                meta["captions"] = [{"text": c, "source": source} for c in caps]
            sink.write({"__key__": f"{i:09d}", ext: data, "txt": caps[0], "json": meta})
            stats.good += 1
            n_captions += len(caps)
    written = [Path(p).name for p in sink.shards]
    for old in out_dir.glob(f"{stem}-*.tar"):  # left by an earlier run with a smaller --maxcount
        if old.name not in written:
            old.unlink()
    if on_progress:
        on_progress(len(groups), len(groups))
    summary = {
        "annotations": str(ann),
        "images": str(root),
        "out": str(out_dir),
        "source": source,
        "records": len(records),
        "samples": stats.good,
        "captions": n_captions,
        "shards": written,
        "bad_samples": stats.as_dict(),
        "seconds": round(time.perf_counter() - t0, 3),
    }
    write_json(out_dir / SUMMARY, summary, indent=1)
    return summary
