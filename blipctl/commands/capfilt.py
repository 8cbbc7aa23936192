"""`blipctl capfilt`: bootstrap clean shards from noisy web shards (captioner + filter)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated

import typer

from blipctl._common import PrecisionOpt, err, guarded, out, progress
from blipctl.commands.model_cmds import DeviceOpt, resolve_device


def run_capfilt(
    inputs: str | list[str],
    out_dir: str | Path,
    captioner: str | None = None,
    filter: str | None = None,  # noqa: A002 - the CLI's name
    num_captions: int = 1,
    top_p: float = 0.9,
    num_beams: int = 0,
    threshold: float = 0.5,
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
    precision: str = "auto",
) -> dict:
    """Run CapFilt over this process's share of the input shards; returns the summary (capfilt.json)."""
    from blip.capfilt import Bootstrapper, CapfiltConfig, assign_shards, is_done, process_shard, summarize
    from blip.checkpoint import DEFAULT_CAPTIONER, DEFAULT_FILTER, load_model
    from blip.data.shards import expand_shards
    from blip.distributed import barrier, cleanup, init_distributed

    info = init_distributed("auto" if device == "auto" else ("cpu" if device == "cpu" else "cuda"))
    dev = str(info.device) if device in ("auto", "cpu", "cuda") else resolve_device(device)
    try:
        rank, world = info.rank, info.world_size
        shards = expand_shards(inputs)
        out_path = Path(out_dir)
        barrier(info)  # rank 0 may have just cleared out_dir (a recipe rerun): every rank reads it after that
        out_path.mkdir(parents=True, exist_ok=True)
        mine = assign_shards(shards, shard_index, num_shards, rank, world)
        todo = [s for s in mine if not is_done(out_path, s)]
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
            precision=precision,
        )
        cap_src, filt_src = captioner or DEFAULT_CAPTIONER, filter or DEFAULT_FILTER
        settings = {**cfg.__dict__, "captioner": cap_src, "filter": filt_src, "inputs": inputs}
        if rank == 0:
            err.print(
                f"capfilt: {len(shards)} input shards; this job {len(mine)}, "
                f"{len(mine) - len(todo)} already done, {world} rank(s)"
            )
        if todo:
            c = load_model(cap_src, device=dev) if num_captions > 0 else None  # 0: filter web captions only
            f = load_model(filt_src, device=dev)
            boot = Bootstrapper(c and c.model, c and c.tokenizer, f.model, f.tokenizer, cfg)
            t0, n = time.perf_counter(), 0
            with progress() as bar:
                task = bar.add_task("capfilt", total=len(todo), rate="")
                for shard in todo:

                    def seen(k: int) -> None:
                        nonlocal n
                        n += k
                        bar.update(task, rate=f"{n / (time.perf_counter() - t0):.1f} img/s")

                    process_shard(shard, out_path, boot, on_images=seen)
                    bar.advance(task)
        barrier(info)
        return summarize(out_path, shards, settings) if rank == 0 else {}
    finally:
        cleanup(info)


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
    threshold: Annotated[float, typer.Option(help="Keep captions with ITM p(match) >= this.")] = 0.5,
    itc_threshold: Annotated[float | None, typer.Option(help="Also require ITC cosine >= this.")] = None,
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
    precision: PrecisionOpt = "auto",
) -> None:
    """Bootstrap a cleaner dataset: caption web images, filter web and synthetic captions with ITM.

    Every web image gets --num-captions synthetic captions (nucleus sampling); the filter keeps each caption,
    web or synthetic, whose ITM match probability reaches --threshold. Human-annotated samples (json source
    "human") pass through. Finished shards are skipped on rerun; a killed run resumes where it stopped.
    On the demo world (`blipctl data demo`) capfilt.json also scores the filter against the known noise labels
    and checks every caption against the recorded scene.

    Examples:

      blipctl capfilt --in web/ --out clean/ --captioner runs/captioner --filter runs/filter

      torchrun --nproc_per_node 8 -m blipctl capfilt --in 'web/{00000..09999}.tar' --out clean/

      blipctl capfilt --in web/ --out clean/ --shard-index $SLURM_ARRAY_TASK_ID --num-shards 100
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
        precision=precision,
    )
    if not summary:
        return
    from rich.table import Table

    table = Table("source", "in", "kept", "dropped", title=f"CapFilt ({out_dir})")
    for src, c in summary["counts"].items():
        table.add_row(src, str(c["in"]), str(c["kept"]), str(c["dropped"]))
    out.print(table)
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
