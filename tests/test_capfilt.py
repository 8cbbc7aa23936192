"""CapFilt end to end on hand-made web shards with tiny random captioner and filter models."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
from helpers import capfilt_models, png
from PIL import Image
from typer.testing import CliRunner

from blip.data.demo import phrases_vs_scene
from blip.data.shards import SampleStats, iter_shard, write_shard
from blipctl.cli import app

runner = CliRunner()
ENV = {**os.environ, "HF_HUB_OFFLINE": "1"}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return capfilt_models(tmp_path_factory.mktemp("models"))


# the demo world records each image's scene; CapFilt checks every caption against it
SCENE = {"objects": [{"color": "red", "shape": "circle", "position": "left", "size": "small"}], "background": "white"}
MATCHES_SCENE = {
    "a red circle on the left": True,
    "a red circle on the left and a small blue square": False,  # two phrases, one right
    "there is a big star": None,
    "green triangle at the top": False,
}


@pytest.fixture(scope="module")
def web(tmp_path_factory):
    """5 web shards of 6 samples (one human sample, one bad image, noise labels on the web ones)."""
    d = tmp_path_factory.mktemp("web")
    words = list(MATCHES_SCENE)
    for s in range(5):
        samples = []
        for i in range(6):
            k = s * 6 + i
            meta = {"image_id": k, "noise": bool(k % 3 == 0), "noise_kind": "junk" if k % 3 == 0 else None}
            meta["scene"] = SCENE
            sample = {"__key__": f"s{k:04d}", "png": png(k), "txt": words[k % 4], "json": meta}
            if i == 5:
                sample["json"] = {"image_id": k, "captions": [{"text": "a human caption", "source": "human"}]}
            samples.append(sample)
        if s == 2:
            samples[1]["png"] = b"not an image"
        write_shard(d / f"web-{s:05d}.tar", samples)
    return d


def run(web, out, models, threshold, *extra):
    cap, filt = models
    return runner.invoke(
        app,
        [
            "capfilt",
            "--in",
            str(web),
            "--out",
            str(out),
            "--captioner",
            str(cap),
            "--filter",
            str(filt),
            "--num-captions",
            "2",
            "--batch-size",
            "4",
            "--threshold",
            threshold,
            *map(str, extra),
        ],
        catch_exceptions=False,
    )


def read_all(out: Path, with_itm: bool = False) -> dict[str, list]:
    res = {}
    for tar in sorted(out.glob("*.tar")):
        for s in iter_shard(tar, SampleStats()):
            caps = s["json"]["captions"]
            res[s["key"]] = [(c["text"], c["source"], *([c["itm"]] if with_itm else [])) for c in caps]
    return res


@pytest.fixture(scope="module")
def threshold(web, models, tmp_path_factory) -> str:
    """A threshold in the widest gap between the middle ITM scores of the web captions under the random filter:
    it keeps some and drops some, whatever the vocabulary or initialisation (a fixed number broke when the
    tokenizer changed)."""
    out = tmp_path_factory.mktemp("all")
    args = ["capfilt", "--in", str(web), "--out", str(out), "--filter", str(models[1]), "--num-captions", "0"]
    r = runner.invoke(app, [*args, "--threshold", "0", "--batch-size", "4"], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    scores = sorted(c[2] for v in read_all(out, with_itm=True).values() for c in v if c[1] == "web")
    n = len(scores)
    gap, i = max((scores[i + 1] - scores[i], i) for i in range(n // 4, 3 * n // 4))  # widest gap mid-range
    assert gap > 2e-5  # well above what batch composition changes (~1e-7) and the 6 decimals stored
    return f"{(scores[i] + scores[i + 1]) / 2:.9f}"


@pytest.fixture(scope="module")
def reference(web, models, threshold, tmp_path_factory):
    out = tmp_path_factory.mktemp("ref")
    r = run(web, out, models, threshold)
    assert r.exit_code == 0, r.output
    return out


def test_counts_add_up_and_output_is_trainable(reference, web, threshold):
    s = json.loads((reference / "capfilt.json").read_text())
    assert s["complete"] and s["shards_done"] == 5
    assert s["images_in"] == 29  # 30 samples, one undecodable image skipped and counted
    assert s["bad_samples"] == {"undecodable_image": 1}
    for src, c in s["counts"].items():
        assert c["in"] == c["kept"] + c["dropped"], src
    assert s["counts"]["web"]["in"] == 24 and s["counts"]["synthetic"]["in"] == 48
    assert s["counts"]["human"] == {"in": 5, "kept": 5, "dropped": 0}
    assert 0 < s["counts"]["web"]["kept"] < 24  # the random filter keeps some and drops some
    f = s["filter_vs_noise_labels"]
    assert f["tp"] + f["fp"] + f["fn"] + f["tn"] == 24 and 0 <= f["precision"] <= 1
    assert sorted(p.name for p in reference.glob("*.tar")) == sorted(p.name for p in web.glob("*.tar"))
    out = read_all(reference)
    # web captions against the recorded scene, all and kept ones (the random synthetic captions name no shape)
    src = {x["key"]: x for t in sorted(web.glob("*.tar")) for x in iter_shard(t, SampleStats())}
    given = Counter(MATCHES_SCENE[x["text"]] for x in src.values() if "scene" in x["json"])
    kept = Counter(MATCHES_SCENE[t] for caps in out.values() for t, source in caps if source == "web")
    v = s["captions_vs_scene"]["web"]
    share = round(given[True] / (given[True] + given[False]), 4)
    phrases = [phrases_vs_scene(x["text"], x["json"]["scene"]) for x in src.values() if "scene" in x["json"]]
    n_phrases, n_right = sum(map(len, phrases)), sum(map(sum, phrases))
    assert v["all"] == {
        "checked": given[True] + given[False],
        "right": given[True],
        "share": share,
        "phrases": n_phrases,
        "phrases_right": n_right,
        "phrases_right_share": round(n_right / n_phrases, 4),
    }
    assert 0 < n_right < n_phrases and n_phrases > given[True] + given[False]  # two phrases in one caption
    assert v["kept"]["checked"] == kept[True] + kept[False] and v["kept"]["right"] == kept[True]
    assert 0 < given[True] < given[True] + given[False]
    assert sum(len(v) for v in out.values()) == sum(c["kept"] for c in s["counts"].values())
    # every output sample keeps the input image bytes unchanged, its json, and its first kept caption as txt
    for tar in reference.glob("*.tar"):
        for x in iter_shard(tar, SampleStats()):
            assert x["image_bytes"] == src[x["key"]]["image_bytes"]
            assert x["text"] == x["json"]["captions"][0]["text"]
            assert x["json"]["image_id"] == src[x["key"]]["json"]["image_id"]
            assert all(c["itm"] is None or c["itm"] >= float(threshold) for c in x["json"]["captions"])
    # the training loader reads it: one pair per kept caption
    from blip.data.loader import build_train_loader

    n = sum(
        len(b["caption"])
        for b in build_train_loader(str(reference), image_size=32, batch_size=1, num_workers=0, randaugment=False)
    )
    assert n == sum(len(v) for v in out.values())


def test_rerun_of_finished_output_does_nothing(reference, web, models, threshold):
    before = {p: p.stat().st_mtime_ns for p in reference.glob("*.tar")}
    r = run(web, reference, models, threshold)
    assert r.exit_code == 0 and "5 already done" in r.output
    assert before == {p: p.stat().st_mtime_ns for p in reference.glob("*.tar")}


def test_shard_index_jobs_equal_single_job(reference, web, models, threshold, tmp_path):
    for i in range(2):
        assert run(web, tmp_path, models, threshold, "--shard-index", i, "--num-shards", 2).exit_code == 0
    assert read_all(tmp_path) == read_all(reference)
    assert (
        json.loads((tmp_path / "capfilt.json").read_text())["counts"]
        == json.loads((reference / "capfilt.json").read_text())["counts"]
    )


def test_sigkill_then_rerun_gives_same_output(reference, web, models, threshold, tmp_path):
    cap, filt = models
    cmd = [
        sys.executable,
        "-m",
        "blipctl",
        "capfilt",
        "--in",
        str(web),
        "--out",
        str(tmp_path),
        "--captioner",
        str(cap),
        "--filter",
        str(filt),
        "--num-captions",
        "2",
        "--batch-size",
        "4",
        "--threshold",
        threshold,
    ]
    p = subprocess.Popen(cmd, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and not list(tmp_path.glob("*.tar")):  # kill once one shard is out
        time.sleep(0.05)
    time.sleep(0.3)
    p.send_signal(signal.SIGKILL)
    p.wait()
    done = len(list(tmp_path.glob("*.tar")))
    assert 1 <= done <= 5
    r = subprocess.run(cmd, env=ENV, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert not list(tmp_path.glob("*.tmp"))
    assert read_all(tmp_path) == read_all(reference)


@pytest.mark.slow
def test_torchrun_two_ranks_equal_single_job(reference, web, models, threshold, tmp_path):
    cap, filt = models
    torchrun = Path(sys.executable).parent / "torchrun"
    r = subprocess.run(
        [
            str(torchrun),
            "--nproc_per_node",
            "2",
            "-m",
            "blipctl",
            "capfilt",
            "--in",
            str(web),
            "--out",
            str(tmp_path),
            "--captioner",
            str(cap),
            "--filter",
            str(filt),
            "--num-captions",
            "2",
            "--batch-size",
            "4",
            "--threshold",
            threshold,
        ],
        env=ENV,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert read_all(tmp_path) == read_all(reference)


def test_report_html(reference):
    from html.parser import HTMLParser

    page = (reference / "report.html").read_text()
    imgs = []

    class P(HTMLParser):
        def handle_starttag(self, tag, attrs):
            if tag == "img":
                imgs.append(dict(attrs)["src"])

    P().feed(page)
    assert len(imgs) >= 5
    for src in imgs:
        with Image.open(reference / src) as im:
            assert max(im.size) <= 160
    assert "synthetic" in page and "dropped" in page and 'id="counts"' in page


def test_filter_only_needs_no_captioner_and_decides_web_captions_alike(reference, web, models, threshold, tmp_path):
    # --num-captions 0 is the paper's "Filt" ablation: no captioner is loaded (the default is a hub model)
    args = ["capfilt", "--in", str(web), "--out", str(tmp_path), "--filter", str(models[1]), "--num-captions", "0"]
    r = runner.invoke(app, [*args, "--batch-size", "4", "--threshold", threshold], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    s, ref = (json.loads((d / "capfilt.json").read_text()) for d in (tmp_path, reference))
    assert s["counts"]["synthetic"] == {"in": 0, "kept": 0, "dropped": 0}
    assert s["counts"]["web"] == ref["counts"]["web"] and s["filter_vs_noise_labels"] == ref["filter_vs_noise_labels"]
    got, want = read_all(tmp_path), read_all(reference)
    assert got == {
        k: [c for c in v if c[1] != "synthetic"] for k, v in want.items() if any(c[1] != "synthetic" for c in v)
    }
    r = runner.invoke(app, [*args[:-1], "-1"])
    assert r.exit_code == 2 and "--num-captions must be 0 or more" in r.output


def test_bad_flags_exit_2(web, models, threshold, tmp_path):
    r = run(web, tmp_path, models, threshold, "--shard-index", 3, "--num-shards", 2)
    assert r.exit_code == 2 and "--shard-index" in r.output
    r = run(web, tmp_path, (models[1], models[1]), threshold)
    assert r.exit_code == 2 and "captioner" in r.output
