"""Pre-train the vision tower alone, by classifying labelled images: BLIP's ImageNet start, for any label set.

The original BLIP never trains its ViT from nothing: it loads a ViT (DeiT-B, ViT-L) classified on ImageNet and
only then pre-trains image and text together. A tower that already tells objects apart learns the image-text
losses far faster (on the demo world: docs/demo-capfilt.md). This module is that first stage for data that has
class labels but no pre-trained ViT of the right shape (the demo world's "objects" split, a domain's own labels):

    cfg = VisionPretrainConfig(train=["objects/"], out="runs/vit", heads={"shape": 5, "color": 6})
    result = pretrain_vision(cfg, on_log=print)
    # then: blipctl pretrain ... model.vision_init=runs/vit  (model.stem, model.image_size as here)

Labels: `json.labels` = {head: class id} (several heads: one linear head each on [CLS], cross-entropies summed),
or a `cls` member with one integer (webdataset's ImageNet layout; its head is called "cls"). A sample that lacks a
head's label is not trained on for that head; one with none of them, or an id out of range, is skipped and
counted as `bad_label`.

Output (`out`): `vit.safetensors` (the ViT in timm layout, the file `model.vision_init` reads), `heads.safetensors`,
`vision_config.json` (the tower's shape and the heads), `metrics.jsonl` (one line per log step) and `result.json`
(last losses, validation accuracy per head, bad-sample counts), written last: a directory with result.json is
complete. One process, no resume: it is meant for minutes of training (for ImageNet-scale runs train the ViT with
timm's scripts and pass its weights to `model.vision_init`); a killed run starts again from step 0.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import os
import random
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from blip.atomic import temp_dir, write_json
from blip.config import VisionConfig, from_dict
from blip.data.loader import shuffled
from blip.data.shards import SampleStats, expand_shards, iter_shard
from blip.data.transforms import eval_transform, train_transform
from blip.errors import InputError
from blip.model.vit import ViT
from blip.train_setup import decay_groups
from blip.vision_pretrain_config import VisionPretrainConfig, vision_pretrain_config  # noqa: F401 - part of this API

RESULT = "result.json"
WEIGHTS = "vit.safetensors"
CONFIG = "vision_config.json"
IGNORE = -100  # F.cross_entropy's ignore_index: this sample has no label for this head

LogFn = Callable[[dict[str, Any]], None]


# ---- data --------------------------------------------------------------------------------------------------------
def _labels(sample: dict[str, Any], heads: dict[str, int]) -> list[int] | None:
    """The sample's class id per head (IGNORE where it has none); None when it has none at all or a bad one."""
    given = sample["json"].get("labels") if isinstance(sample["json"].get("labels"), dict) else {}
    if "cls" in sample:
        given = {**given, "cls": sample["cls"]}
    ids = []
    for name, n in heads.items():
        v = given.get(name)
        if v is None:
            ids.append(IGNORE)
        elif isinstance(v, int) and not isinstance(v, bool) and 0 <= v < n:
            ids.append(v)
        else:
            return None
    return ids if any(i != IGNORE for i in ids) else None


def labelled_samples(
    shards: list[str], heads: dict[str, int], stats: SampleStats, seed: int | None = None
) -> Iterator[tuple[Any, list[int]]]:
    """(PIL image, class ids) over the shards, once; with a seed, in a shard order shuffled by it."""
    paths = [p for spec in shards for p in expand_shards(spec)]
    if seed is not None:
        random.Random(seed).shuffle(paths)
    for path in paths:
        for s in iter_shard(path, stats, need_caption=False):
            ids = _labels(s, heads)
            if ids is None:  # iter_shard counted it good: its image and json are fine, its labels are not
                stats.good -= 1
                stats.add_bad("bad_label")
                continue
            yield s["image"], ids


def _batches(cfg: VisionPretrainConfig, stats: SampleStats) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Endless shuffled training batches: (B, 3, H, W) pixels and (B, heads) class ids."""
    tf = train_transform(cfg.image_size, cfg.min_scale, randaugment=False, hflip=cfg.hflip)
    rng = np.random.default_rng(cfg.seed)
    batch: list[tuple[torch.Tensor, list[int]]] = []
    for epoch in itertools.count():
        n = 0
        items = labelled_samples(cfg.train, cfg.heads, stats, seed=cfg.seed * 1000 + epoch)
        for image, ids in shuffled(items, cfg.shuffle_buffer, rng):
            n += 1
            batch.append((tf(image), ids))
            if len(batch) == cfg.batch_size:
                yield torch.stack([b[0] for b in batch]), torch.tensor([b[1] for b in batch])
                batch = []
        if n == 0:
            raise InputError(f"train: no labelled samples with heads {list(cfg.heads)} in {cfg.train}", param="train")


# ---- model and loss ----------------------------------------------------------------------------------------------
class Classifier(nn.Module):
    """A ViT with one linear head per label set on its [CLS] token (`pool="cls"`) or its mean patch token."""

    def __init__(self, vision: VisionConfig, heads: dict[str, int], pool: str = "cls"):
        super().__init__()
        self.vit = ViT(vision)
        self.pool = pool
        self.heads = nn.ModuleDict({name: nn.Linear(vision.width, n) for name, n in heads.items()})

    def forward(self, pixels: torch.Tensor) -> dict[str, torch.Tensor]:
        tokens = self.vit(pixels)  # (B, 1 + patches, D)
        feat = tokens[:, 1:].mean(1) if self.pool == "mean" else tokens[:, 0]  # (B, D)
        return {name: head(feat) for name, head in self.heads.items()}  # name -> (B, classes)


def classification_losses(logits: dict[str, torch.Tensor], labels: torch.Tensor) -> dict[str, torch.Tensor]:
    """`{<head>_loss: cross-entropy, <head>_acc: accuracy}` over the samples labelled for that head (labels: (B,
    heads), IGNORE where unlabelled), plus `loss`, the sum of the head losses."""
    out: dict[str, torch.Tensor] = {}
    total = logits[next(iter(logits))].new_zeros(())
    for j, (name, z) in enumerate(logits.items()):
        y = labels[:, j]
        known = y != IGNORE
        loss = F.cross_entropy(z, y, ignore_index=IGNORE) if known.any() else z.sum() * 0.0
        out[f"{name}_loss"] = loss
        if known.any():  # no accuracy for a head this batch has no labels for (NaN is not JSON)
            out[f"{name}_acc"] = (z.argmax(-1) == y)[known].float().mean()
        total = total + loss
    out["loss"] = total
    return out


@torch.no_grad()
def evaluate(model: Classifier, cfg: VisionPretrainConfig, device: torch.device) -> dict[str, Any]:
    """Accuracy per head on `cfg.val` (`val_<head>_acc`, `val_samples`); empty when there is no val data."""
    if not cfg.val:
        return {}
    tf, stats = eval_transform(cfg.image_size), SampleStats()
    right, seen = torch.zeros(len(cfg.heads)), torch.zeros(len(cfg.heads))
    was_training = model.training
    model.eval()
    pixels, labels = [], []

    def flush() -> None:
        z = model(torch.stack(pixels).to(device))
        y = torch.tensor(labels)
        for j, logits in enumerate(z.values()):
            known = y[:, j] != IGNORE
            right[j] += (logits.argmax(-1).cpu() == y[:, j])[known].sum()
            seen[j] += known.sum()
        pixels.clear()
        labels.clear()

    for image, ids in labelled_samples(cfg.val, cfg.heads, stats):
        pixels.append(tf(image))
        labels.append(ids)
        if len(pixels) == 256:
            flush()
    if pixels:
        flush()
    model.train(was_training)
    if not stats.good:
        raise InputError(f"val: no labelled samples with heads {list(cfg.heads)} in {cfg.val}", param="val")
    accs = {f"val_{n}_acc": round((right[j] / seen[j]).item(), 4) for j, n in enumerate(cfg.heads) if seen[j]}
    return {**accs, "val_samples": stats.good, "val_bad": stats.total_bad}


# ---- training ----------------------------------------------------------------------------------------------------
def _lr(cfg: VisionPretrainConfig, step: int) -> float:
    """Linear warm-up, then a cosine from lr to min_lr over the run."""
    cos = cfg.min_lr + (cfg.lr - cfg.min_lr) * 0.5 * (1 + math.cos(math.pi * step / cfg.steps))
    return min(1.0, (step + 1) / max(1, cfg.warmup_steps)) * cos


def _optimizer(model: nn.Module, cfg: VisionPretrainConfig) -> torch.optim.Optimizer:
    """AdamW with the training loop's decay groups (blip.train_setup.decay_groups)."""
    return torch.optim.AdamW(decay_groups(model.named_parameters(), cfg.weight_decay), lr=cfg.lr)


def _prepare_out(cfg: VisionPretrainConfig) -> Path:
    out = Path(cfg.out)
    if (out / RESULT).exists() and not cfg.overwrite:
        raise InputError(f"out: {out} holds a finished run (set overwrite to replace it)", param="out")
    if out.exists() and not out.is_dir():
        raise InputError(f"out: {out} is a file, not a directory", param="out")
    ours = (RESULT, WEIGHTS, CONFIG, "heads.safetensors", "metrics.jsonl")
    if out.is_dir() and any(p.name not in ours and not p.name.startswith(".") for p in out.iterdir()):
        raise InputError(f"out: {out} is not empty and not a vision pre-training run", param="out")
    out.mkdir(parents=True, exist_ok=True)
    (out / RESULT).unlink(missing_ok=True)
    (out / "metrics.jsonl").unlink(missing_ok=True)
    return out


def pretrain_vision(cfg: VisionPretrainConfig, on_log: LogFn | None = None) -> dict[str, Any]:
    """Train `cfg.steps` steps; write the tower (see the module docstring); return the result dict.

    `on_log` gets {"event": "start", ...}, {"event": "log", "step", "loss", "<head>_loss", "<head>_acc", "lr",
    "samples_per_s", "val_<head>_acc"...} and {"event": "end", ...}.
    """
    from safetensors.torch import save_file

    cfg = vision_pretrain_config(dataclasses.asdict(cfg))  # re-checks a config built in code
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise InputError("pretrain_vision runs in one process; start it without torchrun")
    out = _prepare_out(cfg)
    torch.manual_seed(cfg.seed)
    device = torch.device("cuda" if cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available())
                          else "cpu")  # fmt: skip
    model = Classifier(cfg.vision(), cfg.heads, cfg.pool).to(device).train()
    opt = _optimizer(model, cfg)
    stats = SampleStats()
    batches = _batches(cfg, stats)
    emit = on_log or (lambda r: None)
    params = sum(p.numel() for p in model.vit.parameters())
    emit({"event": "start", "step": 0, "total_steps": cfg.steps, "params": params, "device": str(device),
          "precision": "fp32", "world_size": 1, "global_batch": cfg.batch_size})  # fmt: skip
    last: dict[str, Any] = {}
    t0, seen = time.perf_counter(), 0
    with open(out / "metrics.jsonl", "a") as metrics:
        for step in range(cfg.steps):
            for g in opt.param_groups:
                g["lr"] = _lr(cfg, step)
            pixels, labels = next(batches)
            parts = classification_losses(model(pixels.to(device)), labels.to(device))
            opt.zero_grad(set_to_none=True)
            parts["loss"].backward()
            opt.step()
            seen += len(labels)
            if (step + 1) % cfg.log_every == 0 or step + 1 == cfg.steps:
                last = {"step": step + 1, **{k: round(v.item(), 6) for k, v in parts.items()}}
                last |= {"lr": opt.param_groups[0]["lr"], "samples_per_s": round(seen / (time.perf_counter() - t0), 3)}
                last |= evaluate(model, cfg, device)
                metrics.write(json.dumps(last) + "\n")
                metrics.flush()
                emit({"event": "log", "total_steps": cfg.steps, **last})
                t0, seen = time.perf_counter(), 0
    scratch = temp_dir(out, ".vit-")
    try:
        save_file({k: v.detach().cpu().contiguous() for k, v in model.vit.state_dict().items()}, scratch / WEIGHTS)
        heads = {k: v.detach().cpu().contiguous() for k, v in model.heads.state_dict().items()}
        save_file(heads, scratch / "heads.safetensors")
        (scratch / WEIGHTS).replace(out / WEIGHTS)
        (scratch / "heads.safetensors").replace(out / "heads.safetensors")
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    saved = {"vision": dataclasses.asdict(cfg.vision()), "heads": cfg.heads, "config": dataclasses.asdict(cfg)}
    write_json(out / CONFIG, saved)
    result = {**last, "out": str(out), "data": stats.as_dict()}
    write_json(out / RESULT, result)
    emit({"event": "end", **result})
    return result


def read_vision_config(path: str | Path) -> VisionConfig | None:
    """The VisionConfig a vision pre-training run saved in `path` (a run dir), or None when it is not one."""
    p = Path(path) / CONFIG
    if not p.is_file():
        return None
    return from_dict(VisionConfig, json.loads(p.read_text())["vision"])
