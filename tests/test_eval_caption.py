"""Caption evaluation: generation for the test images and the COCO metrics, checked against pycocoevalcap."""

from __future__ import annotations

import pytest
import torch
from helpers import CAPTION_GT, CAPTION_RESULTS, direct_scores, eval_tokenizer, native_model, pixels

from blip.errors import InputError
from blip.eval import caption as caption_mod
from blip.eval.caption import dedup_by_image, generate_captions, score_captions
from blip.generation import GenerationConfig, generate


def test_scores_equal_pycocoevalcap_without_meteor():
    notes = []
    got = score_captions(CAPTION_RESULTS, CAPTION_GT, meteor=False, warn=notes.append)
    want = direct_scores(CAPTION_RESULTS, CAPTION_GT, meteor=False)
    assert got == pytest.approx(want, abs=1e-12) and set(got) == set(want)
    assert 0 < got["Bleu_1"] < 1 and got["CIDEr"] > 0
    assert any("SPICE skipped" in n for n in notes)  # no CoreNLP here: skipped with a note, not a crash


@pytest.mark.slow
def test_scores_equal_pycocoevalcap_with_meteor():
    got = score_captions(CAPTION_RESULTS, CAPTION_GT, warn=lambda m: None)
    want = direct_scores(CAPTION_RESULTS, CAPTION_GT, meteor=True)
    assert got == pytest.approx(want, abs=1e-12) and set(got) == set(want)
    assert 0 < got["METEOR"] < 1


def test_without_java_meteor_is_skipped_with_a_warning(monkeypatch):
    monkeypatch.setattr(caption_mod.shutil, "which", lambda name: None)
    notes = []
    # already PTB-clean captions: the Python fallback tokenizer gives the same tokens as the PTB tokenizer
    gt = {"annotations": [{"image_id": 1, "caption": "a red circle"}, {"image_id": 2, "caption": "two blue squares"}]}
    res = [{"image_id": 1, "caption": "a red circle"}, {"image_id": 2, "caption": "two squares"}]
    got = score_captions(res, gt, warn=notes.append)
    assert "METEOR" not in got and "SPICE" not in got
    assert any("METEOR skipped" in n for n in notes)
    want = direct_scores(res, gt, meteor=False)
    assert got == pytest.approx(want, abs=1e-12)


def test_fallback_tokenizer_agrees_with_ptb_on_caption_like_text():
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    caps = {
        1: [{"caption": "A dog's ball, isn't it? Yes... (red)"}],
        2: [{"caption": 'The "big" cat-dog [sits] on {a} mat; 3.5 m away.'}],
        3: [{"caption": "A man riding a wave on top of a surfboard."}, {"caption": "Two giraffes: tall & hungry!"}],
    }
    assert caption_mod._simple_tokenize(caps) == PTBTokenizer().tokenize(caps)


def test_bad_inputs_name_the_problem():
    with pytest.raises(InputError, match="not in the ground truth"):
        score_captions([{"image_id": 99, "caption": "x"}], CAPTION_GT, meteor=False)
    with pytest.raises(InputError, match="annotations"):
        score_captions(CAPTION_RESULTS, {"images": []}, meteor=False)
    with pytest.raises(InputError, match="empty"):
        score_captions([], CAPTION_GT, meteor=False)
    with pytest.raises(InputError, match="SPICE cannot run"):
        score_captions(CAPTION_RESULTS, CAPTION_GT, meteor=False, spice=True)


def test_dedup_keeps_the_first_caption_per_image():
    assert dedup_by_image(CAPTION_RESULTS)[2] == {"image_id": 3, "caption": "a green triangle in the middle"}
    assert len(dedup_by_image(CAPTION_RESULTS)) == 4


def test_generate_captions_matches_generate_and_strips_the_prompt():
    tok = eval_tokenizer()
    model = native_model(tok, seed=7)
    px = pixels(5, seed=1)
    ids = [10, 11, 12, 11, 13]  # image 11 twice (as a padded distributed sampler would produce): kept once
    seen = []
    got = generate_captions(
        model, tok, px, ids, batch_size=2, progress=lambda stage, n, total: seen.append((stage, n, total))
    )
    prompt = tok.encode_prompt("a picture of ")
    with torch.no_grad():
        out = generate(
            model, model.encode_image(px), prompt, GenerationConfig(num_beams=3, max_length=20, min_length=5)
        )
    want = [tok.decode(c[0]) for c in out]
    assert got == [{"image_id": i, "caption": want[j]} for j, i in enumerate(ids) if j != 3]
    assert all(not c["caption"].startswith("a picture of") for c in got)
    assert seen == [("captions", 0, 5), ("captions", 2, 5), ("captions", 2, 5), ("captions", 1, 5)]
