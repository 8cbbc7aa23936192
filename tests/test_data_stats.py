"""`blip.data.stats` (blip/data/shard_stats.py) and `blipctl data stats`: counts on the demo world and on an
img2dataset-layout shard set."""

from __future__ import annotations

import io
import json
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from blip.data import stats
from blip.data.demo import IMAGE_SIZE, make_demo
from blipctl.cli import app

runner = CliRunner()


def _jpeg(w: int, h: int, seed: int = 0, fmt: str = "JPEG") -> bytes:
    arr = np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format=fmt)
    return buf.getvalue()


def _meta(key: str, w: int, h: int, **extra) -> bytes:
    """The per-sample json img2dataset writes (its field names)."""
    d = {
        "url": f"http://example.com/{key}.jpg",
        "key": key,
        "status": "success",
        "error_message": None,
        "width": w,
        "height": h,
        "original_width": w * 2,
        "original_height": h * 2,
        "exif": "{}",
        "sha256": "0" * 64,
        **extra,
    }
    return json.dumps(d).encode()


@pytest.fixture(scope="module")
def img2dataset_dir(tmp_path_factory) -> Path:
    """Two shards as img2dataset writes them (`00000.tar` + `00000_stats.json`, 9-digit keys, jpg + json, txt only
    where there was a caption), with bad samples of several kinds, and a stats file whose tar is missing."""
    d = tmp_path_factory.mktemp("i2d")
    shard0 = [  # 2 image-only, 2 captioned; one "jpg" member really holds PNG bytes
        ("000000000.jpg", _jpeg(320, 200, 1)),
        ("000000000.json", _meta("000000000", 320, 200)),
        ("000000001.jpg", _jpeg(64, 48, 2)),
        ("000000001.json", _meta("000000001", 64, 48)),
        ("000000002.jpg", _jpeg(256, 256, 3)),
        ("000000002.json", _meta("000000002", 256, 256, caption="A dog on a beach")),
        ("000000002.txt", b"A dog on a beach"),
        ("000000003.jpg", _jpeg(600, 400, 4, fmt="PNG")),
        ("000000003.json", _meta("000000003", 600, 400, caption="x")),
        ("000000003.txt", " ".join(["word"] * 33).encode()),
    ]
    shard1 = [
        ("100000000.jpg", b"\xff\xd8\xff\xe0 this is not a jpeg"),  # undecodable_image
        ("100000000.json", _meta("100000000", 10, 10)),
        ("100000000.txt", b"a caption"),
        ("100000001.json", _meta("100000001", 0, 0, status="failed_to_download")),  # no image: missing_image
        ("100000002.jpg", _jpeg(100, 120, 5)),
        ("100000002.json", b"{not json"),  # bad_json
        ("100000003.jpg", _jpeg(100, 120, 6)),
        ("100000003.txt", b"   "),  # empty_caption
        ("100000004.jpg", _jpeg(1024, 768, 7)),  # image-only
        ("100000004.json", _meta("100000004", 1024, 768)),
    ]
    for name, members in (("00000", shard0), ("00001", shard1)):
        with tarfile.open(d / f"{name}.tar", "w") as tf:
            for m, data in members:
                ti = tarfile.TarInfo(m)
                ti.size = len(data)
                tf.addfile(ti, io.BytesIO(data))
    i2d = {
        "00000": dict(count=6, successes=4, failed_to_download=2, failed_to_resize=0, status={"success": 4, "e404": 2}),
        "00001": dict(count=8, successes=5, failed_to_download=2, failed_to_resize=1, status={"success": 5, "e404": 1}),
        "00002": dict(count=3, successes=0, failed_to_download=3, failed_to_resize=0, status={"timeout": 3}),
    }
    msgs = {"e404": "HTTP Error 404: Not Found", "timeout": "The read operation timed out"}
    for name, s in i2d.items():
        status = {msgs.get(k, k): v for k, v in s.pop("status").items()}
        st = {**s, "duration": 1.5, "start_time": 1.0e9, "end_time": 1.0e9 + 1.5, "status_dict": status}
        (d / f"{name}_stats.json").write_text(json.dumps(st, indent=4))
    (d / "00001.parquet").write_bytes(b"PAR1")  # img2dataset's metadata sidecar: not a shard, ignored
    return d


def test_img2dataset_layout_counts(img2dataset_dir):
    s = stats(img2dataset_dir)
    assert s["shards"] == 2 and s["samples"] == 9
    assert s["usable"] == 2 and s["image_only"] == 3
    assert s["bad"] == {"undecodable_image": 1, "missing_image": 1, "bad_json": 1, "empty_caption": 1}
    img = s["images"]
    assert img["count"] == 5
    assert img["by_format"] == {"jpeg": 4, "png": 1} and img["by_extension"] == {"jpg": 5}
    # shorter sides 200, 48, 256, 400, 768
    assert img["by_short_side"] == {"<64 px": 1, "128-223 px": 1, "224-383 px": 1, "384-511 px": 1, "512-1023 px": 1}
    assert img["width"] == {"min": 64, "median": 320, "mean": 452.8, "max": 1024}
    cap = s["captions"]  # txt wins over img2dataset's json.caption, as in training
    assert cap["per_sample"] == {"0": 3, "1": 2} and cap["count"] == 2
    assert cap["by_words"] == {"5-9 words": 1, "30-49 words": 1}
    assert cap["words"] == {"min": 5, "median": 19.0, "mean": 19.0, "max": 33}
    # only the stats files of the shards given: 00002's tar is not in the directory listing
    i2d = s["img2dataset"]
    assert i2d["stats_files"] == 2
    assert (i2d["count"], i2d["successes"], i2d["failed_to_download"], i2d["failed_to_resize"]) == (14, 9, 4, 1)
    assert i2d["failures"] == {"HTTP Error 404: Not Found": 3}


def test_missing_shard_in_a_brace_pattern_is_counted_and_its_download_stats_read(img2dataset_dir):
    s = stats(str(img2dataset_dir / "{00000..00002}.tar"))
    assert s["shards"] == 3 and s["bad"]["missing_shard"] == 1 and s["samples"] == 9
    i2d = s["img2dataset"]
    assert i2d["stats_files"] == 3 and i2d["failed_to_download"] == 7
    assert i2d["failures"] == {"HTTP Error 404: Not Found": 3, "The read operation timed out": 3}


def test_unreadable_img2dataset_stats_file_is_reported_not_fatal(img2dataset_dir, tmp_path):
    d = tmp_path / "copy"
    d.mkdir()
    (d / "00000.tar").write_bytes((img2dataset_dir / "00000.tar").read_bytes())
    (d / "00000_stats.json").write_text('{"count": "many"}')
    s = stats(d)
    assert s["samples"] == 4 and s["img2dataset"]["stats_files"] == 0
    assert "00000_stats.json" in s["img2dataset"]["unreadable"][0]
    (d / "00000_stats.json").unlink()
    assert stats(d)["img2dataset"] is None


def _raw_samples(d: Path) -> list[dict]:
    """The demo shards read with plain tarfile + json, independently of blipctl's reader."""
    groups: dict[str, dict] = {}
    for tar in sorted(d.glob("*.tar")):
        with tarfile.open(tar) as tf:
            for m in tf.getmembers():
                key, ext = m.name.split(".", 1)
                groups.setdefault(f"{tar}:{key}", {})[ext] = tf.extractfile(m).read()
    return list(groups.values())


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("demo") / "w"
    make_demo(d, seed=2, scale="small")
    return d


@pytest.mark.parametrize("split", ["human", "web"])
def test_demo_world_counts(demo, split):
    world = json.loads((demo / "world.json").read_text())["splits"][split]
    s = stats(demo / split)
    n = world["images"]
    assert s["samples"] == s["usable"] == n and s["image_only"] == 0 and s["bad"] == {}
    fmt = {"png": "png", "jpg": "jpeg"}[world["format"]]
    assert s["images"]["by_format"] == {fmt: n} and s["images"]["by_extension"] == {world["format"]: n}
    assert s["images"]["width"]["min"] == s["images"]["width"]["max"] == IMAGE_SIZE
    assert s["images"]["by_short_side"] == {"64-127 px": n}
    raw = _raw_samples(demo / split)
    texts = [
        [c["text"] for c in json.loads(g["json"])["captions"]] if split == "human" else [g["txt"].decode()] for g in raw
    ]
    assert s["captions"]["count"] == world["captions"] == sum(map(len, texts))
    assert s["captions"]["per_sample"] == {str(k): v for k, v in sorted(Counter(map(len, texts)).items())}
    words = [len(t.split()) for ts in texts for t in ts]
    assert s["captions"]["words"]["max"] == max(words) and s["captions"]["words"]["min"] == min(words)
    assert sum(s["captions"]["by_words"].values()) == len(words)
    assert s["captions"]["by_words"].get("<5 words", 0) == sum(w < 5 for w in words)
    assert s["captions"]["by_words"].get("20-29 words", 0) == sum(20 <= w < 30 for w in words)


def test_cli_json_and_table(img2dataset_dir):
    r = runner.invoke(app, ["data", "stats", str(img2dataset_dir), "--json"])
    assert r.exit_code == 0, r.output
    lines = r.stdout.splitlines()
    assert len(lines) == 1 and json.loads(lines[0]) == stats(img2dataset_dir)
    r = runner.invoke(app, ["data", "stats", str(img2dataset_dir)])
    assert r.exit_code == 0, r.output
    for text in ("image-only (no caption)", "undecodable_image", "failed_to_download", "HTTP Error 404"):
        assert text in r.stdout, text


def test_cli_bad_path_exit_2(tmp_path):
    r = runner.invoke(app, ["data", "stats", str(tmp_path / "nope")])
    assert r.exit_code == 2 and "nope" in r.output
