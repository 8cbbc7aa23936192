"""Captioning speed at base size: blipctl fp32 against bf16 (and transformers' `generate` with --transformers).

Setting (issue #2): ViT-B/16 + BERT-base captioner, 384 px, batch 8, beam 3, max length 20, min length 5, prompt
of 4 tokens ([DEC] a picture of), CPU. Random weights (EOS made unlikely, so every caption runs to max length:
equal work for all). Times the whole call (image encoder + beam search), each variant in turn, alternating.

bf16 is autocast around the whole call (blip.precision; weights stay fp32 and are cast once per call). Its
captions are compared with fp32's: the share of tokens before the first divergence is printed. transformers
runs fp32 on the same weights, and its tokens must equal blipctl fp32's before any time is reported.

    python benchmarks/bench_caption.py [--reps 3] [--transformers]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import count_flops, header, interleave, loadavg, median  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def synthetic_vocab(d: Path, size: int = 30522) -> None:
    """A bert-base-sized vocabulary (ids are what matter here); [DEC]/[ENC] are appended by blip.tokenizer."""
    specials = ["[PAD]"] + [f"[unused{i}]" for i in range(99)] + ["[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    words = [f"w{i}" for i in range(size - len(specials))]
    (d / "vocab.txt").write_text("\n".join(specials + words) + "\n")


def build(image_size: int):
    """A transformers base captioner with random weights, and the same weights loaded by blipctl."""
    from transformers import BlipConfig, BlipForConditionalGeneration

    from blip.checkpoint import load_model
    from blip.tokenizer import Tokenizer

    d = Path(tempfile.mkdtemp())
    synthetic_vocab(d)
    tok = Tokenizer.from_pretrained(d)
    cfg = BlipConfig(
        text_config=dict(
            vocab_size=len(tok),
            num_attention_heads=12,
            bos_token_id=tok.bos_id,
            pad_token_id=0,
            sep_token_id=tok.sep_id,
            eos_token_id=tok.sep_id,
        ),
        vision_config=dict(image_size=image_size),
    )
    torch.manual_seed(0)
    hf = BlipForConditionalGeneration(cfg).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():  # transformers initialises the ViT at std 1e-10: images alike
            if name.startswith("vision_model") and p.dim() > 1:
                p.normal_(0.0, 0.02)
        hf.text_decoder.cls.predictions.bias[tok.sep_id] = -10.0  # EOS unlikely: every caption runs to max length
    hf.save_pretrained(d)
    tok.save(d)
    return hf, load_model(d).model, tok


def agreement(a: list[list[int]], b: list[list[int]]) -> float:
    """Share of a's tokens that come before the first divergence from b."""
    same = 0
    for x, y in zip(a, b, strict=True):
        same += next((i for i, (s, t) in enumerate(zip(x, y, strict=False)) if s != t), len(x))
    return same / max(1, sum(len(x) for x in a))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--image-size", type=int, default=384)
    ap.add_argument("--beams", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--transformers", action="store_true", help="also time transformers' generate (fp32)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    roof = header()

    from blip.generation import GenerationConfig, generate
    from blip.precision import autocast

    hf, ours, tok = build(args.image_size)
    print(
        f"model: {sum(p.numel() for p in ours.parameters()) / 1e6:.0f}M params, {args.image_size} px, "
        f"batch {args.batch}, beam {args.beams}, max_length 20, threads {torch.get_num_threads()}",
        flush=True,
    )
    g = torch.Generator().manual_seed(0)
    px = torch.randn(args.batch, 3, args.image_size, args.image_size, generator=g)
    prompt = [tok.bos_id, 1037, 3861, 1997]  # [DEC] + 3 prompt tokens, like "a picture of"
    gcfg = GenerationConfig(num_beams=args.beams, max_length=20, min_length=5)
    outs: dict[str, list] = {}

    def ours_call(dtype: torch.dtype, key: str):
        def run():
            with torch.no_grad(), autocast("cpu", dtype):  # one context: weights cast once per call
                outs[key] = [c[0] for c in generate(ours, ours.encode_image(px), prompt, gcfg)]

        return run

    def hf_call():
        with torch.no_grad():
            out = hf.generate(
                pixel_values=px,
                input_ids=torch.tensor([prompt + [tok.sep_id]] * args.batch),
                num_beams=args.beams,
                max_length=20,
                min_length=5,
            )
        rows = [[t for t in r[len(prompt) :].tolist() if t != 0] for r in out]
        outs["transformers fp32"] = [r[: r.index(tok.sep_id)] if tok.sep_id in r else r for r in rows]

    variants = {"blipctl fp32": ours_call(torch.float32, "blipctl fp32")}
    variants["blipctl bf16"] = ours_call(torch.bfloat16, "blipctl bf16")
    if args.transformers:
        variants["transformers fp32"] = hf_call
    flops = count_flops(variants["blipctl fp32"])
    times = interleave(variants, args.reps, warmup=args.warmup)
    if args.transformers and outs["transformers fp32"] != outs["blipctl fp32"]:
        raise SystemExit("token mismatch between transformers and blipctl fp32: timings are not comparable")
    print(f"\nwhole call, median of {args.reps} alternating reps (load now {loadavg()}); {flops / 1e9:.0f} GFLOP/call")
    med = {k: median(v) for k, v in times.items()}
    for k, t in med.items():
        prec = k.split()[-1]
        gf = flops / t / 1e9
        print(
            f"  {k:<18} {t:7.2f} s  ({', '.join(f'{x:.2f}' for x in times[k])})  {gf:6.0f} GFLOP/s"
            f"{roof.fraction(gf, prec)}"
        )
    print(f"  bf16 vs fp32 (blipctl, whole call): {med['blipctl fp32'] / med['blipctl bf16']:.2f}x")
    if args.transformers:
        print(f"  blipctl fp32 vs transformers fp32: {med['transformers fp32'] / med['blipctl fp32']:.2f}x")
    a, b = outs["blipctl fp32"], outs["blipctl bf16"]
    same = sum(x == y for x, y in zip(a, b, strict=True))
    print(f"  bf16 captions: {same}/{len(a)} identical to fp32; {agreement(a, b):.0%} of tokens before a divergence")


if __name__ == "__main__":
    main()
