"""CapFilt for the data people have and outputs every consumer reads: image-only (img2dataset) shards, `txt` /
`json.caption` / `json.captions` consistency, the pairs layout, keep-top ranking, keep-fraction calibration."""

from __future__ import annotations

import io
import json

import pytest
import torch
from PIL import Image
from test_capfilt import micro, png
from tiny_models import sharpen, tiny_tokenizer
from typer.testing import CliRunner

from blip.checkpoint import save_checkpoint
from blip.data.shards import SampleStats, iter_shard, write_shard
from blip.model import BLIP
from blipctl.cli import app

runner = CliRunner()


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    tok = tiny_tokenizer()
    d = tmp_path_factory.mktemp("models")
    torch.manual_seed(0)
    save_checkpoint(BLIP(micro(tok, text_encoder=False)), tok, d / "captioner")
    filt = BLIP(micro(tok, text_decoder=False))
    sharpen(filt, 2.0)
    save_checkpoint(filt, tok, d / "filter")
    return d / "captioner", d / "filter"


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
