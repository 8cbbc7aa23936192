"""COCO / Flickr30k Karpathy layouts, annotation JSONs and shard sets as evaluation sets and training pairs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from blip.data.datasets import load_eval_set, load_train_pairs, resolve_data_root
from blip.errors import InputError


def _write(root: Path, rel: str, data: bytes) -> None:
    p = root / rel
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_bytes(data)


@pytest.fixture
def coco_root(tmp_path, image_bytes):
    root = tmp_path / "coco"
    a, b = "val2014/COCO_val2014_000000000042.jpg", "val2014/COCO_val2014_000000000007.jpg"
    t = "train2014/COCO_train2014_000000000005.jpg"
    for i, rel in enumerate((a, b, t)):
        _write(root, rel, image_bytes("jpg", seed=i))
    test = [
        {"image": a, "caption": ["A cat.", "a CAT  sitting"]},
        {"image": b, "caption": ["dog", "a dog", "the dog!"]},
    ]
    train = [
        {"image": t, "caption": "A train caption.", "image_id": "coco_5"},
        {"image": a, "caption": "a cat on a mat", "image_id": "coco_42"},
        {"image": t, "caption": "another train caption", "image_id": "coco_5"},
    ]
    _write(root, "annotations/coco_karpathy_test.json", json.dumps(test).encode())
    _write(root, "annotations/coco_karpathy_train.json", json.dumps(train).encode())
    return root


def test_coco_karpathy_test_split_ids_like_the_original(coco_root):
    es = load_eval_set("coco", "test", str(coco_root))
    assert es.name == "coco/test" and len(es) == 2
    assert es.texts == ["a cat", "a cat sitting", "dog", "a dog", "the dog"]
    assert es.img2txt == [[0, 1], [2, 3, 4]]
    assert es.txt2img == [0, 0, 1, 1, 1]
    assert es.raw_captions == [["A cat.", "a CAT  sitting"], ["dog", "a dog", "the dog!"]]
    assert es.image_ids == [42, 7]  # from the COCO file names, as the original caption eval
    assert [im["id"] for im in es.gt["images"]] == [42, 7]
    assert [(a["image_id"], a["caption"]) for a in es.gt["annotations"]][:2] == [(42, "A cat."), (42, "a CAT  sitting")]
    assert len({a["id"] for a in es.gt["annotations"]}) == 5
    img = es.load_image(1)
    assert img.mode == "RGB" and img.size == (32, 24)


def test_coco_gt_file_is_used_when_present(coco_root):
    gt = {"images": [{"id": 42}, {"id": 7}], "annotations": [{"image_id": 42, "caption": "x", "id": 1}]}
    gt["annotations"].append({"image_id": 7, "caption": "y", "id": 2})
    _write(coco_root, "annotations/coco_karpathy_test_gt.json", json.dumps(gt).encode())
    assert load_eval_set("coco", "test", str(coco_root)).gt == gt
    gt["annotations"].pop()
    _write(coco_root, "annotations/coco_karpathy_test_gt.json", json.dumps(gt).encode())
    with pytest.raises(InputError, match="image_id 7"):
        load_eval_set("coco", "test", str(coco_root))


def test_coco_train_pairs_number_images_by_first_appearance(coco_root):
    pairs = load_train_pairs("coco", "train", str(coco_root))
    t = str(coco_root / "train2014/COCO_train2014_000000000005.jpg")
    a = str(coco_root / "val2014/COCO_val2014_000000000042.jpg")
    assert pairs == [(t, "A train caption.", 0), (a, "a cat on a mat", 1), (t, "another train caption", 0)]


def test_missing_files_name_what_is_expected(coco_root, tmp_path, monkeypatch):
    with pytest.raises(InputError) as e:
        load_eval_set("coco", "val", str(coco_root))
    assert "coco_karpathy_val.json" in str(e.value) and "annotations" in str(e.value)
    with pytest.raises(InputError, match="flickr30k_test.json"):
        load_eval_set("flickr30k", "test", str(coco_root))
    with pytest.raises(InputError, match="split must be one of"):
        load_eval_set("coco", "dev", str(coco_root))
    (coco_root / "val2014/COCO_val2014_000000000007.jpg").unlink()
    with pytest.raises(InputError, match="COCO_val2014_000000000007.jpg"):
        load_eval_set("coco", "test", str(coco_root))
    monkeypatch.delenv("BLIP_DATA", raising=False)
    with pytest.raises(InputError, match="BLIP_DATA"):
        resolve_data_root(None)
    with pytest.raises(InputError, match="not a directory"):
        resolve_data_root(str(tmp_path / "nowhere"))
    monkeypatch.setenv("BLIP_DATA", str(coco_root))
    assert resolve_data_root(None) == coco_root
    assert load_train_pairs("coco")[0][2] == 0  # the data root comes from $BLIP_DATA
    with pytest.raises(InputError, match="not found"):
        load_eval_set(str(tmp_path / "missing.json"))
    with pytest.raises(InputError, match="coco, flickr30k, an annotation .json, or shards"):
        load_eval_set("cocoo")
    with pytest.raises(InputError, match="cocoo"):
        load_train_pairs("cocoo")


def test_flickr30k_layout(tmp_path, image_bytes):
    root = tmp_path / "flickr"
    recs = []
    for i, name in enumerate(("1000092795", "10002456", "1000268201")):
        rel = f"flickr30k-images/{name}.jpg"
        _write(root, rel, image_bytes("jpg", seed=i))
        recs.append({"image": rel, "caption": [f"Caption {i} a", f"caption {i} b"]})
    _write(root, "annotations/flickr30k_val.json", json.dumps(recs).encode())
    es = load_eval_set("flickr30k", "val", str(root))
    assert es.image_ids == [1000092795, 10002456, 1000268201]
    assert es.img2txt == [[0, 1], [2, 3], [4, 5]] and es.txt2img == [0, 0, 1, 1, 2, 2]
    assert es.texts[2] == "caption 1 a"


def test_annotation_json_relative_to_its_dir_or_data_root(tmp_path, image_bytes):
    _write(tmp_path / "set", "imgs/a.png", image_bytes("png", seed=1))
    _write(tmp_path / "set", "imgs/b.png", image_bytes("png", seed=2))
    ann = [{"image": "imgs/a.png", "caption": "one"}, {"image": "imgs/b.png", "caption": ["two", "three"]}]
    ann.append({"image": "imgs/a.png", "caption": "four"})  # train-style records of one image merge
    p = tmp_path / "set" / "mine.json"
    p.write_text(json.dumps(ann))
    es = load_eval_set(str(p))
    assert es.raw_captions == [["one", "four"], ["two", "three"]] and es.image_ids == [0, 1]
    moved = tmp_path / "elsewhere.json"
    moved.write_text(json.dumps(ann))
    with pytest.raises(InputError, match="data_root"):
        load_eval_set(str(moved))
    assert len(load_eval_set(str(moved), data_root=str(tmp_path / "set"))) == 2
    pairs = load_train_pairs(str(p))
    assert [(Path(a).name, c, i) for a, c, i in pairs] == [
        ("a.png", "one", 0),
        ("b.png", "two", 1),
        ("b.png", "three", 1),
        ("a.png", "four", 0),
    ]


def test_demo_test_split_loads_from_json_and_from_shards(tmp_path):
    from blip.data.demo import make_demo

    make_demo(tmp_path / "demo", seed=1, scale="small")
    from_json = load_eval_set(str(tmp_path / "demo" / "test" / "test.json"))
    from_tars = load_eval_set(str(tmp_path / "demo" / "test"))
    assert len(from_json) == len(from_tars) == 100
    assert from_json.texts == from_tars.texts and len(from_json.texts) == 500
    assert from_json.img2txt == from_tars.img2txt and from_json.image_ids == from_tars.image_ids
    assert from_json.gt["annotations"] == from_tars.gt["annotations"]  # test_gt.json == GT built from the shards
    for i in (0, 57):
        assert np.array_equal(np.asarray(from_json.load_image(i)), np.asarray(from_tars.load_image(i)))
    human = load_train_pairs(str(tmp_path / "demo" / "human"))
    assert [Path(s).name for s in human] == [f"human-{i:05d}.tar" for i in range(4)]
