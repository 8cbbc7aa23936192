"""Shard reading (every bad-sample kind counted exactly), writing (sized, atomic, deterministic), shard specs."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from blip.data.shards import (
    SampleStats,
    ShardWriter,
    captions_of,
    expand_shards,
    iter_shard,
    sample_image_id,
    write_shard,
)
from blip.errors import InputError


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def _jpeg(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG")
    return buf.getvalue()


def _good(key: str, image_bytes, n: int) -> list[tuple[str, bytes]]:
    return [(f"{key}.png", image_bytes("png", seed=n)), (f"{key}.txt", f"caption {n}".encode())]


@pytest.fixture
def bad_shard(tmp_path, raw_tar, image_bytes):
    """A shard mixing good samples with one of every bad kind; returns (path, good keys, expected bad counts)."""
    rgb = Image.fromarray(np.random.default_rng(0).integers(0, 256, (24, 32, 3), dtype=np.uint8), "RGB")
    png, jpg = _png(rgb), _jpeg(rgb)
    i16 = Image.fromarray(np.arange(24 * 32, dtype=np.uint16).reshape(24, 32) * 80)
    pal = rgb.convert("P")
    members = _good("good0", image_bytes, 0)
    members += [("corrupt.jpg", b"\xff\xd8\xff\xe0" + bytes(range(256)) * 4), ("corrupt.txt", b"a cat")]
    members += _good("good1", image_bytes, 1)
    members += [("cutjpeg.jpg", jpg[: len(jpg) // 2]), ("cutjpeg.txt", b"a cut jpeg")]
    members += [("zero.jpg", b""), ("zero.txt", b"nothing here")]
    members += [("thin.png", _png(Image.new("RGB", (1, 100000)))), ("thin.txt", b"a line")]
    members += [("nocap.png", png)]
    members += [("blank.png", png), ("blank.txt", b"   \n\t ")]
    members += [("dots.png", png), ("dots.txt", b"...!!")]  # empty after pre_caption
    members += [("badutf.png", png), ("badutf.txt", b"caf\xe9 \xff\xfe")]
    members += [("noimg.txt", b"a caption without an image")]
    members += [("badjson.json", b"[1, 2]"), ("badjson.png", png), ("badjson.txt", b"a list is not metadata")]
    members += [("brokenjson.json", b"{nope"), ("brokenjson.png", png), ("brokenjson.txt", b"broken")]
    members += _good("good2", image_bytes, 2)
    meta = {"image_id": 7, "captions": [{"text": "first human caption", "source": "human"}, {"text": "second"}]}
    members += [("multi.json", json.dumps(meta).encode()), ("multi.png", png)]  # captions only in json: fine
    members += [("gray.png", _png(rgb.convert("L"))), ("gray.txt", b"mode L")]
    members += [("alpha.png", _png(rgb.convert("RGBA"))), ("alpha.txt", b"mode RGBA")]
    members += [("cmyk.jpg", _jpeg(rgb.convert("CMYK"))), ("cmyk.txt", b"mode CMYK")]
    members += [("deep.png", _png(i16)), ("deep.txt", b"mode I;16")]
    members += [("pal.png", _png(pal)), ("pal.txt", b"mode P")]
    members += [("webp.webp", image_bytes("webp", seed=5)), ("webp.txt", b"a webp")]
    members += [("upper.JPG", jpg), ("upper.txt", b"upper-case extension")]
    path = raw_tar(tmp_path / "bad.tar", members)
    good = ["good0", "good1", "good2", "multi", "gray", "alpha", "cmyk", "deep", "pal", "webp", "upper"]
    expected = {
        "undecodable_image": 2,
        "empty_image": 1,
        "absurd_size": 1,
        "missing_caption": 1,
        "empty_caption": 2,
        "bad_utf8": 1,
        "missing_image": 1,
        "bad_json": 2,
    }
    return path, good, expected


def test_every_bad_kind_is_skipped_and_counted_exactly(bad_shard):
    path, good, expected = bad_shard
    stats = SampleStats()
    samples = list(iter_shard(path, stats))
    assert [s["key"] for s in samples] == good
    assert dict(stats.bad) == expected
    assert stats.good == len(good)
    assert stats.as_dict() == {"good": len(good), "bad": sum(expected.values()), **dict(sorted(expected.items()))}
    for s in samples:
        assert s["image"].mode == "RGB" and s["image"].size == (32, 24), s["key"]
        assert s["shard"] == str(path)
    by_key = {s["key"]: s for s in samples}
    assert by_key["multi"]["text"] == "first human caption"
    assert captions_of(by_key["multi"]) == ["first human caption", "second"]
    assert sample_image_id(by_key["multi"]) == 7
    assert captions_of(by_key["good1"]) == ["caption 1"]
    assert by_key["upper"]["image_ext"] == "jpg" and by_key["webp"]["image_ext"] == "webp"
    # 16-bit values are scaled to 8 bits, not clipped to white
    deep = np.asarray(by_key["deep"]["image"])
    assert 0 < deep.mean() < 255 and deep.min() < 128
    assert "bad" in stats.summary() and "2 undecodable_image" in stats.summary()


def test_strict_raises_naming_shard_and_key(bad_shard):
    path = bad_shard[0]
    with pytest.raises(InputError) as e:
        list(iter_shard(path, SampleStats(), strict=True))
    assert str(path) in str(e.value) and "'corrupt'" in str(e.value) and "undecodable_image" in str(e.value)


def test_decode_false_skips_images_but_keeps_the_text_checks(bad_shard):
    path, good, expected = bad_shard
    stats = SampleStats()
    keys = [s["key"] for s in iter_shard(path, stats, decode=False)]
    # image content is not looked at: the corrupt, cut and thin images pass, their bytes unread
    assert keys == ["good0", "corrupt", "good1", "cutjpeg", "thin"] + good[2:]
    assert stats.bad["undecodable_image"] == stats.bad["absurd_size"] == 0
    assert {k: v for k, v in stats.bad.items() if k not in ("undecodable_image", "absurd_size")} == {
        k: v for k, v in expected.items() if k not in ("undecodable_image", "absurd_size")
    }


def _clean_shard(path: Path, image_bytes, n: int = 10) -> Path:
    samples = [
        {"__key__": f"k{i:02d}", "png": image_bytes("png", seed=i), "txt": f"caption {i}", "json": {"i": i}}
        for i in range(n)
    ]
    write_shard(path, samples)
    return path


def test_truncated_tar_keeps_the_samples_before_the_cut(tmp_path, image_bytes):
    path = _clean_shard(tmp_path / "full.tar", image_bytes)
    with tarfile.open(path) as tf:
        m = tf.getmember("k06.png")
        cut_in_data, cut_at_header = m.offset_data + m.size // 2, tf.getmember("k07.json").offset
    data = path.read_bytes()
    for cut in (cut_in_data, cut_at_header):
        p = tmp_path / f"cut{cut}.tar"
        p.write_bytes(data[:cut])
        stats = SampleStats()
        keys = [s["key"] for s in iter_shard(p, stats)]
        assert keys == [f"k{i:02d}" for i in range(6)]  # k06 is dropped: it may be incomplete
        assert dict(stats.bad) == {"truncated_tar": 1} and stats.good == 6
        stats = SampleStats()
        assert len(list(iter_shard(p, stats, decode=False))) == 6 and stats.bad["truncated_tar"] == 1
        with pytest.raises(InputError, match="truncated_tar"):
            list(iter_shard(p, SampleStats(), strict=True))
    stats = SampleStats()
    assert len(list(iter_shard(path, stats))) == 10 and stats.total_bad == 0  # the intact file is fine
    (tmp_path / "junk.tar").write_bytes(b"this is not a tar file at all" * 3)
    stats = SampleStats()
    assert list(iter_shard(tmp_path / "junk.tar", stats)) == [] and dict(stats.bad) == {"truncated_tar": 1}


def test_missing_shard_is_counted_or_fatal(tmp_path):
    stats = SampleStats()
    assert list(iter_shard(tmp_path / "nope.tar", stats)) == []
    assert dict(stats.bad) == {"missing_shard": 1}
    with pytest.raises(InputError, match="nope.tar"):
        list(iter_shard(tmp_path / "nope.tar", SampleStats(), strict=True))


def test_subset_splits_a_shard_disjointly(tmp_path, image_bytes):
    path = _clean_shard(tmp_path / "s.tar", image_bytes)
    parts = [[s["key"] for s in iter_shard(path, SampleStats(), subset=(3, k))] for k in range(3)]
    assert sorted(sum(parts, [])) == [f"k{i:02d}" for i in range(10)]
    assert parts[1] == ["k01", "k04", "k07"]


def test_shard_writer_sizes_atomicity_and_json(tmp_path, image_bytes):
    pattern = str(tmp_path / "out" / "part-%05d.tar")
    with ShardWriter(pattern, maxcount=4) as w:
        for i in range(10):
            w.write({"__key__": f"s{i}", "jpg": image_bytes("jpg", seed=i), "txt": f"t{i}", "json": {"b": 1, "a": i}})
    assert [Path(p).name for p in w.shards] == ["part-00000.tar", "part-00001.tar", "part-00002.tar"]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [Path(p).name for p in w.shards]  # no .tmp
    got = [s for p in w.shards for s in iter_shard(p, SampleStats())]
    assert [len(list(iter_shard(p, SampleStats()))) for p in w.shards] == [4, 4, 2]
    assert [s["json"] for s in got] == [{"a": i, "b": 1} for i in range(10)]
    assert [s["image_bytes"] for s in got] == [image_bytes("jpg", seed=i) for i in range(10)]
    with tarfile.open(w.shards[0]) as tf:
        assert {m.mtime for m in tf.getmembers()} == {0}

    with pytest.raises(RuntimeError), ShardWriter(str(tmp_path / "broken-%05d.tar"), maxcount=4) as w2:
        for i in range(6):
            w2.write({"__key__": f"s{i}", "txt": "x"})
        raise RuntimeError("killed")
    assert sorted(p.name for p in tmp_path.glob("broken-*")) == ["broken-00000.tar"]  # the unfinished one is gone


def test_write_shard_is_deterministic_and_atomic(tmp_path, image_bytes):
    a = _clean_shard(tmp_path / "a.tar", image_bytes)
    b = _clean_shard(tmp_path / "b.tar", image_bytes)
    assert a.read_bytes() == b.read_bytes()

    def boom():
        yield {"__key__": "ok", "txt": "fine"}
        raise RuntimeError("killed mid-shard")

    with pytest.raises(RuntimeError):
        write_shard(tmp_path / "c.tar", boom())
    assert not (tmp_path / "c.tar").exists() and not (tmp_path / "c.tar.tmp").exists()
    with pytest.raises(ValueError, match="__key__"):
        write_shard(tmp_path / "d.tar", [{"__key__": "has.dot", "txt": "x"}])


def test_written_shards_read_with_webdataset(tmp_path, image_bytes):
    import webdataset as wds

    path = _clean_shard(tmp_path / "w.tar", image_bytes, n=5)
    ds = wds.WebDataset(str(path), shardshuffle=False, nodesplitter=wds.split_by_node, handler=wds.reraise_exception)
    ds = ds.decode("pil", handler=wds.reraise_exception).to_tuple("__key__", "png", "txt", "json")
    rows = list(ds)
    assert [r[0] for r in rows] == [f"k{i:02d}" for i in range(5)]
    assert [r[2] for r in rows] == [f"caption {i}" for i in range(5)]
    assert rows[3][3] == {"i": 3} and rows[0][1].size == (32, 24)


def test_expand_shards_specs(tmp_path):
    for i in range(3):
        (tmp_path / f"d-{i:05d}.tar").write_bytes(b"")
    (tmp_path / "notes.txt").write_text("x")
    names = [str(tmp_path / f"d-{i:05d}.tar") for i in range(3)]
    assert expand_shards(tmp_path) == names
    assert expand_shards(str(tmp_path / "d-*.tar")) == names
    assert expand_shards(str(tmp_path / "d-{00000..00002}.tar")) == names
    # brace patterns keep missing names (counted as missing_shard when read) as long as one exists
    assert expand_shards(str(tmp_path / "d-{00001..00003}.tar")) == names[1:] + [str(tmp_path / "d-00003.tar")]
    assert expand_shards([names[2], str(tmp_path / "d-0000[01].tar"), names[0]]) == [names[2], names[0], names[1]]
    for spec in (tmp_path / "nothing.tar", str(tmp_path / "z-*.tar"), str(tmp_path / "z-{0..3}.tar")):
        with pytest.raises(InputError, match="nothing|z-"):
            expand_shards(spec)
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="empty"):
        expand_shards(tmp_path / "empty")
    with pytest.raises(InputError):
        expand_shards([])


def test_sample_stats_merge_and_round_trip():
    a = SampleStats(good=3)
    a.add_bad("bad_utf8")
    b = SampleStats(good=2)
    b.add_bad("bad_utf8", 2)
    b.add_bad("truncated_tar")
    a.merge(b).merge({"good": 1, "bad": 99, "missing_shard": 1})  # "bad" is a total and is recomputed
    assert a.as_dict() == {"good": 6, "bad": 5, "bad_utf8": 3, "missing_shard": 1, "truncated_tar": 1}
    assert SampleStats.from_dict(a.as_dict()).as_dict() == a.as_dict()
    assert a.summary() == "6 good samples, 5 bad skipped (3 bad_utf8, 1 missing_shard, 1 truncated_tar)"
    assert a.drain() == {"good": 6, "bad": 5, "bad_utf8": 3, "missing_shard": 1, "truncated_tar": 1}
    assert a.as_dict() == {"good": 0, "bad": 0}
