"""Look at a shard set before spending GPU hours on it: samples, images by format and size, captions per sample and
their lengths, bad samples by reason, and img2dataset's own download statistics when they sit beside the shards.

Samples are read with the shard reader (blip.data.shards) and judged by its rules: a sample that training would
skip is counted under the reader's reason. One exception is reported on its own line rather than as bad:
an *image-only* sample (a valid image with no txt and no json.captions), which is what img2dataset writes without a
caption column and what captioning and CapFilt take as input.

img2dataset writes `<shard>_stats.json` beside each `<shard>.tar` (count, successes, failed_to_download,
failed_to_resize, status_dict: error message -> count). For the shards given, those files are read and summed,
and the commonest failure messages are listed.
"""

from __future__ import annotations

import io
import json
import os
import statistics
import warnings
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from PIL import Image

from blip.data.images import BadSample, decode_image
from blip.data.shards import IMAGE_EXTS, SampleStats, _validate, captions_of, expand_shards, iter_groups

SHORT_SIDE_BUCKETS = (64, 128, 224, 384, 512, 1024)
"""Edges of the image-size histogram (shorter side, px): 224 and 384 are BLIP's input sizes, so the buckets say
how many images are upscaled for pre-training (224) and for the fine-tuned models (384)."""
WORD_BUCKETS = (5, 10, 15, 20, 30, 50)
"""Edges of the caption-length histogram (words); BLIP cuts pre-training captions at 30 tokens."""
TOP_FAILURES = 10
I2D_FIELDS = ("count", "successes", "failed_to_download", "failed_to_resize")


def _bucket_labels(edges: Sequence[int], unit: str) -> list[str]:
    labels = [f"<{edges[0]}"]
    labels += [f"{a}-{b - 1}" for a, b in zip(edges, edges[1:], strict=False)]
    return [f"{x} {unit}" for x in labels + [f">={edges[-1]}"]]


def _bucket(value: int, edges: Sequence[int], labels: list[str]) -> str:
    for edge, label in zip(edges, labels, strict=False):
        if value < edge:
            return label
    return labels[-1]


def _spread(values: list[int]) -> dict[str, float] | None:
    if not values:
        return None
    return {
        "min": min(values),
        "median": statistics.median(values),
        "mean": round(statistics.fmean(values), 2),
        "max": max(values),
    }


def _image_format(data: bytes) -> str:
    """The format the bytes really are (PIL's name, lower case), whatever the member's extension says."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return (Image.open(io.BytesIO(data)).format or "unknown").lower()


def stats(
    shards: str | os.PathLike | Sequence[str | os.PathLike],
    *,
    on_progress: Callable[[int, int], None] | None = None,
) -> dict[str, Any]:
    """Inspect every sample of `shards` (a directory, glob, brace pattern, file, or a list of those).

    Returns a JSON-ready dict:
      shards, samples (every key seen), usable (samples training reads), image_only, bad {reason: n},
      images {count, by_format, by_extension, by_short_side, width, height},
      captions {count, per_sample {"0": n, "1": n, ...}, by_words, words},
      img2dataset (None when no `<shard>_stats.json` is present) {stats_files, count, successes,
      failed_to_download, failed_to_resize, failures {message: n}}.
    Every image is decoded (that is how undecodable ones are found); on_progress(shards done, total) is called.
    """
    paths = expand_shards(shards)
    size_labels = _bucket_labels(SHORT_SIDE_BUCKETS, "px")
    word_labels = _bucket_labels(WORD_BUCKETS, "words")
    reader = SampleStats()  # the reader's own counts: shard-level damage and bad samples by reason
    samples = image_only = 0
    formats: Counter = Counter()
    extensions: Counter = Counter()
    short_sides: Counter = Counter()
    widths: list[int] = []
    heights: list[int] = []
    per_sample: Counter = Counter()
    by_words: Counter = Counter()
    words: list[int] = []
    for done, path in enumerate(paths, 1):
        for _key, _, group in iter_groups(path, reader):
            samples += 1
            try:
                sample = _validate(group, decode=True)
                texts = captions_of(sample)  # what training reads: json.captions, else txt
                image, ext, data = sample["image"], sample["image_ext"], sample["image_bytes"]
                reader.good += 1
            except BadSample as e:
                if e.reason != "missing_caption":
                    reader.add_bad(e.reason)
                    continue
                ext = next((x for x in IMAGE_EXTS if x in group), None)  # no caption: is it a valid image?
                try:
                    if ext is None:
                        raise BadSample("missing_image", "") from None
                    data = group[ext]
                    assert isinstance(data, bytes)
                    image = decode_image(data)
                except BadSample as e2:
                    reader.add_bad(e2.reason)
                    continue
                image_only += 1
                texts = []
            formats[_image_format(data)] += 1
            extensions[ext] += 1
            w, h = image.size
            widths.append(w)
            heights.append(h)
            short_sides[_bucket(min(w, h), SHORT_SIDE_BUCKETS, size_labels)] += 1
            per_sample[len(texts)] += 1
            for t in texts:
                n = len(t.split())
                words.append(n)
                by_words[_bucket(n, WORD_BUCKETS, word_labels)] += 1
        if on_progress is not None:
            on_progress(done, len(paths))
    bad = reader.as_dict()
    return {
        "shards": len(paths),
        "samples": samples,
        "usable": reader.good,
        "image_only": image_only,
        "bad": {k: v for k, v in bad.items() if k not in ("good", "bad")},
        "images": {
            "count": len(widths),
            "by_format": dict(formats.most_common()),
            "by_extension": dict(extensions.most_common()),
            "by_short_side": {label: short_sides[label] for label in size_labels if short_sides[label]},
            "width": _spread(widths),
            "height": _spread(heights),
        },
        "captions": {
            "count": len(words),
            "per_sample": {str(k): per_sample[k] for k in sorted(per_sample)},
            "by_words": {label: by_words[label] for label in word_labels if by_words[label]},
            "words": _spread(words),
        },
        "img2dataset": img2dataset_stats(paths),
    }


def img2dataset_stats(shard_paths: Sequence[str]) -> dict[str, Any] | None:
    """Sum img2dataset's `<stem>_stats.json` of the given shards (None when there are none).

    A stats file that is not the JSON object img2dataset writes is listed under `unreadable`, not fatal: it only
    describes the download, the shards themselves were read above.
    """
    totals: Counter = Counter()
    failures: Counter = Counter()
    found, unreadable = [], []
    for shard in shard_paths:
        p = Path(shard)
        f = p.with_name(f"{p.stem}_stats.json")
        if not f.is_file():
            continue
        try:
            d = json.loads(f.read_text(encoding="utf-8"))
            if not isinstance(d, dict) or not all(isinstance(d.get(k, 0), int) for k in I2D_FIELDS):
                raise ValueError("not an img2dataset stats object")
        except (OSError, ValueError) as e:
            unreadable.append(f"{f}: {e}")
            continue
        found.append(str(f))
        totals.update({k: d.get(k, 0) for k in I2D_FIELDS})
        status = d.get("status_dict")
        if isinstance(status, dict):
            failures.update({k: v for k, v in status.items() if k != "success" and isinstance(v, int)})
    if not found and not unreadable:
        return None
    out: dict[str, Any] = {"stats_files": len(found), **{k: totals[k] for k in I2D_FIELDS}}
    out["failures"] = dict(failures.most_common(TOP_FAILURES))
    if len(failures) > TOP_FAILURES:
        out["other_failures"] = sum(failures.values()) - sum(out["failures"].values())
    if unreadable:
        out["unreadable"] = unreadable
    return out
