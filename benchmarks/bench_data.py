"""Data-layer speed: training-loader throughput and the demo world's generation time.

1. Loader: demo-like shards (the demo world's scenes rendered at --source-sizes px, JPEG, one caption each) read by
   blip.data.loader.build_train_loader at --image-size px with the training transform (RandomResizedCrop +
   flip + RandAugment, CLIP normalisation), --workers DataLoader workers, batch --batch. Images/s counts every
   image decoded, checked and transformed into a batch, from the first `iter()` (worker start-up included) to
   the end of the epoch; a second epoch is timed too (warm page cache).
2. `make_demo(scale="full")` wall time (2000 + 12000 + 300 images).

    .venv/bin/python benchmarks/bench_data.py [--images 2000] [--workers 2] [--image-size 224] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import random
import tempfile
import time
from pathlib import Path

import torch

from blip.data.demo import encode, make_demo, random_scene, render
from blip.data.loader import build_train_loader
from blip.data.shards import SampleStats, ShardWriter, iter_shard


def make_shards(root: Path, n: int, n_shards: int, source_size: int) -> list[str]:
    rng = random.Random(0)
    with ShardWriter(str(root / f"bench{source_size}-%05d.tar"), maxcount=-(-n // n_shards)) as w:
        for i in range(n):
            scene = random_scene(rng)
            data = encode(render(scene, f"bench:{i}", size=source_size), "jpg")
            w.write({"__key__": f"{i:08d}", "jpg": data, "txt": f"image {i}", "json": {"image_id": i}})
    return w.shards


def time_loader(shards: list[str], args: argparse.Namespace, epoch: int) -> tuple[float, int]:
    loader = build_train_loader(
        shards,
        image_size=args.image_size,
        batch_size=args.batch,
        num_workers=args.workers,
        epoch=epoch,
        min_scale=0.5,
        randaugment=True,
    )
    t0 = time.perf_counter()
    n = 0
    for b in loader:
        n += b["image"].shape[0]
    return time.perf_counter() - t0, n


def time_decode(shards: list[str]) -> float:
    t0 = time.perf_counter()
    stats = SampleStats()
    for s in shards:
        for _ in iter_shard(s, stats):
            pass
    return stats.good / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=2000)
    ap.add_argument("--shards", type=int, default=8)
    ap.add_argument("--source-sizes", type=int, nargs="+", default=[96, 256])
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--threads", type=int, default=1, help="torch threads in the main process")
    ap.add_argument("--skip-demo", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    results: dict = {"settings": vars(args), "loader": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for size in args.source_sizes:
            shards = make_shards(Path(tmp), args.images, args.shards, size)
            decode_rate = time_decode(shards)
            cold, n = time_loader(shards, args, epoch=0)
            warm, n2 = time_loader(shards, args, epoch=1)
            results["loader"][f"{size}px_jpeg"] = {
                "images": n,
                "epoch0_s": round(cold, 2),
                "epoch0_img_per_s": round(n / cold, 1),
                "epoch1_img_per_s": round(n2 / warm, 1),
                "decode_only_img_per_s_1proc": round(decode_rate, 1),
            }
            print(
                f"loader {size}px JPEG -> {args.image_size}px train transform, {args.workers} workers, "
                f"batch {args.batch}: {n / cold:.0f} img/s (epoch 0, {n} images in {cold:.1f} s), "
                f"{n2 / warm:.0f} img/s (epoch 1); decode+check only, 1 process: {decode_rate:.0f} img/s",
                flush=True,
            )
        if not args.skip_demo:
            t0 = time.perf_counter()
            s = make_demo(Path(tmp) / "demo", seed=0, scale="full")
            dt = time.perf_counter() - t0
            total = sum(v["images"] for v in s["splits"].values())
            results["make_demo_full_s"] = round(dt, 2)
            print(f"make_demo(scale='full'): {total} images in {dt:.1f} s", flush=True)
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
