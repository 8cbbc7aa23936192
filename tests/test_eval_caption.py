"""Caption evaluation: generation for the test images and the COCO metrics, checked against pycocoevalcap."""

from __future__ import annotations

import pytest
import torch
from test_eval_common import native_model, pixels, tiny_tok

from blip.errors import InputError
from blip.eval import caption as caption_mod
from blip.eval.caption import dedup_by_image, generate_captions, score_captions
from blip.generation import GenerationConfig, generate

GT = {
    "images": [{"id": i} for i in (1, 2, 3, 4)],
    "annotations": [
        {"image_id": 1, "id": 1, "caption": "A red circle on the left."},
        {"image_id": 1, "id": 2, "caption": "a red round shape, left side"},
        {"image_id": 2, "id": 3, "caption": "Two small blue squares."},
        {"image_id": 2, "id": 4, "caption": "blue squares at the top"},
        {"image_id": 2, "id": 5, "caption": "there are two squares"},
        {"image_id": 3, "id": 6, "caption": "a green star"},
        {"image_id": 3, "id": 7, "caption": "A big green star in the middle!"},
        {"image_id": 4, "id": 8, "caption": "a yellow triangle"},
        {"image_id": 4, "id": 9, "caption": "yellow triangle on the right"},
    ],
}
RESULTS = [
    {"image_id": 1, "caption": "a red circle on the left"},
    {"image_id": 2, "caption": "two blue squares"},
    {"image_id": 3, "caption": "a green triangle in the middle"},
    {"image_id": 3, "caption": "a duplicate that must be ignored"},
    {"image_id": 4, "caption": "a yellow triangle on the right"},
]


def direct_scores(results, gt, meteor: bool):
    """pycocoevalcap's own pipeline minus SPICE, written out as COCOEvalCap.evaluate() does it."""
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.meteor.meteor import Meteor
    from pycocoevalcap.rouge.rouge import Rouge
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    firsts = {}
    for r in results:
        firsts.setdefault(r["image_id"], r)
    gts = {i: [a for a in gt["annotations"] if a["image_id"] == i] for i in firsts}
    res = {i: [r] for i, r in firsts.items()}
    gts, res = PTBTokenizer().tokenize(gts), PTBTokenizer().tokenize(res)
    out = dict(
        zip(["Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4"], Bleu(4).compute_score(gts, res, verbose=0)[0], strict=True)
    )
    if meteor:
        out["METEOR"] = Meteor().compute_score(gts, res)[0]
    out["ROUGE_L"] = Rouge().compute_score(gts, res)[0]
    out["CIDEr"] = Cider().compute_score(gts, res)[0]
    return out


def test_scores_equal_pycocoevalcap_without_meteor():
    notes = []
    got = score_captions(RESULTS, GT, meteor=False, warn=notes.append)
    want = direct_scores(RESULTS, GT, meteor=False)
    assert got == pytest.approx(want, abs=1e-12) and set(got) == set(want)
    assert 0 < got["Bleu_1"] < 1 and got["CIDEr"] > 0
    assert any("SPICE skipped" in n for n in notes)  # no CoreNLP here: skipped with a note, not a crash


@pytest.mark.slow
def test_scores_equal_pycocoevalcap_with_meteor():
    got = score_captions(RESULTS, GT, warn=lambda m: None)
    want = direct_scores(RESULTS, GT, meteor=True)
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
        score_captions([{"image_id": 99, "caption": "x"}], GT, meteor=False)
    with pytest.raises(InputError, match="annotations"):
        score_captions(RESULTS, {"images": []}, meteor=False)
    with pytest.raises(InputError, match="empty"):
        score_captions([], GT, meteor=False)
    with pytest.raises(InputError, match="SPICE cannot run"):
        score_captions(RESULTS, GT, meteor=False, spice=True)


def test_dedup_keeps_the_first_caption_per_image():
    assert dedup_by_image(RESULTS)[2] == {"image_id": 3, "caption": "a green triangle in the middle"}
    assert len(dedup_by_image(RESULTS)) == 4


def test_generate_captions_matches_generate_and_strips_the_prompt():
    tok = tiny_tok()
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
