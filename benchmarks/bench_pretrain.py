"""Pre-training step time of blipctl (fp32 and bf16), and of the original BLIP_Pretrain side by side when given.

    python benchmarks/bench_pretrain.py --sizes tiny base                              # blipctl only, no ratio
    python benchmarks/bench_pretrain.py --sizes tiny base --original /tmp/orig_blip    # + the original, same run

The step is the original's `BLIP_Pretrain.forward` + `loss.backward()` + `optimizer.step()`: momentum encoders
(EMA update + forward), ITC against a full 64-entry queue with distillation (alpha 0.4), ITM with one hard
negative image and one hard negative text per pair, LM with label smoothing; batch 8, 224 px, text padded to 30
tokens (captions of 10-20 tokens), vocabulary 30524, 2 threads. blipctl uses its own AdamW (fused), the original
its pretrain.py's (torch's default). bf16 is autocast with fp32 master weights (train.precision = bf16).

`--original DIR` is an export of github.com/salesforce/BLIP (`git archive HEAD models configs`), imported
unmodified with the compatibility shims of benchmarks/original_blip.py. All measured steps alternate between the
variants (ABC, CBA, ...), so load changes on a shared machine hit every variant alike. With each time: FLOPs
counted by torch.utils.flop_counter, the rate achieved, and its fraction of the matmul roofline measured at
start in the same precision. `--profile` adds a torch.profiler table of one blipctl fp32 step per size.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import random
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import Roofline, count_flops, header, interleave, loadavg, median  # noqa: E402

from blip.config import model_config  # noqa: E402
from blip.distributed import DistInfo  # noqa: E402
from blip.precision import autocast  # noqa: E402
from blip.train import Trainer  # noqa: E402
from blip.train_config import build_config  # noqa: E402

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


def ours(size: str, a: argparse.Namespace):
    """blipctl's pre-training task and optimizer at `size`; returns step(dtype) and the batch."""
    torch.manual_seed(0)
    cfg = build_config(
        "pretrain",
        {
            "model": {"size": size, "image_size": a.image_size},
            "data": {"batch_size": a.batch, "text_length": a.text_length},
            "loss": {"queue_size": a.queue},
            "train": {"out": "unused", "device": "cpu", "precision": "fp32"},
        },
    )
    tr = Trainer(cfg, DistInfo(), None, loader_fn=lambda **_: iter(()))
    mc = model_config(size, vocab_size=VOCAB, image_size=a.image_size)
    from blip.model.blip import BLIP

    tr.model = BLIP(dataclasses.replace(mc, text=dataclasses.replace(mc.text, dropout=0.0))).train()
    tr.momentum = tr.build_momentum()
    tr.tok = None  # the pre-training task needs no tokenizer (only the captioner reads its prompt length)
    # a full queue, as the original's (whose random initial slots always count): the same ITC work
    feats = torch.nn.functional.normalize(torch.randn(2, a.queue, mc.embed_dim), dim=-1)
    tr.momentum.enqueue(feats[0], feats[1], torch.full((a.queue,), -1))
    task = tr.build_task()
    opt = tr.build_optimizer()
    b = make_batch(a.batch, a.image_size, a.text_length)
    counter = iter(range(10**9))

    def forward_backward(dtype: torch.dtype) -> float:
        with autocast("cpu", dtype):
            out = task(b, alpha=0.4, step=next(counter))
        out["loss"].backward()
        return out["loss"].item()

    def step(dtype: torch.dtype) -> float:
        loss = forward_backward(dtype)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    n_params = sum(p.numel() for p in tr.model.parameters())
    return step, forward_backward, opt, n_params


def original(size: str, a: argparse.Namespace):
    from original_blip import load_original

    torch.manual_seed(0)
    model, tok, shims = load_original(a.original, size, a.image_size, a.queue)
    opt = torch.optim.AdamW(params=model.parameters(), lr=3e-4, weight_decay=0.05)  # as the original pretrain.py
    g = torch.Generator().manual_seed(0)
    image = torch.randn(a.batch, 3, a.image_size, a.image_size, generator=g)
    rng = random.Random(0)
    caption = [" ".join(f"w{rng.randrange(29000)}" for _ in range(rng.randint(8, 18))) for _ in range(a.batch)]

    def forward_backward() -> float:
        ita, itm, lm = model(image, caption, alpha=0.4)
        loss = ita + itm + lm
        loss.backward()
        return loss.item()

    def step() -> float:
        opt.zero_grad()
        loss = forward_backward()
        opt.step()
        return loss

    return step, forward_backward, opt, shims


def profile(step, label: str, rows: int = 18) -> None:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
    print(f"\n{label}: torch.profiler, one step, top ops by self CPU time")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows))


def bench(size: str, a: argparse.Namespace, roof) -> list[dict]:
    print(f"\n== {size}: batch {a.batch}, {a.image_size} px, text {a.text_length}, queue {a.queue}", flush=True)
    step, fb, opt, n_params = ours(size, a)
    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16}
    variants = {f"blipctl {p}": (lambda p=p: step(dtypes[p])) for p in a.precisions}
    flops = {}
    fp = count_flops(lambda: fb(torch.float32))
    opt.zero_grad(set_to_none=True)
    for p in a.precisions:
        flops[f"blipctl {p}"] = fp
    if a.original:
        ostep, ofb, oopt, shims = original(size, a)
        print("original BLIP shims:\n  - " + "\n  - ".join(shims), flush=True)
        variants["original fp32"] = ostep
        flops["original fp32"] = count_flops(ofb)
        oopt.zero_grad()
    times = interleave(variants, a.reps, warmup=a.warmup)
    rows = []
    for k, ts in times.items():
        prec = k.split()[-1]
        t = median(ts)
        g = flops[k] / t / 1e9
        rows.append(
            {
                "size": size,
                "variant": k,
                "params_m": round(n_params / 1e6, 1),
                "s_per_step": round(t, 3),
                "times": [round(x, 2) for x in ts],
                "samples_per_s": round(a.batch / t, 3),
                "gflop_per_sample": round(flops[k] / a.batch / 1e9, 1),
                "gflop_per_s": round(g, 1),
                "of_roofline": None if (sh := roof.share(g, prec)) is None else round(sh, 3),
            }
        )
    print(f"\n{size} (median of {a.reps} alternating steps; load now {loadavg()}):")
    for r in rows:
        print(
            f"  {r['variant']:<16} {r['s_per_step']:7.2f} s/step  {r['samples_per_s']:7.3f} samples/s  "
            f"{r['gflop_per_sample']:6.1f} GFLOP/sample  {r['gflop_per_s']:6.1f} GFLOP/s"
            f"{roof.fraction(r['gflop_per_s'], r['variant'].split()[-1])}"
        )
    by = {r["variant"]: r for r in rows}
    if "blipctl fp32" in by and "blipctl bf16" in by:
        print(f"  bf16 vs fp32 (blipctl): {by['blipctl fp32']['s_per_step'] / by['blipctl bf16']['s_per_step']:.2f}x")
    if "original fp32" in by:
        for p in a.precisions:
            k = f"blipctl {p}"
            print(f"  {k} vs original fp32 (same run): {by['original fp32']['s_per_step'] / by[k]['s_per_step']:.2f}x")
    if a.profile:
        profile(lambda: step(torch.float32), f"blipctl fp32 {size}")
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", nargs="+", default=["tiny", "base"])
    ap.add_argument("--precisions", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"])
    ap.add_argument("--original", help="an export of github.com/salesforce/BLIP: time it side by side")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--queue", type=int, default=64)
    ap.add_argument("--text-length", type=int, default=30)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--profile", action="store_true", help="also profile one blipctl fp32 step per size")
    ap.add_argument("--json-out", help="append the rows as JSON lines to this file")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    roof = header()
    rows = [r for s in a.sizes for r in bench(s, a, roof)]
    end = Roofline.measure()
    print(f"\nat the end: load {loadavg()}; {end.line()}")
    if a.json_out:
        with open(a.json_out, "a") as f:
            for r in rows:
                row = {**r, "roofline": roof.gflops, "roofline_emulated": sorted(roof.emulated), "load_end": loadavg()}
                f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
