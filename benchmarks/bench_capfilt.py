"""CapFilt throughput (images/s), fp32 against bf16: captioner (nucleus sampling, 1 caption) + filter (ITM on
web + synthetic).

Random-weight models of the named size (captioner = decoder-only, filter = encoder-only, as fine-tuned ones),
synthetic images written to one webdataset shard, then `blip.capfilt.process_shard` end to end (decode,
generate, score, write) with CapfiltConfig.precision = fp32 and bf16, alternating. Sizes: tiny at 224 px, base
at 384 px (the paper's fine-tuned models). FLOPs are counted on the first (untimed) fp32 pass.

    python benchmarks/bench_capfilt.py [--sizes tiny base] [--images 64 16] [--reps 2] [--threads 2]
"""

from __future__ import annotations

import argparse
import io
import os
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import count_flops, header, interleave, loadavg, median  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", nargs="+", default=["tiny", "base"])
    ap.add_argument("--images", nargs="+", type=int, default=[64, 16])
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    roof = header()

    import dataclasses

    from blip.capfilt import Bootstrapper, CapfiltConfig, process_shard
    from blip.config import model_config
    from blip.data.shards import write_shard
    from blip.model import BLIP
    from blip.tokenizer import Tokenizer

    d = Path(tempfile.mkdtemp())
    specials = ["[PAD]"] + [f"[unused{i}]" for i in range(99)] + ["[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    (d / "vocab.txt").write_text("\n".join(specials + [f"w{i}" for i in range(30522 - len(specials))]) + "\n")
    tok = Tokenizer.from_pretrained(d)
    rng = np.random.default_rng(0)
    for size, n in zip(args.sizes, args.images, strict=False):
        image_size = 224 if size == "tiny" else 384
        cfg = model_config(size, vocab_size=len(tok), image_size=image_size)
        torch.manual_seed(0)
        cap = BLIP(dataclasses.replace(cfg, text_encoder=False)).eval()
        filt = BLIP(dataclasses.replace(cfg, text_decoder=False)).eval()
        with torch.no_grad():  # keep EOS unlikely: captions run to max length (the worst case)
            cap.text_decoder.cls.predictions.bias[tok.sep_id] = -10.0
        samples = []
        for i in range(n):
            buf = io.BytesIO()
            Image.fromarray((rng.random((256, 256, 3)) * 255).astype(np.uint8)).save(buf, format="JPEG")
            samples.append({"__key__": f"{i:06d}", "jpg": buf.getvalue(), "txt": "w1 w2 w3 w4 w5", "json": {}})
        shard = d / f"{size}-in" / "00000.tar"
        write_shard(shard, samples)
        cfgs = {p: CapfiltConfig(batch_size=args.batch_size, max_length=30, precision=p) for p in ("fp32", "bf16")}
        boots = {p: Bootstrapper(cap, tok, filt, tok, c) for p, c in cfgs.items()}
        seen = {}

        def run(p: str, shard=shard, size=size, boots=boots, seen=seen):
            def f():
                seen[p] = process_shard(str(shard), d / f"{size}-out-{p}", boots[p])

            return f

        variants = {f"{size} {p}": run(p) for p in ("fp32", "bf16")}
        flops = count_flops(variants[f"{size} fp32"])  # doubles as fp32's warm-up
        variants[f"{size} bf16"]()  # bf16's warm-up
        times = interleave(variants, args.reps, warmup=0)
        print(
            f"\n{size}: {image_size} px, {n} images, batch {args.batch_size}, 1 synthetic caption (max 30 tokens), "
            f"{torch.get_num_threads()} threads, median of {args.reps} alternating reps (load now {loadavg()}):"
        )
        med = {}
        for k, ts in times.items():
            p = k.split()[-1]
            med[p] = t = median(ts)
            gf = flops / t / 1e9
            print(
                f"  {p}: {t:.1f} s, {n / t:.2f} images/s, {gf:.0f} GFLOP/s{roof.fraction(gf, p)} "
                f"({flops / n / 1e9:.0f} GFLOP/image)"
            )
        print(f"  bf16 vs fp32: {med['fp32'] / med['bf16']:.2f}x images/s")
        kept = {p: seen[p].counts for p in seen}
        print(
            f"  kept (web / synthetic): fp32 {kept['fp32']['web']['kept']}/{kept['fp32']['synthetic']['kept']}, "
            f"bf16 {kept['bf16']['web']['kept']}/{kept['bf16']['synthetic']['kept']}"
        )


if __name__ == "__main__":
    main()
