"""The demo world's "ImageNet": classify single objects by shape and colour with the tiny stem tower, then save the
ViT state dict for `model.vision_init` (docs/demo-capfilt.md, "A tower that sees shapes"). The experiment behind
the measurements there, kept to reproduce them; the library feature that replaced it is `blipctl pretrain-vision`
(blip/vision_pretrain.py, the demo recipe's `vision` step).

    python docs/experiments/classify_objects.py OUT.pth [STEPS=1200] [IMAGES=4000]
    blipctl run recipes/demo.toml warmstart.model.stem=conv warmstart.model.vision_init=OUT.pth capfilt.num_captions=1
"""

from __future__ import annotations

import math
import random
import sys

import torch
import torch.nn.functional as F

from blip.config import VisionConfig
from blip.data import demo
from blip.data.transforms import eval_transform
from blip.model.vit import ViT


def objects(n: int, seed: int = 7) -> tuple[torch.Tensor, torch.Tensor]:
    """n single-object images (an independent draw, not the demo's splits) -> pixels, (n, 2) shape and colour ids."""
    rng, tf = random.Random(seed), eval_transform(demo.IMAGE_SIZE)
    xs, ys = [], []
    while len(xs) < n:
        scene = demo.random_scene(rng)
        scene = {**scene, "objects": scene["objects"][:1]}
        o = scene["objects"][0]
        xs.append(tf(demo.render(scene, f"v{len(xs)}")))
        ys.append([demo.SHAPES.index(o["shape"]), list(demo.COLORS).index(o["color"])])
    return torch.stack(xs), torch.tensor(ys)


def main(out: str, steps: int = 1200, n: int = 4000, lr: float = 1e-3, batch: int = 48) -> None:
    torch.manual_seed(0)
    x, y = objects(n + 500)
    xtr, ytr, xte, yte = x[:n], y[:n], x[n:], y[n:]
    vit = ViT(VisionConfig(image_size=demo.IMAGE_SIZE, patch_size=16, width=256, depth=2, heads=4, mlp_dim=1024,
                           stem="conv"))  # fmt: skip
    head = torch.nn.Linear(256, len(demo.SHAPES) + len(demo.COLORS))  # shape logits, then colour logits
    params = [*vit.parameters(), *head.parameters()]
    groups = [{"params": [p for p in params if p.ndim >= 2], "weight_decay": 0.05}]
    groups.append({"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0})
    opt = torch.optim.AdamW(groups, lr=lr)
    g = torch.Generator().manual_seed(0)
    k = len(demo.SHAPES)
    for step in range(steps):
        for pg in opt.param_groups:  # 30 warm-up steps, cosine to 1e-5
            pg["lr"] = min(1.0, (step + 1) / 30) * (1e-5 + (lr - 1e-5) * 0.5 * (1 + math.cos(math.pi * step / steps)))
        i = torch.randint(0, n, (batch,), generator=g)
        z = head(vit(xtr[i])[:, 0])  # (B, 5 + 6) from [CLS]
        loss = F.cross_entropy(z[:, :k], ytr[i, 0]) + F.cross_entropy(z[:, k:], ytr[i, 1])
        opt.zero_grad()
        loss.backward()
        opt.step()
        if (step + 1) % 100 == 0:
            with torch.no_grad():
                z = head(vit.eval()(xte)[:, 0])
            vit.train()
            shape, colour = (
                (z[:, :k].argmax(1) == yte[:, 0]).float().mean(),
                (z[:, k:].argmax(1) == yte[:, 1]).float().mean(),
            )
            print(f"step {step + 1} loss {loss.item():.3f} test shape {shape:.3f} colour {colour:.3f}", flush=True)
    torch.save(vit.state_dict(), out)


if __name__ == "__main__":
    main(sys.argv[1], *(int(a) for a in sys.argv[2:4]))
