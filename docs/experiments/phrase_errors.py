"""Why a CapFilt run's synthetic captions are wrong: each "[size] colour shape [position]" phrase of the kept synthetic
captions checked against the recorded scene, the wrong ones split by kind, per number of objects in the scene:

    binding   the scene has that colour and that shape, but on different objects ("a red square" for a red circle
              and a blue square)
    shape     the scene has that colour but no object of that shape
    colour    no object of the scene has that colour
    size, position   the object exists but the named size (checked first) or position is not its own

The measurement behind docs/demo-capfilt.md ("Seventh session"): a captioner that names single objects right can
still bind colours to the wrong shapes in scenes of two or three objects.

    python docs/experiments/phrase_errors.py CAPFILT_OUT_DIR [SHARDS=all]
"""

from __future__ import annotations

import glob
import sys
from collections import Counter

from blip.data.demo import _OBJECT_PHRASE, _POSITION_OF, _SHAPE_OF, _SIZE_OF
from blip.data.shards import SampleStats, iter_shard


def kind_of_error(phrase: tuple[str, str, str, str], scene: dict) -> str | None:
    """None when the phrase is right against the scene, else the kind of error (see the module docstring)."""
    size_w, color, shape_w, pos_w = phrase
    shape = _SHAPE_OF[shape_w]
    o = next((o for o in scene["objects"] if (o["color"], o["shape"]) == (color, shape)), None)
    if o is None:
        colours, shapes = {x["color"] for x in scene["objects"]}, {x["shape"] for x in scene["objects"]}
        if color in colours and shape in shapes:
            return "binding"
        return "shape" if color in colours else "colour"
    if size_w and _SIZE_OF[size_w] != o["size"]:
        return "size"
    if pos_w and _POSITION_OF[pos_w] != o["position"]:
        return "position"
    return None


def main(out_dir: str, shards: int | None = None) -> None:
    paths = sorted(glob.glob(f"{out_dir}/*.tar"))[:shards]
    tally: Counter = Counter()
    for path in paths:
        for s in iter_shard(path, SampleStats(), need_caption=False, decode=False):
            scene = s["json"]["scene"]
            n = len(scene["objects"])
            for c in s["json"]["captions"]:
                if c["source"] != "synthetic":
                    continue
                for phrase in _OBJECT_PHRASE.findall(c["text"].lower()):
                    tally[n, "phrases"] += 1
                    tally[n, kind_of_error(phrase, scene) or "right"] += 1
    kinds = ("right", "binding", "shape", "colour", "size", "position")
    print(f"{len(paths)} shards of {out_dir}: kept synthetic phrases by objects in the scene")
    print(f"{'objects':>8} {'phrases':>8} " + " ".join(f"{k:>9}" for k in kinds))
    for n in (1, 2, 3, "all"):
        row = {k: sum(v for (m, kk), v in tally.items() if kk == k and (n == "all" or m == n)) for k in kinds}
        total = sum(v for (m, kk), v in tally.items() if kk == "phrases" and (n == "all" or m == n))
        shares = " ".join(f"{100 * row[k] / max(total, 1):8.1f}%" for k in kinds)
        print(f"{n!s:>8} {total:>8} {shares}")


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else None)
