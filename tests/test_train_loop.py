"""The training loop and tasks on a micro model and synthetic data (in-process, CPU, seconds)."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch
from helpers import (
    config_dict,
    micro_config,
    micro_init,
    micro_tokenizer,
    read_metrics,
    sharpen,
    synthetic_loader,
    synthetic_pairs,
    tiny_tokenizer,
)

import blip.tasks as tasks_mod
from blip.checkpoint import load_model, save_checkpoint
from blip.errors import InputError
from blip.losses import itc_loss, itm_loss, lm_labels, lm_loss
from blip.model.blip import BLIP
from blip.model.momentum import Momentum
from blip.train import Trainer, latest_checkpoint, lr_at, train
from blip.train_config import build_config


@pytest.fixture(scope="module")
def init_dir(tmp_path_factory):
    return micro_init(tmp_path_factory.mktemp("init") / "micro")


def _run(task, init, out, loader_batch=8, **sections):
    cfg = build_config(task, config_dict(task, init, out, **sections))
    events = []
    result = train(cfg, on_log=events.append, loader_fn=synthetic_loader(loader_batch, prompt=cfg.data.prompt))
    return result, events


@pytest.mark.parametrize(
    "task, losses, layout",
    [
        ("pretrain", ("itc_loss", "itm_loss", "lm_loss"), (True, True)),
        ("captioner", ("lm_loss",), (False, True)),
        ("filter", ("itc_loss", "itm_loss"), (True, False)),
    ],
)
def test_each_task_learns_and_saves_a_loadable_model(tmp_path, init_dir, task, losses, layout):
    out = tmp_path / task
    result, events = _run(task, init_dir, out, train={"epochs": 4})
    assert result["interrupted"] is None and result["step"] == 32
    rows = read_metrics(out)
    assert [r["step"] for r in rows] == list(range(1, 33))
    first, last = rows[:8], rows[-8:]
    for k in (*losses, "loss"):
        before, after = sum(r[k] for r in first) / 8, sum(r[k] for r in last) / 8
        assert after < before, f"{task}: {k} did not fall ({before:.4f} -> {after:.4f})"
    loaded = load_model(out)  # the final model is the output directory itself
    c = loaded.model.config
    assert (c.text_encoder, c.text_decoder) == layout
    assert c.vision.image_size == 32
    assert json.loads((out / "train_config.json").read_text())["task"] == task
    ck = latest_checkpoint(out)
    assert ck is not None and ck.name == "step_000032" and (ck / "train_state" / "state.pt").exists()
    assert load_model(ck).model.config.text_decoder == layout[1]
    kinds = {e["event"] for e in events}
    assert {"start", "log", "checkpoint", "end"} <= kinds


def test_captioner_masks_the_prompt(init_dir):
    loaded = load_model(init_dir)
    tok = loaded.tokenizer
    plen = len(tok.encode_prompt("a picture of "))
    task = tasks_mod.CaptionerTask(loaded.model.train(), prompt_length=plen)
    ids, mask = tok(["a picture of a red square", "a picture of a blue square on the left"], max_length=40)
    image = torch.randn(2, 3, 32, 32)
    got = task({"image": image, "input_ids": ids, "attention_mask": mask})["lm_loss"]
    m = loaded.model
    want = lm_loss(m.lm_logits(ids, mask, m.encode_image(image)), lm_labels(ids, mask, plen))["lm_loss"]
    assert torch.allclose(got, want, atol=1e-5)
    assert plen == 1 + len(tok.hf.tokenize("a picture of"))  # [DEC] + the prompt's word pieces
    unmasked = tasks_mod.CaptionerTask(m, prompt_length=0)({"image": image, "input_ids": ids, "attention_mask": mask})
    assert not torch.allclose(unmasked["lm_loss"], got)


@pytest.mark.parametrize("all_ranks", [False, True])
def test_pretrain_task_equals_the_original_computation(monkeypatch, all_ranks):
    """Shared cross-attention K/V (positives, negatives, decoder) gives the original's losses and gradients."""
    torch.manual_seed(0)
    tok = tiny_tokenizer()
    model = BLIP(micro_config(tok)).train()
    momentum = Momentum(model, queue_size=12)
    # a full queue (as after the first queue_size / batch steps): then every slot counts, as in the original
    feats = torch.nn.functional.normalize(torch.randn(2, 12, model.config.embed_dim), dim=-1)
    momentum.enqueue(feats[0], feats[1], torch.full((12,), -1))
    assert momentum.filled().all()
    task = tasks_mod.PretrainTask(model, momentum, {"itc": 1.0, "itm": 1.0, "lm": 1.0}, all_ranks)
    picks = []
    real = tasks_mod.sample_hard_negatives

    def spy(sim, pos, g, hardness=1.0):
        out = real(sim, pos, g, hardness)
        picks.append(out[0])
        return out

    monkeypatch.setattr(tasks_mod, "sample_hard_negatives", spy)
    images, captions, _ = synthetic_pairs(6)
    ids, mask = tok(captions, max_length=30, padding="max_length")
    idx = torch.arange(6)
    batch = {"image": images, "input_ids": ids, "attention_mask": mask, "idx": idx}
    queue = (momentum.image_queue.clone(), momentum.text_queue.clone(), momentum.idx_queue.clone())
    out = task(batch, alpha=0.4, step=3, update_momentum=False)
    out["loss"].backward()
    got_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()

    # the original: every image-text pair through its own cross-attention over copied image embeddings
    emb = model.encode_image(images)
    img_f, txt_f = model.image_features(emb), model.text_features(ids, mask)
    img_m, txt_m = momentum.features(images, ids, mask)
    img_all, txt_all = torch.cat([img_m, queue[0]]), torch.cat([txt_m, queue[1]])
    itc = itc_loss(img_f, txt_f, img_all, txt_all, idx, torch.cat([idx, queue[2]]), model.temp, img_m, txt_m, 0.4)
    neg_img, neg_txt = picks
    logits = torch.cat(
        [
            model.itm_logits(ids, mask, image_embeds=emb),
            model.itm_logits(ids[neg_txt], mask[neg_txt], image_embeds=emb),
            model.itm_logits(ids, mask, image_embeds=emb[neg_img]),
        ]
    )
    itm = itm_loss(logits, torch.tensor([1] * 6 + [0] * 12))
    lm = lm_loss(model.lm_logits(ids, mask, emb), lm_labels(ids, mask))
    for name, want in (("itc_loss", itc["itc_loss"]), ("itm_loss", itm["itm_loss"]), ("lm_loss", lm["lm_loss"])):
        assert torch.allclose(out[name], want, atol=1e-5), name
    (itc["itc_loss"] + itm["itm_loss"] + lm["lm_loss"]).backward()
    for g, p in zip(got_grads, model.parameters(), strict=True):
        assert torch.allclose(g, p.grad, atol=1e-5)
    assert not (neg_txt == torch.arange(6)).any() and not (neg_img == torch.arange(6)).any()


def _micro_with_negative_spy(monkeypatch) -> tuple:
    """A micro model, and a list that collects every (index, valid) the task's negative sampling returns."""
    torch.manual_seed(0)
    tok = tiny_tokenizer()
    picks = []
    real = tasks_mod.sample_hard_negatives
    monkeypatch.setattr(
        tasks_mod, "sample_hard_negatives", lambda s, p, g, h=1.0: picks.append(real(s, p, g, h)) or picks[-1]
    )
    return tok, BLIP(micro_config(tok)), picks


def test_filter_negatives_never_share_the_image(monkeypatch):
    tok, model, picks = _micro_with_negative_spy(monkeypatch)
    task = tasks_mod.FilterTask(model, Momentum(model, queue_size=8), {"itc": 1.0, "itm": 1.0})
    images, captions, _ = synthetic_pairs(8)
    ids, mask = tok(captions, max_length=35, padding="max_length")
    idx = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])  # two captions per image
    for step in range(20):
        out = task({"image": images, "input_ids": ids, "attention_mask": mask, "idx": idx}, alpha=0.4, step=step)
        assert torch.isfinite(out["loss"])
    for index, valid in picks:
        assert valid.all() and (idx[index] != idx).all()
    # every caption of one image: no negative exists, rows are ignored, no crash
    out = task({"image": images, "input_ids": ids, "attention_mask": mask, "idx": torch.zeros(8, dtype=torch.long)})
    assert torch.isfinite(out["loss"])


def test_word_for_word_duplicate_captions_are_never_negatives(monkeypatch):
    # web data repeats alt-texts ("stock photo"); a caption is as true of its duplicate's image as of its own
    tok, model, picks = _micro_with_negative_spy(monkeypatch)
    task = tasks_mod.PretrainTask(model, Momentum(model, queue_size=0), {"itc": 1.0, "itm": 1.0, "lm": 1.0})
    images, captions, _ = synthetic_pairs(6)
    captions = [captions[0]] * 4 + captions[4:]  # pairs 0-3 share a caption, each with its own image
    ids, mask = tok(captions, max_length=30, padding="longest")
    for step in range(20):
        task({"image": images, "input_ids": ids, "attention_mask": mask, "idx": torch.arange(6)}, 0.4, step)
    for index, valid in picks:
        assert valid.all() and (index[:4] >= 4).all()  # rows 0-3 only ever draw pairs 4 and 5
    assert {int(i) for index, _ in picks for i in index[4:]} >= {0, 1, 2, 3}  # others may draw them


def test_lr_schedules():
    pre = build_config("pretrain", {"train": {"epochs": 20}})
    assert lr_at(pre, 0, 0) == pytest.approx(1e-6)
    assert lr_at(pre, 1500, 0) == pytest.approx(1e-6 + (3e-4 - 1e-6) / 2)
    assert lr_at(pre, 3000, 0) == pytest.approx(3e-4)
    assert lr_at(pre, 9000, 3) == pytest.approx(3e-4 * 0.9**3)
    assert lr_at(pre, 10**6, 19) == pytest.approx(max(1e-6, 3e-4 * 0.9**19))
    cap = build_config("captioner", {})
    assert [lr_at(cap, 0, e) for e in range(5)] == pytest.approx(
        [1e-5 * 0.5 * (1 + math.cos(math.pi * e / 5)) for e in range(5)]
    )  # per epoch, as the original cosine_lr_schedule
    steps = build_config("filter", {"train": {"max_steps": 100}})
    assert lr_at(steps, 50, 0) == pytest.approx(0.5e-5) and lr_at(steps, 100, 9) == pytest.approx(0.0)


def test_weight_decay_groups(tmp_path, init_dir):
    cfg = build_config("pretrain", config_dict("pretrain", init_dir, tmp_path / "o"))
    tr = Trainer(cfg, _cpu_info(), None, synthetic_loader(8))
    tr.model, tr.tok = tr.build_model(None)
    opt = tr.build_optimizer()
    decay, no_decay = opt.param_groups
    names = {id(p): n for n, p in tr.model.named_parameters()}
    nd = {names[id(p)] for p in no_decay["params"]}
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    assert {"temp", "visual_encoder.pos_embed", "visual_encoder.cls_token"} <= nd
    assert "text_encoder.embeddings.position_embeddings.weight" in nd
    assert all(n.endswith(("bias", "weight")) for n in nd if "LayerNorm" in n or "norm" in n)
    assert not any(n.endswith("query.weight") for n in nd)
    total = sum(len(g["params"]) for g in opt.param_groups)
    assert total == len([p for p in tr.model.parameters() if p.requires_grad])


def test_resume_reproduces_the_uninterrupted_run(tmp_path, init_dir):
    """A run resumed from its step-k checkpoint logs the same later losses (mid-epoch and across an epoch)."""
    full = tmp_path / "full"
    _run("pretrain", init_dir, full, train={"epochs": 2, "save_every": 5, "keep_checkpoints": 0})
    resumed = tmp_path / "resumed"
    ck = full / "checkpoints" / "step_000005"
    _run("pretrain", init_dir, resumed, train={"epochs": 2, "resume": str(ck)})
    a = {r["step"]: r for r in read_metrics(full)}
    b = {r["step"]: r for r in read_metrics(resumed)}
    assert sorted(b) == list(range(6, 17))
    for step, r in b.items():
        for k in ("itc_loss", "itm_loss", "lm_loss", "loss"):
            assert abs(r[k] - a[step][k]) < 1e-5, (step, k, r[k], a[step][k])
    sa, sb = (load_model(d).model.state_dict() for d in (full, resumed))
    assert all(torch.allclose(sa[k], sb[k], atol=1e-6) for k in sa)


def test_an_existing_run_needs_resume(tmp_path, init_dir):
    from blip.errors import InputError

    out = tmp_path / "run"
    _run("captioner", init_dir, out, train={"max_steps": 2})
    with pytest.raises(InputError, match="train.resume=auto"):
        _run("captioner", init_dir, out, train={"max_steps": 2})
    result, _ = _run("captioner", init_dir, out, train={"max_steps": 3, "resume": "auto"})
    assert result["step"] == 3


def _cpu_info():
    from blip.distributed import DistInfo

    return DistInfo()


def test_accumulation_clipping_and_tensorboard_option(tmp_path, init_dir):
    import importlib.util

    out = tmp_path / "acc"
    result, events = _run(
        "captioner",
        init_dir,
        out,
        optim={"accum_steps": 2, "grad_clip": 1.0},
        train={"max_steps": 4, "tensorboard": True},
    )
    rows = read_metrics(out)
    assert result["step"] == 4 and [r["step"] for r in rows] == [1, 2, 3, 4]
    assert all(0 < r["grad_norm"] for r in rows), rows
    state = torch.load(latest_checkpoint(out) / "train_state" / "state.pt", weights_only=False)
    assert state["position"]["micro_step"] == 8 and state["position"]["batches_in_epoch"] == 8
    start = next(e for e in events if e["event"] == "start")
    assert start["global_batch"] == 16 and start["steps_per_epoch"] == 4
    warned = any("tensorboard" in e.get("message", "") for e in events if e["event"] == "warning")
    if importlib.util.find_spec("tensorboard") is None:
        assert warned  # a clear message, and the run goes on
    else:
        assert (out / "tensorboard").is_dir()


def _stem_init(out):
    """A micro pre-training model with a conv stem (BatchNorm statistics that a locked tower must keep)."""
    torch.manual_seed(0)
    tok = micro_tokenizer()
    mc = micro_config(tok)
    model = BLIP(dataclasses.replace(mc, vision=dataclasses.replace(mc.vision, stem="conv")))
    sharpen(model, 3.0, 0)
    save_checkpoint(model, tok, out)
    return out, {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("scale", [0.0, 0.5])
def test_vision_lr_scale_locks_or_slows_the_tower(tmp_path, scale):
    init, before = _stem_init(tmp_path / "init")
    out = tmp_path / "o"
    result, _ = _run("pretrain", init, out, optim={"vision_lr_scale": scale}, train={"max_steps": 4})
    assert result["step"] == 4
    after = load_model(out).model.state_dict()
    moved = {k for k in before if not torch.equal(before[k], after[k])}
    vision = {k for k in before if k.startswith("visual_encoder.")}
    assert any(k.startswith("visual_encoder.patch_embed.proj.1.running_") for k in vision)  # the stem's BatchNorm
    assert any(k.startswith("text_encoder.") for k in moved)
    if scale == 0:
        assert not moved & vision, f"a locked tower changed: {sorted(moved & vision)[:5]}"
    else:
        assert {"visual_encoder.patch_embed.proj.0.weight", "visual_encoder.blocks.0.attn.qkv.weight"} <= moved

    cfg = build_config("pretrain", config_dict("pretrain", init, tmp_path / "o2", optim={"vision_lr_scale": scale}))
    tr = Trainer(cfg, _cpu_info(), None, synthetic_loader(8))
    tr.model, tr.tok = tr.build_model(None)
    tr.optimizer = tr.build_optimizer()
    lr = tr.set_lr()
    names = {id(p): n for n, p in tr.model.named_parameters()}
    for g in tr.optimizer.param_groups:
        in_vision = {names[id(p)].startswith("visual_encoder.") for p in g["params"]}
        assert len(in_vision) == 1  # a group is all tower or all rest
        assert g["lr"] == pytest.approx(lr * (scale if in_vision.pop() else 1.0))
    trainable = [p for p in tr.model.parameters() if p.requires_grad]
    assert sum(len(g["params"]) for g in tr.optimizer.param_groups) == len(trainable)
    assert all(p.requires_grad == (scale > 0) for p in tr.model.visual_encoder.parameters())


def test_vision_lr_scale_must_not_be_negative(tmp_path, init_dir):
    with pytest.raises(InputError, match="optim.vision_lr_scale"):
        build_config("pretrain", config_dict("pretrain", init_dir, tmp_path / "o", optim={"vision_lr_scale": -1.0}))
