"""Evaluation sets and training pairs: COCO / Flickr30k Karpathy splits, annotation JSONs, shard sets.

Layout under the data root (`--data-root` or $BLIP_DATA), as the original BLIP repo downloads it:

    <root>/annotations/coco_karpathy_{train,val,test}.json      (+ optional coco_karpathy_{val,test}_gt.json)
    <root>/annotations/flickr30k_{train,val,test}.json          (+ optional flickr30k_{val,test}_gt.json)
    <root>/<image field of each record>                        e.g. val2014/COCO_val2014_000000391895.jpg

Train records are `{"image", "caption": str, "image_id"}` (one per caption); val/test records are
`{"image", "caption": [str, ...]}`. Retrieval ids follow the original (coco_karpathy_dataset.py): images in file
order, texts = all captions flattened, img2txt[i] = that image's caption indices, txt2img[t] = its image.
"""

from __future__ import annotations

import json
import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from blip.data.images import BadSample, decode_image
from blip.data.shards import SampleStats, captions_of, expand_shards, iter_shard, sample_image_id
from blip.data.text import pre_caption
from blip.errors import InputError

log = logging.getLogger(__name__)

KARPATHY = {"coco": "coco_karpathy_{split}.json", "flickr30k": "flickr30k_{split}.json"}
SPLITS = ("train", "val", "test")
EVAL_MAX_WORDS = 30

_LAYOUT_HELP = (
    "expected layout: <root>/annotations/coco_karpathy_{{train,val,test}}.json or "
    "<root>/annotations/flickr30k_{{train,val,test}}.json, images at <root>/<record 'image' path> "
    "(the original BLIP annotation files: "
    "https://storage.googleapis.com/sfr-vision-language-research/datasets/{file})"
)


def resolve_data_root(data_root: str | os.PathLike | None) -> Path:
    """`data_root`, else $BLIP_DATA, else an InputError that says how to point at the data."""
    root = data_root if data_root else os.environ.get("BLIP_DATA")
    if not root:
        raise InputError(
            "no data root: pass data_root DIR (or set BLIP_DATA=DIR) pointing at a directory with "
            "annotations/coco_karpathy_test.json (or flickr30k_test.json) and the image folders",
            param="data_root",
        )
    p = Path(root).expanduser()
    if not p.is_dir():
        raise InputError(
            f"data root {p} is not a directory (from {'data_root' if data_root else '$BLIP_DATA'})", param="data_root"
        )
    return p


@dataclass
class EvalSet:
    """Images with several reference captions each: what eval-retrieval and eval-caption need."""

    name: str
    images: list[Any]
    """Image paths, or encoded image bytes (from shards)."""
    raw_captions: list[list[str]]
    image_ids: list[int]
    gt: dict[str, Any]
    """COCO-format ground truth for caption scoring: {"images": [{"id"}], "annotations": [{"image_id", ...}]}."""
    texts: list[str] = field(default_factory=list)
    """Every caption, pre_caption'd (max 30 words), flattened in image order."""
    img2txt: list[list[int]] = field(default_factory=list)
    txt2img: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.texts:
            for i, caps in enumerate(self.raw_captions):
                self.img2txt.append([])
                for c in caps:
                    self.img2txt[i].append(len(self.texts))
                    self.texts.append(pre_caption(c, EVAL_MAX_WORDS))
                    self.txt2img.append(i)

    def __len__(self) -> int:
        return len(self.images)

    def load_image(self, i: int) -> Image.Image:
        """Decoded with the shard reader's checks: a decompression bomb or a corrupt file is an InputError naming
        the image and the reason (absurd_size, undecodable_image, ...), never a huge allocation or a traceback."""
        src = self.images[i]
        where = src if isinstance(src, str) else "from a shard"
        try:
            if not isinstance(src, bytes | bytearray):
                with open(src, "rb") as f:
                    src = f.read()
            return decode_image(bytes(src))
        except OSError as e:
            raise InputError(f"{self.name}: cannot read image {i} ({where}): {e}") from None
        except BadSample as e:
            raise InputError(f"{self.name}: image {i} ({where}): {e.reason} ({e.detail})") from None


# ---- eval sets ---------------------------------------------------------------------------------------------------
def load_eval_set(dataset: str, split: str = "test", data_root: str | os.PathLike | None = None) -> EvalSet:
    """`coco` | `flickr30k` (Karpathy `split` under the data root), an annotation JSON (images relative to
    `data_root` if given, else to the JSON's directory; a sibling `<stem>_gt.json` is the caption GT if present),
    or a shard spec (captions from json.captions/txt, ids from json.image_id). `split` only applies to the named
    datasets."""
    if dataset in KARPATHY:
        root = resolve_data_root(data_root)
        ann = _karpathy_file(root, dataset, split)
        gt_path = _find_gt(root, dataset, split)
        return _from_records(f"{dataset}/{split}", _read_json_list(ann), root, gt_path)
    p = Path(dataset).expanduser()
    if p.suffix == ".json" and p.is_file():
        root = Path(data_root).expanduser() if data_root else p.parent
        gt = p.with_name(p.stem + "_gt.json")
        return _from_records(p.name, _read_json_list(p), root, gt if gt.is_file() else None)
    if p.suffix == ".json":
        raise InputError(f"annotation file {p} not found")
    return _from_shards(_shard_list(dataset))


def _shard_list(dataset: str) -> list[str]:
    try:
        return expand_shards(dataset)
    except InputError as e:
        raise InputError(f"{e} (a DATASET is coco, flickr30k, an annotation .json, or shards)") from None


def _karpathy_file(root: Path, dataset: str, split: str) -> Path:
    if split not in SPLITS:
        raise InputError(f"split must be one of {', '.join(SPLITS)}, not {split!r}", param="split")
    name = KARPATHY[dataset].format(split=split)
    ann = root / "annotations" / name
    if not ann.is_file():
        raise InputError(f"{dataset}: {ann} not found; " + _LAYOUT_HELP.format(file=name))
    return ann


def _find_gt(root: Path, dataset: str, split: str) -> Path | None:
    stem = KARPATHY[dataset].format(split=split)[: -len(".json")]
    for p in (root / "annotations" / f"{stem}_gt.json", root / "annotations" / "coco_gt" / f"{stem}_gt.json"):
        if p.is_file():
            return p
    return None


def _read_json_list(path: Path) -> list[dict]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as e:
        raise InputError(f"{path}: cannot read annotation JSON: {type(e).__name__}: {str(e)[:200]}") from None
    if not isinstance(data, list) or not all(isinstance(r, dict) and "image" in r for r in data):
        raise InputError(f"{path}: expected a list of records with an 'image' field, e.g. [{{'image', 'caption'}}]")
    for i, r in enumerate(data):
        image, caps = r["image"], r.get("caption", [])
        if not isinstance(image, str) or not image:
            raise InputError(f"{path}: record {i}: 'image' must be a file path (a string), got {image!r:.80}")
        if not isinstance(caps, str) and not (isinstance(caps, list) and all(isinstance(c, str) for c in caps)):
            raise InputError(
                f"{path}: record {i} (image {image!r}): 'caption' must be a string or a list of strings, "
                f"got {caps!r:.80}"
            )
    return data


def _id_from(record: dict, image: str) -> int | None:
    """The record's int image_id, else the number at the end of the file name (COCO_val2014_000000391895.jpg,
    1007129816.jpg), as the original caption eval does."""
    v = record.get("image_id")
    if isinstance(v, int) and not isinstance(v, bool):
        return v
    if isinstance(v, str) and v.isdigit():
        return int(v)
    m = re.search(r"(\d+)$", Path(image).stem)
    return int(m.group(1)) if m else None


def _from_records(name: str, records: list[dict], root: Path, gt_path: Path | None) -> EvalSet:
    order: dict[str, int] = {}  # image -> index, in file order; train-style records (one caption each) merge
    images: list[str] = []
    captions: list[list[str]] = []
    ids: list[int | None] = []
    for r in records:
        image = r["image"]
        caps = r.get("caption", [])
        caps = [caps] if isinstance(caps, str) else list(caps)
        if image not in order:
            order[image] = len(images)
            images.append(image)
            captions.append([])
            ids.append(_id_from(r, image))
        captions[order[image]].extend(c for c in caps if isinstance(c, str))
    if not images:
        raise InputError(f"{name}: the annotation file has no records")
    if any(not c for c in captions):
        bad = images[next(i for i, c in enumerate(captions) if not c)]
        raise InputError(f"{name}: image {bad} has no caption")
    paths = [str(root / im) for im in images]
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
        raise InputError(
            f"{name}: {len(missing)} of {len(paths)} images not found, e.g. {missing[0]} "
            f"(image paths are relative to {root}; pass data_root to change that)",
            param="data_root",
        )
    image_ids = [i for i in ids if i is not None]
    if len(set(image_ids)) != len(images):  # no usable unique ids: number the images
        image_ids = list(range(len(images)))
    gt = _load_gt(gt_path, image_ids, name) if gt_path else build_gt(image_ids, captions)
    return EvalSet(name=name, images=paths, raw_captions=captions, image_ids=image_ids, gt=gt)


def build_gt(image_ids: list[int], captions: list[list[str]]) -> dict[str, Any]:
    """COCO-format caption ground truth (what pycocoevalcap and blip.eval.caption read)."""
    anns = []
    for iid, caps in zip(image_ids, captions, strict=True):
        for c in caps:
            anns.append({"image_id": iid, "caption": c, "id": len(anns)})
    return {
        "info": {"description": "built by blipctl from the annotation file"},
        "licenses": [],
        "type": "captions",
        "images": [{"id": iid} for iid in image_ids],
        "annotations": anns,
    }


def _load_gt(path: Path, image_ids: list[int], name: str) -> dict[str, Any]:
    try:
        gt = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise InputError(f"{path}: cannot read caption ground truth: {e}") from None
    if not isinstance(gt, dict) or "annotations" not in gt:
        raise InputError(f"{path}: not COCO-format caption ground truth (no 'annotations')")
    gt.setdefault("images", [{"id": i} for i in sorted({a["image_id"] for a in gt["annotations"]})])
    known = {a["image_id"] for a in gt["annotations"]}
    lost = [i for i in image_ids if i not in known]
    if lost:
        raise InputError(f"{path}: no ground-truth captions for {len(lost)} images of {name}, e.g. image_id {lost[0]}")
    return gt


def _from_shards(shards: list[str]) -> EvalSet:
    stats = SampleStats()
    images: list[bytes] = []
    captions: list[list[str]] = []
    ids: list[int] = []
    for shard in shards:
        for s in iter_shard(shard, stats):
            images.append(s["image_bytes"])
            captions.append(captions_of(s))
            ids.append(sample_image_id(s))
    name = Path(shards[0]).parent.name if len(shards) > 1 else Path(shards[0]).name
    if not images:
        raise InputError(f"{name}: no readable samples in {len(shards)} shard(s) ({stats.summary()})")
    if stats.total_bad:
        log.warning("%s: %s", name, stats.summary())
    if len(set(ids)) != len(ids):
        ids = list(range(len(images)))
    return EvalSet(name=name, images=images, raw_captions=captions, image_ids=ids, gt=build_gt(ids, captions))


# ---- training pairs ----------------------------------------------------------------------------------------------
def load_train_pairs(
    dataset: str, split: str = "train", data_root: str | os.PathLike | None = None
) -> list[tuple[str, str, int]] | list[str]:
    """Training data of a DATASET argument: (image path, caption, image id) pairs for `coco`, `flickr30k` and
    annotation JSONs, or the shard list of a shard spec (what blip.data.loader.build_train_loader takes).

    Image ids are numbered by first appearance, as the original (`img_ids[ann['image_id']] = n`), so all
    captions of an image share one id; a list-valued caption gives one pair per caption.
    """
    if dataset in KARPATHY:
        root = resolve_data_root(data_root)
        return _pairs(_read_json_list(_karpathy_file(root, dataset, split)), root, dataset)
    p = Path(dataset).expanduser()
    if p.suffix == ".json":
        if not p.is_file():
            raise InputError(f"annotation file {p} not found")
        root = Path(data_root).expanduser() if data_root else p.parent
        return _pairs(_read_json_list(p), root, str(p))
    return _shard_list(dataset)


def _pairs(records: list[dict], root: Path, name: str) -> list[tuple[str, str, int]]:
    ids: dict[Any, int] = {}
    out: list[tuple[str, str, int]] = []
    for r in records:
        caps = r.get("caption")
        caps = [caps] if isinstance(caps, str) else list(caps or [])
        ident = r.get("image_id", r["image"])
        n = ids.setdefault(ident, len(ids))
        out.extend((str(root / r["image"]), c, n) for c in caps if isinstance(c, str))
    if not out:
        raise InputError(f"{name}: no (image, caption) records")
    first = out[0][0]
    if not os.path.isfile(first):
        raise InputError(
            f"{name}: image {first} not found (image paths are relative to {root}; pass data_root to change that)",
            param="data_root",
        )
    return out
