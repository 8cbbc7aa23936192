"""ITM scoring speed at BASE size (ViT-B/16 + BERT-base, 384 px) on CPU: transformers' BLIP vs blipctl.

The same random weights in both (a transformers BlipForImageTextRetrieval saved, then loaded by blipctl), the
same 8 images x 16 candidate texts (128 pairs, as retrieval re-ranking scores them). Three ways:

  (a) transformers, the usual way: the image goes with every pair (16 pairs per forward), so the ViT runs per pair;
  (b) transformers given the image embeddings once: `text_encoder(..., encoder_hidden_states=...)` + `itm_head`,
      which still projects the image's cross-attention K/V for every pair;
  (c) blipctl: image encoded once, cross-attention K/V once per image, its 16 texts folded into the query
      length (`itm_logits(..., image_kv=..., rows_per_kv=16)`).

Scores must agree within 1e-4. Prints pairs/s and the speed-ups of (c) over (a) and (b). Then (c) in fp32 and
in bf16 (autocast, blip.precision), alternating `--reps` times: their times, GFLOP/s against the roofline, and
how far bf16's ITM p(match) is from fp32's (max and mean absolute difference).

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/bench_itm.py            # ~6 min on 2 CPU cores, (a) dominates
    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/bench_itm.py --skip-a   # (b) and (c) only
    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/bench_itm.py --only-precision   # (c) fp32 against (c) bf16 only
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import count_flops, header, interleave, median  # noqa: E402

CAPTIONS = [
    "a man riding a wave on top of a surfboard",
    "a plate of food with broccoli and a fork on a wooden table",
    "two giraffes standing next to each other in a field",
    "a red double decker bus driving down a city street",
    "a cat sleeping on the keyboard of a laptop computer",
    "a group of people flying kites on a windy beach",
    "a kitchen with white cabinets and a stainless steel refrigerator",
    "a young boy swinging a baseball bat at a ball",
    "an airplane flying over a snowy mountain range",
    "a bowl of fruit with bananas apples and oranges",
    "a woman holding an umbrella in the rain on a street",
    "a herd of elephants walking through tall grass",
    "a pizza with cheese and pepperoni on a pan",
    "a dog catching a frisbee in a park",
    "a train traveling down tracks next to a forest",
    "a bathroom with a toilet sink and a mirror",
]


def build(image_size: int, tmp: str):
    """A base-size transformers BLIP retrieval model with random weights, and the same weights in blipctl."""
    from transformers import BlipConfig, BlipForImageTextRetrieval

    from blip.checkpoint import load_model
    from blip.tokenizer import Tokenizer

    words = sorted({w for c in CAPTIONS for w in c.split()})
    tok = Tokenizer.train(CAPTIONS * 3 + words, vocab_size=400)
    cfg = BlipConfig(
        text_config=dict(
            vocab_size=30524,
            hidden_size=768,
            num_hidden_layers=12,
            num_attention_heads=12,
            intermediate_size=3072,
            bos_token_id=tok.bos_id,
            pad_token_id=tok.pad_id,
            sep_token_id=tok.sep_id,
            eos_token_id=tok.sep_id,
        ),
        vision_config=dict(
            image_size=image_size,
            patch_size=16,
            hidden_size=768,
            num_hidden_layers=12,
            num_attention_heads=12,
            intermediate_size=3072,
        ),
        image_text_hidden_size=256,
    )
    torch.manual_seed(0)
    hf = BlipForImageTextRetrieval(cfg).eval()
    with torch.no_grad():  # HF initialises the ViT at std 1e-10 (every image alike); use BERT's 0.02 everywhere
        for p in hf.parameters():
            if p.dim() > 1:
                p.normal_(0.0, 0.02)
    hf.save_pretrained(tmp)
    tok.hf.save_pretrained(tmp)
    return hf, load_model(tmp).model, tok


@torch.no_grad()
def hf_usual(hf, px, ids, mask, R):
    """(a) the image passed with every pair: R pairs per forward."""
    out = []
    for i in range(px.shape[0]):
        rows = slice(i * R, (i + 1) * R)
        img = px[i : i + 1].expand(R, -1, -1, -1)
        out.append(hf(input_ids=ids[rows], pixel_values=img, attention_mask=mask[rows]).itm_score[:, 1])
    return torch.cat(out)


@torch.no_grad()
def hf_embeds_once(hf, px, ids, mask, R):
    """(b) the ViT once per image, then the text encoder per R pairs (K/V still projected for every pair)."""
    emb = hf.vision_model(pixel_values=px).last_hidden_state  # (B, 1 + P, D)
    out = []
    for i in range(px.shape[0]):
        rows = slice(i * R, (i + 1) * R)
        e = emb[i : i + 1].expand(R, -1, -1)
        h = hf.text_encoder(
            input_ids=ids[rows],
            attention_mask=mask[rows],
            encoder_hidden_states=e,
            encoder_attention_mask=torch.ones(e.shape[:2], dtype=torch.long),
        ).last_hidden_state
        out.append(hf.itm_head(h[:, 0])[:, 1])
    return torch.cat(out)


@torch.no_grad()
def blipctl_folded(model, px, ids, mask, R):
    """(c) the ViT once per image, cross-attention K/V once per image, R texts folded per image."""
    emb = model.encode_image(px)  # (B, 1 + P, D)
    kv = model.text_encoder.image_kv(emb)  # per layer (B, H, 1 + P, d)
    return model.itm_logits(ids, mask, image_kv=kv, rows_per_kv=R)[:, 1]  # rows image-major: (B*R,)


@torch.no_grad()
def blipctl_probs(model, px, ids, mask, R, dtype):
    """(c) under autocast to `dtype`: ITM p(match) of every pair, (B*R,)."""
    from blip.precision import autocast

    with autocast("cpu", dtype):
        emb = model.encode_image(px)
        kv = model.text_encoder.image_kv(emb)
        logits = model.itm_logits(ids, mask, image_kv=kv, rows_per_kv=R)
    return logits.float().softmax(-1)[:, 1]


def precision_side_by_side(model, px, ids, mask, R, reps: int, roof, results: dict) -> None:
    pairs = ids.shape[0]
    out = {}
    fns = {
        p: (lambda p=p, dt=dt: out.__setitem__(p, blipctl_probs(model, px, ids, mask, R, dt)))
        for p, dt in (("fp32", torch.float32), ("bf16", torch.bfloat16))
    }
    flops = count_flops(fns["fp32"])
    times = interleave(fns, reps, warmup=1)
    d = (out["fp32"] - out["bf16"]).abs()
    print(f"\n(c) fp32 vs bf16, median of {reps} alternating reps, {flops / 1e9:.0f} GFLOP/call:")
    for p, ts in times.items():
        t = median(ts)
        g = flops / t / 1e9
        print(f"  {p}: {t:.2f} s, {pairs / t:.2f} pairs/s, {g:.0f} GFLOP/s{roof.fraction(g, p)}")
        results[f"c_{p}"] = {"seconds": round(t, 2), "pairs_per_s": round(pairs / t, 3)}
    sp = median(times["fp32"]) / median(times["bf16"])
    print(f"  bf16 vs fp32: {sp:.2f}x; ITM p(match) |bf16 - fp32|: max {d.max():.4f}, mean {d.mean():.4f}")
    print(f"  (fp32 p(match) range {float(out['fp32'].min()):.3f}-{float(out['fp32'].max()):.3f})")
    results["bf16_speedup"] = round(sp, 2)
    results["bf16_max_abs_dp"] = round(float(d.max()), 5)


def timed(fn, *args):
    t0 = time.perf_counter()
    out = fn(*args)
    return out, time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=8)
    ap.add_argument("--texts", type=int, default=16, help="candidate texts per image")
    ap.add_argument("--image-size", type=int, default=384)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--skip-a", action="store_true", help="skip (a), the slow one (~6 min at the defaults)")
    ap.add_argument("--out", help="also write the numbers to this JSON file")
    ap.add_argument("--reps", type=int, default=2, help="alternating reps of (c) fp32 / bf16")
    ap.add_argument("--only-precision", action="store_true", help="only (c) fp32 against (c) bf16")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    roof = header()

    B, R = args.images, args.texts
    with tempfile.TemporaryDirectory() as tmp:
        hf, model, tok = build(args.image_size, tmp)
    g = torch.Generator().manual_seed(0)
    px = torch.randn(B, 3, args.image_size, args.image_size, generator=g)
    texts = [CAPTIONS[(i + j) % len(CAPTIONS)] for i in range(B) for j in range(R)]  # (B*R) image-major
    ids, mask = tok(texts, max_length=35)
    ids[:, 0] = tok.enc_id  # ITM reads [ENC] at position 0 (blipctl sets it itself; transformers needs it given)
    pairs = B * R
    print(f"{B} images x {R} texts = {pairs} pairs, {args.image_size} px, base size, {args.threads} threads")

    # warm up each path on a tiny input, so one-time costs (allocator, oneDNN kernels) count for nobody
    blipctl_folded(model, px[:1], ids[:2], mask[:2], 2)
    hf_embeds_once(hf, px[:1], ids[:2], mask[:2], 2)
    hf_usual(hf, px[:1], ids[:2], mask[:2], 2)

    results: dict[str, dict[str, float]] = {}
    precision_side_by_side(model, px, ids, mask, R, args.reps, roof, results)
    if args.only_precision:
        if args.out:
            with open(args.out, "w") as f:
                json.dump(results, f, indent=2)
        return

    def report(name: str, scores: torch.Tensor, seconds: float) -> None:
        results[name] = {"seconds": round(seconds, 2), "pairs_per_s": round(pairs / seconds, 3)}
        print(f"{name:<42} {seconds:8.1f} s  {pairs / seconds:8.2f} pairs/s", flush=True)

    c, tc = timed(blipctl_folded, model, px, ids, mask, R)
    report("(c) blipctl, K/V once per image, folded", c, tc)
    b, tb = timed(hf_embeds_once, hf, px, ids, mask, R)
    report("(b) transformers, image embeddings once", b, tb)
    diff_b = float((b - c).abs().max())
    print(f"max |b - c| = {diff_b:.2e}")
    assert diff_b < 1e-4, "scores differ between transformers (b) and blipctl (c)"
    print(f"(c) vs (b): {tb / tc:.2f}x faster (target >= 1.8x)", flush=True)
    if not args.skip_a:
        a, ta = timed(hf_usual, hf, px, ids, mask, R)
        report("(a) transformers, the usual way", a, ta)
        diff_a = float((a - c).abs().max())
        print(f"max |a - c| = {diff_a:.2e}")
        assert diff_a < 1e-4, "scores differ between transformers (a) and blipctl (c)"
        print(f"(c) vs (a): {ta / tc:.2f}x faster (target >= 5x)")
        results["speedup_c_over_a"] = round(ta / tc, 2)
    results["speedup_c_over_b"] = round(tb / tc, 2)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
