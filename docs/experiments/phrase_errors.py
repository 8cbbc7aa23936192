"""Why a CapFilt run's synthetic captions are wrong: each "[size] colour shape [position]" phrase of the kept synthetic
captions checked against the recorded scene, the wrong ones split by kind, per number of objects in the scene:

    binding, shape, colour, size, position   as `blip.data.demo.phrase_errors` classifies them

The measurement behind docs/demo-capfilt.md ("Seventh session"): a captioner that names single objects right can
still bind colours to the wrong shapes in scenes of two or three objects.

    python docs/experiments/phrase_errors.py CAPFILT_OUT_DIR [SHARDS=all]
"""

from __future__ import annotations

import glob
import sys
from collections import Counter

from blip.data.demo import phrase_errors
from blip.data.shards import SampleStats, iter_shard


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
                for kind in phrase_errors(c["text"], scene):
                    tally[n, "phrases"] += 1
                    tally[n, kind or "right"] += 1
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
