"""Vision pre-training by classification (blip.vision_pretrain, `blipctl pretrain-vision`) on the demo world's
objects split, and its hand-over to a BLIP pre-training through model.vision_init."""

from __future__ import annotations

import io
import json

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from blip.config import model_config
from blip.data import demo
from blip.data.shards import SampleStats, expand_shards, iter_shard, write_shard
from blip.errors import InputError
from blip.init import init_vision_from_timm
from blip.model.blip import BLIP
from blip.vision_pretrain import VisionPretrainConfig, labelled_samples, pretrain_vision, vision_pretrain_config
from blipctl.cli import app

HEADS = {"shape": 5, "color": 6, "size": 2, "position": 5}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    d = tmp_path_factory.mktemp("vp") / "w"
    demo.make_demo(d, seed=3, scale="small")
    return d


def _cfg(world, out, **kw) -> VisionPretrainConfig:
    base = dict(train=[f"{world}/objects"], val=[f"{world}/objects_val"], out=str(out), heads=HEADS, size="tiny")
    base |= dict(image_size=64, stem="conv", batch_size=32, log_every=15)
    return VisionPretrainConfig(**(base | kw))


def test_objects_split_labels_name_the_scene(world):
    stats = SampleStats()
    samples = [s for d in ("objects", "objects_val") for p in expand_shards(world / d) for s in iter_shard(p, stats)]
    assert stats.total_bad == 0 and len(samples) == 500 and len({s["key"] for s in samples}) == 500
    names = json.loads((world / "world.json").read_text())["labels"]
    assert {k: len(v) for k, v in names.items()} == HEADS
    for s in samples:
        (o,) = s["json"]["scene"]["objects"]
        assert {k: names[k][i] for k, i in s["json"]["labels"].items()} == {k: o[k] for k in HEADS}
        assert demo.caption_matches_scene(s["text"], s["json"]["scene"]) is True
    for head, classes in names.items():  # every class occurs
        assert {s["json"]["labels"][head] for s in samples} == set(range(len(classes))), head


def test_pretrain_vision_learns_and_hands_the_tower_to_vision_init(world, tmp_path):
    out = tmp_path / "vit"
    events = []
    result = pretrain_vision(_cfg(world, out, steps=45, warmup_steps=10), on_log=events.append)
    assert [e["event"] for e in events][0] == "start" and events[-1]["event"] == "end"
    assert result["data"] == {"good": result["data"]["good"], "bad": 0} and result["val_samples"] == 100
    # colour is the easy attribute: well above chance (1/6) after 45 steps (0.56 measured); every head is reported
    assert result["val_color_acc"] >= 0.4, result
    assert {f"val_{h}_acc" for h in HEADS} <= set(result)
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == [15, 30, 45] and lines[-1]["loss"] < lines[0]["loss"]

    model = BLIP(model_config("tiny", image_size=96, vision=_conv(96)))  # trained at 64 px, loaded at 96
    init_vision_from_timm(model, str(out))
    saved = load_file(str(out / "vit.safetensors"))
    own = model.visual_encoder.state_dict()
    assert set(saved) == set(own) and all(torch.equal(own[k], v) for k, v in saved.items() if k != "pos_embed")
    assert own["pos_embed"].shape == (1, 37, 256) and saved["pos_embed"].shape == (1, 17, 256)

    plain = BLIP(model_config("tiny", image_size=96))  # BLIP's patch projection, not the conv stem
    with pytest.raises(InputError, match="stem 'conv' \\(the model has 'none'\\)"):
        init_vision_from_timm(plain, str(out))
    with pytest.raises(InputError, match="holds a finished run"):
        pretrain_vision(_cfg(world, out, steps=1))
    pretrain_vision(_cfg(world, out, steps=1, overwrite=True))  # overwrite replaces it
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 1


def _conv(image_size: int):
    import dataclasses

    return dataclasses.replace(model_config("tiny", image_size=image_size).vision, stem="conv")


def _png() -> bytes:
    buf = io.BytesIO()
    demo.render({"objects": [], "background": "white"}, "x").save(buf, format="PNG")
    return buf.getvalue()


def test_bad_labels_are_skipped_and_counted_and_cls_members_read(tmp_path):
    img = _png()
    shard = tmp_path / "lab-00000.tar"
    write_shard(shard, [
        {"__key__": "ok", "png": img, "json": {"labels": {"a": 1}}},
        {"__key__": "cls", "png": img, "cls": b"2"},
        {"__key__": "range", "png": img, "json": {"labels": {"a": 3}}},
        {"__key__": "type", "png": img, "json": {"labels": {"a": "one"}}},
        {"__key__": "none", "png": img, "json": {"labels": {"b": 1}}},
        {"__key__": "badcls", "png": img, "cls": b"two"},
    ])  # fmt: skip
    stats = SampleStats()
    got = [ids for _, ids in labelled_samples([str(shard)], {"a": 3, "cls": 4}, stats)]
    assert got == [[1, -100], [-100, 2]]
    assert stats.as_dict() == {"good": 2, "bad": 4, "bad_label": 4}


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"heads": {}}, "heads: at least one head"),
        ({"heads": {"a": 1}}, "heads.a: a head needs at least 2 classes"),
        ({"heads": {"a": "5"}}, "heads.a: expected int"),
        ({"stepz": 3}, "unknown key\\(s\\) stepz"),
        ({"min_scale": 0.0}, "min_scale: must be in"),
        ({"steps": 0}, "steps: must be at least 1"),
        ({"pool": "max"}, "pool"),
    ],
)
def test_config_errors_name_the_key(change, message):
    d = {"train": ["x"], "out": "o", "heads": {"a": 2}} | change
    with pytest.raises(InputError, match=message):
        vision_pretrain_config(d)


@pytest.mark.parametrize("pool", ["cls", "mean"])
def test_heads_read_the_pooled_token(pool):
    """`cls` heads see only [CLS]; `mean` heads the mean patch token, so every patch must carry the label."""
    from blip.vision_pretrain import Classifier

    torch.manual_seed(0)
    model = Classifier(_cfg_vision(), {"a": 3}, pool).eval()
    x = torch.randn(2, 3, 32, 32)
    tokens = model.vit(x)  # (B, 1 + patches, D)
    feat = tokens[:, 0] if pool == "cls" else tokens[:, 1:].mean(1)
    torch.testing.assert_close(model(x)["a"], model.heads["a"](feat))


def _cfg_vision():
    return vision_pretrain_config({"train": ["x"], "out": "o", "heads": {"a": 3}, "image_size": 32}).vision()


def test_cli_pretrain_vision_and_its_errors(world, tmp_path):
    runner = CliRunner()
    args = ["pretrain-vision", "--data", f"{world}/objects", "--val", f"{world}/objects_val", "--out"]
    r = runner.invoke(app, [*args, str(tmp_path / "v"), "--heads", "color=6,shape=5", "size=tiny", "image_size=64",
                            "steps=2", "batch_size=8", "log_every=1"])  # fmt: skip
    assert r.exit_code == 0, r.output
    assert "tower:" in r.output and (tmp_path / "v" / "vit.safetensors").is_file()
    r = runner.invoke(app, [*args, str(tmp_path / "w"), "--heads", "color:6"])
    assert r.exit_code == 2 and "--heads" in r.output
    r = runner.invoke(app, [*args, str(tmp_path / "w"), "--heads", "color=6", "stepz=2"])
    assert r.exit_code == 2 and "stepz" in r.output
    r = runner.invoke(app, [*args, str(tmp_path / "w"), "--heads", "nothing=3", "size=tiny", "image_size=64"])
    assert r.exit_code == 2 and "no labelled samples" in r.output


def test_refuses_to_run_under_torchrun(world, tmp_path, monkeypatch):
    """Every rank would train the same tower and race on one output directory: refused, nothing written."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(InputError, match="one process"):
        pretrain_vision(_cfg(world, tmp_path / "v", steps=1))
    assert not (tmp_path / "v").exists()
