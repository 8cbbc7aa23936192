"""The synthetic demo world: 96x96 images of coloured shapes with grammar-generated captions.

A scene has 1-3 objects (6 colours x 5 shapes x 2 sizes) at distinct positions (left, right, top, bottom,
centre) on one of 4 backgrounds; no two objects share colour and shape, so every description is checkable.
Captions come from a small grammar with paraphrases and optional details ("a red circle on the left", "there is a
small red circle at the left side", "red round shape to the left of a blue square", "three shapes: ...").

Splits, as the BLIP bootstrap needs them:
    human/  clean, 2-3 captions per image (json.captions, source "human"; the first also in txt)
    web/    one caption per image, a known fraction corrupted: another image's caption ("swap"), one wrong
            colour or shape ("attribute"), or alt-text junk (file names, shop slogans, camera strings: "junk").
            json.noise / json.noise_kind hold the truth and json.clean_caption the true caption.
    test/   clean, 5 captions per image, as shards AND as test.json (COCO-Karpathy style, images under
            test/images/) with test_gt.json (COCO caption ground truth)
    objects/  the world's "ImageNet": one object per image with its class labels in json.labels (shape, color,
            size, position: indices into world.json's "labels") and one caption, for pre-training the vision
            tower by classification (blip.vision_pretrain), as BLIP starts from an ImageNet-classified ViT
    objects_val/  more of the same, held out: the classifier's validation accuracy
and world.json, the summary (counts, realised noise). The noise fraction is exact: round(noise * web images).

Deterministic per seed, byte for byte: the plan (scenes, captions, noise) is drawn from generators seeded by
(seed, split), each image's small jitters from a generator seeded by (seed, key), PNG/JPEG settings are fixed,
and tar headers carry no timestamps.
"""

from __future__ import annotations

import io
import json
import os
import random
import re
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw

from blip.atomic import write_bytes
from blip.data.shards import write_shard
from blip.errors import InputError

IMAGE_SIZE = 96
SUPERSAMPLE = 2  # draw at 2x and downsample: anti-aliased edges

COLORS = {
    "red": (214, 39, 40),
    "green": (44, 160, 44),
    "blue": (31, 90, 200),
    "yellow": (240, 200, 20),
    "purple": (140, 70, 180),
    "orange": (255, 127, 14),
}
SHAPES = ("circle", "square", "triangle", "star", "cross")
SIZES = ("small", "big")
POSITIONS = ("left", "top", "centre", "bottom", "right")
BACKGROUNDS = {"white": (246, 246, 246), "gray": (128, 128, 128), "black": (22, 22, 22), "beige": (222, 205, 170)}

SCALES = {
    # split: (images, shards)
    "small": {"human": (300, 4), "web": (1200, 8), "test": (100, 4), "objects": (400, 4), "objects_val": (100, 1)},
    "full": {"human": (2000, 8), "web": (12000, 24), "test": (300, 4), "objects": (4000, 8), "objects_val": (500, 1)},
}
TEST_CAPTIONS = 5
NOISE_KINDS = {"swap": 0.4, "attribute": 0.3, "junk": 0.3}
FORMATS = {"human": "png", "web": "jpg", "test": "png", "objects": "png", "objects_val": "png"}
PNG = {"format": "PNG", "compress_level": 6, "optimize": False}
JPEG = {"format": "JPEG", "quality": 92, "subsampling": 0, "optimize": False, "progressive": False}
ID_BASE = {"human": 0, "web": 1_000_000, "test": 2_000_000, "objects": 3_000_000}

# ---- the grammar -------------------------------------------------------------------------------------------------
SHAPE_WORDS = {
    "circle": ("circle", "circle", "round shape", "disc"),
    "square": ("square", "square", "box", "block"),
    "triangle": ("triangle", "triangle", "triangular shape"),
    "star": ("star", "star", "star shape"),
    "cross": ("cross", "cross", "plus sign"),
}
SIZE_WORDS = {"small": ("small", "little", "tiny"), "big": ("big", "large")}
POSITION_WORDS = {
    "left": ("on the left", "at the left side", "to the left"),
    "right": ("on the right", "at the right side", "to the right"),
    "top": ("at the top", "near the top", "in the upper part"),
    "bottom": ("at the bottom", "near the bottom", "in the lower part"),
    "centre": ("in the middle", "in the center", "in the centre"),
}
BACKGROUND_WORDS = ("on a {} background", "against a {} backdrop", "on {}")
GRID = {"left": (0, 1), "right": (2, 1), "top": (1, 0), "bottom": (1, 2), "centre": (1, 1)}

JUNK = {
    "file": (
        "img_{n4}.jpg",
        "dsc{n5}.jpg",
        "dscn{n4}.jpg",
        "image-{n6}.png",
        "photo_{year}{mm}{dd}.jpeg",
        "untitled-{n1}",
        "screenshot {year}-{mm}-{dd} at {hh}.{mi}.{ss}",
        "p{n7}.jpg",
        "{hex8}.webp",
        "wp-content/uploads/{year}/{mm}/banner-{n3}.png",
    ),
    "shop": (
        "buy now - free shipping on all orders",
        "best price guaranteed",
        "click here to see more",
        "new arrivals {year} collection",
        "sale up to {pct}% off",
        "add to cart",
        "limited time offer",
        "shop the look",
        "order today and save {pct}%",
    ),
    "camera": (
        "canon eos {n1}d mark ii",
        "nikon d{n3} 1/{shutter}s f/{fnum} iso {iso}",
        "sony a7 iii {mm}mm f/{fnum}",
        "iphone {n1} back camera 4.25mm f/1.8",
        "olympus digital camera",
        "exif 1/{shutter} sec f/{fnum} iso {iso}",
    ),
    "misc": ("stock photo", "thumbnail", "default image", "no description available", "logo", "placeholder"),
}


def _pick(rng: random.Random, options: tuple | list) -> Any:
    # one rng.random() per choice, whatever the number of options: captions of two scenes that differ in one
    # attribute then use the same template and wording everywhere else
    return options[int(rng.random() * len(options))]


def _article(phrase: str) -> str:
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def _noun(rng: random.Random, o: dict) -> str:
    size = _pick(rng, SIZE_WORDS[o["size"]])
    with_size = rng.random() < 0.5
    return f"{size + ' ' if with_size else ''}{o['color']} {_pick(rng, SHAPE_WORDS[o['shape']])}"


def _relation(a: dict, b: dict) -> str:
    (xa, ya), (xb, yb) = GRID[a["position"]], GRID[b["position"]]
    dx, dy = xa - xb, ya - yb
    if dx and abs(dx) >= abs(dy):
        return "to the left of" if dx < 0 else "to the right of"
    return "above" if dy < 0 else "below"


def describe(scene: dict, rng: random.Random) -> str:
    """One caption of a scene from the grammar (lowercase, no final period)."""
    objs = list(scene["objects"])
    order = sorted(range(len(objs)), key=lambda _: rng.random())
    objs = [objs[i] for i in order]
    nouns = [_noun(rng, o) for o in objs]
    a = [_article(n) for n in nouns]
    pos = [_pick(rng, POSITION_WORDS[o["position"]]) for o in objs]
    bg = _pick(rng, BACKGROUND_WORDS).format(scene["background"])
    t = rng.random()
    if len(objs) == 1:
        templates = (
            f"{a[0]} {pos[0]}",
            f"there is {a[0]} {pos[0]}",
            f"{nouns[0]} {pos[0]}",
            f"{a[0]} {pos[0]} {bg}",
            f"{a[0]} {bg}",
            f"an image of {a[0]} {pos[0]}",
            f"a single {nouns[0]} {pos[0]}",
        )
    elif len(objs) == 2:
        rel = _relation(objs[0], objs[1])
        templates = (
            f"{a[0]} {pos[0]} and {a[1]} {pos[1]}",
            f"{nouns[0]} {rel} {a[1]}",
            f"{a[0]} {rel} {a[1]}",
            f"two shapes, {a[0]} and {a[1]}",
            f"there is {a[0]} {pos[0]} and {a[1]} {pos[1]} {bg}",
            f"{a[0]} and {a[1]} {bg}",
        )
    else:
        rel = _relation(objs[0], objs[1])
        templates = (
            f"{a[0]} {pos[0]}, {a[1]} {pos[1]} and {a[2]} {pos[2]}",
            f"three shapes, {a[0]}, {a[1]} and {a[2]}",
            f"{a[0]} {rel} {a[1]}, and {a[2]} {pos[2]}",
            f"there are three shapes {bg}, {a[0]}, {a[1]} and {a[2]}",
            f"{a[0]}, {a[1]} and {a[2]} {bg}",
        )
    return templates[int(t * len(templates))]


def distinct_captions(scene: dict, rng: random.Random, n: int) -> list[str]:
    """n different captions of a scene (fewer repeats allowed only if the grammar runs out)."""
    out: list[str] = []
    for _ in range(20 * n):
        c = describe(scene, rng)
        if c not in out:
            out.append(c)
            if len(out) == n:
                break
    while len(out) < n:
        out.append(describe(scene, rng))
    return out


def _words(options: dict[str, tuple[str, ...]]) -> dict[str, str]:
    return {w: key for key, ws in options.items() for w in ws}


def _alternatives(words: Iterable[str]) -> str:
    return "|".join(re.escape(w) for w in sorted(words, key=len, reverse=True))  # longest first: "round shape"


_SIZE_OF = _words(SIZE_WORDS)
_SHAPE_OF = _words(SHAPE_WORDS)
_POSITION_OF = _words(POSITION_WORDS)
_OBJECT_PHRASE = re.compile(
    rf"\b(?:({_alternatives(_SIZE_OF)}) )?({_alternatives(COLORS)}) ({_alternatives(_SHAPE_OF)})(?:e?s)?\b"
    rf"(?: ({_alternatives(_POSITION_OF)})(?! of an? ))?"  # "to the left of a ..." is a relation, not a position
)


def phrase_errors(text: str, scene: dict) -> list[str | None]:
    """One entry per "[size] colour shape [position]" phrase of a caption: None when the scene has an object of that
    colour and shape, of that size and at that position when they are given; else what is wrong:

        "binding"   the scene has that colour and that shape, on different objects ("a red square" in a scene of a
                    red circle and a blue square)
        "shape"     the scene has that colour, but no object of that shape
        "colour"    no object of that colour
        "size", "position"   the object exists, but the named size (checked first) or position is not its own
    """
    objects = {(o["color"], o["shape"]): o for o in scene.get("objects", [])}
    colours = {o["color"] for o in objects.values()}
    shapes = {o["shape"] for o in objects.values()}
    kinds: list[str | None] = []
    for size_word, color, shape_word, position_word in _OBJECT_PHRASE.findall(text.lower()):
        shape = _SHAPE_OF[shape_word]
        o = objects.get((color, shape))
        if o is None:
            kinds.append("colour" if color not in colours else "binding" if shape in shapes else "shape")
        elif size_word and _SIZE_OF[size_word] != o["size"]:
            kinds.append("size")
        elif position_word and _POSITION_OF[position_word] != o["position"]:
            kinds.append("position")
        else:
            kinds.append(None)
    return kinds


def phrases_vs_scene(text: str, scene: dict) -> list[bool]:
    """One verdict per "[size] colour shape [position]" phrase of a caption: an object of that colour and shape is in
    the scene, of that size and at that position when they are given (`phrase_errors` says what is wrong)."""
    return [kind is None for kind in phrase_errors(text, scene)]


def caption_matches_scene(text: str, scene: dict) -> bool | None:
    """Whether a caption names only what the scene holds: every "[size] colour shape [position]" phrase an object of
    that colour and shape, of that size and at that position when they are given. None: no such phrase (junk, or a
    caption off the grammar).

    The demo world records every scene, so synthetic captions can be checked, not just scored by the filter.
    """
    verdicts = phrases_vs_scene(text, scene)
    return all(verdicts) if verdicts else None


def junk_caption(rng: random.Random) -> str:
    """Alt-text junk: a file name, a shop slogan, a camera string or a placeholder."""
    template = _pick(rng, JUNK[_pick(rng, tuple(JUNK))])
    fields = {
        "n1": rng.randint(1, 9),
        "n3": rng.randint(100, 999),
        "n4": f"{rng.randint(0, 9999):04d}",
        "n5": f"{rng.randint(0, 99999):05d}",
        "n6": rng.randint(100000, 999999),
        "n7": rng.randint(1000000, 9999999),
        "hex8": f"{rng.getrandbits(32):08x}",
        "year": rng.randint(2008, 2023),
        "mm": f"{rng.randint(1, 12):02d}",
        "dd": f"{rng.randint(1, 28):02d}",
        "hh": f"{rng.randint(0, 23):02d}",
        "mi": f"{rng.randint(0, 59):02d}",
        "ss": f"{rng.randint(0, 59):02d}",
        "pct": _pick(rng, (10, 20, 30, 50, 70)),
        "shutter": _pick(rng, (30, 60, 125, 250, 500, 1000)),
        "fnum": _pick(rng, ("1.8", "2.8", "4.0", "5.6", "8.0")),
        "iso": _pick(rng, (100, 200, 400, 800, 1600)),
    }
    return template.format(**fields)


# ---- scenes ------------------------------------------------------------------------------------------------------
def random_scene(rng: random.Random) -> dict:
    k = rng.choices((1, 2, 3), weights=(0.4, 0.35, 0.25))[0]
    positions = rng.sample(POSITIONS, k)
    used: set[tuple[str, str]] = set()
    objects = []
    for p in sorted(positions, key=POSITIONS.index):
        while True:
            color, shape = _pick(rng, tuple(COLORS)), _pick(rng, SHAPES)
            if (color, shape) not in used:
                break
        used.add((color, shape))
        objects.append({"shape": shape, "color": color, "size": _pick(rng, SIZES), "position": p})
    return {"objects": objects, "background": _pick(rng, tuple(BACKGROUNDS))}


def _kinds(scene: dict) -> set[tuple[str, str]]:
    return {(o["color"], o["shape"]) for o in scene["objects"]}


def wrong_attribute(scene: dict, rng: random.Random) -> dict:
    """The scene with one object's colour or shape changed to a combination the scene does not contain."""
    i = rng.randrange(len(scene["objects"]))
    attr = "color" if rng.random() < 0.6 else "shape"
    values = tuple(COLORS) if attr == "color" else SHAPES
    have = _kinds(scene)
    objects = [dict(o) for o in scene["objects"]]
    o = objects[i]
    options = [
        v for v in values if v != o[attr] and ((v, o["shape"]) if attr == "color" else (o["color"], v)) not in have
    ]
    o[attr] = _pick(rng, options)
    return {**scene, "objects": objects}


# ---- rendering ---------------------------------------------------------------------------------------------------
def _polygon(shape: str, cx: float, cy: float, r: float, angle: float) -> list[tuple[float, float]]:
    import math

    if shape == "square":
        pts = [(1.2 * r, math.pi / 4 + k * math.pi / 2) for k in range(4)]
    elif shape == "triangle":
        pts = [(1.3 * r, -math.pi / 2 + k * 2 * math.pi / 3) for k in range(3)]
    elif shape == "star":
        pts = [((1.3 if k % 2 == 0 else 0.55) * r, -math.pi / 2 + k * math.pi / 5) for k in range(10)]
    else:  # cross: a plus sign of arm half-width w
        w = 0.38 * r
        corners = [(w, r), (w, w), (r, w), (r, -w), (w, -w), (w, -r), (-w, -r), (-w, -w), (-r, -w), (-r, w), (-w, w)]
        corners.append((-w, r))
        pts = [(math.hypot(x, y), math.atan2(y, x)) for x, y in corners]
        r = 1.0
    return [(cx + d * math.cos(a + angle), cy + d * math.sin(a + angle)) for d, a in pts]


def render(scene: dict, seed: str, size: int = IMAGE_SIZE) -> Image.Image:
    """Draw a scene; small jitters of colour, position, size and rotation come from `seed`."""
    import math

    rng = random.Random(seed)
    s = size * SUPERSAMPLE

    def jitter(rgb: tuple[int, int, int], amount: int) -> tuple[int, ...]:
        return tuple(min(255, max(0, c + rng.randint(-amount, amount))) for c in rgb)

    img = Image.new("RGB", (s, s), jitter(BACKGROUNDS[scene["background"]], 10))
    draw = ImageDraw.Draw(img)
    anchors = {"left": (0.2, 0.5), "right": (0.8, 0.5), "top": (0.5, 0.2), "bottom": (0.5, 0.8), "centre": (0.5, 0.5)}
    for o in scene["objects"]:
        ax, ay = anchors[o["position"]]
        cx, cy = (ax + rng.uniform(-0.03, 0.03)) * s, (ay + rng.uniform(-0.03, 0.03)) * s
        r = (0.085 if o["size"] == "small" else 0.15) * s * rng.uniform(0.9, 1.1)
        fill = jitter(COLORS[o["color"]], 14)
        if o["shape"] == "circle":
            draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
        else:
            draw.polygon(_polygon(o["shape"], cx, cy, r, math.radians(rng.uniform(-20, 20))), fill=fill)
    return img.reduce(SUPERSAMPLE)


def encode(img: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    img.save(buf, **(JPEG if fmt == "jpg" else PNG))
    return buf.getvalue()


# ---- planning and writing ----------------------------------------------------------------------------------------
def _plan_split(split: str, n: int, seed: int, n_captions: Callable[[random.Random], int]) -> list[dict]:
    rng = random.Random(f"blipctl-demo:{seed}:{split}:plan")
    samples = []
    for i in range(n):
        scene = random_scene(rng)
        caps = distinct_captions(scene, rng, n_captions(rng))
        image_id = ID_BASE[split] + i
        samples.append({"key": f"{split}_{image_id:07d}", "image_id": image_id, "scene": scene, "captions": caps})
    return samples


def _plan_objects(n: int, seed: int) -> list[dict]:
    """Single-object scenes, every attribute uniform, from their own generator (the other splits do not move)."""
    rng = random.Random(f"blipctl-demo:{seed}:objects:plan")
    samples = []
    for i in range(n):
        o = {"shape": _pick(rng, SHAPES), "color": _pick(rng, tuple(COLORS)), "size": _pick(rng, SIZES)}
        o["position"] = _pick(rng, POSITIONS)
        scene = {"objects": [o], "background": _pick(rng, tuple(BACKGROUNDS))}
        image_id = ID_BASE["objects"] + i
        key = f"objects_{image_id:07d}"
        samples.append({"key": key, "image_id": image_id, "scene": scene, "captions": [describe(scene, rng)]})
    return samples


LABELS = {"shape": list(SHAPES), "color": list(COLORS), "size": list(SIZES), "position": list(POSITIONS)}
"""The objects split's label heads and their class names (world.json "labels")."""


def object_labels(o: dict) -> dict[str, int]:
    """An object's class id per head of LABELS: the objects split's `json.labels`."""
    return {head: names.index(o[head]) for head, names in LABELS.items()}


def _plan_noise(web: list[dict], seed: int, noise: float) -> dict[str, int]:
    """Corrupt exactly round(noise * N) web captions; kinds split by NOISE_KINDS (largest remainder)."""
    rng = random.Random(f"blipctl-demo:{seed}:web:noise")
    n_noisy = round(noise * len(web))
    quotas = {k: int(w * n_noisy) for k, w in NOISE_KINDS.items()}
    rest = sorted(NOISE_KINDS, key=lambda k: -(NOISE_KINDS[k] * n_noisy - quotas[k]))
    for k in rest[: n_noisy - sum(quotas.values())]:
        quotas[k] += 1
    kinds = [k for k, q in quotas.items() for _ in range(q)]
    noisy = rng.sample(range(len(web)), n_noisy)
    for s in web:
        s["clean"] = s["captions"][0]
        s["txt"], s["noise_kind"] = s["clean"], None
    for i, kind in zip(noisy, kinds, strict=True):
        s = web[i]
        s["noise_kind"] = kind
        if kind == "swap":
            for _ in range(50):
                other = web[rng.randrange(len(web))]
                if _kinds(other["scene"]) != _kinds(s["scene"]):
                    break
            s["txt"] = other["clean"]
        elif kind == "attribute":
            cap_seed = f"blipctl-demo:{seed}:attr:{s['key']}"
            s["clean"] = describe(s["scene"], random.Random(cap_seed))
            s["txt"] = describe(wrong_attribute(s["scene"], rng), random.Random(cap_seed))
        else:
            s["txt"] = junk_caption(rng)
    return quotas


def _sample_record(split: str, s: dict) -> tuple[str, dict]:
    meta: dict[str, Any] = {"image_id": s["image_id"], "split": split, "scene": s["scene"]}
    if split == "web":
        meta.update(source="web", noise=s["noise_kind"] is not None, noise_kind=s["noise_kind"])
        meta["clean_caption"] = s["clean"]
        return s["txt"], meta
    meta["source"] = "human"
    if split.startswith("objects"):
        meta["labels"] = object_labels(s["scene"]["objects"][0])
    meta["captions"] = [{"text": c, "source": "human"} for c in s["captions"]]
    return s["captions"][0], meta


def _write_shard(path: str, split: str, fmt: str, seed: int, samples: list[dict], images_dir: str | None) -> int:
    """Render and write one shard; depends on its arguments only."""
    records = []
    for s in samples:
        data = encode(render(s["scene"], f"blipctl-demo:{seed}:{s['key']}:render"), fmt)
        txt, meta = _sample_record(split, s)
        records.append({"__key__": s["key"], fmt: data, "txt": txt, "json": meta})
        if images_dir is not None:
            write_bytes(Path(images_dir) / f"{s['key']}.{fmt}", data)
    return write_shard(path, records)


def _clear_old(d: Path, split: str) -> None:
    """Remove what an earlier run of a different scale left (only files this module names)."""
    for p in list(d.glob(f"{split}-*.tar")) + list(d.glob(f"{split}-*.tar.tmp")):
        p.unlink()
    if (d / "images").is_dir():
        for p in (d / "images").glob(f"{split}_*"):
            p.unlink()


def make_demo(
    out: str | os.PathLike,
    seed: int = 0,
    scale: str = "small",
    noise: float = 0.4,
    *,
    on_progress: Callable[[int, int], None] | None = None,
) -> dict:
    """Write the demo world under `out` (human/, web/, test/, objects/, objects_val/, world.json); returns the
    summary (world.json plus "seconds"). on_progress(images done, images total) is called as shards finish.

    One process: an image takes about 0.25 ms to draw and encode, so the full world takes a few seconds and
    worker processes would cost more to start than they save."""
    if scale not in SCALES:
        raise InputError(f"scale must be one of {', '.join(SCALES)}, not {scale!r}", param="scale")
    if not 0.0 <= noise <= 1.0:
        raise InputError(f"noise must be between 0 and 1, got {noise}", param="noise")
    t0 = time.perf_counter()
    root = Path(out)
    sizes = SCALES[scale]
    plans = {
        "human": _plan_split("human", sizes["human"][0], seed, lambda r: r.choice((2, 3))),
        "web": _plan_split("web", sizes["web"][0], seed, lambda r: 1),
        "test": _plan_split("test", sizes["test"][0], seed, lambda r: TEST_CAPTIONS),
    }
    objects = _plan_objects(sizes["objects"][0] + sizes["objects_val"][0], seed)
    plans["objects"], plans["objects_val"] = objects[: sizes["objects"][0]], objects[sizes["objects"][0] :]
    quotas = _plan_noise(plans["web"], seed, noise)

    jobs = []
    for split, samples in plans.items():
        d = root / split
        d.mkdir(parents=True, exist_ok=True)
        _clear_old(d, split)
        images_dir = None
        if split == "test":
            (d / "images").mkdir(exist_ok=True)
            images_dir = str(d / "images")
        n_shards = sizes[split][1]
        per = -(-len(samples) // n_shards)
        for k in range(n_shards):
            part = samples[k * per : (k + 1) * per]
            if part:
                jobs.append((str(d / f"{split}-{k:05d}.tar"), split, FORMATS[split], seed, part, images_dir))
    total, done = sum(len(j[4]) for j in jobs), 0
    for job in jobs:
        done += _write_shard(*job)
        if on_progress:
            on_progress(done, total)

    test = plans["test"]
    ann = [{"image": f"images/{s['key']}.png", "caption": s["captions"], "image_id": s["image_id"]} for s in test]
    write_bytes(root / "test" / "test.json", (json.dumps(ann, indent=1) + "\n").encode())
    from blip.data.datasets import build_gt

    gt = build_gt([s["image_id"] for s in test], [s["captions"] for s in test])
    gt["info"] = {"description": f"blipctl demo world, seed {seed}, scale {scale}"}
    write_bytes(root / "test" / "test_gt.json", (json.dumps(gt, indent=1) + "\n").encode())

    n_web = len(plans["web"])
    n_noisy = sum(quotas.values())
    world = {
        "version": 1,
        "seed": seed,
        "scale": scale,
        "image_size": IMAGE_SIZE,
        "splits": {
            split: {
                "images": len(samples),
                "captions": sum(len(s["captions"]) for s in samples) if split != "web" else len(samples),
                "shards": sorted(Path(j[0]).name for j in jobs if j[1] == split),
                "format": FORMATS[split],
            }
            for split, samples in plans.items()
        },
        "noise": {
            "requested": noise,
            "realised": round(n_noisy / n_web, 6) if n_web else 0.0,
            "noisy": n_noisy,
            "by_kind": quotas,
        },
        "files": {"test_annotations": "test/test.json", "test_gt": "test/test_gt.json", "test_images": "test/images"},
        "vocabulary": {
            "colors": list(COLORS),
            "shapes": list(SHAPES),
            "sizes": list(SIZES),
            "positions": list(POSITIONS),
            "backgrounds": list(BACKGROUNDS),
        },
        "labels": LABELS,
    }
    write_bytes(root / "world.json", (json.dumps(world, indent=1) + "\n").encode())
    return {**world, "out": str(root), "seconds": round(time.perf_counter() - t0, 3)}
