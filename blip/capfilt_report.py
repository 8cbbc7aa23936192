"""What CapFilt reports beside its shards: example rows with thumbnails, checks against the demo world's ground
truth (known noise labels, recorded scenes), and the static HTML report.

Kept apart from the keep/drop algorithm in blip/capfilt.py: the shard driver hands each finished shard's decisions
here once the shard is decided, and the summary turns the per-shard counters into numbers and a page.
"""

from __future__ import annotations

import html
import io
from collections import Counter
from pathlib import Path

from blip.atomic import write_bytes

EXAMPLES_PER_SHARD = 6
OUTCOME = {(True, True): "tp", (False, True): "fp", (True, False): "fn", (False, False): "tn"}
"""(noisy, dropped) -> the filter's outcome, counting "dropped" as "flagged noisy"."""


def example(sample: dict, caps: list | None, kept: list, out_dir: Path, stats_dir: str) -> dict:
    """A report row: a thumbnail file plus the texts, scores and decisions.

    The thumbnail is named by the sample's position in its shard, never by its key: a key is data from the input
    and must not pick a path (the shard reader refuses unsafe keys too)."""
    thumb_rel = f"{stats_dir}/thumbs/{Path(sample['shard']).stem}_{int(sample['index']):06d}.jpg"
    thumb = out_dir / thumb_rel
    thumb.parent.mkdir(parents=True, exist_ok=True)
    im = sample["image"].copy()
    im.thumbnail((160, 160))
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=85)
    write_bytes(thumb, buf.getvalue())
    rows = caps if caps is not None else [{**k, "kept": True} for k in kept]
    return {
        "key": sample["key"],
        "thumb": thumb_rel,
        "captions": rows,
        "noise": sample["json"].get("noise"),
        "noise_kind": sample["json"].get("noise_kind"),
    }


def ground_truth_checks(decided: list[tuple[dict, list[dict]]]) -> tuple[dict, dict]:
    """Counters of one shard's decisions against the demo world's labels: (noise, scene).

    `decided`: (sample json, its captions with "text", "source", "kept"; the web caption first) per web sample.
    noise: tp/fp/fn/tn of "dropped = noisy" for web captions with a json.noise label; scene: per source and group
    (all, kept), captions checked against json.scene and how many name it right, as whole captions (every phrase
    right) and phrase by phrase ("[size] colour shape [position]", blip.data.demo.phrases_vs_scene).
    """
    from blip.data.demo import phrases_vs_scene

    noise, scene = Counter(), Counter()
    for meta, caps in decided:
        if "scene" in meta:
            for c in caps:
                verdicts = phrases_vs_scene(c["text"], meta["scene"])
                if not verdicts:  # junk, or a caption off the grammar
                    continue
                for group in ("all", "kept") if c["kept"] else ("all",):
                    scene[f"{c['source']}/{group}/checked"] += 1
                    scene[f"{c['source']}/{group}/right"] += all(verdicts)
                    scene[f"{c['source']}/{group}/phrases"] += len(verdicts)
                    scene[f"{c['source']}/{group}/phrases_right"] += sum(verdicts)
        if "noise" in meta and caps and caps[0]["source"] == "web":  # labels are about the web caption
            noisy, dropped = bool(meta["noise"]), not caps[0]["kept"]
            noise[OUTCOME[(noisy, dropped)]] += 1
    return dict(noise), dict(scene)


def add_checks(summary: dict, noise: Counter, scene: Counter) -> None:
    """Add the ground-truth sections (filter_vs_noise_labels, captions_vs_scene) to a summary, when there are any."""
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
                    "phrases_right": scene[f"{source}/{group}/phrases_right"],
                    "phrases_right_share": round(
                        scene[f"{source}/{group}/phrases_right"] / max(scene[f"{source}/{group}/phrases"], 1), 4
                    ),
                }
                for group in ("all", "kept")
                if (n := scene[f"{source}/{group}/checked"])
            }
            for source in ("web", "synthetic")
            if scene[f"{source}/all/checked"]
        }


def histogram_svg(counts: list[int], threshold: float | None, title: str, bars: int = 60) -> str:
    """An inline SVG bar chart of ITM p(match) counts (equal bins over [0, 1]), zoomed to the scores' range and the
    threshold (a filter's scores may all sit within a few hundredths), the threshold drawn as a red line."""
    n_bins = len(counts)
    nz = [i for i, c in enumerate(counts) if c]
    lo, hi = (nz[0], nz[-1] + 1) if nz else (0, n_bins)
    if threshold is not None:
        t_bin = min(int(threshold * n_bins), n_bins - 1)
        lo, hi = min(lo, t_bin), max(hi, t_bin + 1)
    pad = max(1, (hi - lo) // 10)
    lo, hi = max(0, lo - pad), min(n_bins, hi + pad)
    group = -(-(hi - lo) // bars)  # bins per bar
    hi = min(n_bins, lo + group * -(-(hi - lo) // group))
    merged = [sum(counts[i : i + group]) for i in range(lo, hi, group)]
    x0, x1 = lo / n_bins, hi / n_bins  # the value range drawn
    w, h, left, right, bottom, top = 560, 186, 40, 28, 28, 42
    pw, ph = w - left - right, h - bottom - top
    peak = max(merged) or 1
    bw = pw / len(merged)

    def x(v: float) -> float:
        return left + pw * (v - x0) / (x1 - x0)

    rects = "".join(
        f'<rect x="{left + i * bw:.1f}" y="{top + ph - ph * c / peak:.1f}" width="{max(bw - 1, 1):.1f}" '
        f'height="{ph * c / peak:.1f}" fill="#4a78b5"><title>{(lo + i * group) / n_bins:.3f}-'
        f"{(lo + (i + 1) * group) / n_bins:.3f}: {c}</title></rect>"
        for i, c in enumerate(merged)
        if c
    )
    ticks = "".join(
        f'<line x1="{x(v):.1f}" y1="{top + ph}" x2="{x(v):.1f}" y2="{top + ph + 4}" stroke="#333"/>'
        f'<text x="{x(v):.1f}" y="{top + ph + 16}" font-size="11" text-anchor="middle">{v:.3f}</text>'
        for v in (x0 + (x1 - x0) * k / 4 for k in range(5))
    )
    line = ""
    if threshold is not None:
        line = (
            f'<line x1="{x(threshold):.1f}" y1="{top - 2}" x2="{x(threshold):.1f}" y2="{top + ph}" stroke="#d00" '
            f'stroke-width="2"/><text x="{x(threshold):.1f}" y="{top - 6}" font-size="11" fill="#d00" '
            f'text-anchor="middle">threshold {threshold:.3f}</text>'
        )
    return (
        f'<svg class="hist" xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" role="img" '
        f'aria-label="{html.escape(title)}"><text x="{left}" y="14" font-size="13" font-weight="bold">'
        f"{html.escape(title)}: {sum(counts)} captions, scores {x0:.3f}-{x1:.3f} shown</text>"
        f'<line x1="{left}" y1="{top + ph}" x2="{left + pw}" y2="{top + ph}" stroke="#333"/>'
        f"{rects}{ticks}{line}</svg>"
    )


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
    settings = summary.get("settings", {})
    hist = summary.get("itm_histogram", {})

    def dense(sparse: dict) -> list[int]:  # {"<bin>": count} -> a count per bin
        counts = [0] * hist["bins"]
        for i, c in sparse.items():
            counts[int(i)] += c
        return counts

    charts = "".join(
        histogram_svg(dense(hist[src]), settings.get("threshold"), f"ITM p(match), {src} captions")
        for src in ("web", "synthetic")
        if sum(hist.get(src, {}).values()) > 0
    )
    cal = settings.get("calibration")
    how = (
        f"threshold {cal['threshold']:.4f} chosen to keep {cal['keep_fraction']} of the captions on a calibration "
        f"sample of {cal['images']} images ({cal['captions']} captions) from {', '.join(map(esc, cal['shards']))} "
        f"(seed {cal['seed']}); it kept {cal['kept_on_sample']} there"
        if cal
        else f"threshold {settings.get('threshold')} (given)"
    )
    if charts:
        extra += f'<h2>Filter scores</h2><p id="threshold">{how}.</p><div id="histograms">{charts}</div>'
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>blipctl CapFilt report</title>
<style>body{{font-family:sans-serif;margin:2em}} table{{border-collapse:collapse}} td,th{{border:1px solid #ccc;
padding:4px 8px}} .ex{{display:flex;gap:1em;margin:1em 0;border-bottom:1px solid #eee;padding-bottom:1em}}
.ex img{{width:160px;height:auto}} .kept{{color:#155724}} .dropped{{color:#a00;text-decoration:line-through}}
.src{{font-size:80%;background:#eee;padding:1px 4px}} .key{{color:#666}} .truth{{font-size:90%}}</style></head>
<body><h1>CapFilt report</h1>
<p>{summary["shards_done"]}/{summary["shards_total"]} shards, {summary["images_in"]} images in
({summary.get("images_without_text", 0)} without text: synthetic captions only), {summary["images_out"]} out,
{summary["images_per_s"]} images/s; web noise ratio {summary["web_noise_ratio"]}.</p>
<table id="counts"><tr><th>source</th><th>in</th><th>kept</th><th>dropped</th></tr>{table}</table>{extra}
<h2>Examples</h2>{"".join(rows)}
</body></html>
"""
