"""Model commands: `caption`, `score`, `export` (thin wrappers over blip.checkpoint / blip.generation)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated

import typer

from blipctl._common import PrecisionOpt, err, guarded, print_json_line

IMAGE_EXTS = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}

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


def resolve_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def _load(model: str, tokenizer: str | None, image_size: int | None, device: str):
    from blip.checkpoint import load_model

    with err.status(f"loading {model}"):
        return load_model(model, tokenizer=tokenizer, image_size=image_size, device=resolve_device(device))


# ---- inputs ------------------------------------------------------------------------------------------------------
def iter_inputs(inputs: list[str], stats=None):
    """Yield (name, PIL RGB image) for image files, directories of images, and webdataset shards."""
    from PIL import Image

    from blip.data.shards import SampleStats, expand_shards, iter_shard
    from blip.data.transforms import to_rgb
    from blip.errors import InputError

    stats = stats if stats is not None else SampleStats()
    for item in inputs:
        p = Path(item)
        if p.is_file() and p.suffix.lower() in IMAGE_EXTS:
            try:
                with Image.open(p) as im:
                    im.load()  # decode now: the file closes when this block ends
                    rgb = to_rgb(im)
            except Exception as e:  # noqa: BLE001
                raise InputError(f"cannot read image {p}: {e}") from None
            yield str(p), rgb
        elif p.is_dir() and not any(p.glob("*.tar")):
            files = sorted(f for f in p.rglob("*") if f.suffix.lower() in IMAGE_EXTS)
            if not files:
                raise InputError(f"{p}: no images ({', '.join(sorted(IMAGE_EXTS))}) and no .tar shards")
            yield from iter_inputs([str(f) for f in files], stats)
        else:
            for shard in expand_shards(item):
                for s in iter_shard(shard, stats):
                    yield f"{Path(shard).name}/{s['key']}", s["image"]


def _batches(it, n: int):
    batch = []
    for x in it:
        batch.append(x)
        if len(batch) == n:
            yield batch
            batch = []
    if batch:
        yield batch


# ---- caption -----------------------------------------------------------------------------------------------------
def caption_images(
    inputs: list[str],
    model: str,
    *,
    num_beams: int = 3,
    sample: bool = False,
    top_p: float = 0.9,
    max_length: int = 20,
    min_length: int = 5,
    prompt: str = "a picture of ",
    num_captions: int = 1,
    repetition_penalty: float | None = None,
    batch_size: int = 8,
    tokenizer: str | None = None,
    image_size: int | None = None,
    device: str = "auto",
    seed: int = 0,
    on_result=None,
    precision: str = "auto",
):
    """Caption every input image; calls `on_result(name, caption)` per caption and returns the list of results."""
    import torch

    from blip.data.transforms import eval_transform
    from blip.errors import InputError
    from blip.generation import GenerationConfig, generate
    from blip.precision import autocast, resolve

    if num_captions < 1:
        raise InputError("--num-captions must be at least 1")
    if not sample and num_captions > num_beams:
        raise InputError(f"--num-captions {num_captions} needs --num-beams >= {num_captions} (or use --sample)")
    loaded = _load(model, tokenizer, image_size, device)
    m, tok = loaded.model, loaded.tokenizer
    if not m.config.text_decoder:
        raise InputError(f"{model} has no text decoder: it is a retrieval/filter model, not a captioner")
    dev = next(m.parameters()).device
    tf = eval_transform(m.config.vision.image_size)
    prompt_ids = tok.encode_prompt(prompt)
    if max_length <= len(prompt_ids):
        raise InputError(f"--max-length {max_length} must exceed the prompt length ({len(prompt_ids)} tokens)")
    gcfg = GenerationConfig(
        num_beams=1 if sample else num_beams,
        max_length=max_length,
        min_length=min_length,
        do_sample=sample,
        top_p=top_p,
        repetition_penalty=repetition_penalty if repetition_penalty is not None else (1.1 if sample else 1.0),
        num_return_sequences=num_captions,
    )
    gen = torch.Generator(device=dev).manual_seed(seed)
    dtype = resolve(precision, dev)
    results = []
    for batch in _batches(iter_inputs(inputs), batch_size):
        px = torch.stack([tf(im) for _, im in batch]).to(dev)
        with torch.inference_mode(), autocast(dev, dtype):  # one context: weights cast to bf16 once per batch
            out = generate(m, m.encode_image(px), prompt_ids, gcfg, generator=gen)
        for (name, _), caps in zip(batch, out, strict=True):
            for ids in caps:
                text = tok.decode(ids)
                results.append({"image": name, "caption": text})
                if on_result:
                    on_result(name, text)
    return results


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
    precision: PrecisionOpt = "auto",
) -> None:
    """Caption images with a BLIP captioner.

    Examples:
      blipctl caption photo.jpg --model Salesforce/blip-image-captioning-base
      blipctl caption photos/ --model runs/captioner --sample --num-captions 3 --json
      blipctl caption 'shards/{00000..00009}.tar' --model model_base_caption_capfilt_large.pth
    """
    from blip.checkpoint import DEFAULT_CAPTIONER

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
    )
    n = len({r["image"] for r in res})
    err.print(f"[dim]{n} images captioned in {time.perf_counter() - t0:.1f} s[/]")


# ---- score -------------------------------------------------------------------------------------------------------
def score_texts(
    image: str,
    texts: list[str],
    model: str,
    tokenizer: str | None = None,
    image_size: int | None = None,
    device: str = "auto",
    max_length: int = 35,
    precision: str = "auto",
) -> list[dict]:
    """ITM match probability and ITC cosine of one image against each text (precision: auto, fp32 or bf16)."""
    import torch

    from blip.data.transforms import eval_transform
    from blip.errors import InputError
    from blip.precision import autocast, resolve

    if not texts:
        raise InputError("give at least one --text")
    loaded = _load(model, tokenizer, image_size, device)
    m, tok = loaded.model, loaded.tokenizer
    if not m.config.text_encoder:
        raise InputError(f"{model} has no text encoder: it is a captioner, not a retrieval/filter model")
    ((_, im),) = list(iter_inputs([image]))
    dev = next(m.parameters()).device
    px = eval_transform(m.config.vision.image_size)(im)[None].to(dev)
    ids, mask = tok(texts, max_length=max_length)
    ids, mask = ids.to(dev), mask.to(dev)
    with torch.inference_mode(), autocast(dev, resolve(precision, dev)):
        emb = m.encode_image(px)  # (1, 1+N, D)
        kv = m.text_encoder.image_kv(emb)
        itm = m.itm_logits(ids, mask, image_kv=kv, rows_per_kv=len(texts)).float().softmax(-1)[:, 1]
        itc = (m.text_features(ids, mask).float() @ m.image_features(emb).float().T)[:, 0]
    return [{"text": t, "itm": float(a), "itc": float(b)} for t, a, b in zip(texts, itm, itc, strict=True)]


def score(
    image: Annotated[str, typer.Option("--image", help="An image file.")],
    text: Annotated[list[str], typer.Option("--text", help="A text to score; repeat for several.")],
    model: ModelOpt = None,
    tokenizer: TokenizerOpt = None,
    image_size: ImageSizeOpt = None,
    device: DeviceOpt = "auto",
    json_out: Annotated[bool, typer.Option("--json", help='One {"text", "itm", "itc"} JSON object per line.')] = False,
    precision: PrecisionOpt = "auto",
) -> None:
    """Score how well texts match an image: ITM match probability and ITC cosine similarity.

    Example:
      blipctl score --model Salesforce/blip-itm-base-coco --image dog.jpg --text "a dog" --text "a cat"
    """
    from rich.table import Table

    from blip.checkpoint import DEFAULT_FILTER

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
            "or auto (caption if the model has a decoder)."
        ),
    ] = "auto",
    tokenizer: TokenizerOpt = None,
) -> None:
    """Convert a checkpoint: to a transformers BLIP directory, to an original-style .pth, or to blipctl format.

    Examples:
      blipctl export --model runs/captioner --format hf --out hf-captioner
      blipctl export --model model_base_retrieval_coco.pth --format blipctl --out filter/
    """
    from blip.checkpoint import export_hf, save_checkpoint, save_pth
    from blip.errors import InputError

    loaded = _load(model, tokenizer, None, "cpu")
    if fmt == "hf":
        path, arch = export_hf(loaded.model, loaded.tokenizer, out, task=task)
        err.print(f"wrote {arch} to {path}")
    elif fmt == "pth":
        save_pth(loaded.model, out)
        err.print(f"wrote original-format checkpoint {out}")
    elif fmt == "blipctl":
        save_checkpoint(loaded.model, loaded.tokenizer, out)
        err.print(f"wrote blipctl checkpoint {out}")
    else:
        raise InputError(f"--format must be hf, pth or blipctl, not {fmt!r}")


def register(app: typer.Typer) -> None:
    app.command("caption")(guarded(caption))
    app.command("score")(guarded(score))
    app.command("export")(guarded(export))
