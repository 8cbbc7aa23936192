"""Word-swap ITM negatives (blip.data.swaps, `loss.word_swaps`): one word replaced by another of its class, never
by a synonym; the pre-training and filter tasks score them as one more ITM negative per pair."""

from __future__ import annotations

import random

import pytest
import torch
from helpers import micro_config, synthetic_pairs, tiny_tokenizer

import blip.tasks as tasks_mod
from blip.data.swaps import WordSwapper
from blip.errors import InputError
from blip.losses import itm_loss
from blip.model.blip import BLIP
from blip.model.momentum import Momentum
from blip.train_config import build_config

CLASSES = [["circle|disc|round", "square|box"], ["red", "blue", "green"]]


def test_one_word_is_replaced_by_another_meaning_never_a_synonym():
    swap = WordSwapper(CLASSES)
    rng = random.Random(0)
    seen = set()
    for _ in range(200):
        out = swap("a Red disc above a blue box", rng)
        before, after = "a Red disc above a blue box".split(), out.split()
        changed = [(b, a) for b, a in zip(before, after, strict=True) if b != a]
        assert len(changed) == 1, out
        b, a = changed[0]
        assert (b.lower(), a) not in {("disc", "circle"), ("disc", "round"), ("box", "square")}  # no synonyms
        assert a != b.lower()
        seen.add(changed[0])
    # every class word of the caption gets swapped sometimes, to every other meaning
    assert {("Red", "blue"), ("Red", "green"), ("disc", "square"), ("blue", "red"), ("box", "circle")} <= seen
    assert swap("a photo of a dog", rng) is None  # nothing to swap: no negative
    assert WordSwapper(CLASSES)("red disc", random.Random(3)) == WordSwapper(CLASSES)("red disc", random.Random(3))


@pytest.mark.parametrize(
    "classes, named",
    [
        ([["red"]], r"word_swaps\[0\]"),
        ([["red", "blue"], ["red", "green"]], r"word_swaps\[1\]\[0\]"),
        ([["a b", "c"]], r"\[0\]\[0\]"),
    ],
)
def test_malformed_classes_are_refused_naming_the_key(classes, named, tmp_path):
    with pytest.raises(InputError, match=named):
        WordSwapper(classes)
    with pytest.raises(InputError, match=r"loss\.word_swaps"):
        build_config("pretrain", {"loss": {"word_swaps": classes}, "train": {"out": str(tmp_path)}})
    with pytest.raises(InputError, match=r"loss\.word_swaps.*captioner"):
        build_config("captioner", {"loss": {"word_swaps": [["red", "blue"]]}, "train": {"out": str(tmp_path)}})


@pytest.mark.parametrize("task_cls", [tasks_mod.PretrainTask, tasks_mod.FilterTask])
def test_swapped_captions_are_scored_as_one_more_itm_negative(monkeypatch, task_cls):
    """The task's ITM loss equals the original three row sets plus each pair's swapped caption (label 0), scored
    over its own image; captions without a class word add no row."""
    torch.manual_seed(0)
    tok = tiny_tokenizer()
    model = BLIP(micro_config(tok)).train()
    weights = {"itc": 1.0, "itm": 1.0} | ({"lm": 1.0} if task_cls is tasks_mod.PretrainTask else {})
    task = task_cls(model, Momentum(model, queue_size=0), weights, word_swaps=[["red", "green"], ["top", "bottom"]])
    picks = []
    real = tasks_mod.sample_hard_negatives
    monkeypatch.setattr(
        tasks_mod, "sample_hard_negatives", lambda s, p, g, h=1.0: picks.append(real(s, p, g, h)) or picks[-1]
    )
    images, captions, ids_ = synthetic_pairs(6)
    captions[5] = "blue left"  # no word of either class
    raw = {"image": images, "caption": captions, "image_id": ids_, "key": [str(i) for i in range(6)]}
    data = build_config("pretrain", {"train": {"out": "x"}}).data
    batch = task.prepare(raw, tok, data, torch.device("cpu"), micro_step=3, rank=0, world=1)
    swapped = [tok.decode(r) for r in batch["swap_ids"].tolist()]
    assert batch["swap_ok"].tolist() == [True] * 5 + [False]
    for c, s in zip(captions[:5], swapped[:5], strict=True):
        assert sum(a != b for a, b in zip(c.split(), s.split(), strict=True)) == 1, (c, s)
    again = task.prepare(raw, tok, data, torch.device("cpu"), micro_step=3, rank=0, world=1)
    assert torch.equal(again["swap_ids"], batch["swap_ids"])  # a resumed run draws the same swaps

    out = task(batch, alpha=0.4, step=3, update_momentum=False)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    emb = model.encode_image(images)
    (neg_img, _), (neg_txt, _) = picks[-2:]
    logits = torch.cat(
        [
            model.itm_logits(ids, mask, image_embeds=emb),
            model.itm_logits(ids[neg_txt], mask[neg_txt], image_embeds=emb),
            model.itm_logits(ids, mask, image_embeds=emb[neg_img]),
            model.itm_logits(batch["swap_ids"][:5], batch["swap_mask"][:5], image_embeds=emb[:5]),
        ]
    )
    want = itm_loss(logits, torch.tensor([1] * 6 + [0] * 17))["itm_loss"]
    assert torch.allclose(out["itm_loss"], want, atol=1e-5)
    without = task_cls(model, Momentum(model, queue_size=0), weights)
    plain = without.prepare(raw, tok, data, torch.device("cpu"), micro_step=3, rank=0, world=1)
    assert "swap_ids" not in plain
