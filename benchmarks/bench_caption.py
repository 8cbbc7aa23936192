"""Captioning speed, blipctl vs transformers' BLIP `generate`, on identical base-size weights.

Setting (issue #2): ViT-B/16 + BERT-base captioner, 384 px, batch 8, beam 3, max length 20, min length 5,
prompt of 4 tokens ([DEC] a picture of), CPU. Random weights, the same in both; the generated tokens are
checked to be identical before any time is reported. Times the whole call and the decoding phase (everything
after the image encoder).

    .venv/bin/python benchmarks/bench_caption.py [--batch 8] [--threads 2] [--repeats 1]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def synthetic_vocab(d: Path, size: int = 30522) -> None:
    """A bert-base-sized vocabulary (ids are what matter here); [DEC]/[ENC] are appended by blip.tokenizer."""
    specials = ["[PAD]"] + [f"[unused{i}]" for i in range(99)] + ["[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    words = [f"w{i}" for i in range(size - len(specials))]
    (d / "vocab.txt").write_text("\n".join(specials + words) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--image-size", type=int, default=384)
    ap.add_argument("--beams", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    from transformers import BlipConfig, BlipForConditionalGeneration

    from blip.checkpoint import load_model
    from blip.generation import GenerationConfig, generate
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
        vision_config=dict(image_size=args.image_size),
    )
    hf = BlipForConditionalGeneration(cfg).eval()
    with torch.no_grad():  # keep EOS unlikely so every caption runs to max length: equal work on both sides
        hf.text_decoder.cls.predictions.bias[tok.sep_id] = -10.0
    hf.save_pretrained(d)
    tok.save(d)
    ours = load_model(d).model
    print(
        f"model: {sum(p.numel() for p in hf.parameters()) / 1e6:.0f}M params, {args.image_size} px, "
        f"batch {args.batch}, beam {args.beams}, max_length 20, threads {torch.get_num_threads()}"
    )

    px = torch.randn(args.batch, 3, args.image_size, args.image_size)
    prompt = [tok.bos_id, 1037, 3861, 1997]  # [DEC] + 3 prompt tokens, like "a picture of"
    gcfg = GenerationConfig(num_beams=args.beams, max_length=20, min_length=5)

    def run_hf():
        with torch.inference_mode():
            t0 = time.perf_counter()
            hf.vision_model(pixel_values=px)
            t_img = time.perf_counter() - t0
            t0 = time.perf_counter()
            out = hf.generate(
                pixel_values=px,
                input_ids=torch.tensor([prompt + [tok.sep_id]] * args.batch),
                num_beams=args.beams,
                max_length=20,
                min_length=5,
            )
            return time.perf_counter() - t0, t_img, out

    def run_ours():
        with torch.inference_mode():
            t0 = time.perf_counter()
            emb = ours.encode_image(px)
            t_img = time.perf_counter() - t0
            out = generate(ours, emb, prompt, gcfg)
            return time.perf_counter() - t0, t_img, out

    best_hf = best_ours = None
    for _ in range(args.repeats):
        hf_total, hf_img, hf_out = run_hf()
        o_total, o_img, o_out = run_ours()
        if best_hf is None or hf_total < best_hf[0]:
            best_hf = (hf_total, hf_img)
        if best_ours is None or o_total < best_ours[0]:
            best_ours = (o_total, o_img)
    hf_tokens = [[t for t in r[len(prompt) :].tolist() if t not in (0,)] for r in hf_out]
    hf_tokens = [r[: r.index(tok.sep_id)] if tok.sep_id in r else r for r in hf_tokens]
    same = hf_tokens == [o[0] for o in o_out]
    print(f"same tokens: {same}")
    (hf_total, hf_img), (o_total, o_img) = best_hf, best_ours
    hf_dec, o_dec = hf_total - hf_img, o_total - o_img
    print(f"transformers: total {hf_total:.2f} s (image encoder {hf_img:.2f} s, decoding {hf_dec:.2f} s)")
    print(f"blipctl:      total {o_total:.2f} s (image encoder {o_img:.2f} s, decoding {o_dec:.2f} s)")
    print(f"speed-up: whole call {hf_total / o_total:.2f}x, decoding {hf_dec / o_dec:.2f}x")
    if not same:
        raise SystemExit("token mismatch: timings are not comparable")


if __name__ == "__main__":
    main()
