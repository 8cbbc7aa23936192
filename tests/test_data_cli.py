"""`blipctl data demo` and `blipctl data from-json` through the real CLI."""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from pathlib import Path

import pytest
from typer.testing import CliRunner

from blip.data.shards import SampleStats, captions_of, expand_shards, iter_shard
from blipctl.cli import app

runner = CliRunner()


def _invoke(*args: str):
    r = runner.invoke(app, list(args))
    return r


def _hashes(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in root.rglob("*") if p.is_file()
    }


def _samples(d: Path, decode: bool = False) -> list[dict]:
    stats = SampleStats()
    out = [s for shard in expand_shards(d) for s in iter_shard(shard, stats, decode=decode)]
    assert stats.total_bad == 0, stats.summary()
    return out


@pytest.fixture(scope="module")
def demo_world(tmp_path_factory):
    d = tmp_path_factory.mktemp("demo") / "w"
    r = _invoke("data", "demo", "--out", str(d), "--seed", "5")
    assert r.exit_code == 0, r.output
    return d


def test_demo_is_byte_for_byte_deterministic(demo_world, tmp_path):
    r = _invoke("data", "demo", "--out", str(tmp_path / "again"), "--seed", "5")
    assert r.exit_code == 0, r.output
    first, again = _hashes(demo_world), _hashes(tmp_path / "again")
    assert len(first) > 100 and first == again
    r = _invoke("data", "demo", "--out", str(tmp_path / "other"), "--seed", "6")
    other = _hashes(tmp_path / "other")
    assert other.keys() == first.keys() and sum(other[k] != first[k] for k in first) > 100


def test_demo_noise_is_exactly_as_requested_and_recorded(demo_world, tmp_path):
    world = json.loads((demo_world / "world.json").read_text())
    web = _samples(demo_world / "web")
    assert len(web) == world["splits"]["web"]["images"] == 1200
    noisy = [s for s in web if s["json"]["noise"]]
    assert len(noisy) == round(0.4 * 1200) and world["noise"]["realised"] == 0.4
    kinds = Counter(s["json"]["noise_kind"] for s in noisy)
    assert kinds == world["noise"]["by_kind"] and set(kinds) == {"swap", "attribute", "junk"}
    for s in web:
        j = s["json"]
        assert (s["text"] != j["clean_caption"]) == j["noise"], s["key"]
        assert (j["noise_kind"] is None) == (not j["noise"])
        assert s["text"] == s["text"].lower()
    r = _invoke("data", "demo", "--out", str(tmp_path / "quiet"), "--noise", "0.25")
    assert r.exit_code == 0, r.output
    assert sum(s["json"]["noise"] for s in _samples(tmp_path / "quiet" / "web")) == 300


def test_caption_matches_scene_knows_the_world_s_own_captions(demo_world):
    """Every grammar caption (relations such as "to the left of" included) matches its scene; an attribute-noise
    caption (one wrong colour or shape) never does; junk has nothing to check; swapped captions mostly fail."""
    from blip.data.demo import caption_matches_scene

    human = _samples(demo_world / "human")
    for s in human:
        for c in s["json"]["captions"]:
            assert caption_matches_scene(c["text"], s["json"]["scene"]) is True, c["text"]
    verdicts: dict[str, Counter] = {}
    for s in _samples(demo_world / "web"):
        j = s["json"]
        assert caption_matches_scene(j["clean_caption"], j["scene"]) is True, j["clean_caption"]
        verdicts.setdefault(str(j["noise_kind"]), Counter())[caption_matches_scene(s["text"], j["scene"])] += 1
    assert set(verdicts["attribute"]) == {False} and set(verdicts["junk"]) == {None}
    assert verdicts["swap"][False] > 0.8 * verdicts["swap"].total()
    scene = {"objects": [{"color": "red", "shape": "star", "position": "left", "size": "small"}]}
    assert caption_matches_scene("a little red star shape to the left of a red star", scene) is True
    for wrong in ("a red star at the right side", "a big red star", "two red stars on the right"):
        assert caption_matches_scene(wrong, scene) is False, wrong  # the right object, but not that place or size
    assert caption_matches_scene("a red star on the right of the image", scene) is False  # a place, not a relation


def test_demo_splits_keys_ids_and_test_annotations(demo_world):
    world = json.loads((demo_world / "world.json").read_text())
    all_samples = {split: _samples(demo_world / split) for split in ("human", "web", "test")}
    keys = [s["key"] for ss in all_samples.values() for s in ss]
    ids = [s["json"]["image_id"] for ss in all_samples.values() for s in ss]
    assert len(keys) == len(set(keys)) == 1600 and len(set(ids)) == 1600 and all(isinstance(i, int) for i in ids)
    for split in ("human", "web", "test"):
        assert len(world["splits"][split]["shards"]) >= 4  # enough for 2 ranks x 2 workers
    decoded = _samples(demo_world / "test", decode=True)
    assert {s["image"].size for s in decoded} == {(96, 96)}
    for s in all_samples["human"] + all_samples["test"]:
        caps = s["json"]["captions"]
        assert all(c["source"] == "human" for c in caps) and s["text"] == caps[0]["text"]
        assert captions_of(s) == [c["text"] for c in caps] and len(set(captions_of(s))) == len(caps)
    assert {len(s["json"]["captions"]) for s in all_samples["test"]} == {5}
    assert {len(s["json"]["captions"]) for s in all_samples["human"]} <= {2, 3}
    ann = json.loads((demo_world / "test" / "test.json").read_text())
    gt = json.loads((demo_world / "test" / "test_gt.json").read_text())
    assert len(ann) == 100 and all((demo_world / "test" / a["image"]).is_file() for a in ann)
    assert [a["image_id"] for a in ann] == [s["json"]["image_id"] for s in all_samples["test"]]
    assert {i["id"] for i in gt["images"]} == {a["image_id"] for a in ann}
    assert len(gt["annotations"]) == 500 and {a["image_id"] for a in gt["annotations"]} == {a["image_id"] for a in ann}
    assert (demo_world / "test" / ann[0]["image"]).read_bytes() == decoded[0]["image_bytes"]


def test_demo_bad_options_exit_2(tmp_path):
    r = _invoke("data", "demo", "--out", str(tmp_path / "x"), "--noise", "1.5")
    assert r.exit_code == 2 and "--noise" in r.output
    r = _invoke("data", "demo", "--out", str(tmp_path / "x"), "--scale", "huge")
    assert r.exit_code == 2 and "--scale" in r.output


@pytest.fixture
def annotated_images(tmp_path, image_bytes):
    root = tmp_path / "imgs"
    root.mkdir()
    files = {"a.jpg": image_bytes("jpg", seed=1), "b.png": image_bytes("png", seed=2)}
    files["c.webp"] = image_bytes("webp", seed=3)
    files["mislabelled.jpg"] = image_bytes("png", seed=4)  # a PNG behind a .jpg name
    files["broken.jpg"] = b"\xff\xd8\xff\xe0 definitely not a jpeg"
    for name, data in files.items():
        (root / name).write_bytes(data)
    ann = [
        {"image": "a.jpg", "caption": "A cat.", "image_id": "coco_1", "dataset": "toy"},
        {"image": "b.png", "caption": ["two", "captions"], "image_id": 2},
        {"image": "gone.jpg", "caption": "missing image"},
        {"image": "c.webp", "caption": "a webp"},
        {"image": "a.jpg", "caption": "a second cat caption", "image_id": "coco_1"},
        {"image": "broken.jpg", "caption": "undecodable"},
        {"image": "mislabelled.jpg", "caption": "png inside"},
    ]
    p = tmp_path / "toy_train.json"
    p.write_text(json.dumps(ann))
    return p, root, files


def test_from_json_round_trip(annotated_images, tmp_path):
    ann, root, files = annotated_images
    out = tmp_path / "shards"
    r = _invoke("data", "from-json", str(ann), "--images", str(root), "--out", str(out), "--maxcount", "2")
    assert r.exit_code == 0, r.output
    shards = sorted(p.name for p in out.glob("*.tar"))
    assert shards == ["toy_train-00000.tar", "toy_train-00001.tar"]
    got = {s["json"]["image"]: s for s in _samples(out, decode=True)}
    assert list(got) == ["a.jpg", "b.png", "c.webp", "mislabelled.jpg"]
    for name, s in got.items():
        assert s["image_bytes"] == files[name]  # copied unchanged
    assert got["mislabelled.jpg"]["image_ext"] == "png" and got["c.webp"]["image_ext"] == "webp"
    assert captions_of(got["a.jpg"]) == ["A cat.", "a second cat caption"] and got["a.jpg"]["text"] == "A cat."
    assert captions_of(got["b.png"]) == ["two", "captions"]
    assert captions_of(got["c.webp"]) == ["a webp"]
    assert got["a.jpg"]["json"]["image_id"] == "coco_1" and got["a.jpg"]["json"]["dataset"] == "toy"
    assert got["b.png"]["json"]["image_id"] == 2 and got["b.png"]["json"]["source"] == "web"
    summary = json.loads((out / "from_json.json").read_text())
    assert summary["samples"] == 4 and summary["captions"] == 6 and summary["records"] == 7
    assert summary["bad_samples"] == {"good": 4, "bad": 2, "missing_image": 1, "undecodable_image": 1}


def test_from_json_strict_and_bad_input(annotated_images, tmp_path):
    ann, root, _ = annotated_images
    r = _invoke("data", "from-json", str(ann), "--images", str(root), "--out", str(tmp_path / "o"), "--strict")
    assert r.exit_code == 2 and "gone.jpg" in r.output
    (tmp_path / "bad.json").write_text('{"not": "a list"}')
    r = _invoke("data", "from-json", str(tmp_path / "bad.json"), "--images", str(root), "--out", str(tmp_path / "o"))
    assert r.exit_code == 2 and "bad.json" in r.output


def test_phrases_vs_scene_judges_each_phrase():
    """One verdict per "[size] colour shape [position]" phrase (the issue-15 target is per phrase); a caption is
    right when all of them are."""
    from blip.data.demo import caption_matches_scene, phrase_errors, phrases_vs_scene

    scene = {
        "objects": [
            {"color": "red", "shape": "star", "position": "left", "size": "small"},
            {"color": "blue", "shape": "square", "position": "top", "size": "big"},
        ]
    }
    text = "a small red star on the left and a big blue square on the right and a green circle"
    assert phrases_vs_scene(text, scene) == [True, False, False]  # wrong position; no green circle
    assert phrase_errors(text, scene) == [None, "position", "colour"]
    swapped = "a red square, a blue star, a small blue square, a small red star at the top and a red circle"
    assert phrase_errors(swapped, scene) == ["binding", "binding", "size", "position", "shape"]
    assert caption_matches_scene(text, scene) is False
    assert phrases_vs_scene("a big red star", scene) == [False]  # wrong size
    assert phrases_vs_scene("buy now cheap", scene) == [] and caption_matches_scene("buy now cheap", scene) is None
