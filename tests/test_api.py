"""The public API (`import blip`): load any source, caption and score from PIL images, paths and tensors."""

from __future__ import annotations

import pytest
import torch
from helpers import hf_model, make_images, tiny_tokenizer
from PIL import Image

import blip
from blip.errors import InputError


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    d = tmp_path_factory.mktemp("api")
    tok = tiny_tokenizer()
    hf_model("caption", tok, d / "cap")
    hf_model("retrieval", tok, d / "ret")
    return d, make_images(d / "images")


def test_caption_takes_paths_pil_and_tensors_alike(world):
    d, images = world
    m = blip.load(d / "cap", device="cpu")
    assert m.kind == "hf" and len(m.tokenizer) > 0
    by_path = m.caption([str(p) for p in images], batch_size=2)
    pil = [Image.open(p).convert("RGB") for p in images]
    assert m.caption(pil) == by_path
    assert m.caption(torch.stack([m.transform(im) for im in pil])) == by_path
    assert all(isinstance(c, str) and c for c in by_path)
    sampled = m.caption(pil[0], sample=True, num_captions=2)
    assert len(sampled) == 1 and len(sampled[0]) == 2


def test_score_one_image_many_texts_and_pairs(world):
    d, images = world
    m = blip.load(str(d / "ret"), device="cpu")
    one = m.score(str(images[0]), ["a red circle", "a blue star"])
    assert [r["text"] for r in one] == ["a red circle", "a blue star"]
    assert all(0 <= r["itm"] <= 1 and -1 <= r["itc"] <= 1 for r in one)
    pairs = m.score([str(images[0]), str(images[1])], ["a red circle", "a blue star"])
    assert pairs[0] == pytest.approx(one[0], abs=1e-5)  # the same pair scores the same, batched or not
    assert pairs[1]["itm"] != pytest.approx(one[1]["itm"], abs=1e-6)  # another image: another score


def test_errors_name_the_parameters(world):
    d, images = world
    cap = blip.load(d / "cap", device="cpu")
    with pytest.raises(InputError, match="num_captions 4 needs num_beams") as e:
        cap.caption(str(images[0]), num_beams=3, num_captions=4)
    assert "--" not in str(e.value) and "num_beams" in e.value.params
    with pytest.raises(InputError, match="no text encoder"):
        cap.score(str(images[0]), ["x"])
    with pytest.raises(InputError, match="dtype"):
        blip.load(d / "cap", dtype="fp8")


def test_model_config_takes_token_ids_from_the_tokenizer():
    tok = tiny_tokenizer()
    c = blip.model_config("tiny", tokenizer=tok)
    assert c.text.vocab_size == len(tok)
    assert (c.pad_token_id, c.cls_token_id, c.sep_token_id, c.bos_token_id, c.enc_token_id) == (
        tok.pad_id,
        tok.cls_id,
        tok.sep_id,
        tok.bos_id,
        tok.enc_id,
    )


def test_verbs_are_callable_modules():
    import blip.eval.caption
    import blip.eval.retrieval
    import blip.train

    assert callable(blip.train) and callable(blip.eval.retrieval) and callable(blip.eval.caption)
    assert blip.capfilt.run and blip.CapfiltConfig().threshold == 0.5
