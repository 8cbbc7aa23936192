"""The training loader with real DataLoader workers: rank/worker splitting, determinism, exact resume, stats."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest
import torch

from blip.data.loader import build_train_loader, count_pairs, read_captions
from blip.data.shards import write_shard
from blip.distributed import DistInfo
from blip.errors import InputError
from blip.train import Trainer
from blip.train_config import build_config

SIZE = 16


def _shards(root: Path, image_bytes, sizes: list[int], bad: bool = True) -> tuple[list[str], Counter]:
    """Shards of `sizes` good samples (every third has 3 captions in json.captions); with bad=True the first two
    shards also hold a zero-byte image and a sample without caption. Returns (paths, expected pair counts)."""
    paths, pairs = [], Counter()
    n = 0
    for s, size in enumerate(sizes):
        samples = []
        for _ in range(size):
            key = f"img{n:04d}"
            sample = {"__key__": key, "png": image_bytes("png", size=(20, 18), seed=n), "txt": f"A Photo #{n}."}
            caps = [f"a photo {n}"]
            if n % 3 == 0:
                caps = [f"first of {n}", f"second of {n}", f"third of {n}!"]
                sample["json"] = {"image_id": n, "captions": [{"text": c, "source": "human"} for c in caps]}
            pairs.update((key, c.replace("!", "")) for c in caps)
            samples.append(sample)
            n += 1
        if bad and s < 2:
            samples.insert(1, {"__key__": f"zero{s}", "png": b"", "txt": "empty image"})
            samples.append({"__key__": f"nocap{s}", "png": image_bytes("png", seed=99)})
        paths.append(str(write_shard(root / f"s-{s:03d}.tar", samples) and root / f"s-{s:03d}.tar"))
    return paths, pairs


def _run(source, **kw):
    args = dict(image_size=SIZE, batch_size=2, num_workers=2, seed=0, min_scale=0.5, shuffle_buffer=8)
    args.update(kw)
    loader = build_train_loader(source, **args)
    return list(loader), loader.stats


def _pairs_of(batches) -> Counter:
    return Counter((k, c) for b in batches for k, c in zip(b["key"], b["caption"], strict=True))


def test_two_ranks_with_two_workers_read_every_pair_exactly_once(tmp_path, image_bytes):
    shards, expected = _shards(tmp_path, image_bytes, [5, 3, 6, 4, 2])
    seen, good, bad = Counter(), 0, Counter()
    per_rank = []
    for rank in (0, 1):
        batches, stats = _run(shards, batch_size=1, rank=rank, world_size=2)
        per_rank.append(_pairs_of(batches))
        seen += per_rank[-1]
        good += stats.good
        bad += stats.bad
    assert seen == expected  # every (image, caption) pair once, across both ranks
    assert not set(per_rank[0]) & set(per_rank[1]) and all(per_rank)
    assert good == 20 and bad == {"empty_image": 2, "missing_caption": 2}


def test_fewer_shards_than_readers_still_splits_disjointly(tmp_path, image_bytes):
    shards, expected = _shards(tmp_path, image_bytes, [9], bad=False)
    seen = Counter()
    for rank in (0, 1):
        batches, _ = _run(shards, batch_size=1, rank=rank, world_size=2, num_workers=2)
        assert batches, f"rank {rank} got nothing"
        seen += _pairs_of(batches)
    assert seen == expected


def test_batches_are_deterministic_and_well_formed(tmp_path, image_bytes):
    shards, expected = _shards(tmp_path, image_bytes, [5, 3, 6, 4])
    a, stats = _run(shards, prompt="a picture of ")
    b, _ = _run(shards, prompt="a picture of ")
    assert len(a) == len(b) > 3
    for x, y in zip(a, b, strict=True):
        assert torch.equal(x["image"], y["image"]) and x["caption"] == y["caption"] and x["key"] == y["key"]
        assert torch.equal(x["image_id"], y["image_id"])
    first = a[0]
    assert first["image"].shape == (2, 3, SIZE, SIZE) and first["image"].dtype == torch.float32
    assert first["image_id"].dtype == torch.long and len(first["caption"]) == len(first["key"]) == 2
    # prompt + pre_caption'd text ("A Photo #1." -> "a picture of a photo 1"); no pair twice
    seen = _pairs_of(a)
    assert set(seen) <= {(k, "a picture of " + c) for k, c in expected} and max(seen.values()) == 1
    assert len(seen) >= sum(expected.values()) - 2 * 2  # at most one partial batch dropped per worker
    ids = {k: int(i) for b in a for k, i in zip(b["key"], b["image_id"], strict=True)}
    assert ids.get("img0003", 3) == 3  # json.image_id is used when present
    other_epoch, _ = _run(shards, prompt="a picture of ", epoch=1)
    assert [x["key"] for x in other_epoch] != [x["key"] for x in a]
    assert stats.as_dict() == {"good": 18, "bad": 4, "empty_image": 2, "missing_caption": 2}


@pytest.mark.parametrize("num_workers", [2, 0])
def test_skip_batches_resumes_exactly(tmp_path, image_bytes, num_workers):
    # skewed shards: one worker runs dry long before the other, the hard case for the cheap per-worker skip
    shards, expected = _shards(tmp_path, image_bytes, [1, 1, 14], bad=False)
    full, full_stats = _run(shards, batch_size=1, num_workers=num_workers, randaugment=True)
    n = len(full)
    assert n == sum(expected.values()) == 28
    for skip in (1, 2, 3, 5, 8, 13, n - 1, n, n + 3):
        rest, stats = _run(shards, batch_size=1, num_workers=num_workers, skip_batches=skip)
        assert len(rest) == max(0, n - skip), skip
        for x, y in zip(rest, full[skip:], strict=True):
            assert x["key"] == y["key"] and x["caption"] == y["caption"]
            assert torch.equal(x["image"], y["image"]), (skip, x["key"])
        assert stats.as_dict() == full_stats.as_dict()  # skipped samples are still read and counted


def test_skip_batches_with_larger_batches(tmp_path, image_bytes):
    shards, _ = _shards(tmp_path, image_bytes, [3, 7, 2, 8])
    full, _ = _run(shards, batch_size=3, num_workers=2)
    for skip in (2, 5):
        rest, _ = _run(shards, batch_size=3, num_workers=2, skip_batches=skip)
        assert [b["key"] for b in rest] == [b["key"] for b in full[skip:]]
        assert all(torch.equal(x["image"], y["image"]) for x, y in zip(rest, full[skip:], strict=True))


def test_strict_makes_bad_samples_fatal_through_workers(tmp_path, image_bytes):
    shards, _ = _shards(tmp_path, image_bytes, [3, 3])
    with pytest.raises(InputError) as e:
        _run(shards, strict=True)
    assert "s-00" in str(e.value) and ("zero" in str(e.value) or "nocap" in str(e.value))


def test_annotation_pairs_source(tmp_path, image_bytes):
    pairs = []
    for i in range(9):
        p = tmp_path / f"im{i}.jpg"
        p.write_bytes(image_bytes("jpg", size=(24, 20), seed=i))
        pairs += [(str(p), f"Caption {i}.", i), (str(p), f"another caption {i}", i)]
    pairs.append((str(tmp_path / "missing.jpg"), "lost", 99))
    pairs.append((str(tmp_path / "im0.jpg"), "!!!", 0))
    seen, bad = Counter(), Counter()
    for rank in (0, 1):
        batches, stats = _run(pairs, batch_size=1, rank=rank, world_size=2)
        seen += Counter((Path(k).name, c, int(i)) for b in batches for k, c, i in zip(*_cols(b), strict=True))
        bad += stats.bad
    assert seen == Counter(
        [(f"im{i}.jpg", f"caption {i}", i) for i in range(9)]
        + [(f"im{i}.jpg", f"another caption {i}", i) for i in range(9)]
    )
    assert bad == {"missing_image": 1, "empty_caption": 1}
    full, _ = _run(pairs, batch_size=2)
    rest, _ = _run(pairs, batch_size=2, skip_batches=3)
    assert [b["key"] for b in rest] == [b["key"] for b in full[3:]]


def _cols(b):
    return b["key"], b["caption"], b["image_id"].tolist()


def test_caption_passes_without_decoding(tmp_path, image_bytes):
    shards, expected = _shards(tmp_path, image_bytes, [4, 5])
    assert count_pairs(shards) == sum(expected.values()) == 15
    assert list(read_captions(shards, limit=4)) == ["first of 0", "second of 0", "third of 0", "a photo 1"]
    assert count_pairs([("x.jpg", "a b", 0), ("y.jpg", "...", 1)]) == 1


def test_bad_arguments(tmp_path, image_bytes):
    shards, _ = _shards(tmp_path, image_bytes, [2], bad=False)
    with pytest.raises(InputError, match="rank"):
        build_train_loader(shards, image_size=SIZE, batch_size=1, rank=2, world_size=2)
    with pytest.raises(InputError, match="nothing"):
        build_train_loader(str(tmp_path / "nothing-*.tar"), image_size=SIZE, batch_size=1)


def test_truncated_and_missing_shards_are_counted_through_workers(tmp_path, image_bytes):
    shards, expected = _shards(tmp_path, image_bytes, [4, 4, 4], bad=False)
    data = Path(shards[2]).read_bytes()
    (tmp_path / "s-003.tar").write_bytes(data[: len(data) // 2])  # a copy cut in half
    batches, stats = _run(str(tmp_path / "s-{000..004}.tar"), batch_size=1)  # s-004 does not exist
    assert stats.bad == {"truncated_tar": 1, "missing_shard": 1}
    cut = stats.good - 12  # samples of the cut copy that survived
    assert 0 < cut < 4
    extra = _pairs_of(batches) - expected  # the copy repeats s-002's keys: what it added beyond the intact shards
    assert set(_pairs_of(batches)) == set(expected)
    assert extra == Counter({(k, c): 1 for k, c in expected if k in {f"img{8 + i:04d}" for i in range(cut)}})


def test_data_shuffle_buffer_reaches_the_loader_and_decides_the_mix(tmp_path, image_bytes):
    """Shards are read one after another: a small buffer gives batches from one shard at a time, a buffer as large
    as the data a full shuffle (the demo recipe's setting, so that A's human/web mix does not hang on the seed)."""
    shards, _ = _shards(tmp_path, image_bytes, [12, 12], bad=False)

    def first_batch(buffer: int) -> set[int]:
        data = {"train": shards, "batch_size": 12, "num_workers": 0, "shuffle_buffer": buffer, "hflip": False}
        cfg = build_config("pretrain", {"data": data, "model": {"image_size": SIZE}, "train": {"out": str(tmp_path)}})
        trainer = Trainer(cfg, DistInfo(), None, None)
        batch = next(b for b in trainer.make_loader(epoch=0, skip=0) if "key" in b)
        return {int(k[3:]) // 12 for k in batch["key"]}  # which shard each pair came from

    assert len(first_batch(1)) == 1
    assert first_batch(10_000) == {0, 1}
