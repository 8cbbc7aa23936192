"""What a vision tower's patch tokens say about each object of the demo's web scenes: a linear probe (logistic
regression, 70/30 split) of the shape and the size of the object at each position, from the mean of the 2x2 patch
tokens around its anchor. The measurement behind docs/demo.md ("Fourth session"): it tells a tower that sees shapes
from one that does not, whatever the captioner later makes of it.

    python docs/experiments/probe_objects.py MODEL DATA [IMAGES=2400]

MODEL: a `blipctl pretrain-vision` output dir (vit.safetensors) or any model `blip.load` reads; DATA: the dir of
`blipctl data demo` (its web/ shards hold each image's scene). Needs a 96 px model with 16 px patches (6 x 6).
"""

from __future__ import annotations

import glob
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from blip.data.demo import SHAPES, SIZES
from blip.data.shards import SampleStats, iter_shard
from blip.data.transforms import eval_transform

WINDOW = {"left": (2, 0), "right": (2, 4), "top": (0, 2), "bottom": (4, 2), "centre": (2, 2)}
"""Top-left (row, column) of the 2x2 patches around each position's anchor on the 6 x 6 grid."""


def load_tower(src: str) -> torch.nn.Module:
    if (Path(src) / "vit.safetensors").exists():
        from safetensors.torch import load_file

        from blip.model.vit import ViT
        from blip.vision_pretrain import read_vision_config

        vit = ViT(read_vision_config(src))
        vit.load_state_dict(load_file(str(Path(src) / "vit.safetensors")))
        return vit.eval()
    import blip

    return blip.load(src, device="cpu").net.visual_encoder.eval()


def scenes(data: str, n: int) -> tuple[torch.Tensor, list[dict]]:
    tf, images, found = eval_transform(96), [], []
    for shard in sorted(glob.glob(f"{data}/web/*.tar")):
        for x in iter_shard(shard, SampleStats()):
            images.append(tf(x["image"].convert("RGB")))
            found.append(x["json"]["scene"])
            if len(images) == n:
                return torch.stack(images), found
    return torch.stack(images), found


def probe(x: torch.Tensor, y: torch.Tensor, classes: int) -> float:
    """Held-out accuracy of a logistic regression trained on the first 70%."""
    torch.manual_seed(0)
    x = (x - x.mean(0)) / (x.std(0) + 1e-6)
    cut = int(len(y) * 0.7)
    w = torch.zeros(x.shape[1], classes, requires_grad=True)
    b = torch.zeros(classes, requires_grad=True)
    opt = torch.optim.Adam([w, b], lr=0.01)
    for _ in range(300):
        loss = F.cross_entropy(x[:cut] @ w + b, y[:cut]) + 1e-3 * w.pow(2).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return ((x[cut:] @ w + b).argmax(1) == y[cut:]).float().mean().item()


def main(src: str, data: str, n: int = 2400) -> None:
    vit = load_tower(src)
    pixels, found = scenes(data, n)
    with torch.no_grad():
        tokens = torch.cat([vit(pixels[i : i + 200])[:, 1:] for i in range(0, len(pixels), 200)])  # (N, 36, D)
    grid = tokens.reshape(len(pixels), 6, 6, -1)  # (N, rows, cols, D)
    feats, shapes, sizes = [], [], []
    for i, scene in enumerate(found):
        for o in scene["objects"]:
            r, c = WINDOW[o["position"]]
            feats.append(grid[i, r : r + 2, c : c + 2].reshape(4, -1).mean(0))
            shapes.append(SHAPES.index(o["shape"]))
            sizes.append(SIZES.index(o["size"]))
    x = torch.stack(feats)
    print(f"{src}: {len(x)} objects in {len(pixels)} scenes (30% held out)")
    print(f"  shape at its position: {probe(x, torch.tensor(shapes), len(SHAPES)):.3f} (chance 0.2)")
    print(f"  size at its position:  {probe(x, torch.tensor(sizes), len(SIZES)):.3f} (chance 0.5)")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], *(int(a) for a in sys.argv[3:4]))
