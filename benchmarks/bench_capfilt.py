"""CapFilt throughput (images/s): captioner (nucleus sampling, 1 caption) + filter (ITM on web + synthetic).

Random-weight models of the named size (captioner = decoder-only, filter = encoder-only, as fine-tuned ones),
synthetic images written to one webdataset shard, then `blip.capfilt.process_shard` end to end (decode,
generate, score, write). Sizes: tiny at 224 px, base at 384 px (the paper's fine-tuned models).

    .venv/bin/python benchmarks/bench_capfilt.py [--sizes tiny base] [--images 64 16] [--threads 2]
"""

from __future__ import annotations

import argparse
import io
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", nargs="+", default=["tiny", "base"])
    ap.add_argument("--images", nargs="+", type=int, default=[64, 16])
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

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
        boot = Bootstrapper(cap, tok, filt, tok, CapfiltConfig(batch_size=args.batch_size, max_length=30))
        t0 = time.perf_counter()
        st = process_shard(str(shard), d / f"{size}-out", boot)
        dt = time.perf_counter() - t0
        print(
            f"{size}: {image_size} px, {n} images, batch {args.batch_size}, 1 synthetic caption (max 30 tokens), "
            f"{torch.get_num_threads()} threads: {dt:.1f} s, {st.images_in / dt:.2f} images/s"
        )


if __name__ == "__main__":
    main()
