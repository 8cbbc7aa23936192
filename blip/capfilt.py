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
import json
import time
from collections import Counter
from collections.abc import Callable
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
from blip.tokenizer import Tokenizer

STATS_DIR = "_capfilt"
SUMMARY = "capfilt.json"
REPORT = "report.html"


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
            raise InputError(f"num_captions must be 0 or more, got {self.num_captions}", param="num_captions")
        check_range("threshold", self.threshold, low=0.0, high=1.0)
        if self.itc_threshold is not None:
            check_range("itc_threshold", self.itc_threshold, low=-1.0, high=1.0)  # a cosine
        check_range("top_p", self.top_p, low=0.0, high=1.0, low_open=True)
        check_range("num_beams", self.num_beams, low=0)
        check_range("batch_size", self.batch_size, low=1)
        check_range("max_length", self.max_length, low=1)
        check_range("min_length", self.min_length, low=0)
        if self.min_length > self.max_length:
            raise InputError(f"min_length: must not exceed max_length ({self.max_length}), got {self.min_length}")
        check_range("repetition_penalty", self.repetition_penalty, low=0.0, low_open=True)


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
        raise InputError(f"shard_index must be in [0, {num_shards}), got {shard_index}", param="shard_index")
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


def process_shard(
    shard: str, out_dir: Path, boot: Bootstrapper, on_images: Callable[[int], None] | None = None
) -> ShardStats:
    """Bootstrap one input shard into `out_dir/<name>` (atomic) plus its stats file; returns the stats."""
    from blip.data.shards import SampleStats, captions_of, iter_shard, write_shard

    cfg = boot.cfg
    t0 = time.perf_counter()
    tar_path, stats_path = output_paths(out_dir, shard)
    st = ShardStats(shard=Path(shard).name)
    counts = {s: Counter() for s in ("web", "synthetic", "human")}
    bad = SampleStats()
    gen = torch.Generator(device=boot.device).manual_seed(shard_seed(cfg.seed, shard))
    out_samples = []
    decided = []  # (sample json, its captions) of every web sample, for the ground-truth checks
    examples = []  # (sample, captions or None for human data, kept captions) of the first few samples
    for batch in batches(iter_shard(shard, bad, strict=cfg.strict), cfg.batch_size):
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
                decisions[s["key"]] = caps
                decided.append((s["json"], caps))
        for s in batch:
            if s["key"] in decisions:
                caps = decisions[s["key"]]
                kept = [{k: c[k] for k in ("text", "source", "itm")} for c in caps if c["kept"]]
            else:  # human data passes through
                caps = None
                kept = [{"text": t, "source": "human", "itm": None} for t in captions_of(s)]
                counts["human"]["in"] += len(kept)
                counts["human"]["kept"] += len(kept)
            if len(examples) < report.EXAMPLES_PER_SHARD:
                examples.append((s, caps, kept))
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
    st.noise, st.scene = report.ground_truth_checks(decided)
    st.examples = [report.example(s, caps, kept, out_dir, STATS_DIR) for s, caps, kept in examples]
    st.seconds = time.perf_counter() - t0
    write_shard(tar_path, out_samples)
    write_text(stats_path, json.dumps(asdict(st), indent=1))
    return st


# ---- summary -----------------------------------------------------------------------------------------------------
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
    on_progress: Callable[[CapfiltProgress], None] | None = None,
) -> dict:
    """Run CapFilt over this process's share of the input shards; returns the summary (capfilt.json) on rank 0
    and {} on other ranks.

    `captioner` / `filter`: a model source (blipctl dir, HF dir or hub id, .pth; default the released BLIP
    models) or a loaded model (`blip.load(...)`). Under torchrun the ranks split the shards; `shard_index` of
    `num_shards` splits them between independent jobs. Finished shards (output and stats present) are skipped.
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
        barrier(info)  # rank 0 may have just cleared `out` (a recipe rerun): every rank reads it after that
        mine = assign_shards(shards, shard_index, num_shards, rank, world)
        todo = [s for s in mine if not is_done(out_path, s)]
        cap_src = captioner or DEFAULT_CAPTIONER
        filt_src = filter or DEFAULT_FILTER
        settings = {
            **cfg.__dict__,
            "captioner": getattr(cap_src, "source", cap_src),
            "filter": getattr(filt_src, "source", filt_src),
            "inputs": inputs,
        }
        prog = CapfiltProgress(len(shards), len(mine), len(mine) - len(todo), rank=rank, world_size=world)
        if on_progress:
            on_progress(prog)
        if todo:

            def load(src: Any) -> Loaded:
                if isinstance(src, Loaded):
                    return src
                if hasattr(src, "net") and hasattr(src, "tokenizer"):  # a blip.Model
                    return Loaded(src.net, src.tokenizer, src.source, src.kind)
                return load_model(src, device=dev)

            c = load(cap_src) if cfg.num_captions > 0 else None  # 0: filter web captions only
            f = load(filt_src)
            boot = Bootstrapper(c and c.model, c and c.tokenizer, f.model, f.tokenizer, cfg)
            out_path.mkdir(parents=True, exist_ok=True)  # only now: a bad option or model leaves nothing behind
            t0 = time.perf_counter()

            def seen(k: int) -> None:
                prog.images += k
                prog.seconds = time.perf_counter() - t0
                if on_progress:
                    on_progress(prog)

            for shard in todo:
                process_shard(shard, out_path, boot, on_images=seen)
                prog.shards_done += 1
                seen(0)
        barrier(info)
        if rank == 0:
            out_path.mkdir(parents=True, exist_ok=True)
        return summarize(out_path, shards, settings) if rank == 0 else {}
    finally:
        cleanup(info)
