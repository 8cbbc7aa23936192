"""How right a captioner's captions of the demo's web images are, attribute by attribute: for every
"[size] colour shape [position]" phrase, whether the scene has an object of that colour, and whether that object
(one of them) has the named shape, size and position; plus the share of whole phrases right
(blip.data.demo.phrases_vs_scene). Once with nucleus sampling (top-p 0.9, as CapFilt) and once with beam search
(3 beams). The measurement behind docs/demo.md ("Fourth session").

    python docs/experiments/caption_attributes.py CAPTIONER DATA [IMAGES=400]
"""

from __future__ import annotations

import glob
import sys
from collections import Counter

import blip
from blip.data.demo import _OBJECT_PHRASE, _POSITION_OF, _SHAPE_OF, _SIZE_OF, phrases_vs_scene
from blip.data.shards import SampleStats, iter_shard


def tally(captions: list[str], scenes: list[dict]) -> dict[str, float]:
    c: Counter = Counter()
    for text, scene in zip(captions, scenes, strict=True):
        for size_w, color, shape_w, pos_w in _OBJECT_PHRASE.findall(text.lower()):
            same_colour = [o for o in scene["objects"] if o["color"] == color]
            c["phrases"] += 1
            c["colour"] += bool(same_colour)
            c["shape"] += any(o["shape"] == _SHAPE_OF[shape_w] for o in same_colour)
            if size_w:
                c["with size"] += 1
                c["size"] += any(o["size"] == _SIZE_OF[size_w] for o in same_colour)
            if pos_w:
                c["with position"] += 1
                c["position"] += any(o["position"] == _POSITION_OF[pos_w] for o in same_colour)
        c["right"] += sum(phrases_vs_scene(text, scene))
    n = max(c["phrases"], 1)
    return {
        "phrases": c["phrases"],
        "colour in scene": c["colour"] / n,
        "shape of that colour": c["shape"] / n,
        "size of that colour": c["size"] / max(c["with size"], 1),
        "position of that colour": c["position"] / max(c["with position"], 1),
        "phrases right": c["right"] / n,
    }


def main(captioner: str, data: str, n: int = 400) -> None:
    images, scenes = [], []
    for shard in sorted(glob.glob(f"{data}/web/*.tar")):
        for x in iter_shard(shard, SampleStats()):
            images.append(x["image"].convert("RGB"))
            scenes.append(x["json"]["scene"])
        if len(images) >= n:
            break
    images, scenes = images[:n], scenes[:n]
    model = blip.load(captioner, device="cpu")
    for label, kw in (("nucleus (top-p 0.9)", {"sample": True, "top_p": 0.9, "num_beams": 1}), ("beam 3", {})):
        named = ((str(i), im) for i, im in enumerate(images))
        caps = [c[0] for _, c in model.caption_named(named, max_length=24, min_length=5, batch_size=64, seed=0, **kw)]
        row = tally(caps, scenes)
        print(f"{label}: " + ", ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items()))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], *(int(a) for a in sys.argv[3:4]))
