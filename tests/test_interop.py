"""Checkpoint interop and parity with transformers' BLIP, through the library and the real CLI."""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import hf_model, make_images, tiny_tokenizer
from typer.testing import CliRunner

from blip.checkpoint import load_model, save_checkpoint
from blip.config import BlipConfig, TextConfig, VisionConfig
from blip.data.transforms import eval_transform
from blip.model import BLIP
from blipctl.cli import app

runner = CliRunner()


def cli(*args: str):
    return runner.invoke(app, [str(a) for a in args], catch_exceptions=False)


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    return make_images(tmp_path_factory.mktemp("img"), n=3)


@pytest.fixture(scope="module")
def hf_caption(tmp_path_factory, tok):
    d = tmp_path_factory.mktemp("hf_caption")
    return d, hf_model("caption", tok, d)


@pytest.fixture(scope="module")
def hf_retrieval(tmp_path_factory, tok):
    d = tmp_path_factory.mktemp("hf_retrieval")
    return d, hf_model("retrieval", tok, d, seed=1)


def pixels(paths, size=32):
    from PIL import Image

    tf = eval_transform(size)
    return torch.stack([tf(Image.open(p).convert("RGB")) for p in paths])


def hf_captions(model, tok, px, prompt: str, num_beams: int) -> list[str]:
    ids = torch.tensor([tok.encode_prompt(prompt) + [tok.sep_id]] * px.shape[0])
    out = model.generate(pixel_values=px, input_ids=ids, num_beams=num_beams, max_length=20, min_length=5)
    n = len(tok.encode_prompt(prompt))
    return [tok.decode(r[n:].tolist()) for r in out]


def test_lm_logits_match_transformers(hf_caption, tok, images):
    d, ref = hf_caption
    m = load_model(d).model
    px = pixels(images)
    ids, mask = tok(["a red circle on the left", "a star", "big blue square"])
    dec_ids = ids.clone()
    dec_ids[:, 0] = tok.bos_id
    with torch.no_grad():
        want = ref(pixel_values=px, input_ids=dec_ids, attention_mask=mask).logits
        got = m.lm_logits(ids, mask, m.encode_image(px))
        same_text_other_images = m.lm_logits(ids[:1].repeat(3, 1), mask[:1].repeat(3, 1), m.encode_image(px))
    assert torch.allclose(got, want, atol=1e-4), (got - want).abs().max()
    # the images matter: a parity check on image-blind weights would prove little about the vision tower
    assert (same_text_other_images[0] - same_text_other_images[1]).abs().max() > 1e-2


@pytest.mark.parametrize("num_beams", [1, 3])
@pytest.mark.parametrize("prompt", ["a picture of ", ""])
def test_cli_caption_matches_transformers_generate(hf_caption, tok, images, num_beams, prompt):
    d, ref = hf_caption
    want = hf_captions(ref, tok, pixels(images), prompt, num_beams)
    r = cli("caption", *images, "--model", d, "--num-beams", num_beams, "--prompt", prompt, "--json")
    assert r.exit_code == 0, r.output
    got = [json.loads(line) for line in r.stdout.splitlines()]
    assert [g["image"] for g in got] == [str(p) for p in images]
    assert [g["caption"] for g in got] == want
    assert all(g["caption"] for g in got)


def test_itm_itc_match_transformers_through_cli(hf_retrieval, tok, images):
    d, ref = hf_retrieval
    texts = ["a red circle on the left", "a small star", "there is a big blue square at the top"]
    ids, mask = tok(texts)
    px = pixels(images[:1]).expand(len(texts), -1, -1, -1)
    enc_ids = ids.clone()
    enc_ids[:, 0] = tok.enc_id
    with torch.no_grad():
        itm = ref(input_ids=enc_ids, pixel_values=px, attention_mask=mask).itm_score.softmax(-1)[:, 1]
        itc = ref(input_ids=ids, pixel_values=px[:1], attention_mask=mask, use_itm_head=False).itm_score[0]
    m = load_model(d).model
    with torch.no_grad():
        emb = m.encode_image(px[:1])
        logits = m.itm_logits(ids, mask, emb.expand(len(texts), -1, -1))
    want_logits = ref(input_ids=enc_ids, pixel_values=px, attention_mask=mask).itm_score.detach()
    assert torch.allclose(logits, want_logits, atol=1e-4)
    args = ["score", "--model", d, "--image", images[0], "--json"]
    for t in texts:
        args += ["--text", t]
    r = cli(*args)
    assert r.exit_code == 0, r.output
    rows = [json.loads(line) for line in r.stdout.splitlines()]
    assert [row["text"] for row in rows] == texts
    assert torch.allclose(torch.tensor([row["itm"] for row in rows]), itm, atol=1e-4)
    assert torch.allclose(torch.tensor([row["itc"] for row in rows]), itc, atol=1e-4)


# ---- original .pth -----------------------------------------------------------------------------------------------
ORIGINAL_NAMES = [  # HF name -> original Salesforce name (written out here independently of blip.checkpoint)
    ("vision_model.embeddings.class_embedding", "visual_encoder.cls_token"),
    ("vision_model.embeddings.position_embedding", "visual_encoder.pos_embed"),
    ("vision_model.embeddings.patch_embedding.", "visual_encoder.patch_embed.proj."),
    ("vision_model.post_layernorm.", "visual_encoder.norm."),
    ("vision_model.encoder.layers.", "visual_encoder.blocks."),
    (".self_attn.projection.", ".attn.proj."),
    (".self_attn.qkv.", ".attn.qkv."),
    (".layer_norm1.", ".norm1."),
    (".layer_norm2.", ".norm2."),
]


def to_original(sd: dict) -> dict:
    out = {}
    for k, v in sd.items():
        for a, b in ORIGINAL_NAMES:
            k = k.replace(a, b)
        out[k] = v.clone()
    return out


def test_original_pth_gives_identical_outputs(hf_caption, tok, images, tmp_path):
    d, ref = hf_caption
    pth = tmp_path / "model_caption.pth"
    torch.save({"model": to_original(ref.state_dict()), "epoch": 3}, pth)
    tok.save(tmp_path)  # tokenizer files beside the .pth
    a, b = load_model(d).model, load_model(pth).model
    px = pixels(images)
    ids, mask = tok(["a red circle", "a star on the left"][:1] * 3)
    with torch.no_grad():  # original ViT LayerNorm eps is 1e-6 (HF configs say 1e-5): equal to ~1e-7, not bitwise
        assert torch.allclose(
            a.lm_logits(ids, mask, a.encode_image(px)), b.lm_logits(ids, mask, b.encode_image(px)), atol=1e-4
        )
    r1 = cli("caption", *images, "--model", d, "--json")
    r2 = cli("caption", *images, "--model", pth, "--json")
    assert r1.exit_code == r2.exit_code == 0
    assert r1.stdout == r2.stdout


def test_original_pth_retrieval_with_tokenizer_flag(hf_retrieval, tok, images, tmp_path):
    d, ref = hf_retrieval
    pth = tmp_path / "elsewhere" / "model_retrieval.pth"
    pth.parent.mkdir()
    torch.save({"model": to_original(ref.state_dict())}, pth)
    tokdir = tmp_path / "tok"
    tok.save(tokdir)
    base = ["score", "--image", images[0], "--text", "a red circle", "--text", "a star", "--json"]
    r1, r2 = cli(*base, "--model", d), cli(*base, "--model", pth, "--tokenizer", tokdir)
    assert r1.exit_code == r2.exit_code == 0, r2.output
    for x, y in zip(r1.stdout.splitlines(), r2.stdout.splitlines(), strict=True):
        x, y = json.loads(x), json.loads(y)
        assert x["text"] == y["text"]
        assert abs(x["itm"] - y["itm"]) < 1e-4 and abs(x["itc"] - y["itc"]) < 1e-4


class _Evil:
    def __reduce__(self):
        return (os.system, ("touch /tmp/blipctl_pwned_marker",))


def test_pth_that_would_run_code_is_refused(tmp_path, images):
    marker = Path("/tmp/blipctl_pwned_marker")
    marker.unlink(missing_ok=True)
    bad = tmp_path / "evil.pth"
    with open(bad, "wb") as f:
        pickle.dump({"model": _Evil()}, f)
    r = subprocess.run(
        [sys.executable, "-m", "blipctl", "caption", str(images[0]), "--model", str(bad)],
        capture_output=True,
        text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert r.returncode == 2, r.stderr
    assert "refusing" in r.stderr and "evil.pth" in r.stderr
    assert "Traceback" not in r.stderr
    assert not marker.exists()


def test_hub_id_offline_fails_fast_with_advice(images):
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "blipctl",
            "caption",
            str(images[0]),
            "--model",
            "Salesforce/blip-image-captioning-base",
        ],
        capture_output=True,
        text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
        timeout=60,
    )
    assert r.returncode == 2
    assert "pass DIR instead of the hub id" in " ".join(r.stderr.split()) and "Traceback" not in r.stderr


def test_missing_model_path_exit_2(images):
    r = cli("caption", images[0], "--model", "/nonexistent/model_dir")
    assert r.exit_code == 2 and "not found" in r.output


# ---- export round trip -------------------------------------------------------------------------------------------
def micro_config(tok, **kw) -> BlipConfig:
    return BlipConfig(
        vision=VisionConfig(image_size=32, patch_size=8, width=32, depth=2, heads=4, mlp_dim=64),
        text=TextConfig(vocab_size=len(tok), hidden=32, layers=2, heads=4, mlp_dim=64, max_positions=64),
        embed_dim=16,
        bos_token_id=tok.bos_id,
        enc_token_id=tok.enc_id,
        pad_token_id=tok.pad_id,
        cls_token_id=tok.cls_id,
        sep_token_id=tok.sep_id,
        **kw,
    )


@pytest.fixture(scope="module")
def native_ckpt(tmp_path_factory, tok):
    from helpers import sharpen

    torch.manual_seed(0)
    m = BLIP(micro_config(tok))
    sharpen(m)
    d = tmp_path_factory.mktemp("native") / "ckpt"
    save_checkpoint(m, tok, d)
    return d


def test_native_checkpoint_round_trip_keeps_sharing(native_ckpt):
    m = load_model(native_ckpt).model
    assert m.shares_text
    enc, dec = m.text_encoder.encoder.layer[0], m.text_decoder.bert.encoder.layer[0]
    assert enc.crossattention is dec.crossattention and enc.attention is not dec.attention
    assert m.text_decoder.cls.predictions.decoder.weight is m.text_encoder.embeddings.word_embeddings.weight


def test_export_hf_caption_round_trip(native_ckpt, tok, images, tmp_path):
    from transformers import BlipForConditionalGeneration

    out = tmp_path / "hf"
    r = cli("export", "--model", native_ckpt, "--format", "hf", "--out", out)
    assert r.exit_code == 0, r.output
    hf = BlipForConditionalGeneration.from_pretrained(out).eval()
    want = hf_captions(hf, tok, pixels(images), "a picture of ", 3)
    r = cli("caption", *images, "--model", native_ckpt, "--json")
    assert [json.loads(x)["caption"] for x in r.stdout.splitlines()] == want
    r = cli("caption", *images, "--model", out, "--json")  # and the exported dir loads back in blipctl
    assert [json.loads(x)["caption"] for x in r.stdout.splitlines()] == want


def test_export_hf_retrieval_round_trip(native_ckpt, tok, images, tmp_path):
    from transformers import BlipForImageTextRetrieval

    out = tmp_path / "hf_itm"
    assert cli("export", "--model", native_ckpt, "--format", "hf", "--task", "retrieval", "--out", out).exit_code == 0
    hf = BlipForImageTextRetrieval.from_pretrained(out).eval()
    m = load_model(native_ckpt).model
    ids, mask = tok(["a red circle", "a big star on the left"])
    px = pixels(images[:2])
    enc_ids = ids.clone()
    enc_ids[:, 0] = tok.enc_id
    with torch.no_grad():
        want = hf(input_ids=enc_ids, pixel_values=px, attention_mask=mask).itm_score
        got = m.itm_logits(ids, mask, m.encode_image(px))
    assert torch.allclose(got, want, atol=1e-4)


def test_export_pth_round_trip(native_ckpt, tok, tmp_path, images):
    pth = tmp_path / "orig.pth"
    assert cli("export", "--model", native_ckpt, "--format", "pth", "--out", pth).exit_code == 0
    sd = torch.load(pth, weights_only=True)["model"]
    assert "visual_encoder.blocks.0.attn.qkv.weight" in sd and "text_decoder.cls.predictions.bias" in sd
    r1 = cli("caption", *images, "--model", native_ckpt, "--json")
    r2 = cli("caption", *images, "--model", pth, "--tokenizer", native_ckpt, "--json")
    assert r1.stdout == r2.stdout


def test_image_size_interpolation(native_ckpt, images):
    m = load_model(native_ckpt, image_size=48).model
    assert m.visual_encoder.pos_embed.shape[1] == 1 + 36
    r = cli("caption", *images[:1], "--model", native_ckpt, "--image-size", "48", "--json")
    assert r.exit_code == 0 and json.loads(r.stdout)["caption"]


# ---- a vision tower with a convolutional stem: native only -------------------------------------------------------
def stem_config(tok, patch_size: int = 8, image_size: int = 32) -> BlipConfig:
    import dataclasses

    c = micro_config(tok)
    return dataclasses.replace(
        c, vision=dataclasses.replace(c.vision, stem="conv", patch_size=patch_size, image_size=image_size)
    )


@pytest.fixture(scope="module")
def stem_ckpt(tmp_path_factory, tok, images):
    torch.manual_seed(0)
    m = BLIP(stem_config(tok))
    m.train()
    with torch.no_grad():
        m.encode_image(torch.randn(4, 3, 32, 32) + 0.5)  # move BatchNorm's running statistics off their init
    m.eval()
    d = tmp_path_factory.mktemp("stem") / "ckpt"
    save_checkpoint(m, tok, d)
    with torch.no_grad():
        want = m.encode_image(pixels(images))
    return d, want


def test_stem_model_round_trips_natively(stem_ckpt, images):
    d, want = stem_ckpt
    assert json.loads((d / "config.json").read_text())["model"]["vision"]["stem"] == "conv"
    m = load_model(d).model.eval()
    stem = m.visual_encoder.patch_embed.proj
    assert sum(isinstance(x, torch.nn.BatchNorm2d) for x in stem) == 3  # log2(8) stride-2 stages
    assert stem[1].running_mean.abs().sum() > 0  # buffers saved and loaded, not re-initialised
    with torch.no_grad():
        got = m.encode_image(pixels(images))
    assert got.shape == (3, 1 + 16, 32)
    assert torch.allclose(got, want, atol=1e-6)


@pytest.mark.parametrize("fmt", ["hf", "pth"])
def test_export_of_stem_model_is_refused(stem_ckpt, tmp_path, fmt):
    out = tmp_path / ("out.pth" if fmt == "pth" else "out")
    r = cli("export", "--model", stem_ckpt[0], "--format", fmt, "--out", out)
    assert r.exit_code == 2, r.output
    assert "stem" in r.output and "no place for one" in r.output
    assert list(tmp_path.iterdir()) == []  # nothing written, not even a temporary


def test_stem_needs_power_of_two_patches(tok):
    from blip.errors import InputError

    with pytest.raises(InputError, match="power-of-two patch_size"):
        BLIP(stem_config(tok, patch_size=12, image_size=36))
