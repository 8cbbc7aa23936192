"""The one-call verbs of the public API: `blip.load(...)` gives a `Model` that captions and scores images.

    import blip
    m = blip.load("Salesforce/blip-image-captioning-base", device="auto")
    m.caption(["a.jpg", pil_image])                 # -> ["a dog on a couch", ...]
    m.score("a.jpg", ["a dog", "a cat"])            # -> [{"text", "itm", "itc"}, ...]

The CLI's `caption` and `score` commands call `caption_images` / `score_texts` below, which use the same Model.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch

from blip.errors import InputError
from blip.inputs import batches, iter_inputs
from blip.precision import resolve as resolve_precision

DTYPE_NAMES = {"float32": "fp32", "bfloat16": "bf16"}
"""Long names `load(dtype=...)` also takes; the short ones are blip.precision's (fp32, bf16, auto)."""


class Model:
    """A loaded BLIP model with its tokenizer and image transform.

    `net` is the torch module (blip.model.BLIP), `tokenizer` a blip.tokenizer.Tokenizer, `transform` turns a PIL
    image into the (3, s, s) tensor the model expects. Images may be PIL images, paths (image files, directories
    of images, webdataset shards) or tensors already transformed ((3, s, s) or (B, 3, s, s)).
    """

    def __init__(self, net: Any, tokenizer: Any, source: str = "", kind: str = "", dtype: torch.dtype | None = None):
        from blip.data.transforms import eval_transform

        self.net, self.tokenizer, self.source, self.kind = net, tokenizer, source, kind
        self.dtype = dtype
        self.transform = eval_transform(net.config.vision.image_size)

    @property
    def config(self) -> Any:
        return self.net.config

    @property
    def device(self) -> torch.device:
        return next(self.net.parameters()).device

    def __repr__(self) -> str:
        return f"blip.Model({self.source!r}, kind={self.kind!r}, device={self.device})"

    # ---- inputs ----------------------------------------------------------------------------------------------
    def _named(self, images: Any) -> Iterator[tuple[str, Any]]:
        """(name, PIL image or (3, s, s) tensor) for every image in `images` (one item or a list)."""
        items = images if isinstance(images, list | tuple) else [images]
        for i, x in enumerate(items):
            if isinstance(x, torch.Tensor):
                t = x if x.dim() == 4 else x[None]
                for j, row in enumerate(t):
                    yield f"tensor{i}" + (f"/{j}" if x.dim() == 4 else ""), row
            elif isinstance(x, str | os.PathLike):
                yield from iter_inputs([str(x)])
            elif hasattr(x, "convert"):  # a PIL image
                yield f"image{i}", x
            else:
                raise InputError(f"images[{i}]: expected a PIL image, a path or a tensor, got {type(x).__name__}")

    def _pixels(self, images: list[Any]) -> torch.Tensor:
        px = torch.stack([im if isinstance(im, torch.Tensor) else self.transform(im) for im in images])
        return px.to(self.device)  # (B, 3, s, s)

    def _autocast(self) -> Any:
        import contextlib

        if self.dtype is None or self.dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    # ---- captioning ------------------------------------------------------------------------------------------
    def caption_named(
        self,
        named: Iterable[tuple[str, Any]],
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
        seed: int = 0,
    ) -> Iterator[tuple[str, list[str]]]:
        """(name, captions) per (name, image): the streaming form of `caption`."""
        from blip.generation import GenerationConfig, check_range, generate

        check_range("batch_size", batch_size, low=1)
        if num_captions < 1:
            raise InputError("num_captions must be at least 1", param="num_captions")
        if not sample and num_captions > num_beams:
            raise InputError(
                f"num_captions {num_captions} needs num_beams >= {num_captions} (or set sample)",
                param=("num_captions", "num_beams", "sample"),
            )
        if not self.config.text_decoder:
            raise InputError(f"{self.source} has no text decoder: it is a retrieval/filter model, not a captioner")
        prompt_ids = self.tokenizer.encode_prompt(prompt)
        if max_length <= len(prompt_ids):
            raise InputError(
                f"max_length {max_length} must exceed the prompt length ({len(prompt_ids)} tokens)", param="max_length"
            )
        gcfg = GenerationConfig(
            num_beams=1 if sample else num_beams,
            max_length=max_length,
            min_length=min_length,
            do_sample=sample,
            top_p=top_p,
            repetition_penalty=repetition_penalty if repetition_penalty is not None else (1.1 if sample else 1.0),
            num_return_sequences=num_captions,
        )
        gen = torch.Generator(device=self.device).manual_seed(seed)
        for batch in batches(named, batch_size):
            px = self._pixels([im for _, im in batch])
            with torch.no_grad(), self._autocast():
                out = generate(self.net, self.net.encode_image(px), prompt_ids, gcfg, generator=gen)
            for (name, _), caps in zip(batch, out, strict=True):
                yield name, [self.tokenizer.decode(ids) for ids in caps]

    def caption(
        self,
        images: Any,
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
        seed: int = 0,
    ) -> list[str] | list[list[str]]:
        """Caption images: one caption per image (beam search, or nucleus sampling with `sample=True`); with
        `num_captions > 1`, a list of captions per image. Lengths count [DEC] and the prompt, as the original."""
        res = self.caption_named(
            self._named(images),
            num_beams=num_beams,
            sample=sample,
            top_p=top_p,
            max_length=max_length,
            min_length=min_length,
            prompt=prompt,
            num_captions=num_captions,
            repetition_penalty=repetition_penalty,
            batch_size=batch_size,
            seed=seed,
        )
        return [caps if num_captions > 1 else caps[0] for _, caps in res]

    # ---- scoring ---------------------------------------------------------------------------------------------
    def score(self, images: Any, texts: str | list[str], *, max_length: int = 35, batch_size: int = 256) -> list[dict]:
        """ITM match probability and ITC cosine: of one image against every text, or of images[i] with texts[i].

        Returns one {"text", "itm", "itc"} per pair, in order.
        """
        texts = [texts] if isinstance(texts, str) else list(texts)
        if not texts:
            raise InputError("texts: give at least one text", param="texts")
        if not self.config.text_encoder:
            raise InputError(f"{self.source} has no text encoder: it is a captioner, not a retrieval/filter model")
        ims = [im for _, im in self._named(images)]
        if len(ims) == 1:
            pairs = [(0, t) for t in texts]
        elif len(ims) == len(texts):
            pairs = list(enumerate(texts))
        else:
            raise InputError(f"images and texts: {len(ims)} images for {len(texts)} texts (give 1 image, or 1 each)")
        rows = []
        for chunk in batches(pairs, batch_size):
            idx = sorted({i for i, _ in chunk})
            ids, mask = self.tokenizer([t for _, t in chunk], max_length=max_length)
            ids, mask = ids.to(self.device), mask.to(self.device)
            with torch.no_grad(), self._autocast():
                emb = self.net.encode_image(self._pixels([ims[i] for i in idx]))  # (I, 1+N, D)
                kv = self.net.text_encoder.image_kv(emb)
                if len(idx) == 1:  # one image: its K/V serve every text
                    itm = self.net.itm_logits(ids, mask, image_kv=kv, rows_per_kv=len(chunk))
                    img_feat = self.net.image_features(emb).expand(len(chunk), -1)
                else:  # one text per image, in order
                    itm = self.net.itm_logits(ids, mask, image_kv=kv, rows_per_kv=1)
                    img_feat = self.net.image_features(emb)
                itm = itm.float().softmax(-1)[:, 1]
                itc = (self.net.text_features(ids, mask).float() * img_feat.float()).sum(-1)
            rows += [
                {"text": t, "itm": float(a), "itc": float(b)} for (_, t), a, b in zip(chunk, itm, itc, strict=True)
            ]
        return rows


def load(
    source: str | os.PathLike,
    device: str = "auto",
    dtype: str | torch.dtype | None = None,
    tokenizer: str | None = None,
    image_size: int | None = None,
) -> Model:
    """Load any model source: a blipctl checkpoint dir, a Hugging Face BLIP dir or hub id, an original .pth.

    device: "auto" (the GPU when there is one), "cpu", "cuda", "cuda:N". dtype: None/"fp32", "bf16" to run
    the forward passes under bfloat16 autocast (weights stay fp32), or "auto" (bf16 where the hardware computes it
    natively: bf16 GPUs, CPUs with AVX512-BF16/AMX; see blip.precision). `image_size` interpolates the position
    embeddings; `tokenizer` is for .pth files without one beside them.
    """
    from blip.checkpoint import load_model
    from blip.distributed import resolve_device
    from blip.precision import resolve

    dev = resolve_device(device)
    if dtype is None or isinstance(dtype, str):
        name = dtype or "fp32"
        dtype = resolve(DTYPE_NAMES.get(name, name), dev, key="dtype")
    loaded = load_model(source, tokenizer=tokenizer, image_size=image_size, device=dev)
    return Model(loaded.model, loaded.tokenizer, loaded.source, loaded.kind, dtype=dtype)


# ---- the CLI's verbs ---------------------------------------------------------------------------------------------
def caption_images(
    inputs: list[str],
    model: str | Model,
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
    precision: str = "fp32",
    seed: int = 0,
    on_result: Callable[[str, str], None] | None = None,
    strict: bool = False,
    stats: Any = None,
) -> list[dict]:
    """Caption every input image (files, directories, shards); calls `on_result(name, caption)` per caption and
    returns [{"image", "caption"}]. Unusable images in directories and shards are skipped and counted by reason in
    `stats` (a blip.data.shards.SampleStats, if given), or with `strict` an InputError naming the file/sample."""
    if num_captions < 1:
        raise InputError("num_captions must be at least 1", param="num_captions")
    if not sample and num_captions > num_beams:
        raise InputError(
            f"num_captions {num_captions} needs num_beams >= {num_captions} (or set sample)",
            param=("num_captions", "num_beams", "sample"),
        )
    resolve_precision(precision, "cpu", key="precision")  # a bad value names `precision`, not load's `dtype`
    m = model if isinstance(model, Model) else load(model, device, precision, tokenizer, image_size)
    results = []
    for name, caps in m.caption_named(
        iter_inputs(inputs, stats, strict),
        num_beams=num_beams,
        sample=sample,
        top_p=top_p,
        max_length=max_length,
        min_length=min_length,
        prompt=prompt,
        num_captions=num_captions,
        repetition_penalty=repetition_penalty,
        batch_size=batch_size,
        seed=seed,
    ):
        for text in caps:
            results.append({"image": name, "caption": text})
            if on_result:
                on_result(name, text)
    return results


def score_texts(
    image: str,
    texts: list[str],
    model: str | Model,
    tokenizer: str | None = None,
    image_size: int | None = None,
    device: str = "auto",
    max_length: int = 35,
    precision: str = "fp32",
) -> list[dict]:
    """ITM match probability and ITC cosine of one image against each text."""
    if not texts:
        raise InputError("texts: give at least one text", param="texts")
    from blip.data.images import load_image_file

    im = load_image_file(image)  # one image file: a directory, a shard or a non-image is an InputError naming it
    resolve_precision(precision, "cpu", key="precision")  # a bad value names `precision`, not load's `dtype`
    m = model if isinstance(model, Model) else load(model, device, precision, tokenizer, image_size)
    return m.score(im, texts, max_length=max_length)
