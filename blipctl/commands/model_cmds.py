"""Model commands: `caption`, `score`, `export` (thin wrappers over blip.checkpoint / blip.generation)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated

import typer

from blipctl._common import PrecisionOpt, err, guarded, print_json_line

ModelOpt = Annotated[
    str | None,
    typer.Option(
        "--model",
        help="Model source: a blipctl checkpoint dir, a Hugging Face BLIP dir or hub id, or an original .pth file.",
    ),
]
TokenizerOpt = Annotated[
    str | None, typer.Option("--tokenizer", help="Tokenizer dir or vocab.txt (for .pth files without one beside them).")
]
DeviceOpt = Annotated[str, typer.Option("--device", help="cpu, cuda, cuda:N or auto.")]
ImageSizeOpt = Annotated[
    int | None, typer.Option("--image-size", help="Resize input to this size (position embeddings are interpolated).")
]


def _load(model: str, tokenizer: str | None, image_size: int | None, device: str):
    from blip import load

    with err.status(f"loading {model}"):
        return load(model, device=device, tokenizer=tokenizer, image_size=image_size)


# ---- caption -----------------------------------------------------------------------------------------------------
def caption(
    inputs: Annotated[list[str], typer.Argument(help="Image files, directories of images, or webdataset shards.")],
    model: ModelOpt = None,
    num_beams: Annotated[int, typer.Option(help="Beam width for beam search (ignored with --sample).")] = 3,
    sample: Annotated[bool, typer.Option("--sample", help="Nucleus sampling instead of beam search.")] = False,
    top_p: Annotated[float, typer.Option(help="Nucleus mass when sampling.")] = 0.9,
    max_length: Annotated[int, typer.Option(help="Max tokens, counting [DEC] and the prompt (as the original).")] = 20,
    min_length: Annotated[int, typer.Option(help="Min tokens, counting [DEC] and the prompt.")] = 5,
    prompt: Annotated[str, typer.Option(help='Decoder prompt; "" for none. Never printed.')] = "a picture of ",
    num_captions: Annotated[int, typer.Option(help="Captions per image (sampled, or the best beams).")] = 1,
    repetition_penalty: Annotated[
        float | None, typer.Option(help="Default 1.0 for beam search, 1.1 for sampling (as the original).")
    ] = None,
    batch_size: Annotated[int, typer.Option(help="Images per forward pass.")] = 8,
    tokenizer: TokenizerOpt = None,
    image_size: ImageSizeOpt = None,
    device: DeviceOpt = "auto",
    seed: Annotated[int, typer.Option(help="Sampling seed.")] = 0,
    json_out: Annotated[bool, typer.Option("--json", help='One {"image", "caption"} JSON object per line.')] = False,
    precision: PrecisionOpt = "fp32",
    strict: Annotated[
        bool,
        typer.Option("--strict", help="Stop at the first unusable image or sample (exit 2) instead of skipping it."),
    ] = False,
) -> None:
    """Caption images with a BLIP captioner. Unusable images (in directories) and samples (in shards) are skipped
    and counted by reason; --strict stops at the first one instead.

    Examples:
      blipctl caption photo.jpg --model Salesforce/blip-image-captioning-base
      blipctl caption photos/ --model runs/captioner --sample --num-captions 3 --json
      blipctl caption 'shards/{00000..00009}.tar' --model model_base_caption_capfilt_large.pth
    """
    from blip.api import caption_images
    from blip.checkpoint import DEFAULT_CAPTIONER
    from blip.data.shards import SampleStats

    t0 = time.perf_counter()

    def show(name: str, text: str) -> None:
        if json_out:
            print_json_line({"image": name, "caption": text})
        else:
            typer.echo(f"{name}\t{text}")

    res = caption_images(
        inputs,
        model or DEFAULT_CAPTIONER,
        num_beams=num_beams,
        sample=sample,
        top_p=top_p,
        max_length=max_length,
        min_length=min_length,
        prompt=prompt,
        num_captions=num_captions,
        repetition_penalty=repetition_penalty,
        batch_size=batch_size,
        tokenizer=tokenizer,
        image_size=image_size,
        device=device,
        seed=seed,
        on_result=show,
        precision=precision,
        strict=strict,
        stats=(stats := SampleStats()),
    )
    n = len({r["image"] for r in res})
    err.print(f"[dim]{n} images captioned in {time.perf_counter() - t0:.1f} s[/]")
    if stats.total_bad:
        reasons = ", ".join(f"{v} {k}" for k, v in sorted(stats.bad.items()))
        err.print(f"[yellow]skipped[/] {stats.total_bad} unusable images ({reasons})", highlight=False)


# ---- score -------------------------------------------------------------------------------------------------------
def score(
    image: Annotated[str, typer.Option("--image", help="An image file.")],
    text: Annotated[list[str], typer.Option("--text", help="A text to score; repeat for several.")],
    model: ModelOpt = None,
    tokenizer: TokenizerOpt = None,
    image_size: ImageSizeOpt = None,
    device: DeviceOpt = "auto",
    json_out: Annotated[bool, typer.Option("--json", help='One {"text", "itm", "itc"} JSON object per line.')] = False,
    precision: PrecisionOpt = "fp32",
) -> None:
    """Score how well texts match an image: ITM match probability and ITC cosine similarity.

    Example:
      blipctl score --model Salesforce/blip-itm-base-coco --image dog.jpg --text "a dog" --text "a cat"
    """
    from rich.table import Table

    from blip.api import score_texts
    from blip.checkpoint import DEFAULT_FILTER
    from blip.errors import InputError

    if not text:
        raise InputError("give at least one --text")
    rows = score_texts(image, text, model or DEFAULT_FILTER, tokenizer, image_size, device, precision=precision)
    if json_out:
        for r in rows:
            print_json_line(r)
        return
    table = Table("text", "ITM p(match)", "ITC cosine")
    for r in rows:
        table.add_row(r["text"], f"{r['itm']:.4f}", f"{r['itc']:.4f}")
    from blipctl._common import out

    out.print(table)


# ---- export ------------------------------------------------------------------------------------------------------
def export(
    model: Annotated[str, typer.Option("--model", help="Model source to convert (any format).")],
    out: Annotated[Path, typer.Option("--out", help="Output directory (or .pth file for --format pth).")],
    fmt: Annotated[
        str, typer.Option("--format", help="hf (transformers), pth (original Salesforce) or blipctl.")
    ] = "hf",
    task: Annotated[
        str,
        typer.Option(
            help="For hf: caption (BlipForConditionalGeneration), retrieval (BlipForImageTextRetrieval) "
            "or auto (caption if the model has a decoder). For pth, the original model whose full key list to "
            "write: caption (blip_decoder), itm (blip_itm), retrieval (blip_retrieval: + momentum copies and "
            "queues), pretrain (blip_pretrain) or auto (pretrain with both text towers, else caption/retrieval)."
        ),
    ] = "auto",
    tokenizer: TokenizerOpt = None,
    overwrite: Annotated[
        bool,
        typer.Option(
            "--overwrite",
            help="Write into a non-empty --out that is not an earlier export of this format: blipctl's files are "
            "replaced, every other file is kept.",
        ),
    ] = False,
) -> None:
    """Convert a checkpoint: to a transformers BLIP directory, to an original-style .pth, or to blipctl format.

    A .pth export carries every key the original salesforce/BLIP model lists (position_ids buffers, the LM head's
    decoder.bias alias, momentum copies and queues for retrieval/pretrain), so the original loaders accept it. A
    model with an untied LM head (tie_lm_head = false) is exported untied, also to hf (tie_word_embeddings false).

    Examples:
      blipctl export --model runs/captioner --format hf --out hf-captioner
      blipctl export --model model_base_retrieval_coco.pth --format blipctl --out filter/
    """
    from blip.checkpoint import export_hf, save_checkpoint, save_pth
    from blip.errors import InputError

    loaded = _load(model, tokenizer, None, "cpu")
    if fmt == "hf":
        path, arch = export_hf(loaded.net, loaded.tokenizer, out, task=task, overwrite=overwrite)
        err.print(f"wrote {arch} to {path}")
    elif fmt == "pth":
        kind = save_pth(loaded.net, out, task=task)
        err.print(f"wrote original-format checkpoint {out} ({kind} layout)")
    elif fmt == "blipctl":
        save_checkpoint(loaded.net, loaded.tokenizer, out, overwrite=overwrite)
        err.print(f"wrote blipctl checkpoint {out}")
    else:
        raise InputError(f"--format must be hf, pth or blipctl, not {fmt!r}")


def register(app: typer.Typer) -> None:
    app.command("caption")(guarded(caption))
    app.command("score")(guarded(score))
    app.command("export")(guarded(export))
