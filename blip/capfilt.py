"""CapFilt: bootstrap clean image-text data from noisy web shards (BLIP §3.3; never released by the authors).

For every web image the captioner writes synthetic captions (nucleus sampling, top-p 0.9 as the paper found
best); the filter scores the web caption and each synthetic caption with ITM; captions whose match probability
is below the threshold (0.5) are dropped. Human-annotated samples pass through untouched. The output is one
webdataset shard per input shard (same stem), which the training loader reads (every kept caption is a pair).

Built for very large runs: input shards are processed one at a time (streaming), split across torchrun ranks
and independent jobs (`shard_index/num_shards`), each output written to a temporary name and renamed when
complete, together with a small per-shard stats file. A rerun skips finished shards and redoes partial ones;
sampling is seeded per input shard, so a shard's output is the same whichever process makes it, and however
often it is restarted.
"""

from __future__ import annotations

import hashlib
import html
import io
import json
import os
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from blip.errors import InputError
from blip.generation import GenerationConfig, generate
from blip.model.blip import BLIP
from blip.tokenizer import Tokenizer

STATS_DIR = "_capfilt"
SUMMARY = "capfilt.json"
REPORT = "report.html"
EXAMPLES_PER_SHARD = 6


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
    threshold: float = 0.5
    """Keep a caption when ITM p(match) >= threshold."""
    itc_threshold: float | None = None
    """Optionally also require ITC cosine >= this."""
    batch_size: int = 32
    seed: int = 0
    strict: bool = False

    def __post_init__(self) -> None:
        if self.num_captions < 0:
            raise InputError(f"--num-captions must be 0 or more, got {self.num_captions}")


@dataclass
class ShardStats:
    shard: str
    images_in: int = 0
    images_out: int = 0
    counts: dict = field(default_factory=dict)
    """Per source ('web', 'synthetic', 'human'): {'in': n, 'kept': n, 'dropped': n}."""
    bad_samples: dict = field(default_factory=dict)
    noise: dict = field(default_factory=dict)
    """Against known noise labels (json.noise, the demo world): web captions tp/fp/fn/tn of 'dropped = noisy'."""
    scene: dict = field(default_factory=dict)
    """Against the recorded scene (json.scene, the demo world): per source, captions checked / right, all and kept."""
    seconds: float = 0.0
    examples: list = field(default_factory=list)


# ---- sharding and bookkeeping ------------------------------------------------------------------------------------
def assign_shards(shards: list[str], shard_index: int, num_shards: int, rank: int, world: int) -> list[str]:
    """This process's input shards: job `shard_index` of `num_shards`, then rank `rank` of `world` within it."""
    if not 0 <= shard_index < num_shards:
        raise InputError(f"--shard-index must be in [0, {num_shards}), got {shard_index}")
    stems = [Path(s).name for s in shards]
    dup = [s for s, n in Counter(stems).items() if n > 1]
    if dup:
        raise InputError(f"input shards must have distinct file names (one output per input): {dup[:3]}")
    slot, total = shard_index * world + rank, num_shards * world
    return [s for i, s in enumerate(sorted(shards)) if i % total == slot]


def output_paths(out_dir: Path, shard: str) -> tuple[Path, Path]:
    name = Path(shard).name
    return out_dir / name, out_dir / STATS_DIR / (Path(name).stem + ".json")


def is_done(out_dir: Path, shard: str) -> bool:
    tar, stats = output_paths(out_dir, shard)
    return tar.exists() and stats.exists()


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
            raise InputError("--num-captions > 0 needs a --captioner")
        if captioner is not None and not captioner.config.text_decoder:
            raise InputError("--captioner has no text decoder: pass a captioning model")
        if not filt.config.text_encoder:
            raise InputError("--filter has no text encoder: pass a retrieval/ITM model")
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
            raise InputError(f"--num-captions {cfg.num_captions} needs --num-beams >= {cfg.num_captions}")

    @property
    def device(self) -> torch.device:
        return next((self.cap or self.filt).parameters()).device

    @torch.inference_mode()
    def synthesize(self, images: list, generator: torch.Generator) -> list[list[str]]:
        if not self.cfg.num_captions:
            return [[] for _ in images]
        px = torch.stack([self.cap_tf(im) for im in images]).to(self.device)
        out = generate(self.cap, self.cap.encode_image(px), self.prompt_ids, self.gcfg, generator=generator)
        return [[self.cap_tok.decode(ids) for ids in caps] for caps in out]

    @torch.inference_mode()
    def score(self, images: list, texts: list[list[str]]) -> tuple[list[list[float]], list[list[float]]]:
        """ITM p(match) and ITC cosine of each image's texts (the same number R of texts per image)."""
        dev = next(self.filt.parameters()).device
        R = len(texts[0])
        px = torch.stack([self.filt_tf(im) for im in images]).to(dev)
        emb = self.filt.encode_image(px)  # (B, 1+N, D)
        flat = [t for ts in texts for t in ts]  # image-major: rows [b*R:(b+1)*R] belong to image b
        ids, mask = self.filt_tok(flat, max_length=35)
        ids, mask = ids.to(dev), mask.to(dev)
        kv = self.filt.text_encoder.image_kv(emb)  # cross-attention K/V once per image, shared by its R texts
        itm = self.filt.itm_logits(ids, mask, image_kv=kv, rows_per_kv=R).softmax(-1)[:, 1].view(-1, R)
        tf = self.filt.text_features(ids, mask).view(len(images), R, -1)  # (B, R, E)
        itc = (tf @ self.filt.image_features(emb)[:, :, None]).squeeze(-1)  # (B, R)
        return itm.tolist(), itc.tolist()


# ---- one shard ---------------------------------------------------------------------------------------------------
def _is_human(sample: dict) -> bool:
    meta = sample["json"]
    caps = meta.get("captions")
    if meta.get("source") == "human":
        return True
    return bool(caps) and all(isinstance(c, dict) and c.get("source") == "human" for c in caps)


def _batches(it: Iterator, n: int) -> Iterator[list]:
    batch = []
    for x in it:
        batch.append(x)
        if len(batch) == n:
            yield batch
            batch = []
    if batch:
        yield batch


def process_shard(
    shard: str, out_dir: Path, boot: Bootstrapper, on_images: Callable[[int], None] | None = None
) -> ShardStats:
    """Bootstrap one input shard into `out_dir/<name>` (atomic) plus its stats file; returns the stats."""
    from blip.data.demo import phrases_vs_scene
    from blip.data.shards import SampleStats, iter_shard, write_shard

    cfg = boot.cfg
    t0 = time.perf_counter()
    tar_path, stats_path = output_paths(out_dir, shard)
    st = ShardStats(shard=Path(shard).name)
    counts = {s: Counter() for s in ("web", "synthetic", "human")}
    noise, scene = Counter(), Counter()
    bad = SampleStats()
    gen = torch.Generator(device=boot.device).manual_seed(shard_seed(cfg.seed, shard))
    out_samples = []
    for batch in _batches(iter_shard(shard, bad, strict=cfg.strict), cfg.batch_size):
        st.images_in += len(batch)
        web = [s for s in batch if not _is_human(s)]
        decisions = {}
        if web:
            synth = boot.synthesize([s["image"] for s in web], gen)
            texts = [[s["text"], *syn] for s, syn in zip(web, synth, strict=True)]
            itm, itc = boot.score([s["image"] for s in web], texts)
            for s, ts, ps, cs in zip(web, texts, itm, itc, strict=True):
                caps = []
                for j, (t, p, c) in enumerate(zip(ts, ps, cs, strict=True)):
                    source = "web" if j == 0 else "synthetic"
                    keep = p >= cfg.threshold and (cfg.itc_threshold is None or c >= cfg.itc_threshold)
                    counts[source]["in"] += 1
                    counts[source]["kept" if keep else "dropped"] += 1
                    caps.append({"text": t, "source": source, "itm": round(p, 6), "itc": round(c, 6), "kept": keep})
                    phrases = phrases_vs_scene(t, s["json"]["scene"]) if "scene" in s["json"] else []
                    if phrases:
                        for group in ("all", "kept") if keep else ("all",):
                            scene[f"{source}/{group}/checked"] += 1
                            scene[f"{source}/{group}/right"] += all(phrases)
                            scene[f"{source}/{group}/phrases"] += len(phrases)
                            scene[f"{source}/{group}/phrases_right"] += sum(phrases)
                if "noise" in s["json"]:
                    noisy, dropped = bool(s["json"]["noise"]), not caps[0]["kept"]
                    noise[
                        {(True, True): "tp", (False, True): "fp", (True, False): "fn", (False, False): "tn"}[
                            (noisy, dropped)
                        ]
                    ] += 1
                decisions[s["key"]] = caps
        for s in batch:
            if s["key"] in decisions:
                caps = decisions[s["key"]]
                kept = [{k: c[k] for k in ("text", "source", "itm")} for c in caps if c["kept"]]
            else:  # human data passes through
                caps = None
                given = s["json"].get("captions") or [{"text": s["text"]}]
                kept = [{"text": c["text"], "source": "human", "itm": None} for c in given]
                counts["human"]["in"] += len(kept)
                counts["human"]["kept"] += len(kept)
            if len(st.examples) < EXAMPLES_PER_SHARD:
                st.examples.append(_example(s, caps, kept, out_dir))
            if not kept:
                continue
            meta = {**s["json"], "captions": kept}
            out_samples.append(
                {"__key__": s["key"], s["image_ext"]: s["image_bytes"], "txt": kept[0]["text"], "json": meta}
            )
        if on_images:
            on_images(len(batch))
    st.images_out = len(out_samples)
    st.counts = {k: {"in": v["in"], "kept": v["kept"], "dropped": v["dropped"]} for k, v in counts.items()}
    st.bad_samples = dict(bad.bad)
    st.noise = dict(noise)
    st.scene = dict(scene)
    st.seconds = time.perf_counter() - t0
    write_shard(tar_path, out_samples)
    _atomic_write_text(stats_path, json.dumps(asdict(st), indent=1))
    return st


def _example(sample: dict, caps: list | None, kept: list, out_dir: Path) -> dict:
    """A report row: a thumbnail file plus the texts, scores and decisions."""
    thumb_rel = f"{STATS_DIR}/thumbs/{Path(sample['shard']).stem}_{sample['key']}.jpg"
    thumb = out_dir / thumb_rel
    thumb.parent.mkdir(parents=True, exist_ok=True)
    im = sample["image"].copy()
    im.thumbnail((160, 160))
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=85)
    _atomic_write_bytes(thumb, buf.getvalue())
    rows = caps if caps is not None else [{**k, "kept": True} for k in kept]
    return {
        "key": sample["key"],
        "thumb": thumb_rel,
        "captions": rows,
        "noise": sample["json"].get("noise"),
        "noise_kind": sample["json"].get("noise_kind"),
    }


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def _atomic_write_text(path: Path, text: str) -> None:
    _atomic_write_bytes(path, text.encode())


# ---- summary and report ------------------------------------------------------------------------------------------
def summarize(out_dir: Path, inputs: list[str], settings: dict) -> dict:
    """Aggregate every finished shard's stats in `out_dir` into capfilt.json (and report.html)."""
    stats = []
    for shard in sorted(inputs):
        p = output_paths(out_dir, shard)[1]
        if p.exists():
            stats.append(json.loads(p.read_text()))
    counts = {s: Counter() for s in ("web", "synthetic", "human")}
    bad, noise, scene = Counter(), Counter(), Counter()
    images_in = images_out = 0
    seconds = 0.0
    for st in stats:
        images_in += st["images_in"]
        images_out += st["images_out"]
        seconds += st["seconds"]
        for src, c in st["counts"].items():
            counts[src].update(c)
        bad.update(st["bad_samples"])
        noise.update(st["noise"])
        scene.update(st.get("scene", {}))
    summary = {
        "shards_done": len(stats),
        "shards_total": len(inputs),
        "complete": len(stats) == len(inputs),
        "images_in": images_in,
        "images_out": images_out,
        "counts": {k: {"in": v["in"], "kept": v["kept"], "dropped": v["dropped"]} for k, v in counts.items()},
        "bad_samples": dict(bad),
        "images_per_s": round(images_in / seconds, 3) if seconds else None,
        "settings": settings,
    }
    web = summary["counts"]["web"]
    summary["web_noise_ratio"] = round(web["dropped"] / web["in"], 4) if web["in"] else None
    if noise:
        tp, fp, fn, tn = (noise.get(k, 0) for k in ("tp", "fp", "fn", "tn"))
        summary["filter_vs_noise_labels"] = {
            "tp": tp,
            "fp": fp,
            "fn": fn,
            "tn": tn,
            "precision": round(tp / (tp + fp), 4) if tp + fp else None,
            "recall": round(tp / (tp + fn), 4) if tp + fn else None,
            "noisy_removed": round(tp / (tp + fn), 4) if tp + fn else None,
            "clean_kept": round(tn / (tn + fp), 4) if tn + fp else None,
        }
    if scene:
        summary["captions_vs_scene"] = {
            source: {
                group: {
                    "checked": n,
                    "right": scene[f"{source}/{group}/right"],
                    "share": round(scene[f"{source}/{group}/right"] / n, 4),
                    "phrases": scene[f"{source}/{group}/phrases"],
                    "phrases_right_share": round(
                        scene[f"{source}/{group}/phrases_right"] / scene[f"{source}/{group}/phrases"], 4
                    ),
                }
                for group in ("all", "kept")
                if (n := scene[f"{source}/{group}/checked"])
            }
            for source in ("web", "synthetic")
            if scene[f"{source}/all/checked"]
        }
    _atomic_write_text(out_dir / SUMMARY, json.dumps(summary, indent=2) + "\n")
    _atomic_write_text(out_dir / REPORT, render_report(summary, [e for st in stats for e in st["examples"]]))
    return summary


def render_report(summary: dict, examples: list[dict]) -> str:
    """A static page: the summary numbers, then thumbnails with web/synthetic captions, scores and decisions."""
    esc = html.escape
    rows = []
    for ex in examples:
        items = []
        for c in ex["captions"]:
            decision = "kept" if c.get("kept") else "dropped"
            score = "" if c.get("itm") is None else "ITM {:.3f}".format(c["itm"])
            items.append(
                f'<li class="{decision}"><span class="src">{esc(c["source"])}</span> {esc(c["text"])} '
                f'<span class="score">{score}</span> <b>{decision}</b></li>'
            )
        truth = ""
        if ex.get("noise") is not None:
            label = "noisy ({})".format(esc(str(ex.get("noise_kind")))) if ex["noise"] else "clean"
            truth = f'<div class="truth">truth: {label}</div>'
        rows.append(
            f'<div class="ex"><img src="{esc(ex["thumb"])}" alt="{esc(ex["key"])}">'
            f'<div><div class="key">{esc(ex["key"])}</div>{truth}<ul>{"".join(items)}</ul></div></div>'
        )
    c = summary["counts"]
    table = "".join(
        f"<tr><td>{k}</td><td>{v['in']}</td><td>{v['kept']}</td><td>{v['dropped']}</td></tr>" for k, v in c.items()
    )
    extra = ""
    if "filter_vs_noise_labels" in summary:
        f = summary["filter_vs_noise_labels"]
        extra = (
            f"<p>Filter vs known noise labels: precision {f['precision']}, recall {f['recall']} "
            f"(noisy web captions removed {f['noisy_removed']}, clean kept {f['clean_kept']}).</p>"
        )
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>blipctl CapFilt report</title>
<style>body{{font-family:sans-serif;margin:2em}} table{{border-collapse:collapse}} td,th{{border:1px solid #ccc;
padding:4px 8px}} .ex{{display:flex;gap:1em;margin:1em 0;border-bottom:1px solid #eee;padding-bottom:1em}}
.ex img{{width:160px;height:auto}} .kept{{color:#155724}} .dropped{{color:#a00;text-decoration:line-through}}
.src{{font-size:80%;background:#eee;padding:1px 4px}} .key{{color:#666}} .truth{{font-size:90%}}</style></head>
<body><h1>CapFilt report</h1>
<p>{summary["shards_done"]}/{summary["shards_total"]} shards, {summary["images_in"]} images in,
{summary["images_out"]} out, {summary["images_per_s"]} images/s; web noise ratio {summary["web_noise_ratio"]}.</p>
<table id="counts"><tr><th>source</th><th>in</th><th>kept</th><th>dropped</th></tr>{table}</table>{extra}
<h2>Examples</h2>{"".join(rows)}
</body></html>
"""
