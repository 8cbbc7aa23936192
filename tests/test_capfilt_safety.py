"""CapFilt against hostile or careless input: traversal keys, --out inside --in, duplicate keys, reruns with other
settings. Tiny random models; the shards are written with the raw tar fixture where the names must be hostile."""

from __future__ import annotations

import hashlib
import json
import tarfile
from pathlib import Path

import pytest
from helpers import capfilt_models, png
from typer.testing import CliRunner

from blip.data.shards import SampleStats, iter_shard, write_shard
from blipctl.cli import app

runner = CliRunner()


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return capfilt_models(tmp_path_factory.mktemp("models"))


def capfilt(models, inp, out, *extra, threshold="0"):
    args = ["capfilt", "--in", str(inp), "--out", str(out), "--captioner", str(models[0]), "--filter", str(models[1])]
    args += ["--num-captions", "1", "--batch-size", "4", "--threshold", threshold, *map(str, extra)]
    return runner.invoke(app, args)


def tree(root: Path) -> dict[str, str]:
    """Every file under root -> its sha256."""
    files = [p for p in root.rglob("*") if p.is_file()]
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


def test_traversal_keys_are_counted_and_never_become_paths(models, raw_tar, tmp_path):
    root = tmp_path / "a" / "b" / "c" / "d"
    hostile = ["../../../../elsewhere/x", "../../../../../../elsewhere/w", "/abs/y", "ok/../../z", "back\\slash"]
    members = []
    for i, key in enumerate([*hostile, "good0", "dir/good1"]):
        members += [(f"{key}.png", png(i)), (f"{key}.txt", b"a red circle on the left")]
    raw_tar(root / "in" / "web-00000.tar", members)
    before = tree(tmp_path)
    out = root / "out"
    r = capfilt(models, root / "in", out)
    assert r.exit_code == 0, r.output
    created = set(tree(tmp_path)) - set(before)
    assert created and all(p.startswith("a/b/c/d/out/") for p in created), created
    assert tree(tmp_path / "a" / "b" / "c" / "d" / "in") == {
        k[len("a/b/c/d/in/") :]: v for k, v in before.items() if k.startswith("a/b/c/d/in/")
    }
    s = json.loads((out / "capfilt.json").read_text())
    assert s["bad_samples"] == {"unsafe_key": 5} and s["images_in"] == 2
    with tarfile.open(out / "web-00000.tar") as tf:
        names = tf.getnames()
    assert names and all(not n.startswith("/") and ".." not in n.split("/") and "\\" not in n for n in names)
    assert {n.rsplit(".", 1)[0] for n in names} <= {"good0", "dir/good1"}
    thumbs = [p.name for p in (out / "_capfilt" / "thumbs").iterdir()]
    assert thumbs and all(n.startswith("web-00000_") for n in thumbs)


def test_shard_writer_refuses_unsafe_member_names(tmp_path):
    for key in ("../x", "/x", "a/./b", "a\x00b"):
        with pytest.raises(ValueError, match="unsafe"):
            write_shard(tmp_path / "o.tar", [{"__key__": key, "txt": "t"}])
    assert not list(tmp_path.iterdir())


def test_reader_counts_unsafe_keys(raw_tar, tmp_path):
    members = [("../e/x.png", png(0)), ("../e/x.txt", b"cap"), ("k.png", png(1)), ("k.txt", b"t")]
    p = raw_tar(tmp_path / "s.tar", members)
    st = SampleStats()
    assert [s["key"] for s in iter_shard(p, st)] == ["k"]
    assert dict(st.bad) == {"unsafe_key": 1}


@pytest.fixture
def small_web(tmp_path):
    d = tmp_path / "web"
    for s in range(2):
        rows = [{"__key__": f"k{s}{i}", "png": png(10 * s + i), "txt": "a red circle"} for i in range(3)]
        write_shard(d / f"web-{s:05d}.tar", rows)
    return d


@pytest.mark.parametrize("where", ["same", "inside", "holds_inputs", "glob_same"])
def test_out_equal_to_or_inside_in_is_refused(models, small_web, where):
    before = tree(small_web.parent)
    inp, out = {
        "same": (small_web, small_web),
        "inside": (small_web, small_web / "clean"),
        "holds_inputs": (small_web, small_web.parent),
        "glob_same": (f"{small_web}/*.tar", small_web),
    }[where]
    r = capfilt(models, inp, out)
    assert r.exit_code == 2, r.output
    assert "out" in r.output and "input" in r.output
    assert tree(small_web.parent) == before


def test_duplicate_keys_never_swap_captions(models, tmp_path):
    # "a" appears twice, not consecutively: the second one (another image, another caption) is skipped and counted
    rows = [
        {"__key__": "a", "png": png(1), "txt": "caption of image one", "json": {"image_id": 1}},
        {"__key__": "b", "png": png(2), "txt": "caption of image two", "json": {"image_id": 2}},
        {"__key__": "a", "png": png(3), "txt": "caption of image three", "json": {"image_id": 3}},
        {"__key__": "c", "png": png(4), "txt": "caption of image four", "json": {"image_id": 4}},
    ]
    write_shard(tmp_path / "in" / "web-00000.tar", rows)
    r = capfilt(models, tmp_path / "in", tmp_path / "out", "--num-captions", "0", "--batch-size", "8")
    assert r.exit_code == 0, r.output
    s = json.loads((tmp_path / "out" / "capfilt.json").read_text())
    assert s["bad_samples"] == {"duplicate_key": 1} and s["images_in"] == 3
    by_id = {x["json"]["image_id"]: x for x in iter_shard(tmp_path / "out" / "web-00000.tar", SampleStats())}
    assert sorted(by_id) == [1, 2, 4]  # threshold 0 keeps every web caption
    for i, x in by_id.items():
        assert x["image_bytes"] == png(i) and x["text"] == rows[i - 1]["txt"]


def test_rerun_with_other_settings_is_refused_or_redone_with_overwrite(models, small_web, tmp_path):
    out = tmp_path / "out"
    assert capfilt(models, small_web, out, threshold="0").exit_code == 0
    made = tree(out)
    st = json.loads((out / "_capfilt" / "web-00000.json").read_text())
    assert st["settings"]["threshold"] == 0 and st["settings"]["num_captions"] == 1
    r = capfilt(models, small_web, out, threshold="0")  # same settings: resumes (nothing to do)
    assert r.exit_code == 0 and "2 already done" in r.output and tree(out) == made
    r = capfilt(models, small_web, out, threshold="0.9")
    assert r.exit_code == 2 and "threshold: 0.0 -> 0.9" in r.output and "overwrite" in r.output, r.output
    assert tree(out) == made  # nothing touched, capfilt.json still says threshold 0
    r = capfilt(models, small_web, out, "--overwrite", threshold="1")
    assert r.exit_code == 0, r.output
    s = json.loads((out / "capfilt.json").read_text())
    assert s["settings"]["threshold"] == 1 and s["shards_done"] == 2 and s["shards_stale"] == 0
    assert s["counts"]["web"]["kept"] == 0  # ITM p(match) < 1: the redone shards follow the new threshold
    assert json.loads((out / "_capfilt" / "web-00001.json").read_text())["settings"]["threshold"] == 1
