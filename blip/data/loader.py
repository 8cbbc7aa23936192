"""The training input pipeline: shards (or annotation pairs) -> augmented (image, caption) batches, per rank.

Order of work in each DataLoader worker:
    shards, shuffled per epoch -> this rank's part -> this worker's part -> samples (validated, bad ones counted)
    -> one pair per caption -> seeded shuffle buffer -> augmentation seeded per pair -> full batches.
Annotation pairs (COCO/Flickr/JSON) are shuffled globally per epoch, then split the same way.

Determinism. The batch sequence depends only on (source, seed, epoch, rank, world_size, num_workers, batch_size):
every random choice comes from a generator seeded by those, and each pair's augmentation from a hash of (seed,
epoch, shard name, key, caption index), so worker scheduling changes nothing. The DataLoader hands batches out
round-robin over workers (a worker that runs dry drops out), which is deterministic too.

Splitting. Shards are dealt to ranks, then to workers (`items[index::parts]`). When there are fewer shards than
ranks (or than a rank's workers), every reader of those shards keeps every n-th sample instead, so small
datasets still feed every rank and worker; the parts are always disjoint and cover everything (a missing or
truncated shard read that way is counted once per reader).

Resume. `skip_batches=n` gives exactly the batches an uninterrupted run yields after its first n. In a merge
that deals round-robin over W workers, each worker contributes at least min(its batches, n // W) of the first
n batches, so each worker drops that many of its own batches cheaply (samples are read and checked, but not
augmented) and reports how many it dropped in a "start" item it sends before any batch. The main process adds
those up (T) and discards the next n - T batches of the merged stream.

Bad-sample counts. Every item a worker sends carries `stats`, the counts since its previous item (a delta of
SampleStats.as_dict()), and a worker's last item is an "end" marker with the rest. The main process merges them
into `TrainLoader.stats`, which is complete once the iterator is exhausted; each batch also carries its delta
under "stats". With strict=True a bad sample ends the iteration with InputError naming the shard and key.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from blip.data.images import BadSample, decode_image
from blip.data.shards import SampleStats, captions_of, expand_shards, iter_shard, sample_image_id
from blip.data.text import pre_caption
from blip.data.transforms import train_transform
from blip.errors import InputError
from blip.train_config import DataArgs

log = logging.getLogger(__name__)

Pair = tuple[str, str, int]
"""(image path, caption, image id): one training pair of an annotation dataset."""

SHUFFLE_BUFFER = DataArgs.shuffle_buffer  # one default for library callers and the training config
"""Pairs held by each worker's shuffle buffer (decoded images: mind the memory at high resolution)."""


@dataclass(frozen=True)
class _Item:
    image: Image.Image
    caption: str
    image_id: int
    key: str
    seed_key: str


def _seed(*parts: Any) -> int:
    blob = "\x1f".join(str(p) for p in parts).encode()
    return int.from_bytes(hashlib.blake2b(blob, digest_size=8).digest(), "little") >> 1


def _rng(*parts: Any) -> np.random.Generator:
    return np.random.default_rng(_seed(*parts))


def _split(items: Sequence, parts: int, index: int) -> tuple[list, int, int]:
    """(items to read, n, k) for reader `index` of `parts`: whole items if there are enough, else all of them
    keeping samples k modulo n."""
    if len(items) >= parts:
        return list(items[index::parts]), 1, 0
    return list(items), parts, index


def _is_pairs(source: Any) -> bool:
    return isinstance(source, list | tuple) and bool(source) and isinstance(source[0], list | tuple)


class _Stream(IterableDataset):
    """What every worker runs: its part of the data as full, augmented batches, framed by start/end markers."""

    def __init__(self, source: list[str] | list[Pair], is_pairs: bool, cfg: dict[str, Any]):
        super().__init__()
        self.source, self.is_pairs, self.cfg = source, is_pairs, cfg

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        w, nw = (info.id, info.num_workers) if info is not None else (0, 1)
        stats = SampleStats()
        try:
            yield from self._run(w, nw, stats)
        except InputError as e:
            yield {"_marker": "error", "message": str(e), "stats": stats.drain()}

    def _run(self, w: int, nw: int, stats: SampleStats) -> Iterator[dict[str, Any]]:
        c = self.cfg
        items = iter(self._list_items(w, nw, stats) if self.is_pairs else self._shard_items(w, nw, stats))
        bs = c["batch_size"]
        skipped = 0
        while skipped < c["skip_batches"] // nw and len(list(islice(items, bs))) == bs:
            skipped += 1
        yield {"_marker": "start", "skipped": skipped, "stats": stats.drain()}
        tf = train_transform(c["image_size"], c["min_scale"], c["randaugment"], c["hflip"])
        batch: list[tuple[torch.Tensor, _Item]] = []
        for it in items:
            with torch.random.fork_rng(devices=[]):
                torch.default_generator.manual_seed(_seed(c["seed"], c["epoch"], it.seed_key))  # CPU only: cheap
                batch.append((tf(it.image), it))
            if len(batch) == bs:
                yield _collate(batch, stats.drain())
                batch = []
        yield {"_marker": "end", "stats": stats.drain()}

    def _shard_items(self, w: int, nw: int, stats: SampleStats) -> Iterator[_Item]:
        c = self.cfg
        shards = list(self.source)
        order = _rng("shards", c["seed"], c["epoch"]).permutation(len(shards))
        shards = [shards[i] for i in order]
        mine, n, k = _split(shards, c["world_size"], c["rank"])
        if n == 1:
            mine, n, k = _split(mine, nw, w)
        else:  # the rank already keeps every n-th sample: its workers split those further
            n, k = n * nw, k + n * w

        def pairs() -> Iterator[_Item]:
            for shard in mine:
                name = Path(shard).name
                for s in iter_shard(shard, stats, c["strict"], subset=(n, k) if n > 1 else None):
                    image_id = sample_image_id(s)
                    for ci, cap in enumerate(captions_of(s)):
                        text = pre_caption(cap, c["max_words"])
                        if text:
                            yield _Item(s["image"], c["prompt"] + text, image_id, s["key"], f"{name}/{s['key']}/{ci}")

        rng = _rng("buffer", c["seed"], c["epoch"], c["rank"], c["world_size"], w, nw)
        return shuffled(pairs(), c["shuffle_buffer"], rng)

    def _list_items(self, w: int, nw: int, stats: SampleStats) -> Iterator[_Item]:
        c = self.cfg
        pairs: list[Pair] = self.source  # type: ignore[assignment]
        order = _rng("pairs", c["seed"], c["epoch"]).permutation(len(pairs))
        mine = order[c["rank"] :: c["world_size"]][w::nw]
        for i in mine:
            path, caption, image_id = pairs[i]
            where = f"{path} (pair {i})"
            text = pre_caption(caption, c["max_words"])
            if not text:
                _bad(stats, c["strict"], where, "empty_caption", repr(caption))
                continue
            try:
                with open(path, "rb") as f:
                    data = f.read()
                image = decode_image(data)
            except OSError as e:
                _bad(stats, c["strict"], where, "missing_image", str(e))
                continue
            except BadSample as e:
                _bad(stats, c["strict"], where, e.reason, e.detail)
                continue
            stats.good += 1
            yield _Item(image, c["prompt"] + text, int(image_id), str(path), f"pair/{i}")


def _bad(stats: SampleStats, strict: bool, where: str, reason: str, detail: str) -> None:
    if strict:
        raise InputError(f"{where}: {reason} ({detail})")
    stats.add_bad(reason)


def shuffled(items: Iterator[Any], size: int, rng: np.random.Generator) -> Iterator[Any]:
    """A seeded shuffle buffer: fill `size`, then emit a random slot and put the newcomer there (any items: also
    blip.vision_pretrain's labelled images)."""
    if size <= 1:
        yield from items
        return
    buf: list[Any] = []
    for it in items:
        if len(buf) < size:
            buf.append(it)
            continue
        j = int(rng.integers(size))
        buf[j], it = it, buf[j]
        yield it
    for j in rng.permutation(len(buf)):
        yield buf[j]


def _collate(batch: list[tuple[torch.Tensor, _Item]], stats: dict[str, int]) -> dict[str, Any]:
    return {
        "image": torch.stack([t for t, _ in batch]),
        "caption": [it.caption for _, it in batch],
        "image_id": torch.tensor([it.image_id for _, it in batch], dtype=torch.long),
        "key": [it.key for _, it in batch],
        "stats": stats,
    }


class TrainLoader:
    """Iterable over one epoch's batches for one rank; `stats` holds the bad-sample counts (complete at the end).

    Batches: `{"image": (B, 3, s, s) float, "caption": list[str], "image_id": (B,) long, "key": list[str],
    "stats": dict}`. Iterating again starts the same epoch over.
    """

    def __init__(self, source: list[str] | list[Pair], is_pairs: bool, num_workers: int, cfg: dict[str, Any]):
        self.num_workers = num_workers
        self.skip_batches = cfg["skip_batches"]
        self.dataset = _Stream(source, is_pairs, cfg)
        self.stats = SampleStats()

    def __iter__(self) -> Iterator[dict[str, Any]]:
        self.stats = SampleStats()
        nw = max(1, self.num_workers)
        if self.num_workers == 0:
            items: Any = iter(self.dataset)
        else:
            items = DataLoader(
                self.dataset,
                batch_size=None,
                num_workers=self.num_workers,
                pin_memory=torch.cuda.is_available(),
                persistent_workers=False,
            )
        starts, to_discard = 0, 0
        for item in items:
            self.stats.merge(item["stats"])
            marker = item.get("_marker")
            if marker == "error":
                raise InputError(item["message"])
            if marker == "start":
                starts += 1
                to_discard += item["skipped"]
                if starts == nw:
                    to_discard = self.skip_batches - to_discard
                continue
            if marker == "end":
                continue
            if starts != nw:
                raise RuntimeError("loader: a batch arrived before every worker's start marker")
            if to_discard > 0:
                to_discard -= 1
                continue
            yield item
        if self.stats.total_bad:
            log.warning("training data: %s", self.stats.summary())


def build_train_loader(
    source: str | os.PathLike | Sequence[str] | Sequence[Pair],
    *,
    image_size: int,
    batch_size: int,
    num_workers: int = 2,
    seed: int = 0,
    epoch: int = 0,
    rank: int = 0,
    world_size: int = 1,
    min_scale: float = 0.5,
    randaugment: bool = True,
    skip_batches: int = 0,
    strict: bool = False,
    max_words: int = 30,
    prompt: str = "",
    hflip: bool = True,
    shuffle_buffer: int = SHUFFLE_BUFFER,
) -> TrainLoader:
    """One epoch of training batches for `rank` of `world_size` (see the module docstring for the guarantees).

    source: a shard spec or list of specs, or a list of (image path, caption, image id) pairs
    (blip.data.datasets.load_train_pairs). Every caption of a sample is its own pair; captions are cleaned with
    pre_caption(max_words) and `prompt` is prepended; the partial last batch of each worker is dropped.
    """
    if batch_size < 1:
        raise InputError(f"batch_size must be at least 1, got {batch_size}")
    if not 0 <= rank < world_size:
        raise InputError(f"rank {rank} is outside world_size {world_size}")
    if skip_batches < 0:
        raise InputError(f"skip_batches must be >= 0, got {skip_batches}")
    is_pairs = _is_pairs(source)
    data: list = list(source) if is_pairs else sorted(expand_shards(source))  # type: ignore[arg-type]
    cfg = dict(
        image_size=image_size,
        batch_size=batch_size,
        seed=seed,
        epoch=epoch,
        rank=rank,
        world_size=world_size,
        min_scale=min_scale,
        randaugment=randaugment,
        hflip=hflip,
        skip_batches=skip_batches,
        strict=strict,
        max_words=max_words,
        prompt=prompt,
        shuffle_buffer=shuffle_buffer,
    )
    return TrainLoader(data, is_pairs, num_workers, cfg)


# ---- cheap passes over a source (no image decoding) -------------------------------------------------------------
def _source_captions(source: Any, max_words: int) -> Iterator[str]:
    if _is_pairs(source):
        for _, caption, _ in source:
            text = pre_caption(caption, max_words)
            if text:
                yield text
        return
    stats = SampleStats()
    for shard in sorted(expand_shards(source)):
        for s in iter_shard(shard, stats, decode=False):
            for cap in captions_of(s):
                text = pre_caption(cap, max_words)
                if text:
                    yield text


def read_captions(source: Any, limit: int | None = None, max_words: int = 30) -> Iterator[str]:
    """The first `limit` cleaned captions of a source, in order, without decoding images (tokenizer training)."""
    return islice(_source_captions(source, max_words), limit)


def count_pairs(source: Any, max_words: int = 30) -> int:
    """Training pairs in a source over all ranks (images are not decoded, so undecodable ones still count)."""
    return sum(1 for _ in _source_captions(source, max_words))
