"""`blipctl data ...`: make, convert and inspect datasets (the synthetic demo world; annotation JSON to shards;
shard statistics).

`run_demo` and `run_from_json` are plain functions (keyword arguments, return the summary) so the recipe runner
can call them in-process; the Typer commands wrap them and print a table.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated, Any

import typer

from blipctl._common import err, guarded, out, print_json_line, progress

app = typer.Typer(
    help="Make, convert and inspect datasets: the synthetic demo world, annotation JSON to shards, shard stats.",
    no_args_is_help=True,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _bar(label: str):
    """(progress context, callback(done, total)) drawing one rich bar with a throughput column."""
    bar = progress()
    state: dict[str, Any] = {"task": None, "t0": time.perf_counter()}

    def update(done: int, total: int) -> None:
        if state["task"] is None:
            state["task"] = bar.add_task(label, total=total, rate="")
        dt = time.perf_counter() - state["t0"]
        bar.update(state["task"], completed=done, rate=f"{done / dt:.0f} img/s" if dt > 0 else "")

    return bar, update


def run_demo(out: str, seed: int = 0, scale: str = "small", noise: float = 0.4) -> dict[str, Any]:
    """Write the demo world under `out`; returns the summary (world.json plus seconds)."""
    from blip.data.demo import make_demo

    bar, update = _bar("demo world")
    with bar:
        return make_demo(Path(out), seed=seed, scale=scale, noise=noise, on_progress=update)


def run_from_json(
    annotations: str,
    images: str,
    out: str,
    maxcount: int = 1000,
    source: str = "web",
    strict: bool = False,
) -> dict[str, Any]:
    """Convert an annotation list plus an image root into shards; returns the summary (OUT/from_json.json)."""
    from blip.data.convert import shards_from_json

    bar, update = _bar("from-json")
    with bar:
        return shards_from_json(annotations, images, out, maxcount, source, strict, on_progress=update)


@app.command("demo")
@guarded
def demo(
    out_dir: Annotated[
        Path, typer.Option("--out", help="Output directory (human/, web/, test/, objects/, objects_val/, world.json).")
    ],
    seed: Annotated[int, typer.Option(help="World seed: the same seed gives the same files, byte for byte.")] = 0,
    scale: Annotated[
        str,
        typer.Option(
            help="small (human/web/test/objects 300/1200/100/500 images: tests, CI) or full (2000/12000/300/4500: the "
            "demo)."
        ),
    ] = "small",
    noise: Annotated[float, typer.Option(help="Fraction of web captions corrupted (exact).")] = 0.4,
) -> None:
    """Make the synthetic demo world: 96x96 images of coloured shapes with grammar-generated captions.

    Splits: human/ (clean, 2-3 captions per image), web/ (one caption per image, --noise of them corrupted:
    another image's caption, a wrong colour or shape, or alt-text junk; json.noise and json.noise_kind hold the
    truth), test/ (5 captions per image, as shards and as test/test.json + test/test_gt.json for eval-retrieval
    and eval-caption), objects/ and objects_val/ (one object per image with its shape, colour, size and position
    as class labels in json.labels: the world's ImageNet, for `blipctl pretrain-vision`). A summary goes to
    OUT/world.json.

    Examples:

      blipctl data demo --out data/demo

      blipctl data demo --out data/demo --scale full --seed 1 --noise 0.5
    """
    s = run_demo(str(out_dir), seed=seed, scale=scale, noise=noise)
    from rich.table import Table

    table = Table("split", "images", "captions", "shards", "format", title=f"demo world ({out_dir}, seed {seed})")
    for split, c in s["splits"].items():
        table.add_row(split, str(c["images"]), str(c["captions"]), str(len(c["shards"])), c["format"])
    out.print(table)
    n = s["noise"]
    kinds = ", ".join(f"{v} {k}" for k, v in n["by_kind"].items())
    out.print(f"web noise: {n['noisy']} of {s['splits']['web']['images']} captions ({n['realised']:.1%}: {kinds})")
    err.print(f"[dim]{s['seconds']:.1f} s; summary {Path(out_dir) / 'world.json'}[/]")


@app.command("from-json")
@guarded
def from_json(
    annotations: Annotated[
        Path, typer.Argument(help="Annotation list: [{'image': path, 'caption': str or [str], ...}] (BLIP/LAVIS).")
    ],
    images: Annotated[Path, typer.Option("--images", help="Image root: record paths are relative to it.")],
    out_dir: Annotated[Path, typer.Option("--out", help="Output directory for <annotation stem>-NNNNN.tar shards.")],
    maxcount: Annotated[int, typer.Option(help="Samples (images) per shard.")] = 1000,
    source: Annotated[
        str, typer.Option(help="Caption source recorded in json: web, human (CapFilt passes it through), synthetic.")
    ] = "web",
    strict: Annotated[bool, typer.Option("--strict", help="Fail on the first bad record instead of skipping.")] = False,
) -> None:
    """Convert a BLIP/LAVIS annotation JSON plus an image folder into webdataset shards.

    Records naming the same image become one sample (txt = first caption, json.captions = all of them); image
    bytes are copied unchanged; json keeps each record's other fields. Missing or undecodable images are skipped
    and counted. A summary goes to OUT/from_json.json.

    Example:

      blipctl data from-json coco_karpathy_train.json --images /data/coco --out shards/coco --source human
    """
    s = run_from_json(str(annotations), str(images), str(out_dir), maxcount=maxcount, source=source, strict=strict)
    from rich.table import Table

    table = Table("records", "samples", "captions", "shards", "skipped", title=f"from-json ({out_dir})")
    bad = s["bad_samples"]
    table.add_row(str(s["records"]), str(s["samples"]), str(s["captions"]), str(len(s["shards"])), str(bad["bad"]))
    out.print(table)
    if bad["bad"]:
        why = ", ".join(f"{v} {k}" for k, v in bad.items() if k not in ("good", "bad"))
        err.print(f"[yellow]skipped {bad['bad']} images: {why}[/]")
    err.print(f"[dim]{s['seconds']:.1f} s; summary {Path(out_dir) / 'from_json.json'}[/]")


@app.command("stats")
@guarded
def stats(
    shards: Annotated[
        list[str], typer.Argument(help="Shards: a directory, a glob, a brace pattern (a/{00000..00099}.tar), files.")
    ],
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object on stdout instead of tables.")] = False,
) -> None:
    """Inspect a shard set before training or CapFilt on it: samples, images by format and size, captions per
    sample and their length in words, bad samples by reason. img2dataset's `<shard>_stats.json` files, when they
    sit beside the shards, are summed: download successes and failures, with the commonest error messages.

    Image-only samples (an image, no txt and no json.captions: img2dataset without a caption column) are counted
    apart, not as bad. Every image is decoded, so this reads the whole data set once.

    Examples:

      blipctl data stats data/demo/web

      blipctl data stats "laion/{00000..00099}.tar" --json > laion_stats.json
    """
    from blip.data import stats as shard_stats

    bar, update = _bar("stats")
    with bar:
        s = shard_stats(shards, on_progress=update)
    if as_json:
        print_json_line(s)
        return
    from rich.table import Table

    t = Table("", "count", title=f"{s['shards']} shards", show_header=False)
    t.add_row("samples", str(s["samples"]))
    t.add_row("usable for training", str(s["usable"]))
    t.add_row("image-only (no caption)", str(s["image_only"]))
    t.add_row("bad (skipped)", str(sum(s["bad"].values())))
    for reason, n in s["bad"].items():
        t.add_row(f"  {reason}", str(n))
    out.print(t)
    img, cap = s["images"], s["captions"]
    t = Table("images", "count", title=f"{img['count']} images")
    for name, d in (("format", img["by_format"]), ("shorter side", img["by_short_side"])):
        for k, n in d.items():
            t.add_row(f"{name}: {k}", str(n))
    for axis in ("width", "height"):
        if img[axis]:
            w = img[axis]
            t.add_row(f"{axis} min / median / max", f"{w['min']} / {w['median']:g} / {w['max']}")
    out.print(t)
    t = Table("captions", "count", title=f"{cap['count']} captions")
    for k, n in cap["per_sample"].items():
        t.add_row(f"samples with {k} caption{'' if k == '1' else 's'}", str(n))
    for k, n in cap["by_words"].items():
        t.add_row(f"length {k}", str(n))
    if cap["words"]:
        w = cap["words"]
        t.add_row("words min / median / mean / max", f"{w['min']} / {w['median']:g} / {w['mean']} / {w['max']}")
    out.print(t)
    i2d = s["img2dataset"]
    if i2d:
        t = Table("img2dataset", "count", title=f"img2dataset download ({i2d['stats_files']} stats files)")
        for k in ("count", "successes", "failed_to_download", "failed_to_resize"):
            t.add_row(k, str(i2d[k]))
        for msg, n in i2d["failures"].items():
            t.add_row(f"  {msg}", str(n))
        if i2d.get("other_failures"):
            t.add_row("  (other messages)", str(i2d["other_failures"]))
        out.print(t)
        for u in i2d.get("unreadable", []):
            err.print(f"[yellow]unreadable img2dataset stats file: {u}[/]", highlight=False)


def register(parent: typer.Typer) -> None:
    parent.add_typer(app, name="data")
