"""Losses: ITC against a direct formula, the hard-negative sampler's guarantees, LM masking."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from blip.losses import itc_loss, itm_loss, lm_labels, lm_loss, sample_hard_negatives, total_loss


def unit(n, e, seed):
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(n, e, generator=g), dim=1)


def test_itc_equals_direct_formula_with_queue_and_distillation():
    B, Q, E, temp, alpha = 4, 6, 8, 0.07, 0.4
    img, txt, img_m, txt_m = unit(B, E, 0), unit(B, E, 1), unit(B, E, 2), unit(B, E, 3)
    img_q, txt_q = unit(Q, E, 4), unit(Q, E, 5)
    img_all, txt_all = torch.cat([img_m, img_q]), torch.cat([txt_m, txt_q])
    idx = torch.arange(B)
    idx_all = torch.cat([idx, torch.full((Q,), -1)])
    got = itc_loss(img, txt, img_all, txt_all, idx, idx_all, torch.tensor(temp), img_m, txt_m, alpha)["itc_loss"]
    # direct, element by element, as the original BLIP_Pretrain
    total = 0.0
    for direction in ("i2t", "t2i"):
        q, cands, qm = (img, txt_all, img_m) if direction == "i2t" else (txt, img_all, txt_m)
        for i in range(B):
            logits = [float(q[i] @ c) / temp for c in cands]
            logits_m = [float(qm[i] @ c) / temp for c in cands]
            zm = sum(math.exp(v) for v in logits_m)
            z = math.log(sum(math.exp(v) for v in logits))
            for j in range(B + Q):
                target = alpha * math.exp(logits_m[j]) / zm + (1 - alpha) * (1.0 if j == i else 0.0)
                total -= target * (logits[j] - z)
    want = total / B / 2
    assert abs(float(got) - want) < 1e-4


def test_itc_multi_positive_by_image_id():
    img, txt = unit(4, 8, 0), unit(4, 8, 1)
    idx = torch.tensor([7, 7, 3, 5])
    out = itc_loss(img, txt, img, txt, idx, idx, torch.tensor(0.1))["itc_loss"]
    sim = img @ txt.T / 0.1
    pos = (idx[:, None] == idx[None]).float()
    tgt = pos / pos.sum(1, keepdim=True)
    want = (-(F.log_softmax(sim, 1) * tgt).sum(1).mean() - (F.log_softmax(sim.T, 1) * tgt).sum(1).mean()) / 2
    assert torch.allclose(out, want, atol=1e-6)


def test_hard_negative_never_positive_and_follows_similarity():
    g = torch.Generator().manual_seed(0)
    sim = torch.tensor([[0.0, 10.0, 0.0, 0.0]]).repeat(4, 1)
    pos = torch.eye(4, dtype=torch.bool)
    picks = torch.stack([sample_hard_negatives(sim, pos, g)[0] for _ in range(200)])  # (200, 4)
    assert not (picks == torch.arange(4)).any()
    assert (picks[:, 0] == 1).float().mean() > 0.95  # the hard negative dominates
    assert (picks[:, 1] != 1).all()


def test_hard_negative_survives_degenerate_rows():
    g = torch.Generator().manual_seed(0)
    B = 5
    for sim in (
        torch.zeros(B, B),
        torch.full((B, B), float("nan")),
        torch.full((B, B), float("inf")),
        torch.full((B, B), -1e30),
        torch.randn(B, B) * 1e6,
    ):
        idx, valid = sample_hard_negatives(sim, torch.eye(B, dtype=torch.bool), g)
        assert valid.all() and not (idx == torch.arange(B)).any()
    # every sample is the same image: no negative exists anywhere -> invalid, no crash
    idx, valid = sample_hard_negatives(torch.randn(3, 3), torch.ones(3, 3, dtype=torch.bool), g)
    assert not valid.any()
    # mixed: row 0 has only positives, the others have negatives
    pos = torch.tensor([[1, 1, 1], [0, 1, 0], [0, 0, 1]], dtype=torch.bool)
    idx, valid = sample_hard_negatives(torch.zeros(3, 3), pos, g)
    assert valid.tolist() == [False, True, True] and not pos[torch.arange(3), idx][1:].any()


def test_itm_loss_ignores_invalid_rows():
    logits = torch.tensor([[0.0, 5.0], [5.0, 0.0], [100.0, -100.0]])
    labels = torch.tensor([1, 0, -100])
    out = itm_loss(logits, labels)
    assert torch.allclose(out["itm_loss"], F.cross_entropy(logits[:2], labels[:2]))
    assert float(out["itm_acc"]) == 1.0


def test_lm_loss_ignores_prompt_and_padding():
    torch.manual_seed(0)
    ids = torch.tensor([[9, 4, 5, 6, 7, 3, 0, 0], [9, 4, 5, 6, 8, 8, 8, 3]])
    mask = (ids != 0).long()
    labels = lm_labels(ids, mask, prompt_length=4)
    logits = torch.randn(2, 8, 12, requires_grad=True)
    loss = lm_loss(logits, labels, label_smoothing=0.1)["lm_loss"]
    loss.backward()
    # only the positions that predict a real caption token get gradient: targets 4..(len-1)
    predicts = logits.grad.abs().sum(-1) > 0  # (B, L): position t predicts token t+1
    assert predicts[0].tolist() == [False, False, False, True, True, False, False, False]
    assert predicts[1].tolist() == [False, False, False, True, True, True, True, False]
    # and equals the explicit mean over those targets
    sel = [(0, 3, 7), (0, 4, 3), (1, 3, 8), (1, 4, 8), (1, 5, 8), (1, 6, 3)]
    want = torch.stack([F.cross_entropy(logits[b, t][None], torch.tensor([y]), label_smoothing=0.1) for b, t, y in sel])
    assert torch.allclose(loss, want.mean(), atol=1e-6)


def test_total_loss_sums_only_loss_keys():
    parts = {"itc_loss": torch.tensor(1.0), "itm_loss": torch.tensor(2.0), "itm_acc": torch.tensor(9.0)}
    assert float(total_loss(parts)) == 3.0
    assert float(total_loss(parts, {"itm_loss": 0.5})) == 2.0


def test_itc_leaves_out_unfilled_queue_slots_exactly():
    B, Q, E, alpha = 4, 6, 8, 0.4
    img, txt, img_m, txt_m = unit(B, E, 0), unit(B, E, 1), unit(B, E, 2), unit(B, E, 3)
    img_q, txt_q = unit(Q, E, 4), unit(Q, E, 5)
    idx = torch.arange(B)
    idx_all = torch.cat([idx, torch.full((Q,), -1)])
    valid = torch.tensor([True] * B + [True, True, False, False, False, False])
    temp = torch.tensor(0.07)
    img_all, txt_all = torch.cat([img_m, img_q]), torch.cat([txt_m, txt_q])
    got = itc_loss(img, txt, img_all, txt_all, idx, idx_all, temp, img_m, txt_m, alpha, valid)["itc_loss"]
    keep = valid.nonzero().squeeze(1)
    want = itc_loss(img, txt, img_all[keep], txt_all[keep], idx, idx_all[keep], temp, img_m, txt_m, alpha)["itc_loss"]
    assert torch.isfinite(got) and torch.allclose(got, want, atol=1e-6)
    everything = itc_loss(img, txt, img_all, txt_all, idx, idx_all, temp, img_m, txt_m, alpha)["itc_loss"]
    assert not torch.allclose(got, everything, atol=1e-3)  # the random slots did count before


def test_momentum_queue_tracks_filled_slots_and_size_zero_is_in_batch_only():
    from blip.config import model_config
    from blip.model.blip import BLIP
    from blip.model.momentum import Momentum

    model = BLIP(model_config("tiny", vocab_size=64, image_size=32))
    q = Momentum(model, queue_size=5)
    assert not q.filled().any()
    q.enqueue(unit(3, 256, 0), unit(3, 256, 1), torch.arange(3))
    assert q.filled().tolist() == [True, True, True, False, False]
    q.enqueue(unit(3, 256, 2), unit(3, 256, 3), torch.arange(3))
    assert q.filled().all() and int(q.queue_ptr) == 1
    empty = Momentum(model, queue_size=0)
    empty.enqueue(unit(3, 256, 0), unit(3, 256, 1), torch.arange(3))
    assert empty.image_queue.shape == (0, 256) and empty.filled().shape == (0,)


def test_hardness_zero_draws_negatives_uniformly_and_one_follows_similarity():
    sim = torch.tensor([[0.0, 30.0, 0.0, 0.0]]).repeat(4000, 1)  # column 1 is by far the "hardest"
    pos = torch.zeros_like(sim, dtype=torch.bool)
    pos[:, 0] = True
    g = torch.Generator().manual_seed(0)
    hard, _ = sample_hard_negatives(sim, pos, g)
    assert (hard == 1).all()
    uniform, ok = sample_hard_negatives(sim, pos, g, hardness=0.0)
    counts = torch.bincount(uniform, minlength=4)
    assert counts[0] == 0 and ok.all()
    assert all(abs(int(c) - 4000 / 3) < 150 for c in counts[1:]), counts
