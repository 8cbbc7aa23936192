"""CapFilt: bootstrap clean image-text data from noisy web shards (BLIP §3.3; never released by the authors).

For every web image the captioner writes synthetic captions (nucleus sampling, top-p 0.9 as the paper found
best); the filter scores the web caption and each synthetic caption with ITM; captions whose match probability
is below the threshold (0.5, or one calibrated to keep a given fraction: `keep_fraction`) are dropped, and
`keep_top` keeps only the best few per image. Images without any text get synthetic captions only;
human-annotated samples pass through untouched. The output is one webdataset shard per input shard (same stem):
one sample per image (`txt` = the first kept caption, `json.captions` = all, with provenance) or, with layout
"pairs", one sample per kept caption (DESIGN §5, §11).

Built for very large runs: input shards are processed one at a time (streaming), split across torchrun ranks
and independent jobs (`shard_index/num_shards`), each output written to a temporary name and renamed when
complete, together with a small per-shard stats file. A rerun skips finished shards and redoes partial ones;
sampling is seeded per input shard, so a shard's output is the same whichever process makes it, and however
often it is restarted.
"""

from __future__ import annotations

import copy
import hashlib
import json
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from blip import capfilt_report as report
from blip.atomic import write_text
from blip.errors import InputError
from blip.generation import GenerationConfig, check_range, generate
from blip.inputs import batches
from blip.model.blip import BLIP
from blip.precision import autocast, resolve
from blip.tokenizer import Tokenizer

STATS_DIR = "_capfilt"
SUMMARY = "capfilt.json"
REPORT = "report.html"
LAYOUTS = ("image", "pairs")
HIST_BINS = 1000
"""ITM histogram bins over [0, 1]: fine enough for a filter whose scores all sit within a few hundredths."""
CALIBRATION = "calibration.json"


@dataclass
class CapfiltConfig:
    num_captions: int = 1
    """Synthetic captions per web image (the paper uses 1); 0 filters the web captions only (the paper's "Filt")."""
    top_p: float = 0.9
    num_beams: int = 0
    """0: nucleus sampling (the paper's choice); >0: beam search with this width instead."""
    max_length: int = 30
    min_length: int = 5
    prompt: str = "a picture of "
    repetition_penalty: float = 1.1
    """The original's sampling setting (beam search uses 1.0)."""
    threshold: float | None = None
    """Keep a caption when ITM p(match) >= threshold; None: 0.5, or calibrated when keep_fraction is given."""
    keep_fraction: float | None = None
    """Instead of a threshold: the threshold that keeps this fraction of the web + synthetic captions on a seeded
    calibration sample (`calibrate`), before keep_top and itc_threshold."""
    calibration_shards: int = 4
    """keep_fraction's sample: up to this many input shards, picked with the seed ..."""
    calibration_images: int = 512
    """... and the first this many non-human images in them, in the picked order."""
    itc_threshold: float | None = None
    """Optionally also require ITC cosine >= this."""
    keep_top: int | None = None
    """Keep at most this many captions per image, the best by ITM among web + synthetic (BLIP-2 kept 2); None: all
    that pass the threshold."""
    layout: str = "image"
    """"image": one output sample per image with every kept caption; "pairs": one sample per kept caption."""
    batch_size: int = 32
    seed: int = 0
    strict: bool = False
    precision: str = "fp32"
    """fp32, bf16 or auto for captioner and filter (blip.precision: auto = bf16 where the hardware has it)."""

    def __post_init__(self) -> None:
        if self.num_captions < 0:
            raise InputError(f"num_captions must be 0 or more, got {self.num_captions}", param="num_captions")
        if self.keep_fraction is not None:
            if self.threshold is not None:
                raise InputError(
                    "threshold and keep_fraction are alternatives: give one of them",
                    param=("threshold", "keep_fraction"),
                )
            if not 0 < self.keep_fraction <= 1:  # also refuses nan
                raise InputError(f"keep_fraction: in (0, 1], got {self.keep_fraction}", param="keep_fraction")
            if self.calibration_shards < 1 or self.calibration_images < 1:
                raise InputError(
                    "calibration_shards and calibration_images: at least 1",
                    param=("calibration_shards", "calibration_images"),
                )
        elif self.threshold is None:
            self.threshold = 0.5
        if self.threshold is not None:
            check_range("threshold", self.threshold, low=0.0, high=1.0)
        if self.itc_threshold is not None:
            check_range("itc_threshold", self.itc_threshold, low=-1.0, high=1.0)  # a cosine
        check_range("top_p", self.top_p, low=0.0, high=1.0, low_open=True)
        check_range("num_beams", self.num_beams, low=0)
        check_range("batch_size", self.batch_size, low=1)
        check_range("max_length", self.max_length, low=1)
        check_range("min_length", self.min_length, low=0)
        if self.min_length > self.max_length:
            raise InputError(
                f"min_length: must not exceed max_length ({self.max_length}), got {self.min_length}",
                param=("min_length", "max_length"),
            )
        check_range("repetition_penalty", self.repetition_penalty, low=0.0, low_open=True)
        if self.keep_top is not None and self.keep_top < 1:
            raise InputError(f"keep_top: at least 1 (or None for no limit), got {self.keep_top}", param="keep_top")
        if self.layout not in LAYOUTS:
            raise InputError(f"layout: one of {', '.join(LAYOUTS)}, got {self.layout!r}", param="layout")


@dataclass
class ShardStats:
    shard: str
    images_in: int = 0
    images_out: int = 0
    samples_out: int = 0
    """Output samples: images_out with layout "image", kept captions with "pairs"."""
    counts: dict = field(default_factory=dict)
    """Per source ('web', 'synthetic', 'human'): {'in': n, 'kept': n, 'dropped': n}."""
    bad_samples: dict = field(default_factory=dict)
    noise: dict = field(default_factory=dict)
    """Against known noise labels (json.noise, the demo world): web captions tp/fp/fn/tn of 'dropped = noisy'."""
    scene: dict = field(default_factory=dict)
    """Against the recorded scene (json.scene, the demo world): per source, captions checked / right, all and kept."""
    seconds: float = 0.0
    examples: list = field(default_factory=list)
    itm_hist: dict = field(default_factory=dict)
    """Per source ('web', 'synthetic'): ITM p(match) counts in HIST_BINS equal bins over [0, 1], sparse:
    {"<bin index>": count} for the non-empty bins."""
    dropped_by_keep_top: int = 0
    """Captions that passed the thresholds but not the keep_top cut (counted as dropped too)."""
    image_only: int = 0
    """Non-human images without any caption text: they can only keep synthetic captions."""
    settings: dict = field(default_factory=dict)
    """What made this shard (`output_settings`): a rerun with other settings must not take it as done."""


# ---- sharding and bookkeeping ------------------------------------------------------------------------------------
def assign_shards(shards: list[str], shard_index: int, num_shards: int, rank: int, world: int) -> list[str]:
    """This process's input shards: job `shard_index` of `num_shards`, then rank `rank` of `world` within it."""
    if not 0 <= shard_index < num_shards:
        raise InputError(f"shard_index must be in [0, {num_shards}), got {shard_index}", param="shard_index")
    stems = [Path(s).name for s in shards]
    dup = [s for s, n in Counter(stems).items() if n > 1]
    if dup:
        raise InputError(f"input shards must have distinct file names (one output per input): {dup[:3]}")
    slot, total = shard_index * world + rank, num_shards * world
    return [s for i, s in enumerate(sorted(shards)) if i % total == slot]


def check_out_apart(inputs: str | list[str], shards: list[str], out_dir: Path) -> None:
    """Refuse an output directory that holds an input shard, or lies in (or is) an input directory: the outputs
    take the input shards' names, so they would overwrite them (or be read as inputs by the next run)."""
    import os

    out = out_dir.resolve()
    for s in shards:
        p = Path(s).resolve()
        if out == p or out in p.parents:
            raise InputError(
                f"out: {out_dir} holds the input shard {s}; the outputs would overwrite the inputs", param="out"
            )
    for spec in [inputs] if isinstance(inputs, str | os.PathLike) else inputs:
        d = Path(os.path.expanduser(os.fspath(spec)))
        if d.is_dir() and (out == d.resolve() or d.resolve() in out.parents):
            raise InputError(
                f"out: {out_dir} is inside the input directory {spec}; choose an output elsewhere", param="out"
            )


def output_paths(out_dir: Path, shard: str) -> tuple[Path, Path]:
    name = Path(shard).name
    return out_dir / name, out_dir / STATS_DIR / (Path(name).stem + ".json")


def is_done(out_dir: Path, shard: str) -> bool:
    tar, stats = output_paths(out_dir, shard)
    return tar.exists() and stats.exists()


RUN_ONLY = ("batch_size", "strict")
"""Settings that change how a run goes, not what its shards mean (batch_size only changes which random draw a
synthetic caption comes from): a rerun may change them and still resume."""


def source_name(src: Any) -> str | None:
    """How a model source is recorded: a loaded model's source, a local path made absolute, else as given."""
    import os

    name = getattr(src, "source", src)
    if name is None:
        return None
    name = os.fspath(name)
    return os.path.abspath(name) if os.path.exists(name) else name


def output_settings(cfg: CapfiltConfig, captioner: Any, filter: Any) -> dict:  # noqa: A002
    """The settings that make a shard's content, as recorded in its stats and compared on a rerun."""
    d = {k: v for k, v in asdict(cfg).items() if k not in RUN_ONLY}
    if cfg.keep_fraction is None:
        del d["calibration_shards"], d["calibration_images"]
    d["captioner"] = source_name(captioner) if cfg.num_captions else None  # 0: no captioner runs
    d["filter"] = source_name(filter)
    return d


def recorded_settings(out_dir: Path, shard: str) -> dict | None:
    """The settings a finished shard's stats record ({} for stats older than the record), None if not finished."""
    if not is_done(out_dir, shard):
        return None
    try:
        return json.loads(output_paths(out_dir, shard)[1].read_text()).get("settings") or {}
    except (OSError, ValueError, AttributeError):
        return {}


def settings_diff(old: dict, new: dict, ignore: tuple[str, ...] = ()) -> list[str]:
    """`key: old -> new` for every setting that differs (but those in `ignore`)."""
    if not old:
        return ["settings: not recorded (made by an older blipctl)"]
    keys = sorted((set(old) | set(new)) - set(ignore))
    return [f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in keys if old.get(k) != new.get(k)]


def read_calibration(path: Path, made_with: dict) -> dict | None:
    """A recorded calibration (`calibrate`) made with these settings (threshold aside), else None."""
    try:
        cal = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    ok = isinstance(cal, dict) and cal.get("settings") == made_with and isinstance(cal.get("threshold"), float)
    return cal if ok else None


def shard_seed(seed: int, shard: str) -> int:
    """Seed of a shard's sampling: depends on the shard's name only, not on the process or the order."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{Path(shard).name}".encode()).digest()[:8], "little") >> 1


# ---- the model side ----------------------------------------------------------------------------------------------
class Bootstrapper:
    """Captioner + filter on one device: synthesise captions, then score captions with ITM (and ITC)."""

    def __init__(
        self, captioner: BLIP | None, cap_tok: Tokenizer | None, filt: BLIP, filt_tok: Tokenizer, cfg: CapfiltConfig
    ):
        """`captioner` may be None only with `cfg.num_captions == 0` (filter the web captions only)."""
        from blip.data.transforms import eval_transform

        if cfg.num_captions and (captioner is None or cap_tok is None):
            raise InputError("num_captions > 0 needs a captioner", param=("num_captions", "captioner"))
        if captioner is not None and not captioner.config.text_decoder:
            raise InputError("captioner has no text decoder: pass a captioning model", param="captioner")
        if not filt.config.text_encoder:
            raise InputError("filter has no text encoder: pass a retrieval/ITM model", param="filter")
        self.cap, self.cap_tok, self.filt, self.filt_tok, self.cfg = captioner, cap_tok, filt, filt_tok, cfg
        self.filt_tf = eval_transform(filt.config.vision.image_size)
        if captioner is not None and cap_tok is not None:
            self.cap_tf = eval_transform(captioner.config.vision.image_size)
            self.prompt_ids = cap_tok.encode_prompt(cfg.prompt)
        sample = cfg.num_beams == 0
        self.gcfg = GenerationConfig(
            num_beams=1 if sample else cfg.num_beams,
            do_sample=sample,
            top_p=cfg.top_p,
            max_length=cfg.max_length,
            min_length=cfg.min_length,
            repetition_penalty=cfg.repetition_penalty if sample else 1.0,
            num_return_sequences=cfg.num_captions,
        )
        if not sample and cfg.num_captions > cfg.num_beams:
            raise InputError(
                f"num_captions {cfg.num_captions} needs num_beams >= {cfg.num_captions}",
                param=("num_captions", "num_beams"),
            )
        self.dtype = resolve(cfg.precision, self.device)

    @property
    def device(self) -> torch.device:
        return next((self.cap or self.filt).parameters()).device

    @torch.no_grad()
    def synthesize(self, images: list, generator: torch.Generator) -> list[list[str]]:
        if not self.cfg.num_captions:
            return [[] for _ in images]
        px = torch.stack([self.cap_tf(im) for im in images]).to(self.device)
        with autocast(self.device, self.dtype):
            out = generate(self.cap, self.cap.encode_image(px), self.prompt_ids, self.gcfg, generator=generator)
        return [[self.cap_tok.decode(ids) for ids in caps] for caps in out]

    @torch.no_grad()
    def score(self, images: list, texts: list[list[str]]) -> tuple[list[list[float]], list[list[float]]]:
        """ITM p(match) and ITC cosine of each image's texts (the same number R of texts per image)."""
        dev = next(self.filt.parameters()).device
        R = len(texts[0])
        px = torch.stack([self.filt_tf(im) for im in images]).to(dev)
        flat = [t for ts in texts for t in ts]  # image-major: rows [b*R:(b+1)*R] belong to image b
        ids, mask = self.filt_tok(flat, max_length=35)
        ids, mask = ids.to(dev), mask.to(dev)
        with autocast(dev, self.dtype):
            emb = self.filt.encode_image(px)  # (B, 1+N, D)
            kv = self.filt.text_encoder.image_kv(emb)  # cross-attention K/V once per image, shared by its R texts
            logits = self.filt.itm_logits(ids, mask, image_kv=kv, rows_per_kv=R)  # (B*R, 2)
            tf = self.filt.text_features(ids, mask)  # (B*R, E)
            img_f = self.filt.image_features(emb)  # (B, E)
        itm = logits.float().softmax(-1)[:, 1].view(-1, R)  # probabilities in fp32 (the threshold is compared)
        itc = (tf.float().view(len(images), R, -1) @ img_f.float()[:, :, None]).squeeze(-1)  # (B, R)
        return itm.tolist(), itc.tolist()


# ---- one shard ---------------------------------------------------------------------------------------------------
def _is_human(sample: dict) -> bool:
    meta = sample["json"]
    caps = meta.get("captions")
    if meta.get("source") == "human":
        return True
    return bool(caps) and all(isinstance(c, dict) and c.get("source") == "human" for c in caps)


def _unique_keys(samples: Iterator[dict], bad: Any, strict: bool) -> Iterator[dict]:
    """Skip and count (`duplicate_key`) a sample whose key already appeared in the shard: two output samples with
    one key would be merged or confused by every reader downstream. The first one wins."""
    seen: set[str] = set()
    for s in samples:
        if s["key"] in seen:
            if strict:
                raise InputError(f"{s['shard']}: sample {s['key']!r}: duplicate_key (the key appeared earlier)")
            bad.add_bad("duplicate_key")
            continue
        seen.add(s["key"])
        yield s


def candidates(boot: Bootstrapper, samples: list[dict], gen: torch.Generator) -> list[list[dict]]:
    """Each sample's candidate captions, scored: its web caption (when it has text) then its synthetic ones, as
    {"text", "source", "itm", "itc"}. An image without text gets synthetic candidates only (none with
    num_captions 0)."""
    if not samples:
        return []
    synth = boot.synthesize([s["image"] for s in samples], gen)
    out: list[list[dict]] = [[] for _ in samples]
    # the filter scores the same number of texts per image: images with web text and images without go apart
    for has_text in (True, False):
        rows = [i for i, s in enumerate(samples) if bool(s["text"]) == has_text]
        texts = [([samples[i]["text"]] if has_text else []) + synth[i] for i in rows]
        if not rows or not texts[0]:
            continue
        itm, itc = boot.score([samples[i]["image"] for i in rows], texts)
        for i, ts, ps, cs in zip(rows, texts, itm, itc, strict=True):
            for j, (t, p, c) in enumerate(zip(ts, ps, cs, strict=True)):
                source = "web" if has_text and j == 0 else "synthetic"
                out[i].append({"text": t, "source": source, "itm": round(p, 6), "itc": round(c, 6)})
    return out


def select(caps: list[dict], cfg: CapfiltConfig) -> int:
    """Mark each candidate caption `kept`: ITM p(match) >= threshold (and ITC >= itc_threshold when set), then at
    most `keep_top` of those, the best by ITM. Returns how many passed the thresholds but fell outside the top."""
    passed = [
        c for c in caps if c["itm"] >= cfg.threshold and (cfg.itc_threshold is None or c["itc"] >= cfg.itc_threshold)
    ]
    top = ranked(passed, cfg)[: cfg.keep_top] if cfg.keep_top else passed
    chosen = {id(c) for c in top}
    for c in caps:
        c["kept"] = id(c) in chosen
    return len(passed) - len(top)


def ranked(caps: list[dict], cfg: CapfiltConfig) -> list[dict]:
    """With keep_top, captions best first by ITM (ties keep the web caption first); without, as generated."""
    return sorted(caps, key=lambda c: -c["itm"]) if cfg.keep_top else caps


def provenance(c: dict, cfg: CapfiltConfig, settings: dict) -> dict:
    """A kept caption as written to json.captions: text, source, ITM, ITC, and for a synthetic caption the
    captioner and the run seed (with the shard's name it seeds the shard's sampler: shard_seed)."""
    out = {k: c[k] for k in ("text", "source", "itm", "itc")}
    if c["source"] == "synthetic":
        out["captioner"] = settings.get("captioner")
        out["seed"] = cfg.seed
    return out


def output_samples(s: dict, kept: list[dict], layout: str) -> list[dict]:
    """The output sample(s) of an image with its kept captions (best first).

    layout "image": one sample; `txt` and `json.caption` are the first kept caption, `json.captions` all of
    them. layout "pairs": one sample per kept caption, keyed `<key>_<n>`, with the same image bytes and that
    caption alone as txt / json.caption / json.captions (and `json.image_key`): for loaders that read txt only.
    Every other input json field is kept.
    """
    base = {"_image": s["index"], s["image_ext"]: s["image_bytes"]}
    if layout == "image":
        meta = {**s["json"], "caption": kept[0]["text"], "captions": kept}
        return [{**base, "__key__": s["key"], "txt": kept[0]["text"], "json": meta}]
    return [
        {
            **base,
            "__key__": f"{s['key']}_{n}",
            "txt": c["text"],
            "json": {**s["json"], "caption": c["text"], "captions": [c], "image_key": s["key"]},
        }
        for n, c in enumerate(kept)
    ]


def process_shard(
    shard: str,
    out_dir: Path,
    boot: Bootstrapper,
    on_images: Callable[[int], None] | None = None,
    settings: dict | None = None,
) -> ShardStats:
    """Bootstrap one input shard into `out_dir/<name>` (atomic) plus its stats file; returns the stats."""
    from blip.data.shards import SampleStats, captions_of, iter_shard, write_shard

    cfg = boot.cfg
    t0 = time.perf_counter()
    tar_path, stats_path = output_paths(out_dir, shard)
    st = ShardStats(shard=Path(shard).name, settings=settings or {})
    counts = {s: Counter() for s in ("web", "synthetic", "human")}
    bad = SampleStats()
    gen = torch.Generator(device=boot.device).manual_seed(shard_seed(cfg.seed, shard))
    out_samples = []
    hist: dict[str, Counter] = {}
    decided = []  # (sample json, its captions) of every web sample, for the ground-truth checks
    examples = []  # (sample, captions or None for human data, kept captions) of the first few samples
    samples = _unique_keys(iter_shard(shard, bad, strict=cfg.strict, need_caption=False), bad, cfg.strict)
    for batch in batches(samples, cfg.batch_size):
        st.images_in += len(batch)
        web = [s for s in batch if not _is_human(s)]
        st.image_only += sum(not s["text"] for s in web)
        decisions = {}
        for s, caps in zip(web, candidates(boot, web, gen), strict=True):
            st.dropped_by_keep_top += select(caps, cfg)
            for c in caps:
                hist.setdefault(c["source"], Counter())[str(min(int(c["itm"] * HIST_BINS), HIST_BINS - 1))] += 1
                counts[c["source"]]["in"] += 1
                counts[c["source"]]["kept" if c["kept"] else "dropped"] += 1
            decisions[s["index"]] = caps  # by position: a key may repeat in a corrupt shard
            decided.append((s["json"], caps))
        for s in batch:
            if s["index"] in decisions:  # web data, or an image without text (synthetic captions only)
                caps = decisions[s["index"]]
                kept = [provenance(c, cfg, settings or {}) for c in ranked(caps, cfg) if c["kept"]]
            else:  # human data passes through
                caps = None
                kept = [{"text": t, "source": "human", "itm": None} for t in captions_of(s) if t.strip()]
                counts["human"]["in"] += len(kept)
                counts["human"]["kept"] += len(kept)
            if len(examples) < report.EXAMPLES_PER_SHARD:
                examples.append((s, caps, kept))
            if not kept:
                continue
            out_samples.extend(output_samples(s, kept, cfg.layout))
        if on_images:
            on_images(len(batch))
    st.images_out = len({x["_image"] for x in out_samples})
    st.samples_out = len(out_samples)
    st.counts = {k: {"in": v["in"], "kept": v["kept"], "dropped": v["dropped"]} for k, v in counts.items()}
    st.bad_samples = dict(bad.bad)
    st.itm_hist = {src: dict(sorted(h.items(), key=lambda kv: int(kv[0]))) for src, h in hist.items()}
    st.noise, st.scene = report.ground_truth_checks(decided)
    st.examples = [report.example(s, caps, kept, out_dir, STATS_DIR) for s, caps, kept in examples]
    st.seconds = time.perf_counter() - t0
    write_shard(tar_path, out_samples)
    write_text(stats_path, json.dumps(asdict(st), indent=1))
    return st


# ---- calibration (keep_fraction) --------------------------------------------------------------------------------
def calibration_pick(shards: list[str], cfg: CapfiltConfig) -> list[str]:
    """The calibration shards: `calibration_shards` of the inputs, a seeded random pick (in the picked order)."""
    import random

    return random.Random(cfg.seed).sample(sorted(shards), min(cfg.calibration_shards, len(shards)))


def threshold_for_fraction(scores: list[float], fraction: float) -> float:
    """The ITM threshold keeping round(fraction * n) of the n scores (at least one): midway between the lowest
    kept score and the highest dropped one (the lowest score when all are kept)."""
    s = sorted(scores)
    n = len(s)
    k = min(n, max(1, round(fraction * n)))
    return s[0] if k == n else (s[n - k - 1] + s[n - k]) / 2


def calibrate(shards: list[str], boot: Bootstrapper) -> dict:
    """Choose the threshold for `keep_fraction` from the filter's scores on a seeded calibration sample: the first
    `calibration_images` non-human images of `calibration_pick(shards)`, with their web caption and synthetic
    candidates made as in the run (sampling seeded by `shard_seed(seed, "calibration")`)."""
    from blip.data.shards import SampleStats, iter_shard

    cfg = boot.cfg
    gen = torch.Generator(device=boot.device).manual_seed(shard_seed(cfg.seed, "calibration"))
    scores: list[float] = []
    images, used = 0, []
    for shard in calibration_pick(shards, cfg):
        if images >= cfg.calibration_images:
            break
        used.append(Path(shard).name)
        web = (s for s in iter_shard(shard, SampleStats(), need_caption=False) if not _is_human(s))
        for batch in batches(web, cfg.batch_size):
            batch = batch[: cfg.calibration_images - images]
            images += len(batch)
            scores += [c["itm"] for caps in candidates(boot, batch, gen) for c in caps]
            if images >= cfg.calibration_images:
                break
    if not scores:
        raise InputError(
            "keep_fraction: the calibration sample has no captions to score (no non-human images)",
            param="keep_fraction",
        )
    t = threshold_for_fraction(scores, cfg.keep_fraction)
    return {
        "keep_fraction": cfg.keep_fraction,
        "threshold": t,
        "rule": "seeded pick of calibration_shards input shards (random.Random(seed).sample of the sorted names), "
        "their first calibration_images non-human images; threshold midway between the lowest kept and the highest "
        "dropped of the ITM scores of every web and synthetic candidate, keeping round(keep_fraction * n)",
        "seed": cfg.seed,
        "shards": used,
        "images": images,
        "captions": len(scores),
        "kept_on_sample": round(sum(x >= t for x in scores) / len(scores), 4),
    }


# ---- summary -----------------------------------------------------------------------------------------------------
def summarize(out_dir: Path, inputs: list[str], settings: dict, made_with: dict | None = None) -> dict:
    """Aggregate the stats of every shard in `out_dir` finished with the settings `made_with` into capfilt.json
    (and report.html); shards made with other settings count as `shards_stale`, not done."""
    stats, stale = [], 0
    for shard in sorted(inputs):
        p = output_paths(out_dir, shard)[1]
        if p.exists():
            st = json.loads(p.read_text())
            if made_with is not None and st.get("settings") != made_with:
                stale += 1
                continue
            stats.append(st)
    counts = {s: Counter() for s in ("web", "synthetic", "human")}
    bad, noise, scene = Counter(), Counter(), Counter()
    images_in = images_out = image_only = samples_out = top_cut = 0
    hists: dict[str, Counter] = {}
    seconds = 0.0
    for st in stats:
        image_only += st.get("image_only", 0)
        top_cut += st.get("dropped_by_keep_top", 0)
        for src, h in st.get("itm_hist", {}).items():
            hists.setdefault(src, Counter()).update(h)
        images_in += st["images_in"]
        images_out += st["images_out"]
        samples_out += st.get("samples_out", st["images_out"])
        seconds += st["seconds"]
        for src, c in st["counts"].items():
            counts[src].update(c)
        bad.update(st["bad_samples"])
        noise.update(st["noise"])
        scene.update(st.get("scene", {}))
    summary = {
        "shards_done": len(stats),
        "shards_total": len(inputs),
        "shards_stale": stale,
        "complete": len(stats) == len(inputs),
        "images_in": images_in,
        "images_out": images_out,
        "images_without_text": image_only,
        "samples_out": samples_out,
        "dropped_by_keep_top": top_cut,
        "counts": {k: {"in": v["in"], "kept": v["kept"], "dropped": v["dropped"]} for k, v in counts.items()},
        "bad_samples": dict(bad),
        "itm_histogram": {
            "bins": HIST_BINS,
            "range": [0.0, 1.0],
            **{src: dict(sorted(h.items(), key=lambda kv: int(kv[0]))) for src, h in hists.items()},
        },
        "images_per_s": round(images_in / seconds, 3) if seconds else None,
        "settings": settings,
    }
    web = summary["counts"]["web"]
    summary["web_noise_ratio"] = round(web["dropped"] / web["in"], 4) if web["in"] else None
    report.add_checks(summary, noise, scene)
    write_text(out_dir / SUMMARY, json.dumps(summary, indent=2) + "\n")
    write_text(out_dir / REPORT, report.render_report(summary, [e for st in stats for e in st["examples"]]))
    return summary


# ---- the driver --------------------------------------------------------------------------------------------------
@dataclass
class CapfiltProgress:
    """What `run` reports to `on_progress`: once before loading the models, then after every batch and shard."""

    shards_total: int
    """Input shards of the whole run (every job, every rank)."""
    shards_mine: int
    """This process's share."""
    shards_skipped: int
    """Of this process's share, finished by an earlier run."""
    shards_done: int = 0
    """Processed by this call so far."""
    images: int = 0
    """Images processed by this call so far."""
    seconds: float = 0.0
    rank: int = 0
    world_size: int = 1

    @property
    def shards_todo(self) -> int:
        return self.shards_mine - self.shards_skipped


def run(
    inputs: str | list[str],
    out: str | Path,
    *,
    captioner: Any = None,
    filter: Any = None,  # noqa: A002 - the paper's word
    config: CapfiltConfig | None = None,
    shard_index: int = 0,
    num_shards: int = 1,
    device: str = "auto",
    overwrite: bool = False,
    on_progress: Callable[[CapfiltProgress], None] | None = None,
) -> dict:
    """Run CapFilt over this process's share of the input shards; returns the summary (capfilt.json) on rank 0
    and {} on other ranks.

    `captioner` / `filter`: a model source (blipctl dir, HF dir or hub id, .pth; default the released BLIP models)
    or a loaded model (`blip.load(...)` or a `blip.checkpoint.Loaded`). Under torchrun the ranks split the shards;
    `shard_index` of `num_shards` splits them between independent jobs. Finished shards (output and stats present)
    are skipped; a finished shard made with other settings (model sources, sampling, threshold, ...:
    `output_settings`) is an InputError naming the differences, unless `overwrite`, which redoes it. `out` must not
    hold an input shard nor lie in an input directory. With `config.keep_fraction`, rank 0 first calibrates the
    threshold (`calibrate`; kept in out/_capfilt/calibration.json and reused by reruns and the other ranks).
    """
    from blip.checkpoint import DEFAULT_CAPTIONER, DEFAULT_FILTER, Loaded, load_model
    from blip.data.shards import expand_shards
    from blip.distributed import barrier, cleanup, init_distributed, resolve_device

    cfg = config if config is not None else CapfiltConfig()
    info = init_distributed("auto" if device == "auto" else ("cpu" if device == "cpu" else "cuda"))
    dev = str(info.device) if device in ("auto", "cpu", "cuda") else resolve_device(device)
    try:
        rank, world = info.rank, info.world_size
        shards = expand_shards(inputs)
        out_path = Path(out)
        check_out_apart(inputs, shards, out_path)
        barrier(info)  # rank 0 may have just cleared `out` (a recipe rerun): every rank reads it after that
        mine = assign_shards(shards, shard_index, num_shards, rank, world)
        cap_src = captioner or DEFAULT_CAPTIONER
        filt_src = filter or DEFAULT_FILTER
        made_with = output_settings(cfg, cap_src, filt_src)  # threshold None while keep_fraction is uncalibrated
        # every rank checks every input shard, so all refuse together (and independent jobs alike)
        recorded = {s: rec for s in shards if (rec := recorded_settings(out_path, s)) is not None}

        def stale_shards() -> dict[str, list[str]]:
            ignore = ("threshold",) if made_with["threshold"] is None else ()
            stale = {s: d for s, rec in recorded.items() if (d := settings_diff(rec, made_with, ignore))}
            if stale and not overwrite:
                diffs = sorted({d for ds in stale.values() for d in ds})
                raise InputError(
                    f"out: {len(stale)} finished shard(s) in {out_path} were made with other settings "
                    f"({'; '.join(diffs)}); set overwrite to redo them with these settings, or choose another out",
                    param=("out", "overwrite"),
                )
            return stale

        stale = stale_shards()
        loaded: dict[str, Bootstrapper] = {}

        def bootstrapper() -> Bootstrapper:
            if not loaded:

                def load(src: Any) -> Loaded:
                    if isinstance(src, Loaded):
                        return src
                    if hasattr(src, "net") and hasattr(src, "tokenizer"):  # a blip.Model
                        return Loaded(src.net, src.tokenizer, src.source, src.kind)
                    return load_model(src, device=dev)

                c = load(cap_src) if cfg.num_captions > 0 else None  # 0: filter web captions only
                f = load(filt_src)
                loaded["boot"] = Bootstrapper(c and c.model, c and c.tokenizer, f.model, f.tokenizer, cfg)
            return loaded["boot"]

        calibration = None
        if cfg.keep_fraction is not None:
            cal_path = out_path / STATS_DIR / CALIBRATION
            calibration = read_calibration(cal_path, made_with)
            if calibration is None and rank == 0:
                calibration = {**calibrate(shards, bootstrapper()), "settings": made_with}
                write_text(cal_path, json.dumps(calibration, indent=1) + "\n")
            barrier(info)
            calibration = calibration or read_calibration(cal_path, made_with)
            if calibration is None:
                raise RuntimeError(f"{cal_path}: rank 0's calibration is missing")
            cfg = copy.copy(cfg)  # not dataclasses.replace: threshold and keep_fraction are alternatives
            cfg.threshold = calibration["threshold"]
            if loaded:
                loaded["boot"].cfg = cfg
            made_with = {**made_with, "threshold": cfg.threshold}
            stale = stale_shards()
        todo = [s for s in mine if s in stale or s not in recorded]
        settings = {**asdict(cfg), **made_with, "inputs": inputs}
        if calibration is not None:
            settings["calibration"] = {k: v for k, v in calibration.items() if k != "settings"}
        prog = CapfiltProgress(len(shards), len(mine), len(mine) - len(todo), rank=rank, world_size=world)
        if on_progress:
            on_progress(prog)
        if todo:
            boot = bootstrapper()
            out_path.mkdir(parents=True, exist_ok=True)  # only now: a bad option or model leaves nothing behind
            t0 = time.perf_counter()

            def seen(k: int) -> None:
                prog.images += k
                prog.seconds = time.perf_counter() - t0
                if on_progress:
                    on_progress(prog)

            for shard in todo:
                process_shard(shard, out_path, boot, on_images=seen, settings=made_with)
                prog.shards_done += 1
                seen(0)
        barrier(info)
        if rank == 0:
            out_path.mkdir(parents=True, exist_ok=True)
        return summarize(out_path, shards, settings, made_with) if rank == 0 else {}
    finally:
        cleanup(info)
