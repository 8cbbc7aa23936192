"""`eval-retrieval` and `eval-caption`: thin wrappers over blip.eval.retrieval / blip.eval.caption.

Each command is a plain function (keyword arguments, returns the result dict), so the recipe runner can call it
in-process; the Typer command is the same function wrapped by `guarded`. Under torchrun every rank computes a
share; rank 0 prints the table, the JSON line and writes the files.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any

import typer

from blipctl._common import PrecisionOpt, err, guarded, print_json_line, write_json_atomic
from blipctl._common import progress as progress_bar

DatasetArg = Annotated[
    str,
    typer.Argument(
        help="coco, flickr30k (Karpathy splits under --data-root or $BLIP_DATA), a shard spec, or an annotation JSON."
    ),
]
ModelOpt = Annotated[
    str | None,
    typer.Option(
        "--model",
        help="Model source: a blipctl checkpoint dir, a Hugging Face BLIP dir or hub id, or an original .pth file.",
        show_default=False,
    ),
]
SplitOpt = Annotated[str, typer.Option("--split", help="Dataset split (coco/flickr30k): val or test.")]
DataRootOpt = Annotated[
    str | None, typer.Option("--data-root", help="Root of the coco/flickr30k data (default $BLIP_DATA).")
]
OutOpt = Annotated[
    str | None,
    typer.Option("--out", help="Write the metrics JSON here (atomically); a directory gets DIR/<command>.json."),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print the metrics as one JSON object line on stdout.")]
TokenizerOpt = Annotated[
    str | None, typer.Option("--tokenizer", help="Tokenizer dir or vocab.txt (for .pth files without one beside them).")
]
ImageSizeOpt = Annotated[
    int | None, typer.Option("--image-size", help="Evaluate at this image size (position embeddings interpolated).")
]
DeviceOpt = Annotated[
    str, typer.Option("--device", help="auto (the local GPU under torchrun, else the CPU), cpu, cuda or cuda:N.")
]
WorkersOpt = Annotated[
    int | None, typer.Option("--num-workers", help="Image-loading worker processes (default 4 on GPU, 0 on CPU).")
]

UNITS = {"images": "img", "texts": "txt", "pairs": "pairs", "captions": "img"}


# ---- eval-retrieval ----------------------------------------------------------------------------------------------
def eval_retrieval(
    dataset: DatasetArg,
    model: ModelOpt = None,
    k: Annotated[int, typer.Option("--k", help="ITC candidates re-ranked by ITM, per image and per text.")] = 256,
    split: SplitOpt = "test",
    data_root: DataRootOpt = None,
    batch_size: Annotated[
        int,
        typer.Option(
            "--batch-size", help="(image, text) pairs per ITM forward; also caps the image (32) and text batches."
        ),
    ] = 512,
    out: OutOpt = None,
    json_out: JsonOpt = False,
    tokenizer: TokenizerOpt = None,
    image_size: ImageSizeOpt = None,
    device: DeviceOpt = "auto",
    num_workers: WorkersOpt = None,
    precision: PrecisionOpt = "auto",
) -> dict[str, Any]:
    """Image-text retrieval recall (R@1/5/10, percent) as in the paper: ITC top-k re-ranked by ITM + ITC.

    Default model: Salesforce/blip-itm-base-coco. Examples:
      blipctl eval-retrieval coco --model model_base_retrieval_coco.pth --data-root /data --out coco_ret.json
      torchrun --nproc_per_node 8 -m blipctl eval-retrieval flickr30k --model runs/filter --json
    """
    from blip.checkpoint import DEFAULT_FILTER
    from blip.eval.retrieval import METRIC_KEYS, evaluate_retrieval

    if batch_size < 1:
        raise _input_error(f"--batch-size must be at least 1, got {batch_size}")
    with _distributed(device) as info:
        eval_set = _load_set(dataset, split, data_root)
        loaded = _load_model(model or DEFAULT_FILTER, tokenizer, image_size, info.device)
        t0 = time.perf_counter()
        with _progress(info.is_main) as report:
            metrics = evaluate_retrieval(
                eval_set,
                loaded.model,
                loaded.tokenizer,
                k,
                image_batch_size=min(32, batch_size),
                text_batch_size=min(256, batch_size),
                pairs_per_batch=batch_size,
                num_workers=_workers(num_workers, info.device),
                precision=precision,
                progress=report,
            )
        result = {
            **metrics,
            "model": loaded.source,
            "dataset": eval_set.name,
            "settings": {
                "k": k,
                "split": split,
                "batch_size": batch_size,
                "image_size": loaded.model.config.vision.image_size,
                "world_size": info.world_size,
                "device": str(info.device),
                "precision": precision,
            },
            "stats": {
                "num_images": len(eval_set.img2txt),
                "num_texts": len(eval_set.txt2img),
                "seconds": round(time.perf_counter() - t0, 2),
            },
        }
        if info.is_main:
            _retrieval_table(result, METRIC_KEYS)
            _emit(result, _out_file(out, "eval-retrieval.json"), json_out)
        return result


def _retrieval_table(r: dict[str, Any], keys: tuple[str, ...]) -> None:
    from rich.table import Table

    s = r["stats"]
    table = Table(
        "direction",
        "R@1",
        "R@5",
        "R@10",
        "mean",
        title=f"retrieval on {r['dataset']} ({s['num_images']} images, {s['num_texts']} texts, k={r['settings']['k']})",
        caption=f"r_mean {r['r_mean']:.2f}   model {r['model']}",
    )
    table.add_row("text (i2t)", *(f"{r[k]:.2f}" for k in keys[:4]))
    table.add_row("image (t2i)", *(f"{r[k]:.2f}" for k in keys[4:8]))
    err.print(table)


# ---- eval-caption ------------------------------------------------------------------------------------------------
def eval_caption(
    dataset: Annotated[
        str | None,
        typer.Argument(help="coco, flickr30k, a shard spec or an annotation JSON (not needed with --results)."),
    ] = None,
    model: ModelOpt = None,
    split: SplitOpt = "test",
    data_root: DataRootOpt = None,
    num_beams: Annotated[int, typer.Option("--num-beams", help="Beam width.")] = 3,
    max_length: Annotated[int, typer.Option("--max-length", help="Max tokens, counting [DEC] and the prompt.")] = 20,
    min_length: Annotated[int, typer.Option("--min-length", help="Min tokens, counting [DEC] and the prompt.")] = 5,
    prompt: Annotated[str, typer.Option("--prompt", help='Decoder prompt ("" for none); stripped from captions.')] = (
        "a picture of "
    ),
    batch_size: Annotated[int, typer.Option("--batch-size", help="Images per generation batch.")] = 16,
    out: OutOpt = None,
    results_out: Annotated[
        str | None, typer.Option("--results-out", help='Write the captions ([{"image_id", "caption"}]) here.')
    ] = None,
    results: Annotated[
        str | None, typer.Option("--results", help="Score this COCO results file instead of generating.")
    ] = None,
    annotations: Annotated[
        str | None, typer.Option("--annotations", help="COCO-format ground truth for --results.")
    ] = None,
    meteor: Annotated[bool, typer.Option("--meteor/--no-meteor", help="METEOR (starts a JVM, ~10 s).")] = True,
    spice: Annotated[
        bool | None, typer.Option("--spice/--no-spice", help="SPICE: default only when CoreNLP is installed.")
    ] = None,
    json_out: JsonOpt = False,
    tokenizer: TokenizerOpt = None,
    image_size: ImageSizeOpt = None,
    device: DeviceOpt = "auto",
    num_workers: WorkersOpt = None,
    precision: PrecisionOpt = "auto",
) -> dict[str, Any]:
    """Caption metrics (BLEU-1..4, METEOR, ROUGE-L, CIDEr; SPICE when it can run) as in the paper.

    Default model: Salesforce/blip-image-captioning-base. Examples:
      blipctl eval-caption coco --model model_base_caption_capfilt_large.pth --data-root /data --out cap.json
      blipctl eval-caption --results results.json --annotations coco_karpathy_test_gt.json
    """
    from blip.checkpoint import DEFAULT_CAPTIONER
    from blip.eval.caption import evaluate_caption, score_captions

    notes: list[str] = []

    def warn(msg: str) -> None:
        notes.append(msg)
        err.print(f"[yellow]warning:[/] {msg}", highlight=False)

    settings = {"split": split, "meteor": meteor, "spice": spice}
    if results is not None:
        gt = _read_json(annotations, "--annotations") if annotations else None
        if gt is None:
            if dataset is None:
                raise _input_error("--results needs --annotations GT.json (or a DATASET whose ground truth to use)")
            gt = _load_set(dataset, split, data_root).gt
        res = _read_json(results, "--results")
        if not isinstance(res, list) or not all(isinstance(r, dict) and {"image_id", "caption"} <= set(r) for r in res):
            raise _input_error(f'{results}: expected COCO results [{{"image_id": ..., "caption": ...}}, ...]')
        metrics = score_captions(res, gt, meteor=meteor, spice=spice, warn=warn)
        result = {
            **metrics,
            "model": None,
            "dataset": str(annotations) if annotations else dataset,
            "settings": {**settings, "results": str(results)},
            "stats": {"num_images": len({r["image_id"] for r in res})},
            "notes": notes,
        }
        _caption_table(result)
        _emit(result, _out_file(out, "eval-caption.json"), json_out)
        return result

    if dataset is None:
        raise _input_error("give a DATASET to caption, or --results RESULTS.json --annotations GT.json to score")
    if batch_size < 1:
        raise _input_error(f"--batch-size must be at least 1, got {batch_size}")
    with _distributed(device) as info:
        eval_set = _load_set(dataset, split, data_root)
        loaded = _load_model(model or DEFAULT_CAPTIONER, tokenizer, image_size, info.device)
        t0 = time.perf_counter()
        with _progress(info.is_main) as report:
            metrics, captions = evaluate_caption(
                eval_set,
                loaded.model,
                loaded.tokenizer,
                prompt=prompt,
                num_beams=num_beams,
                max_length=max_length,
                min_length=min_length,
                batch_size=batch_size,
                num_workers=_workers(num_workers, info.device),
                precision=precision,
                meteor=meteor,
                spice=spice,
                progress=report,
                warn=warn if info.is_main else None,
            )
        result = {
            **metrics,
            "model": loaded.source,
            "dataset": eval_set.name,
            "settings": {
                **settings,
                "num_beams": num_beams,
                "max_length": max_length,
                "min_length": min_length,
                "prompt": prompt,
                "batch_size": batch_size,
                "image_size": loaded.model.config.vision.image_size,
                "world_size": info.world_size,
                "device": str(info.device),
                "precision": precision,
            },
            "stats": {"num_images": len(captions), "seconds": round(time.perf_counter() - t0, 2)},
            "notes": notes,
        }
        if info.is_main:
            if results_out:
                write_json_atomic(Path(results_out), captions)
            _caption_table(result)
            _emit(result, _out_file(out, "eval-caption.json"), json_out)
        return result


CAPTION_KEYS = ("Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "METEOR", "ROUGE_L", "CIDEr", "SPICE")


def _caption_table(r: dict[str, Any]) -> None:
    from rich.table import Table

    keys = [k for k in CAPTION_KEYS if k in r]
    table = Table(
        *keys,
        title=f"captioning on {r['dataset']} ({r['stats']['num_images']} images)",
        caption=f"model {r['model']}" if r["model"] else None,
    )
    table.add_row(*(f"{100 * r[k]:.2f}" for k in keys))
    err.print(table)
    err.print("[dim](scores x 100)[/]")


# ---- shared ------------------------------------------------------------------------------------------------------
def _input_error(msg: str) -> Exception:
    from blip.errors import InputError

    return InputError(msg)


@contextlib.contextmanager
def _distributed(device: str) -> Iterator[Any]:
    """Join torchrun's process group when there is one (and leave it afterwards if we created it)."""
    import torch
    import torch.distributed as dist

    from blip.distributed import barrier, cleanup, init_distributed

    if device.startswith("cuda:") and int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        from blip.distributed import DistInfo

        torch.cuda.set_device(torch.device(device))
        yield DistInfo(device=torch.device(device))
        return
    if device not in ("auto", "cpu", "cuda"):
        raise _input_error(f"--device must be auto, cpu, cuda or cuda:N, not {device!r}")
    existed = dist.is_available() and dist.is_initialized()
    info = init_distributed(device)
    try:
        yield info
        barrier(info)  # reached only without an error: every rank done before any leaves the group
    finally:
        if not existed:
            cleanup(info)


def _load_set(dataset: str, split: str, data_root: str | None):
    from blip.data.datasets import load_eval_set

    with err.status(f"loading {dataset} ({split})"):
        return load_eval_set(dataset, split=split, data_root=data_root)


def _load_model(source: str, tokenizer: str | None, image_size: int | None, device):
    from blip.checkpoint import load_model

    with err.status(f"loading {source}"):
        return load_model(source, tokenizer=tokenizer, image_size=image_size, device=device)


def _workers(n: int | None, device) -> int:
    if n is not None:
        return n
    return min(4, os.cpu_count() or 1) if device.type == "cuda" else 0


@contextlib.contextmanager
def _progress(enabled: bool) -> Iterator[Any]:
    """A `progress(stage, advance, total)` callback drawing one rich bar per stage, with throughput."""
    if not enabled:
        yield None
        return
    bar = progress_bar()
    tasks: dict[str, tuple[Any, float]] = {}

    def report(stage: str, advance: int, total: int) -> None:
        if stage not in tasks:
            tasks[stage] = (bar.add_task(stage, total=total, rate=""), time.perf_counter())
        task, t0 = tasks[stage]
        bar.advance(task, advance)
        done = bar.tasks[task].completed
        dt = time.perf_counter() - t0
        rate = f"{done / dt:,.1f} {UNITS.get(stage, 'it')}/s" if dt > 0 else ""
        bar.update(task, rate=rate)

    with bar:
        yield report


def _read_json(path: str, flag: str) -> Any:
    path = Path(path)
    if not path.is_file():
        raise _input_error(f"{flag}: file not found: {path}")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise _input_error(f"{flag}: {path} is not valid JSON ({e})") from None


def _out_file(out: str | None, name: str) -> Path | None:
    """--out FILE.json, or a directory (existing, or a path without suffix, as recipe steps get): DIR/name."""
    if not out:
        return None
    p = Path(out)
    return p / name if p.is_dir() or not p.suffix else p


def _emit(result: dict[str, Any], out: Path | None, json_out: bool) -> None:
    if out:
        write_json_atomic(out, result)
        err.print(f"[dim]wrote {out}[/]")
    if json_out:
        print_json_line(result)


def register(app: typer.Typer) -> None:
    app.command("eval-retrieval")(guarded(eval_retrieval))
    app.command("eval-caption")(guarded(eval_caption))
