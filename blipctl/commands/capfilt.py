"""`blipctl capfilt`: bootstrap clean shards from noisy web shards (captioner + filter)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from blipctl._common import PrecisionOpt, err, guarded, out, progress
from blipctl.commands.model_cmds import DeviceOpt


def run_capfilt(
    inputs: str | list[str],
    out_dir: str | Path,
    captioner: str | None = None,
    filter: str | None = None,  # noqa: A002 - the CLI's name
    num_captions: int = 1,
    top_p: float = 0.9,
    num_beams: int = 0,
    threshold: float | None = None,
    itc_threshold: float | None = None,
    batch_size: int = 32,
    seed: int = 0,
    shard_index: int = 0,
    num_shards: int = 1,
    max_length: int = 30,
    min_length: int = 5,
    prompt: str = "a picture of ",
    strict: bool = False,
    device: str = "auto",
    show_progress: bool = True,
    overwrite: bool = False,
    layout: str = "image",
    keep_top: int | None = None,
    keep_fraction: float | None = None,
    calibration_images: int = 512,
    calibration_shards: int = 4,
    precision: str = "fp32",
) -> dict:
    """The flags as one `blip.capfilt.run` call, drawing progress; returns the summary (capfilt.json)."""
    from blip.capfilt import CapfiltConfig, CapfiltProgress, run

    cfg = CapfiltConfig(
        num_captions=num_captions,
        top_p=top_p,
        num_beams=num_beams,
        threshold=threshold,
        itc_threshold=itc_threshold,
        batch_size=batch_size,
        seed=seed,
        max_length=max_length,
        min_length=min_length,
        prompt=prompt,
        strict=strict,
        layout=layout,
        keep_top=keep_top,
        keep_fraction=keep_fraction,
        calibration_images=calibration_images,
        calibration_shards=calibration_shards,
        precision=precision,
    )
    with progress() as bar:
        task = None

        def show(p: CapfiltProgress) -> None:
            nonlocal task
            if task is None:
                if p.rank == 0:
                    err.print(
                        f"capfilt: {p.shards_total} input shards; this job {p.shards_mine}, "
                        f"{p.shards_skipped} already done, {p.world_size} rank(s)"
                    )
                task = bar.add_task("capfilt", total=p.shards_todo, rate="")
                return
            rate = f"{p.images / p.seconds:.1f} img/s" if p.seconds else ""
            bar.update(task, completed=p.shards_done, rate=rate)

        return run(
            inputs,
            out_dir,
            captioner=captioner,
            filter=filter,
            config=cfg,
            shard_index=shard_index,
            num_shards=num_shards,
            device=device,
            overwrite=overwrite,
            on_progress=show,
        )


def capfilt(
    inputs: Annotated[str, typer.Option("--in", help="Input shards: a directory, glob or brace pattern.")],
    out_dir: Annotated[Path, typer.Option("--out", help="Output directory: one shard per input shard, same name.")],
    captioner: Annotated[
        str | None, typer.Option(help="Captioner source (default Salesforce/blip-image-captioning-base).")
    ] = None,
    filter: Annotated[
        str | None, typer.Option("--filter", help="Filter (ITM) source (default Salesforce/blip-itm-base-coco).")
    ] = None,  # noqa: A002
    num_captions: Annotated[
        int, typer.Option(help="Synthetic captions per web image; 0 filters the web captions only (no captioner).")
    ] = 1,
    top_p: Annotated[float, typer.Option(help="Nucleus sampling mass (the paper: 0.9).")] = 0.9,
    num_beams: Annotated[
        int, typer.Option(help="Use beam search with this width instead of sampling (0 = sample).")
    ] = 0,
    threshold: Annotated[
        float | None, typer.Option(help="Keep captions with ITM p(match) >= this (default 0.5; see --keep-fraction).")
    ] = None,
    keep_fraction: Annotated[
        float | None,
        typer.Option(
            help="Instead of --threshold: choose the threshold that keeps this fraction of the web + synthetic "
            "captions on a seeded calibration sample (--calibration-shards, --calibration-images); it is written "
            "to capfilt.json and _capfilt/calibration.json, and drawn on report.html's score histograms."
        ),
    ] = None,
    calibration_shards: Annotated[
        int, typer.Option(help="--keep-fraction: input shards in the calibration sample (a seeded pick).")
    ] = 4,
    calibration_images: Annotated[
        int, typer.Option(help="--keep-fraction: images in the calibration sample (the first ones of those shards).")
    ] = 512,
    itc_threshold: Annotated[float | None, typer.Option(help="Also require ITC cosine >= this.")] = None,
    keep_top: Annotated[
        int | None,
        typer.Option(
            help="Keep at most N captions per image: the best by ITM among the web caption and the "
            "--num-captions synthetic ones, above the threshold (BLIP-2 kept 2). Default: every caption above it."
        ),
    ] = None,
    batch_size: Annotated[int, typer.Option(help="Images per forward pass.")] = 32,
    seed: Annotated[int, typer.Option(help="Sampling seed (combined with each shard's name).")] = 0,
    shard_index: Annotated[int, typer.Option(help="This job's index among --num-shards independent jobs.")] = 0,
    num_shards: Annotated[
        int, typer.Option(help="Number of independent jobs sharing the input (e.g. a Slurm array).")
    ] = 1,
    max_length: Annotated[int, typer.Option(help="Max synthetic caption length in tokens (with prompt).")] = 30,
    min_length: Annotated[int, typer.Option(help="Min synthetic caption length in tokens (with prompt).")] = 5,
    prompt: Annotated[str, typer.Option(help="Captioner prompt (removed from the caption).")] = "a picture of ",
    strict: Annotated[bool, typer.Option("--strict", help="Fail on the first bad input sample.")] = False,
    device: DeviceOpt = "auto",
    layout: Annotated[
        str,
        typer.Option(
            help="image: one sample per image (txt = first kept caption, json.captions = all kept); "
            "pairs: one sample per kept caption, keys <key>_<n>, for loaders that read txt only (open_clip)."
        ),
    ] = "image",
    overwrite: Annotated[
        bool,
        typer.Option(
            "--overwrite",
            help="Redo finished output shards made with other settings (without it such a rerun is refused).",
        ),
    ] = False,
    precision: PrecisionOpt = "fp32",
) -> None:
    """Bootstrap a cleaner dataset: caption web images, filter web and synthetic captions with ITM.

    Every web image gets --num-captions synthetic captions (nucleus sampling); the filter keeps each caption,
    web or synthetic, whose ITM match probability reaches --threshold. Images without any text (e.g.
    img2dataset output made without a caption column) get synthetic captions only. Human-annotated samples (json source
    "human") pass through. Finished shards are skipped on rerun; a killed run resumes where it stopped. Each
    shard records the settings that made it: a rerun with other settings is refused (exit 2, the differences
    named) unless --overwrite, which redoes those shards.
    On the demo world (`blipctl data demo`) capfilt.json also scores the filter against the known noise labels
    and checks every caption against the recorded scene.

    Examples:

      blipctl capfilt --in web/ --out clean/ --captioner runs/captioner --filter runs/filter

      torchrun --nproc_per_node 8 -m blipctl capfilt --in 'web/{00000..09999}.tar' --out clean/

      blipctl capfilt --in web/ --out clean/ --shard-index $SLURM_ARRAY_TASK_ID --num-shards 100

      blipctl capfilt --in laion/ --out clean/ --num-captions 3 --keep-top 2 --keep-fraction 0.5 --layout pairs
    """
    summary = run_capfilt(
        inputs,
        out_dir,
        captioner,
        filter,
        num_captions,
        top_p,
        num_beams,
        threshold,
        itc_threshold,
        batch_size,
        seed,
        shard_index,
        num_shards,
        max_length,
        min_length,
        prompt,
        strict,
        device,
        overwrite=overwrite,
        layout=layout,
        keep_top=keep_top,
        keep_fraction=keep_fraction,
        calibration_images=calibration_images,
        calibration_shards=calibration_shards,
        precision=precision,
    )
    if not summary:
        return
    from rich.table import Table

    table = Table("source", "in", "kept", "dropped", title=f"CapFilt ({out_dir})")
    for src, c in summary["counts"].items():
        table.add_row(src, str(c["in"]), str(c["kept"]), str(c["dropped"]))
    out.print(table)
    cal = summary["settings"].get("calibration")
    if cal:
        out.print(
            f"threshold {cal['threshold']:.4f}: keeps {cal['kept_on_sample']} of {cal['captions']} captions on the "
            f"calibration sample ({cal['images']} images from {len(cal['shards'])} shard(s), seed {cal['seed']})"
        )
    out.print(
        f"{summary['images_in']} images in ({summary.get('images_without_text', 0)} images without text: "
        f"synthetic captions only), {summary['images_out']} out"
    )
    if summary.get("bad_samples"):
        out.print("bad samples skipped: " + ", ".join(f"{n} {k}" for k, n in sorted(summary["bad_samples"].items())))
    if "filter_vs_noise_labels" in summary:
        f = summary["filter_vs_noise_labels"]
        out.print(
            f"filter vs noise labels: precision {f['precision']}, recall {f['recall']}, "
            f"noisy removed {f['noisy_removed']}, clean kept {f['clean_kept']}"
        )
    for src, v in summary.get("captions_vs_scene", {}).items():
        shares = ", ".join(f"{group} {g['share']:.1%} of {g['checked']}" for group, g in v.items())
        out.print(f"{src} captions naming the recorded scene right: {shares}")
    state = "complete" if summary["complete"] else f"{summary['shards_done']}/{summary['shards_total']} shards done"
    err.print(
        f"{state}; {summary['images_per_s']} images/s; summary {Path(out_dir) / 'capfilt.json'}, "
        f"report {Path(out_dir) / 'report.html'}"
    )


def register(app: typer.Typer) -> None:
    app.command("capfilt")(guarded(capfilt))
