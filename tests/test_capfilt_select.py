"""CapFilt for the data people have and outputs every consumer reads: image-only (img2dataset) shards, `txt` /
`json.caption` / `json.captions` consistency, the pairs layout, keep-top ranking, keep-fraction calibration."""

from __future__ import annotations

import io
import json

import pytest
from helpers import capfilt_models, png
from PIL import Image
from typer.testing import CliRunner

from blip.data.shards import SampleStats, iter_shard, write_shard
from blipctl.cli import app

runner = CliRunner()


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return capfilt_models(tmp_path_factory.mktemp("models"))


def capfilt(models, inp, out, *extra):
    args = ["capfilt", "--in", str(inp), "--out", str(out), "--captioner", str(models[0]), "--filter", str(models[1])]
    return runner.invoke(app, [*args, "--batch-size", "4", *map(str, extra)])


def jpg(seed: int) -> bytes:
    buf = io.BytesIO()
    Image.open(io.BytesIO(png(seed))).convert("RGB").save(buf, format="JPEG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def img2dataset(tmp_path_factory):
    """Two shards as img2dataset writes them without a caption column: jpg + json (key, url, status, sizes), no
    txt; one sample has an empty txt as well."""
    d = tmp_path_factory.mktemp("i2d")
    for s in range(2):
        rows = []
        for i in range(5):
            k = f"{s:05d}{i:04d}"
            meta = {"key": k, "url": f"http://x/{k}.jpg", "status": "success", "width": 40, "height": 40}
            rows.append({"__key__": k, "jpg": jpg(10 * s + i), "json": meta})
        rows[2]["txt"] = ""
        write_shard(d / f"{s:05d}.tar", rows)
    return d


def test_image_only_shards_get_filtered_synthetic_captions(models, img2dataset, tmp_path):
    r = capfilt(models, img2dataset, tmp_path / "o", "--num-captions", "2", "--threshold", "0")
    assert r.exit_code == 0, r.output
    s = json.loads((tmp_path / "o" / "capfilt.json").read_text())
    assert s["images_in"] == 10 and s["images_without_text"] == 10 and s["bad_samples"] == {}
    assert s["counts"]["web"]["in"] == 0 and s["counts"]["synthetic"] == {"in": 20, "kept": 20, "dropped": 0}
    assert s["images_out"] == 10
    for tar in (tmp_path / "o").glob("*.tar"):
        for x in iter_shard(tar, SampleStats()):
            caps = x["json"]["captions"]
            assert len(caps) == 2 and {c["source"] for c in caps} == {"synthetic"}
            assert x["json"]["url"].endswith(x["key"] + ".jpg")  # the input json is kept
    # filter only: nothing to keep, but every image is counted, none is a bad sample
    r = capfilt(models, img2dataset, tmp_path / "f", "--num-captions", "0", "--threshold", "0")
    assert r.exit_code == 0, r.output
    s = json.loads((tmp_path / "f" / "capfilt.json").read_text())
    assert s["images_in"] == 10 and s["images_without_text"] == 10 and s["images_out"] == 0
    assert s["bad_samples"] == {} and "images without text" in r.output


def test_caption_command_captions_image_only_shards(models, img2dataset):
    r = runner.invoke(app, ["caption", str(img2dataset), "--model", str(models[0]), "--json", "--max-length", "8"])
    assert r.exit_code == 0, r.output
    lines = [json.loads(x) for x in r.stdout.splitlines() if x.startswith("{")]
    assert len(lines) == 10 and len({x["image"] for x in lines}) == 10
    assert "00000.tar/000000002" in {x["image"] for x in lines}  # the one with an empty txt


@pytest.fixture(scope="module")
def mixed(tmp_path_factory):
    """Two jpg shards of 6: four with a web caption (and img2dataset's json.caption copy), two image-only."""
    d = tmp_path_factory.mktemp("mixed")
    words = ["a red circle on the left", "a small blue square", "there is a big star", "buy now"]
    for s in range(2):
        rows = []
        for i in range(6):
            row = {"__key__": f"m{s}{i}", "jpg": jpg(100 + 10 * s + i), "json": {"key": f"m{s}{i}"}}
            if i < 4:
                row["txt"] = words[i]
                row["json"]["caption"] = words[i]
            rows.append(row)
        write_shard(d / f"web-{s:05d}.tar", rows)
    return d


def all_scores(out) -> list[float]:
    return sorted(
        c["itm"] for t in out.glob("*.tar") for x in iter_shard(t, SampleStats()) for c in x["json"]["captions"]
    )


@pytest.fixture(scope="module")
def median_threshold(models, mixed, tmp_path_factory) -> str:
    out = tmp_path_factory.mktemp("all")
    assert capfilt(models, mixed, out, "--num-captions", "2", "--threshold", "0").exit_code == 0
    scores = all_scores(out)
    assert len(scores) == 8 * 3 + 4 * 2
    n = len(scores) // 2
    return f"{(scores[n - 1] + scores[n]) / 2:.9f}"


def test_every_consumer_reads_every_kept_caption(models, mixed, median_threshold, tmp_path):
    import webdataset as wds

    args = ["--num-captions", "2", "--threshold", median_threshold]
    assert capfilt(models, mixed, tmp_path / "img", *args).exit_code == 0
    r = capfilt(models, mixed, tmp_path / "pairs", *args, "--layout", "pairs")
    assert r.exit_code == 0, r.output
    s = json.loads((tmp_path / "pairs" / "capfilt.json").read_text())
    kept = sum(c["kept"] for c in s["counts"].values())
    assert 0 < kept < 32 and s["samples_out"] == kept and s["settings"]["layout"] == "pairs"
    # layout image: txt is the first kept caption, json.caption agrees, json.captions holds them all
    per_image = {}
    for key, txt, meta in wds.WebDataset(
        sorted(map(str, (tmp_path / "img").glob("*.tar"))), shardshuffle=False
    ).to_tuple("__key__", "txt", "json"):
        meta = json.loads(meta)
        assert txt.decode() == meta["caption"] == meta["captions"][0]["text"]
        per_image[key] = [c["text"] for c in meta["captions"]]
    assert sum(map(len, per_image.values())) == kept
    # layout pairs, read as open_clip does (jpg + txt only): exactly the kept captions, each with its image
    src = {
        x["key"]: x["image_bytes"]
        for t in mixed.glob("*.tar")
        for x in iter_shard(t, SampleStats(), need_caption=False)
    }
    urls = sorted(map(str, (tmp_path / "pairs").glob("*.tar")))
    pairs = list(wds.WebDataset(urls, shardshuffle=False).to_tuple("__key__", "jpg", "txt"))
    assert len(pairs) == kept
    got = {}
    for key, image, txt in pairs:
        base, n = key.rsplit("_", 1)
        assert image == src[base]
        got.setdefault(base, []).append((int(n), txt.decode()))
    assert {k: [t for _, t in sorted(v)] for k, v in got.items()} == per_image


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """The demo world (small scale); CapFilt tests use its first web shard (150 images, 40% noisy captions)."""
    from blip.data.demo import make_demo

    d = tmp_path_factory.mktemp("demo")
    make_demo(d, seed=0, scale="small")
    return d / "web" / "web-00000.tar"


DEMO = ["--num-captions", "3", "--max-length", "12", "--batch-size", "32"]


def kept_captions(out) -> dict[str, list[dict]]:
    return {x["key"]: x["json"]["captions"] for t in out.glob("*.tar") for x in iter_shard(t, SampleStats())}


@pytest.fixture(scope="module")
def demo60(demo, tmp_path_factory):
    """The first 60 samples of the demo world's first web shard (keeps the keep-top test quick)."""
    rows = []
    for x in iter_shard(demo, SampleStats()):
        rows.append({"__key__": x["key"], x["image_ext"]: x["image_bytes"], "txt": x["text"], "json": x["json"]})
        if len(rows) == 60:
            break
    p = tmp_path_factory.mktemp("demo60") / "web-00000.tar"
    write_shard(p, rows)
    return p


def test_keep_top_2_keeps_the_two_best_above_the_threshold(models, demo60, tmp_path):
    r = capfilt(models, demo60, tmp_path / "all", *DEMO, "--threshold", "0")
    assert r.exit_code == 0, r.output
    every = kept_captions(tmp_path / "all")  # every candidate: web + 3 synthetic per image
    assert len(every) == 60 and all(len(v) == 4 for v in every.values())
    scores = sorted(c["itm"] for v in every.values() for c in v)
    t = (scores[95] + scores[96]) / 2  # drops 40% of the candidates
    r = capfilt(models, demo60, tmp_path / "top", *DEMO, "--threshold", f"{t:.9f}", "--keep-top", "2")
    assert r.exit_code == 0, r.output
    top = kept_captions(tmp_path / "top")
    strip = ("text", "source", "itm")
    n_kept = []
    for key, caps in every.items():
        # candidates are the same in both runs (sampling is seeded): the two best by ITM of those above t
        best = sorted((c for c in caps if c["itm"] >= t), key=lambda c: -c["itm"])[:2]
        got = top.get(key, [])
        assert [{k: c[k] for k in strip} for c in got] == [{k: c[k] for k in strip} for c in best], key
        n_kept.append(len(got))
        for c in got:
            assert isinstance(c["itc"], float)
            if c["source"] == "synthetic":
                assert c["captioner"] == str(models[0]) and c["seed"] == 0
    assert {0, 1, 2} <= set(n_kept)  # the threshold and the cut both matter
    s = json.loads((tmp_path / "top" / "capfilt.json").read_text())
    cut = sum(max(0, sum(c["itm"] >= t for c in caps) - 2) for caps in every.values())
    assert cut > 0 and s["dropped_by_keep_top"] == cut and s["settings"]["keep_top"] == 2
    assert sum(c["kept"] for c in s["counts"].values()) == sum(n_kept)
    st = json.loads((tmp_path / "top" / "_capfilt" / "web-00000.json").read_text())
    assert st["settings"]["keep_top"] == 2 and st["settings"]["threshold"] == pytest.approx(t)
    assert st["settings"]["captioner"] == str(models[0]) and st["settings"]["num_captions"] == 3


def test_keep_fraction_calibrates_the_threshold(models, demo, tmp_path):
    out = tmp_path / "o"
    args = [*DEMO, "--keep-fraction", "0.5", "--calibration-images", "96"]
    r = capfilt(models, demo, out, *args)
    assert r.exit_code == 0, r.output
    s = json.loads((out / "capfilt.json").read_text())
    cal = s["settings"]["calibration"]
    assert cal["shards"] == ["web-00000.tar"] and cal["images"] == 96 and cal["captions"] == 96 * 4
    assert abs(cal["kept_on_sample"] - 0.5) <= 0.01  # exact up to ties on the sample itself
    assert s["settings"]["threshold"] == cal["threshold"] and s["settings"]["keep_fraction"] == 0.5
    assert 0 < cal["threshold"] < 1
    # on the whole shard (150 images, 600 captions) the kept fraction is within 0.1 of 0.5
    kept = s["counts"]["web"]["kept"] + s["counts"]["synthetic"]["kept"]
    total = s["counts"]["web"]["in"] + s["counts"]["synthetic"]["in"]
    assert total == 600 and abs(kept / total - 0.5) <= 0.1, kept / total
    # the histograms of the report: one per source, counting every caption, the threshold drawn on both
    h = s["itm_histogram"]
    assert sum(h["web"].values()) == 150 and sum(h["synthetic"].values()) == 450 and h["bins"] == 1000
    assert min(map(int, h["web"])) / 1000 <= cal["threshold"] <= (max(map(int, h["web"])) + 1) / 1000
    page = (out / "report.html").read_text()
    assert page.count("<svg") == 2 and page.count('stroke="#d00"') == 2
    assert page.count(f">threshold {cal['threshold']:.3f}</text>") == 2
    # a rerun with the same settings reuses the calibration and finds the shard done
    r = capfilt(models, demo, out, *args)
    assert r.exit_code == 0 and "1 already done" in r.output, r.output
    r = capfilt(models, demo, out, *DEMO, "--keep-fraction", "0.3", "--calibration-images", "96")
    assert r.exit_code == 2 and "keep_fraction: 0.5 -> 0.3" in r.output, r.output
    r = capfilt(models, demo, tmp_path / "x", *args, "--threshold", "0.5")
    assert r.exit_code == 2 and "alternatives" in r.output and not (tmp_path / "x").exists()
