"""`eval-retrieval` and `eval-caption`: thin wrappers over blip.eval.retrieval / blip.eval.caption.

Each command is a plain function (keyword arguments, returns the result dict), so the recipe runner can call it
in-process; the Typer command is the same function wrapped by `guarded`. Under torchrun every rank computes a
share; rank 0 prints the table, the JSON line and writes the files.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated, Any

import typer

from blip.atomic import write_json
from blipctl._common import PrecisionOpt, err, guarded, is_rank0, print_json_line
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
    k: Annotated[
        int,
        typer.Option(
            "--k",
            help="ITC candidates re-ranked by ITM, per image and per text (the paper: 256). 0: every pair ranked by "
            "ITC alone, for a model whose ITM head is untrained (a short pre-training).",
        ),
    ] = 256,
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
    precision: PrecisionOpt = "fp32",
) -> dict[str, Any]:
    """Image-text retrieval recall (R@1/5/10, percent) as in the paper: ITC top-k re-ranked by ITM + ITC.

    Default model: Salesforce/blip-itm-base-coco. Examples:
      blipctl eval-retrieval coco --model model_base_retrieval_coco.pth --data-root /data --out coco_ret.json
      torchrun --nproc_per_node 8 -m blipctl eval-retrieval flickr30k --model runs/filter --json
    """
    from blip.eval import retrieval

    with _Display(is_rank0()) as show:
        result = retrieval.run(
            dataset,
            model,
            k=k,
            split=split,
            data_root=data_root,
            batch_size=batch_size,
            tokenizer=tokenizer,
            image_size=image_size,
            device=device,
            num_workers=num_workers,
            precision=precision,
            progress=show.report,
            on_stage=show.stage,
        )
    if is_rank0():
        _retrieval_table(result, retrieval.METRIC_KEYS)
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
    precision: PrecisionOpt = "fp32",
) -> dict[str, Any]:
    """Caption metrics (BLEU-1..4, METEOR, ROUGE-L, CIDEr; SPICE when it can run) as in the paper.

    Default model: Salesforce/blip-image-captioning-base. Examples:
      blipctl eval-caption coco --model model_base_caption_capfilt_large.pth --data-root /data --out cap.json
      blipctl eval-caption --results results.json --annotations coco_karpathy_test_gt.json
    """
    from blip.eval import caption

    def warn(msg: str) -> None:
        err.print(f"[yellow]warning:[/] {msg}", highlight=False)

    with _Display(is_rank0() and results is None) as show:
        result = caption.run(
            dataset,
            model,
            split=split,
            data_root=data_root,
            num_beams=num_beams,
            max_length=max_length,
            min_length=min_length,
            prompt=prompt,
            batch_size=batch_size,
            results_out=results_out,
            results=results,
            annotations=annotations,
            meteor=meteor,
            spice=spice,
            tokenizer=tokenizer,
            image_size=image_size,
            device=device,
            num_workers=num_workers,
            precision=precision,
            progress=show.report,
            warn=warn,
            on_stage=show.stage,
        )
    if is_rank0() or results is not None:
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
class _Display:
    """A spinner while loading, then one rich bar per stage with throughput (rank 0 only)."""

    def __init__(self, enabled: bool):
        self.enabled = enabled
        self.status: Any = None
        self.bar: Any = None
        self.tasks: dict[str, tuple[Any, float]] = {}

    def __enter__(self) -> _Display:
        return self

    def __exit__(self, *_: Any) -> None:
        self._stop_status()
        if self.bar is not None:
            self.bar.stop()

    def _stop_status(self) -> None:
        if self.status is not None:
            self.status.stop()
            self.status = None

    def stage(self, msg: str) -> None:
        if self.enabled:
            self._stop_status()
            self.status = err.status(msg)
            self.status.start()

    def report(self, stage: str, advance: int, total: int) -> None:
        """The `progress(stage, advance, total)` callback of blip.eval."""
        if not self.enabled:
            return
        if self.bar is None:
            self._stop_status()
            self.bar = progress_bar()
            self.bar.start()
        if stage not in self.tasks:
            self.tasks[stage] = (self.bar.add_task(stage, total=total, rate=""), time.perf_counter())
        task, t0 = self.tasks[stage]
        self.bar.advance(task, advance)
        done = self.bar.tasks[task].completed
        dt = time.perf_counter() - t0
        rate = f"{done / dt:,.1f} {UNITS.get(stage, 'it')}/s" if dt > 0 else ""
        self.bar.update(task, rate=rate)


def _out_file(out: str | None, name: str) -> Path | None:
    """--out FILE.json, or a directory (existing, or a path without suffix, as recipe steps get): DIR/name."""
    if not out:
        return None
    p = Path(out)
    return p / name if p.is_dir() or not p.suffix else p


def _emit(result: dict[str, Any], out: Path | None, json_out: bool) -> None:
    if out:
        write_json(out, result, ensure_ascii=False)
        err.print(f"[dim]wrote {out}[/]")
    if json_out:
        print_json_line(result)


def register(app: typer.Typer) -> None:
    app.command("eval-retrieval")(guarded(eval_retrieval))
    app.command("eval-caption")(guarded(eval_caption))
