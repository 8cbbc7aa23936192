"""Retrieval evaluation: the original `itm_eval` metrics and scores, checked against transformers' BLIP."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import EVAL_CAPTIONS, eval_tokenizer, hf_retrieval_model, native_model, pixels

from blip.checkpoint import load_model
from blip.errors import InputError
from blip.eval.retrieval import METRIC_KEYS, recall_metrics, retrieval_scores


def itm_eval(scores_i2t, scores_t2i, txt2img, img2txt):
    """The original BLIP train_retrieval.py `itm_eval`, verbatim but for formatting (the reference)."""
    ranks = np.zeros(scores_i2t.shape[0])
    for index, score in enumerate(scores_i2t):
        inds = np.argsort(score)[::-1]
        rank = 1e20
        for i in img2txt[index]:
            tmp = np.where(inds == i)[0][0]
            if tmp < rank:
                rank = tmp
        ranks[index] = rank
    tr1 = 100.0 * len(np.where(ranks < 1)[0]) / len(ranks)
    tr5 = 100.0 * len(np.where(ranks < 5)[0]) / len(ranks)
    tr10 = 100.0 * len(np.where(ranks < 10)[0]) / len(ranks)
    ranks = np.zeros(scores_t2i.shape[0])
    for index, score in enumerate(scores_t2i):
        inds = np.argsort(score)[::-1]
        ranks[index] = np.where(inds == txt2img[index])[0][0]
    ir1 = 100.0 * len(np.where(ranks < 1)[0]) / len(ranks)
    ir5 = 100.0 * len(np.where(ranks < 5)[0]) / len(ranks)
    ir10 = 100.0 * len(np.where(ranks < 10)[0]) / len(ranks)
    tr_mean = (tr1 + tr5 + tr10) / 3
    ir_mean = (ir1 + ir5 + ir10) / 3
    r_mean = (tr_mean + ir_mean) / 2
    return {
        "txt_r1": tr1,
        "txt_r5": tr5,
        "txt_r10": tr10,
        "txt_r_mean": tr_mean,
        "img_r1": ir1,
        "img_r5": ir5,
        "img_r10": ir10,
        "img_r_mean": ir_mean,
        "r_mean": r_mean,
    }


def gt_maps(n_img: int, per_image: int):
    img2txt = [list(range(i * per_image, (i + 1) * per_image)) for i in range(n_img)]
    txt2img = [t // per_image for t in range(n_img * per_image)]
    return img2txt, txt2img


# ---- metrics -----------------------------------------------------------------------------------------------------
def test_recall_metrics_hand_computed():
    # 3 images x 2 texts each; image 0 ranks its text 1 first, image 1 its text 3 third (after 0 and 1), image 2
    # has its texts at ranks 0 and 1
    s_i2t = np.array(
        [
            [0.1, 0.9, 0.0, 0.0, 0.0, 0.0],
            [0.8, 0.7, 0.1, 0.6, 0.0, 0.0],
            [0.0, 0.0, 0.0, 0.0, 0.5, 0.6],
        ],
        dtype=np.float32,
    )
    s_t2i = np.array([[1, 0, 0], [0, 1, 0], [0, 1, 0], [0, 1, 0], [0, 0, 1], [0, 0, 1]], dtype=np.float32)
    img2txt, txt2img = gt_maps(3, 2)
    m = recall_metrics(s_i2t, s_t2i, img2txt, txt2img)
    assert list(m) == list(METRIC_KEYS)
    assert m["txt_r1"] == pytest.approx(200 / 3) and m["txt_r5"] == 100.0 and m["txt_r10"] == 100.0
    assert m["img_r1"] == pytest.approx(500 / 6) and m["img_r5"] == 100.0
    assert m == itm_eval(s_i2t, s_t2i, txt2img, img2txt)


@pytest.mark.parametrize("seed", range(5))
def test_recall_metrics_equal_itm_eval_with_ties(seed):
    rng = np.random.default_rng(seed)
    n_img, per = 23, 3
    img2txt, txt2img = gt_maps(n_img, per)
    img2txt[4] = []  # an image without ground truth: a miss in the original (rank 1e20)
    # few distinct values: many ties, including -100 for non-candidates as the real matrices have
    s_i2t = rng.integers(0, 4, (n_img, n_img * per)).astype(np.float32)
    s_i2t[rng.random(s_i2t.shape) < 0.5] = -100.0
    s_t2i = rng.integers(0, 3, (n_img * per, n_img)).astype(np.float32)
    s_t2i[rng.random(s_t2i.shape) < 0.3] = -100.0
    got = recall_metrics(s_i2t, s_t2i, img2txt, txt2img)
    assert got == itm_eval(s_i2t, s_t2i, txt2img, img2txt)  # exactly
    assert got == recall_metrics(torch.from_numpy(s_i2t), torch.from_numpy(s_t2i), img2txt, txt2img)


# ---- scores ------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tok():
    return eval_tokenizer()


@pytest.fixture(scope="module")
def hf_pair(tmp_path_factory, tok):
    """The same tiny random weights in transformers and in blipctl (loaded from the saved HF directory)."""
    d = tmp_path_factory.mktemp("hf_itm")
    ref = hf_retrieval_model(tok, seed=1)
    ref.save_pretrained(d)
    tok.hf.save_pretrained(d)
    return ref, load_model(d).model


def hf_brute_force(ref, tok, px, texts):
    """ITM logit[:, 1] + ITC cosine for every (image, text) pair, one transformers forward per image."""
    ids, mask = tok(texts)
    enc_ids = ids.clone()
    enc_ids[:, 0] = tok.enc_id  # ITM reads [ENC]; ITC keeps [CLS]
    rows = []
    with torch.no_grad():
        for i in range(px.shape[0]):
            img = px[i : i + 1].expand(len(texts), -1, -1, -1)
            itm = ref(input_ids=enc_ids, pixel_values=img, attention_mask=mask).itm_score[:, 1]
            itc = ref(input_ids=ids, pixel_values=px[i : i + 1], attention_mask=mask, use_itm_head=False).itm_score
            rows.append(itm + itc[0])
    return torch.stack(rows).numpy()  # (N_img, N_txt)


def test_full_k_equals_transformers_brute_force(hf_pair, tok):
    ref, model = hf_pair
    n_img, texts = 4, EVAL_CAPTIONS  # 8 texts, 2 per image
    px = pixels(n_img)
    want = hf_brute_force(ref, tok, px, texts)
    s_i2t, s_t2i = retrieval_scores(model, tok, px, texts, k=len(texts), image_batch_size=3, text_batch_size=5)
    assert s_i2t.shape == (4, 8) and s_t2i.shape == (8, 4)
    np.testing.assert_allclose(s_i2t, want, atol=1e-4)
    np.testing.assert_allclose(s_t2i, want.T, atol=1e-4)
    img2txt, txt2img = gt_maps(n_img, 2)
    assert recall_metrics(s_i2t, s_t2i, img2txt, txt2img) == itm_eval(want, want.T, txt2img, img2txt)


def original_evaluation(model, tok, px, texts, k):
    """The original algorithm, literally: per image its top-k texts with the image tokens repeated k times, per
    text its top-k images; ITM logit + cosine; -100 elsewhere. No K/V reuse, no pair sharing."""
    ids, mask = tok(texts, max_length=35, padding="max_length")
    with torch.no_grad():
        txt = model.text_features(ids, mask)
        feats = model.encode_image(px)
        sims = model.image_features(feats) @ txt.t()
        s_i2t = torch.full(sims.shape, -100.0)
        for i, row in enumerate(sims):
            top_sim, top_idx = row.topk(k)
            emb = feats[i].repeat(k, 1, 1)
            s_i2t[i, top_idx] = model.itm_logits(ids[top_idx], mask[top_idx], emb)[:, 1] + top_sim
        s_t2i = torch.full(sims.t().shape, -100.0)
        for t, row in enumerate(sims.t()):
            top_sim, top_idx = row.topk(k)
            emb = feats[top_idx]
            s_t2i[t, top_idx] = model.itm_logits(ids[t].repeat(k, 1), mask[t].repeat(k, 1), emb)[:, 1] + top_sim
    return s_i2t.numpy(), s_t2i.numpy()


@pytest.mark.parametrize("k", [1, 2, 3])
@pytest.mark.parametrize("pairs_per_batch", [2, 5, 512])
def test_top_k_rerank_equals_the_original_algorithm(tok, k, pairs_per_batch):
    model = native_model(tok, seed=2)
    n_img = 5
    texts = EVAL_CAPTIONS + ["a big red square", "the star on the right"]  # 10 distinct texts: no exact ITC ties
    px = pixels(n_img, seed=3)
    want_i2t, want_t2i = original_evaluation(model, tok, px, texts, k)
    got_i2t, got_t2i = retrieval_scores(model, tok, px, texts, k=k, pairs_per_batch=pairs_per_batch)
    np.testing.assert_allclose(got_i2t, want_i2t, atol=1e-5)
    np.testing.assert_allclose(got_t2i, want_t2i, atol=1e-5)
    assert (got_i2t == -100.0).sum(1).tolist() == [len(texts) - k] * n_img  # non-candidates keep -100
    img2txt, txt2img = gt_maps(n_img, 2)
    assert recall_metrics(got_i2t, got_t2i, img2txt, txt2img) == itm_eval(want_i2t, want_t2i, txt2img, img2txt)


def test_k0_ranks_every_pair_by_itc_alone(tok):
    """k=0: the ITC cosine for every pair (no ITM, no -100 entries), whatever the ITM head says."""
    model = native_model(tok, seed=6)
    px = pixels(3, seed=7)
    texts = EVAL_CAPTIONS[:6]
    s_i2t, s_t2i = retrieval_scores(model, tok, px, texts, k=0)
    with torch.no_grad():
        ids, mask = tok(texts)
        cos = F.normalize(model.image_features(model.encode_image(px)), dim=-1) @ model.text_features(ids, mask).t()
        model.itm_head.bias.add_(torch.tensor([-50.0, 50.0]))  # an ITM head that would dominate any re-ranking
    np.testing.assert_allclose(s_i2t, cos.numpy(), atol=1e-5)
    np.testing.assert_array_equal(s_t2i, s_i2t.T)
    np.testing.assert_array_equal(retrieval_scores(model, tok, px, texts, k=0)[0], s_i2t)
    assert np.all(np.abs(retrieval_scores(model, tok, px, texts, k=6)[0] - s_i2t) > 1.0)  # k > 0 adds the ITM logit
    with pytest.raises(InputError, match="k must be at least 0"):
        retrieval_scores(model, tok, px, texts, k=-1)


def test_itc_uses_cls_and_itm_uses_enc(tok):
    """Swapping the first token must not matter: the model forces [CLS] for ITC and [ENC] for ITM."""
    model = native_model(tok, seed=4)
    px = pixels(2)
    texts = EVAL_CAPTIONS[:4]
    a = retrieval_scores(model, tok, px, texts, k=4)

    class EncFirst:
        def __call__(self, texts, max_length=35):
            ids, mask = tok(texts, max_length=max_length)
            ids[:, 0] = tok.enc_id
            return ids, mask

    b = retrieval_scores(model, EncFirst(), px, texts, k=4)
    np.testing.assert_array_equal(a[0], b[0])
    with torch.no_grad():
        ids, mask = tok(texts)
        cos = F.normalize(model.image_features(model.encode_image(px)), dim=-1) @ model.text_features(ids, mask).t()
    assert np.all(np.abs(a[0] - cos.numpy()) > 1e-6)  # the ITM logit was added


def test_progress_reports_every_stage(tok):
    model = native_model(tok, seed=5)
    seen: dict[str, list[int]] = {}

    def progress(stage, n, total):
        seen.setdefault(stage, [0, total])[0] += n

    retrieval_scores(model, tok, pixels(3), EVAL_CAPTIONS[:5], k=2, image_batch_size=2, progress=progress)
    assert seen["images"] == [3, 3] and seen["texts"] == [5, 5]
    done, total = seen["pairs"]
    assert done == total and 3 * 2 <= total <= 3 * 2 + 5 * 2
