"""Pre-training throughput (samples/s) of blipctl's training step on CPU, against the original BLIP_Pretrain.

    .venv/bin/python benchmarks/bench_pretrain.py --sizes tiny base

The same work as the original's `BLIP_Pretrain.forward` + `loss.backward()` + `optimizer.step()`: momentum
encoders (EMA update + forward), ITC against a 64-entry queue with distillation (alpha 0.4), ITM with one hard
negative image and one hard negative text per pair, LM with label smoothing; batch 8, 224 px, text padded to
30 tokens (captions of 10-20 tokens), vocabulary 30524, fp32, 2 threads, AdamW. Timed steps follow warm-up steps.

The anchors were measured with the original code (salesforce/BLIP models/blip_pretrain.py) on this CPU:
base 44.4 s/step = 0.18 samples/s; tiny (ViT depth 2 width 256, text 2 layers hidden 256, 4 heads) 4.95 samples/s.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import time

import torch

from blip.config import model_config
from blip.distributed import DistInfo
from blip.train import Trainer
from blip.train_config import build_config

ORIGINAL_SAMPLES_PER_S = {"base": 0.18, "tiny": 4.95}
VOCAB = 30524


def make_batch(batch: int, image_size: int, text_length: int, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(10, 21, (batch,), generator=g)
    ids = torch.randint(1000, 30000, (batch, text_length), generator=g)
    ids[:, 0] = 101  # [CLS]
    mask = (torch.arange(text_length)[None] < lengths[:, None]).long()
    ids[torch.arange(batch), lengths - 1] = 102  # [SEP]
    ids = ids * mask  # [PAD] = 0
    return {
        "image": torch.randn(batch, 3, image_size, image_size, generator=g),
        "input_ids": ids,
        "attention_mask": mask,
        "idx": torch.arange(batch),
    }


def bench(size: str, batch: int, image_size: int, queue: int, text_length: int, warmup: int, steps: int) -> dict:
    torch.manual_seed(0)
    cfg = build_config(
        "pretrain",
        {
            "model": {"size": size, "image_size": image_size},
            "data": {"batch_size": batch, "text_length": text_length},
            "loss": {"queue_size": queue},
            "train": {"out": "unused", "device": "cpu", "precision": "fp32"},
        },
    )
    tr = Trainer(cfg, DistInfo(), None, loader_fn=lambda **_: iter(()))
    mc = model_config(size, vocab_size=VOCAB, image_size=image_size)
    from blip.model.blip import BLIP

    tr.model = BLIP(dataclasses.replace(mc, text=dataclasses.replace(mc.text, dropout=0.0))).train()
    tr.momentum = tr.build_momentum()
    # a full queue, as the original's (whose random initial slots always count): the same ITC work
    e = mc.embed_dim
    feats = torch.nn.functional.normalize(torch.randn(2, queue, e), dim=-1)
    tr.momentum.enqueue(feats[0], feats[1], torch.full((queue,), -1))
    task = tr.build_task()
    opt = tr.build_optimizer()
    b = make_batch(batch, image_size, text_length)
    times = []
    for i in range(warmup + steps):
        t0 = time.perf_counter()
        out = task(b, alpha=0.4, step=i)
        out["loss"].backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
        print(f"  {size} step {i}: {times[-1]:.2f}s  loss {out['loss'].item():.3f}", flush=True)
    t = sum(times[warmup:]) / steps
    ours = batch / t
    orig = ORIGINAL_SAMPLES_PER_S.get(size)
    return {
        "size": size,
        "params_m": round(sum(p.numel() for p in tr.model.parameters()) / 1e6, 1),
        "s_per_step": round(t, 3),
        "samples_per_s": round(ours, 3),
        "original_samples_per_s": orig,
        "speedup": round(ours / orig, 2) if orig else None,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", nargs="+", default=["tiny", "base"])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--queue", type=int, default=64)
    ap.add_argument("--text-length", type=int, default=30)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--steps", type=int, default=3)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    print(f"torch {torch.__version__}, {platform.processor() or platform.machine()}, {a.threads} threads", flush=True)
    rows = [bench(s, a.batch, a.image_size, a.queue, a.text_length, a.warmup, a.steps) for s in a.sizes]
    for r in rows:
        print(json.dumps(r))


if __name__ == "__main__":
    main()
