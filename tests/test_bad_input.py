"""Bad input through the real CLI: each case exits 2 with the offending option, key, file or sample named (and no
traceback), or is skipped and counted; never a crash (exit 1) or a silently wrong result (issue 18)."""

from __future__ import annotations

import io
import json
import math
import os
import re

import numpy as np
import pytest
import torch
from helpers import make_images, sharpen, tiny_tokenizer
from PIL import Image
from typer.testing import CliRunner

from blip.capfilt import CapfiltConfig
from blip.checkpoint import save_checkpoint
from blip.config import BlipConfig, TextConfig, VisionConfig
from blip.errors import InputError
from blip.generation import GenerationConfig
from blip.model import BLIP
from blipctl.cli import app

runner = CliRunner()


def cli(*args):
    return runner.invoke(app, [str(a) for a in args], catch_exceptions=False, env={"HF_HUB_OFFLINE": "1"})


def refused(r, *names: str) -> None:
    """Exit 2, every name (a regex) in the message, no traceback. A parameter name (`top_p`) may appear as the
    command's flag (`--top-p`): the CLI speaks flags."""
    assert r.exit_code == 2, r.output
    assert "Traceback" not in r.output
    # rich wraps long messages at the terminal width, at a space (words) or mid-token (paths): try both joins
    texts = (r.output.replace("\n", " "), r.output.replace("\n", ""))
    for n in names:
        flag = "--" + n.replace("_", "-") if re.fullmatch(r"[a-z_]+", n) else n
        assert any(re.search(n, t) or re.search(flag, t) for t in texts), (n, r.output)


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory, tok):
    """A micro model with encoder and decoder: a captioner and a filter at once."""
    cfg = BlipConfig(
        vision=VisionConfig(image_size=32, patch_size=8, width=32, depth=1, heads=4, mlp_dim=64),
        text=TextConfig(vocab_size=len(tok), hidden=32, layers=1, heads=4, mlp_dim=64, max_positions=64),
        embed_dim=16,
        bos_token_id=tok.bos_id,
        enc_token_id=tok.enc_id,
        pad_token_id=tok.pad_id,
        cls_token_id=tok.cls_id,
        sep_token_id=tok.sep_id,
    )
    torch.manual_seed(0)
    m = BLIP(cfg)
    sharpen(m)
    d = tmp_path_factory.mktemp("ckpt") / "model"
    save_checkpoint(m, tok, d)
    return d


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    return make_images(tmp_path_factory.mktemp("img"), n=2)


def png(seed: int, size: int = 40) -> bytes:
    arr = (np.random.default_rng(seed).random((size, size, 3)) * 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    from blip.data.shards import write_shard

    d = tmp_path_factory.mktemp("web")
    write_shard(d / "web-00000.tar", [{"__key__": f"s{i}", "png": png(i), "txt": "a red circle"} for i in range(3)])
    return d


# ---- generation and CapFilt options ------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("kw", "name"),
    [
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"top_p": math.nan}, "top_p"),
        ({"max_length": 0, "min_length": 0}, "max_length"),
        ({"min_length": 9, "max_length": 8}, "min_length"),
        ({"num_beams": 0}, "num_beams"),
        ({"temperature": 0.0}, "temperature"),
    ],
)
def test_generation_config_refuses_bad_values(kw, name):
    with pytest.raises(InputError, match=name):
        GenerationConfig(**kw)


@pytest.mark.parametrize(
    ("kw", "name"),
    [
        ({"threshold": math.nan}, "threshold"),
        ({"threshold": -0.1}, "threshold"),
        ({"threshold": 1.5}, "threshold"),
        ({"itc_threshold": math.inf}, "itc_threshold"),
        ({"top_p": 0.0}, "top_p"),
        ({"batch_size": 0}, "batch_size"),
        ({"max_length": 0}, "max_length"),
        ({"min_length": 31, "max_length": 30}, "min_length"),
    ],
)
def test_capfilt_config_refuses_bad_values(kw, name):
    with pytest.raises(InputError, match=name):
        CapfiltConfig(**kw)
    CapfiltConfig(threshold=0.0, top_p=1.0, min_length=30, max_length=30)  # the edges are fine


@pytest.mark.parametrize(
    ("args", "name"),
    [
        (["--threshold", "nan"], "threshold"),
        (["--threshold", "1.5"], "threshold"),
        (["--top-p", "0"], "top.p"),
        (["--top-p", "1.01"], "top.p"),
        (["--batch-size", "0"], "batch.size"),
        (["--max-length", "0"], "max.length"),
        (["--min-length", "12", "--max-length", "10"], "min.length"),
        (["--shard-index", "2", "--num-shards", "2"], "--shard-index"),
        (["--filter", "{tmp}/no/such/model"], "model source not found"),
    ],
)
def test_capfilt_bad_options_exit_2(args, name, shards, ckpt, tmp_path):
    out = tmp_path / "out"
    args = [a.format(tmp=tmp_path) for a in args]
    r = cli("capfilt", "--in", shards, "--out", out, "--captioner", ckpt, "--filter", ckpt, "--device", "cpu", *args)
    refused(r, name)
    assert not out.exists()  # nothing created for a run that never started


@pytest.mark.parametrize(
    ("args", "name"),
    [
        (["--sample", "--top-p", "0"], "top.p"),
        (["--sample", "--top-p", "2"], "top.p"),
        (["--batch-size", "0"], "batch.size"),
        (["--max-length", "0", "--min-length", "0"], "max.length"),
        (["--min-length", "12", "--max-length", "10"], "min.length"),
    ],
)
def test_caption_bad_options_exit_2(args, name, images, ckpt):
    refused(cli("caption", images[0], "--model", ckpt, "--device", "cpu", *args), name)


def test_caption_skips_and_counts_a_corrupt_image_in_a_directory(ckpt, tmp_path):
    """One corrupt image no longer stops every caption: the others are captioned, it is counted; --strict names it."""
    d = tmp_path / "photos"
    good = make_images(d, n=2)
    (d / "broken.jpg").write_bytes(png(0)[:60])  # a truncated file
    r = cli("caption", d, "--model", ckpt, "--device", "cpu", "--json")
    assert r.exit_code == 0, r.output
    captioned = [json.loads(ln)["image"] for ln in r.stdout.splitlines() if ln.startswith("{")]
    assert captioned == [str(p) for p in good]
    assert re.search(r"skipped.* 1 unusable images \(1 undecodable_image\)", r.output.replace("\n", " "))
    refused(cli("caption", d, "--model", ckpt, "--device", "cpu", "--strict"), re.escape(str(d / "broken.jpg")))


def test_caption_on_shards_reports_skipped_samples(ckpt, tmp_path):
    from blip.data.shards import write_shard

    samples = [{"__key__": f"s{i}", "png": png(i), "txt": "a red circle"} for i in range(2)]
    samples.append({"__key__": "bad", "png": b"not an image", "txt": "x"})
    write_shard(tmp_path / "web-00000.tar", samples)
    r = cli("caption", tmp_path / "web-00000.tar", "--model", ckpt, "--device", "cpu", "--json")
    assert r.exit_code == 0, r.output
    assert len([ln for ln in r.stdout.splitlines() if ln.startswith("{")]) == 2
    assert "1 unusable images (1 undecodable_image)" in r.output.replace("\n", " ")
    refused(cli("caption", tmp_path / "web-00000.tar", "--model", ckpt, "--device", "cpu", "--strict"), "bad")


def test_caption_top_p_edges_still_caption(images, ckpt):
    r = cli("caption", *images, "--model", ckpt, "--device", "cpu", "--sample", "--top-p", "1", "--json")
    assert r.exit_code == 0, r.output
    assert len(r.stdout.splitlines()) == 2


# ---- one malformed sample is skipped and counted, not fatal -------------------------------------------------------
DEEP = "[" * 100_000 + "]" * 100_000  # a json member nested 100,000 deep (RecursionError in json.loads)
SCENE = {"objects": [{"color": "red", "shape": "circle", "position": "left", "size": "small"}], "background": "white"}


def malformed_shard(path):
    """2 good web samples, one human sample whose captions are plain strings, and 3 with malformed json."""
    from blip.data.shards import write_shard

    good = [{"__key__": f"good{i}", "png": png(i), "txt": "a red circle", "json": {"scene": SCENE}} for i in range(2)]
    human = {"__key__": "human", "png": png(9), "txt": "x", "json": {"source": "human", "captions": ["a red circle"]}}
    bad = [
        {"__key__": "deep", "png": png(3), "txt": "a red circle", "json": DEEP},
        {"__key__": "scene_str", "png": png(4), "txt": "a red circle", "json": {"scene": "a red circle"}},
        {"__key__": "scene_objs", "png": png(5), "txt": "a red circle", "json": {"scene": {"objects": ["red"]}}},
    ]
    write_shard(path, [good[0], bad[0], human, bad[1], good[1], bad[2]])
    return path


def test_malformed_json_is_skipped_and_counted_by_the_reader(tmp_path):
    from blip.data.shards import SampleStats, iter_shard

    stats = SampleStats()
    keys = [s["key"] for s in iter_shard(malformed_shard(tmp_path / "m.tar"), stats)]
    assert keys == ["good0", "human", "good1"]
    assert stats.as_dict() == {"good": 3, "bad": 3, "bad_json": 3}
    with pytest.raises(InputError, match="'deep'.*bad_json"):
        list(iter_shard(tmp_path / "m.tar", SampleStats(), strict=True))


def test_capfilt_skips_malformed_json(tmp_path, ckpt):
    malformed_shard(tmp_path / "in" / "web-00000.tar")
    out = tmp_path / "out"
    r = cli("capfilt", "--in", tmp_path / "in", "--out", out, "--captioner", ckpt, "--filter", ckpt,
            "--threshold", "0", "--device", "cpu")  # fmt: skip
    assert r.exit_code == 0, r.output
    summary = json.loads((out / "capfilt.json").read_text())
    assert summary["images_in"] == 3 and summary["images_out"] == 3
    assert summary["bad_samples"] == {"bad_json": 3}
    assert summary["counts"]["human"] == {"in": 1, "kept": 1, "dropped": 0}


def test_pretrain_skips_malformed_json(tmp_path):
    from helpers import micro_init, read_metrics

    malformed_shard(tmp_path / "in" / "web-00000.tar")
    init = micro_init(tmp_path / "init")
    fast = ["model.image_size=32", "data.batch_size=2", "data.num_workers=0", "data.num_samples=3",
            "loss.queue_size=0", "train.log_every=1", "train.device='cpu'", "train.max_steps=2"]  # fmt: skip
    r = cli("pretrain", "--init", init, "--data", tmp_path / "in", "--out", tmp_path / "run", *fast)
    assert r.exit_code == 0, r.output
    assert any(row.get("bad_samples") for row in read_metrics(tmp_path / "run"))


# ---- training config ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("override", ["optim.lr=nan", "optim.min_lr=inf", "loss.alpha=nan", "optim.betas=[0.9, nan]",
                                      "loss.momentum=-inf", "data.min_scale=nan"])  # fmt: skip
def test_nonfinite_training_values_exit_2_naming_the_key(override, tmp_path):
    key = override.split("=")[0]
    r = cli("pretrain", "--data", tmp_path, "--out", tmp_path / "run", override)
    refused(r, re.escape(key), "finite")
    assert not (tmp_path / "run").exists()


# ---- checkpoints -------------------------------------------------------------------------------------------------
def broken_copy(ckpt, dst):
    import shutil

    shutil.copytree(ckpt, dst)
    return dst


@pytest.mark.parametrize("how", ["truncated", "garbage", "empty"])
def test_corrupt_safetensors_exit_2_naming_the_file(how, ckpt, images, tmp_path):
    d = broken_copy(ckpt, tmp_path / "m")
    w = d / "model.safetensors"
    data = w.read_bytes()
    w.write_bytes({"truncated": data[: len(data) // 2], "garbage": os.urandom(4096), "empty": b""}[how])
    refused(cli("caption", images[0], "--model", d, "--device", "cpu"), "model.safetensors")


@pytest.mark.parametrize(
    "config", ["[]", "{}", '{"format": "blipctl"}', '{"format": "blipctl", "model": 5}', '"x"', "[" * 100_000]
)
def test_bad_config_json_exit_2_naming_the_file(config, ckpt, images, tmp_path):
    d = broken_copy(ckpt, tmp_path / "m")
    (d / "config.json").write_text(config)
    refused(cli("caption", images[0], "--model", d, "--device", "cpu"), "config.json")


# ---- evaluation annotations and images ---------------------------------------------------------------------------
def annotations(d, images, records):
    import shutil

    for p in images:
        shutil.copy(p, d / p.name)
    path = d / "ann.json"
    path.write_text(json.dumps(records))
    return path


@pytest.mark.parametrize(
    ("bad", "named"),
    [
        ({"image": "img1.png", "caption": 7}, "record 1"),
        ({"image": "img1.png", "caption": None}, "record 1"),
        ({"image": "img1.png", "caption": ["a red circle", None]}, "record 1"),
        ({"image": 7, "caption": "a red circle"}, "record 1"),
    ],
)
@pytest.mark.parametrize("command", ["eval-caption", "eval-retrieval"])
def test_bad_annotation_records_exit_2_naming_file_and_record(command, bad, named, ckpt, images, tmp_path):
    ann = annotations(tmp_path, images, [{"image": "img0.png", "caption": ["a red circle"]}, bad])
    extra = ["--no-meteor"] if command == "eval-caption" else ["--k", "1"]
    r = cli(command, ann, "--model", ckpt, "--device", "cpu", *extra)
    refused(r, "ann.json", named, "caption" if "caption" in bad and not isinstance(bad["image"], int) else "image")


def bomb(path) -> None:
    """A PNG of 12000 x 12000 pixels (over Pillow's decompression-bomb limit): tiny on disk."""
    Image.new("1", (12_000, 12_000)).save(path, format="PNG")


@pytest.mark.parametrize("command", ["eval-caption", "eval-retrieval"])
@pytest.mark.parametrize("workers", ["0", "1"])
def test_decompression_bomb_eval_image_exit_2_naming_it(command, workers, ckpt, images, tmp_path):
    ann = annotations(tmp_path, images, [{"image": p.name, "caption": ["a red circle"]} for p in images])
    bomb(tmp_path / images[1].name)
    extra = ["--no-meteor"] if command == "eval-caption" else ["--k", "1"]
    r = cli(command, ann, "--model", ckpt, "--device", "cpu", "--num-workers", workers, *extra)
    refused(r, images[1].name, "absurd_size")


# ---- model sources -----------------------------------------------------------------------------------------------
def blipctl_subprocess(*args, tmp_path):
    """The real console entry, offline, with an empty Hugging Face cache (so bert-base-uncased is not there)."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf_home"), "PYTHONPATH": str(root)}
    env.pop("HF_HUB_CACHE", None)
    return subprocess.run(
        [sys.executable, "-m", "blipctl", *map(str, args)], capture_output=True, text=True, env=env, timeout=300
    )


def test_pth_without_tokenizer_offline_exit_2_asking_for_one(ckpt, images, tmp_path):
    pth = tmp_path / "alone" / "model.pth"
    assert cli("export", "--model", ckpt, "--format", "pth", "--out", pth).exit_code == 0
    r = blipctl_subprocess("caption", images[0], "--model", pth, "--device", "cpu", tmp_path=tmp_path)
    assert r.returncode == 2, r.stderr
    msg = r.stderr.replace("\n", "")
    assert "--tokenizer" in msg and "model.pth" in msg and "Traceback" not in r.stderr
    r = cli("caption", images[0], "--model", pth, "--tokenizer", ckpt, "--device", "cpu", "--json")
    assert r.exit_code == 0 and json.loads(r.stdout)["caption"]  # with the tokenizer: a real caption


@pytest.mark.parametrize("config", [{"format": "blipctl"}, {"format": "blipctl", "model": {"vision": []}}])
def test_blipctl_config_beside_a_pth_without_model_exit_2_naming_it(config, ckpt, images, tmp_path):
    """A bare .pth (no embedded config) takes its head counts from a config.json beside it; one with no usable
    `model` is named (was KeyError, exit 1)."""
    from blip.checkpoint import read_pth

    exported = tmp_path / "x.pth"
    assert cli("export", "--model", ckpt, "--format", "pth", "--out", exported).exit_code == 0
    bare = tmp_path / "bare" / "model.pth"
    bare.parent.mkdir()
    torch.save({"model": read_pth(exported)}, bare)
    (bare.parent / "config.json").write_text(json.dumps(config))
    named = re.escape(str(bare.parent / "config.json"))
    refused(cli("caption", images[0], "--model", bare, "--tokenizer", ckpt), named)


@pytest.mark.parametrize("source", ["runs/x.pth", "runs/modle", "./runs/modle", "{tmp}/runs/modle", "ckpt.safetensors"])
def test_mistyped_local_model_path_is_not_a_hub_failure(source, images, tmp_path, monkeypatch):
    (tmp_path / "runs" / "model").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    source = source.format(tmp=tmp_path)
    r = cli("caption", images[0], "--model", source)
    refused(r, "no such file or directory", re.escape(source))
    assert "hub (" not in r.output and "HF_HUB_OFFLINE" not in r.output and "cannot fetch" not in r.output


def test_export_pth_to_a_directory_exit_2(ckpt, tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "mine.txt").write_text("keep me")
    refused(cli("export", "--model", ckpt, "--format", "pth", "--out", tmp_path / "out"), "out", r"\.pth file")
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["mine.txt"]


@pytest.mark.parametrize("kind", ["directory", "shard", "text", "missing", "bomb"])
def test_score_image_that_is_not_one_image_exit_2_naming_it(kind, ckpt, shards, images, tmp_path):
    path = {
        "directory": images[0].parent,
        "shard": shards / "web-00000.tar",
        "text": tmp_path / "notes.txt",
        "missing": tmp_path / "nope.jpg",
        "bomb": tmp_path / "bomb.png",
    }[kind]
    if kind == "text":
        path.write_text("not an image")
    if kind == "bomb":
        bomb(path)
    r = cli("score", "--image", path, "--text", "a red circle", "--model", ckpt, "--device", "cpu")
    refused(r, "image", re.escape(str(path)))


def test_score_one_image_still_scores(ckpt, images):
    r = cli("score", "--image", images[0], "--text", "a red circle", "--model", ckpt, "--device", "cpu", "--json")
    assert r.exit_code == 0, r.output
    assert 0.0 <= json.loads(r.stdout)["itm"] <= 1.0
