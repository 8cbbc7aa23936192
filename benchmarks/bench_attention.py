"""Attention alone at the shapes of BLIP base: does bf16 make it faster on this machine?

Why: in the bf16 caption call (bench_caption.py) the ViT's linear layers run 2.1x faster than in fp32, but the whole
call only ~1.8x. This isolates `F.scaled_dot_product_attention` (PyTorch picks its CPU flash kernel) and the two
plain batched matmuls of attention, fp32 against bf16, with FLOPs and the fraction of the matmul roofline.

Shapes (batch 8, 12 heads, head dim 64):
- ViT self-attention, 384 px (577 tokens) and 224 px (197 tokens);
- the decoder's cross-attention in beam search: 3 beams' queries of one image against its 577 image tokens;
- text self-attention, 35 tokens.

    python benchmarks/bench_attention.py [--reps 5] [--quick]
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import header, interleave, median  # noqa: E402

SHAPES = {  # name: (batch, heads, queries, keys, head dim)
    "ViT 384 px self-attention": (8, 12, 577, 577, 64),
    "ViT 224 px self-attention": (8, 12, 197, 197, 64),
    "beam-3 cross-attention (1 step)": (8, 12, 3, 577, 64),
    "text self-attention": (8, 12, 35, 35, 64),
}
QUICK = {"quick self-attention": (2, 2, 33, 33, 16)}


def attention_flops(b: int, h: int, q: int, k: int, d: int) -> int:
    """QK^T and AV: 2 x (2 q k d) per head."""
    return 4 * b * h * q * k * d


def variants(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> dict[str, Callable[[], torch.Tensor]]:
    """The kernels compared for one shape and dtype."""

    def sdpa() -> torch.Tensor:
        return F.scaled_dot_product_attention(q, k, v)

    def math() -> torch.Tensor:
        with sdpa_kernel(SDPBackend.MATH):
            return F.scaled_dot_product_attention(q, k, v)

    def qk() -> torch.Tensor:  # the first matmul alone: what the hardware gives a K=64 batched product
        return torch.matmul(q, k.transpose(-2, -1))

    return {"sdpa (default)": sdpa, "sdpa math": math, "q @ k^T only": qk}


def _err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return (out.float() - ref).abs().max().item()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--quick", action="store_true", help="one tiny shape, no roofline (CI smoke)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    roof = header(roofline=not args.quick)
    g = torch.Generator().manual_seed(0)
    for name, shape in (QUICK if args.quick else SHAPES).items():
        b, h, nq, nk, d = shape
        base = [torch.randn(b, h, n, d, generator=g) for n in (nq, nk, nk)]
        flops = attention_flops(*shape)
        print(f"\n{name}: q {tuple(base[0].shape)}, k/v {tuple(base[1].shape)}, {flops / 1e9:.2f} GFLOP", flush=True)
        med: dict[tuple[str, str], float] = {}
        with torch.no_grad():
            ref = F.scaled_dot_product_attention(*base)
            for prec, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
                fns = variants(*(t.to(dtype) for t in base))
                times = interleave(fns, args.reps, warmup=1, log=False)
                for kind, ts in times.items():
                    t = median(ts)
                    med[(kind, prec)] = t
                    work = flops / 2 if kind.startswith("q @ k") else flops
                    frac = roof.fraction(work / t / 1e9, prec) if roof else ""
                    err = "" if kind.startswith("q @ k") else f"  max |out - fp32 sdpa| {_err(fns[kind](), ref):.1e}"
                    print(
                        f"  {prec} {kind:<16} {t * 1e3:8.2f} ms  {work / t / 1e9:6.0f} GFLOP/s{frac}{err}", flush=True
                    )
        for kind in ("sdpa (default)", "sdpa math", "q @ k^T only"):
            print(f"  bf16 vs fp32, {kind}: {med[(kind, 'fp32')] / med[(kind, 'bf16')]:.2f}x")


if __name__ == "__main__":
    main()
