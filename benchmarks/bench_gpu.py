"""GPU throughput: pre-training step, CapFilt and retrieval at base size, bf16, with MFU and peak memory.

    python benchmarks/bench_gpu.py                           # CUDA: base, batch 75 (the original's per-GPU batch)
    python benchmarks/bench_gpu.py --compile --grad-ckpt 4   # + torch.compile of the blocks, checkpoint 4 ViT blocks
    python benchmarks/bench_gpu.py --smoke                   # CPU, tiny model, a few seconds (run by the tests)

Pre-training: blipctl's step (momentum encoders, ITC with a 57600 queue, ITM hard negatives, LM), bf16 autocast
with fp32 master weights, fused AdamW, optional activation checkpointing of the last N ViT blocks
(model.grad_ckpt_layers) and torch.compile (model.compile). CapFilt: nucleus-sampled captions + ITM/ITC filter
(blip.capfilt.Bootstrapper) at 384 px. Retrieval: the ITC + ITM re-ranking evaluation (blip.eval.retrieval).

Each line: samples/s, achieved TFLOP/s (FLOPs from torch.utils.flop_counter: matmul/conv/attention), MFU against
the device's bf16 dense peak (a table of known GPUs, or --peak-tflops; on CPU the measured bf16 matmul roofline),
and peak memory. The machine line and a measured bf16 matmul roofline come first.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import resource
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import Roofline, count_flops, loadavg, machine_line  # noqa: E402

BF16_PEAK_TFLOPS = {  # dense bf16 tensor-core peak (vendor datasheets, without sparsity)
    "H200": 989.0,
    "H100 SXM": 989.0,
    "H100 80GB HBM3": 989.0,
    "H100 PCIe": 756.0,
    "H100 NVL": 835.0,
    "GH200": 989.0,
    "B200": 2250.0,
    "A100": 312.0,
    "A10G": 70.0,
    "A10": 125.0,
    "L40S": 362.0,
    "L4": 121.0,
    "RTX 4090": 165.0,
    "RTX 3090": 71.0,
}


def peak_tflops(device: torch.device, override: float | None, roof: Roofline) -> tuple[float, str]:
    if override:
        return override, "given"
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for k in sorted(BF16_PEAK_TFLOPS, key=len, reverse=True):
            if k in name:
                return BF16_PEAK_TFLOPS[k], f"datasheet ({k})"
        return roof.gflops["bf16"] / 1e3, "measured matmul (unknown GPU)"
    if "bf16" in roof.emulated:
        return roof.gflops["bf16"] / 1e3, "measured bf16 matmul, emulated on this CPU: the MFU means little"
    return roof.gflops["bf16"] / 1e3, "measured bf16 matmul roofline (CPU)"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_memory_gib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB (process peak RSS)


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def timed(fn, device: torch.device, warmup: int, reps: int) -> float:
    for _ in range(warmup):
        fn()
    sync(device)
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    sync(device)
    return (time.perf_counter() - t0) / reps


def report(what: str, n: int, unit: str, seconds: float, flops: int, peak: float, device, extra: str = "") -> dict:
    tflops = flops / seconds / 1e12
    row = {
        "what": what,
        f"{unit}_per_s": round(n / seconds, 2),
        "s_per_call": round(seconds, 4),
        "tflop_per_s": round(tflops, 6),
        "mfu": round(tflops / peak, 4),
        "peak_mem_gib": round(peak_memory_gib(device), 2),
    }
    print(
        f"{what:<34} {n / seconds:9.2f} {unit}/s  {tflops:8.3f} TFLOP/s  MFU {tflops / peak:6.1%}  "
        f"peak mem {row['peak_mem_gib']:.2f} GiB {extra}",
        flush=True,
    )
    return row


def tokenizer(d: Path):
    from blip.tokenizer import Tokenizer

    specials = ["[PAD]"] + [f"[unused{i}]" for i in range(99)] + ["[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    (d / "vocab.txt").write_text("\n".join(specials + [f"w{i}" for i in range(30522 - len(specials))]) + "\n")
    return Tokenizer.from_pretrained(d)


# ---- pre-training -------------------------------------------------------------------------------------------------
def bench_pretrain(a, device, peak) -> dict:
    from blip.config import model_config
    from blip.distributed import DistInfo
    from blip.model.blip import BLIP
    from blip.precision import autocast
    from blip.train import Trainer
    from blip.train_config import build_config

    B, S, L = a.batch, a.image_size, 30
    cfg = build_config(
        "pretrain",
        {
            "model": {"size": a.size, "image_size": S, "grad_ckpt_layers": a.grad_ckpt, "compile": a.compile},
            "data": {"batch_size": B, "text_length": L},
            "loss": {"queue_size": a.queue},
            "optim": {"impl": "fused"},
            "train": {"out": "unused", "device": device.type, "precision": "bf16"},
        },
    )
    tr = Trainer(cfg, DistInfo(device=device), None, loader_fn=lambda **_: iter(()))
    mc = model_config(a.size, vocab_size=30524, image_size=S)
    mc = dataclasses.replace(mc, vision=dataclasses.replace(mc.vision, grad_ckpt_layers=a.grad_ckpt))
    torch.manual_seed(0)
    tr.model = BLIP(mc).to(device).train()
    tr.momentum = tr.build_momentum()
    tr.tok = None  # the pre-training task needs no tokenizer (only the captioner reads its prompt length)
    task = tr.build_task()
    opt = tr.build_optimizer()
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(10, 21, (B,), generator=g)
    mask = (torch.arange(L)[None] < lengths[:, None]).long()
    ids = torch.randint(1000, 30000, (B, L), generator=g) * mask
    ids[:, 0] = 101
    batch = {
        "image": torch.randn(B, 3, S, S, generator=g).to(device),
        "input_ids": ids.to(device),
        "attention_mask": mask.to(device),
        "idx": torch.arange(B, device=device),
    }
    counter = iter(range(10**9))

    def fwd_bwd():
        with autocast(device, torch.bfloat16):
            out = task(batch, alpha=0.4, step=next(counter))
        out["loss"].backward()

    def step():
        fwd_bwd()
        opt.step()
        opt.zero_grad(set_to_none=True)

    flops = count_flops(fwd_bwd)  # eager, before compiling (the FLOPs are the same)
    opt.zero_grad(set_to_none=True)
    if a.compile:
        tr.compile()
    reset_peak(device)
    s = timed(step, device, a.warmup, a.reps)
    extra = f"(batch {B}, {S} px, queue {a.queue}, grad ckpt {a.grad_ckpt}, compile {a.compile}, fused AdamW)"
    return report(f"pretrain {a.size} bf16", B, "samples", s, flops, peak, device, extra)


# ---- CapFilt and retrieval ------------------------------------------------------------------------------------------
def bench_capfilt(a, device, peak, tok) -> dict:
    import numpy as np
    from PIL import Image

    from blip.capfilt import Bootstrapper, CapfiltConfig
    from blip.config import model_config
    from blip.model.blip import BLIP

    cfg = model_config(a.size, vocab_size=len(tok), image_size=a.eval_image_size)
    torch.manual_seed(0)
    cap = BLIP(dataclasses.replace(cfg, text_encoder=False)).to(device).eval()
    filt = BLIP(dataclasses.replace(cfg, text_decoder=False)).to(device).eval()
    with torch.no_grad():  # EOS unlikely: captions run to max length (the worst case)
        cap.text_decoder.cls.predictions.bias[tok.sep_id] = -10.0
    boot = Bootstrapper(cap, tok, filt, tok, CapfiltConfig(batch_size=a.capfilt_batch, precision="bf16"))
    rng = np.random.default_rng(0)
    n = a.capfilt_batch
    images = [Image.fromarray((rng.random((256, 256, 3)) * 255).astype(np.uint8)) for _ in range(n)]
    gen = torch.Generator(device=device).manual_seed(0)

    def run():
        synth = boot.synthesize(images, gen)
        boot.score(images, [["w1 w2 w3 w4 w5", *s] for s in synth])

    flops = count_flops(run)
    reset_peak(device)
    s = timed(run, device, 1, a.reps)
    return report(f"capfilt {a.size} bf16", n, "images", s, flops, peak, device, f"({a.eval_image_size} px, batch {n})")


def bench_retrieval(a, device, peak, tok) -> dict:
    from blip.config import model_config
    from blip.eval.retrieval import retrieval_scores
    from blip.model.blip import BLIP

    cfg = model_config(a.size, vocab_size=len(tok), image_size=a.eval_image_size)
    torch.manual_seed(0)
    m = BLIP(dataclasses.replace(cfg, text_decoder=False)).to(device).eval()
    N, T = a.ret_images, 5 * a.ret_images
    g = torch.Generator().manual_seed(0)
    px = torch.randn(N, 3, a.eval_image_size, a.eval_image_size, generator=g).to(device)
    texts = [" ".join(f"w{int(x)}" for x in torch.randint(1000, 29000, (12,), generator=g)) for _ in range(T)]
    k = min(a.k, T)

    def run():
        retrieval_scores(m, tok, px, texts, k, image_batch_size=64, precision="bf16")

    flops = count_flops(run)
    reset_peak(device)
    s = timed(run, device, 1, max(1, a.reps // 2))
    return report(f"retrieval {a.size} bf16", N, "images", s, flops, peak, device, f"({N} images x {T} texts, k {k})")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="CPU, tiny model, small batches: checks the script runs")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--size", default="base", choices=["tiny", "base", "large"])
    ap.add_argument("--batch", type=int, default=75, help="pre-training batch per GPU (the original's: 75)")
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--eval-image-size", type=int, default=384)
    ap.add_argument("--queue", type=int, default=57600)
    ap.add_argument("--grad-ckpt", type=int, default=0, help="activation checkpointing of the last N ViT blocks")
    ap.add_argument("--compile", action="store_true", help="torch.compile the ViT blocks and text layers")
    ap.add_argument("--capfilt-batch", type=int, default=64)
    ap.add_argument("--ret-images", type=int, default=512, help="retrieval: N images x 5N texts")
    ap.add_argument("--k", type=int, default=128, help="retrieval: ITM re-ranking depth")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--peak-tflops", type=float, help="the device's bf16 dense peak, if not in the table")
    ap.add_argument("--only", nargs="+", choices=["pretrain", "capfilt", "retrieval"])
    ap.add_argument("--json-out")
    a = ap.parse_args()
    if a.smoke:
        a.device, a.size, a.batch, a.image_size, a.eval_image_size = "cpu", "tiny", 4, 64, 64
        a.queue, a.capfilt_batch, a.ret_images, a.k, a.warmup, a.reps = 16, 4, 4, 4, 1, 1
        torch.set_num_threads(min(2, torch.get_num_threads()))
    device = torch.device(a.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: run with --smoke (CPU) or on a GPU machine")
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    print(machine_line(str(device)), flush=True)
    print(f"load average (1/5/15 min): {loadavg()}", flush=True)
    roof = Roofline.measure(str(device), n=512 if a.smoke else (8192 if device.type == "cuda" else 2048))
    print(roof.line(), flush=True)
    peak, src = peak_tflops(device, a.peak_tflops, roof)
    print(f"bf16 peak for MFU: {peak:.3f} TFLOP/s ({src})", flush=True)
    rows = []
    with tempfile.TemporaryDirectory() as d:
        tok = tokenizer(Path(d))
        todo = a.only or ["pretrain", "capfilt", "retrieval"]
        if "pretrain" in todo:
            rows.append(bench_pretrain(a, device, peak))
        if "capfilt" in todo:
            rows.append(bench_capfilt(a, device, peak, tok))
        if "retrieval" in todo:
            rows.append(bench_retrieval(a, device, peak, tok))
    if a.json_out:
        with open(a.json_out, "w") as f:
            info = {"machine": machine_line(str(device)), "roofline": roof.gflops, "peak_tflops": peak}
            info["roofline_emulated"] = sorted(roof.emulated)
            json.dump({**info, "rows": rows}, f)


if __name__ == "__main__":
    main()
