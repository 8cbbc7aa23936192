"""Plumbing shared by the retrieval and caption evaluations: image inputs, progress reporting.

Precision (bf16 autocast) comes from blip.precision, as for every other entry point.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any, Protocol

import torch
from torch.utils.data import DataLoader, Dataset, Subset

from blip.distributed import my_batches
from blip.errors import InputError

ProgressFn = Callable[[str, int, int], None]
"""`progress(stage, advance, total)`: `advance` more units of `stage` are done, out of this rank's `total`.

Each stage ("images", "texts", "pairs"; "captions") starts with an advance of 0 (so rates can be timed from
there); the CLI binds this to a progress bar with throughput.
"""


class EvalImages(Protocol):
    """What the evaluations need from a dataset (blip.data's EvalSet fits)."""

    def __len__(self) -> int: ...

    def load_image(self, i: int) -> Any: ...


class PixelDataset(Dataset):
    """Map-style dataset of (3, H, W) pixel tensors: an EvalSet's images through the eval transform."""

    def __init__(self, source: EvalImages, transform: Callable[[Any], torch.Tensor]):
        self.source = source
        self.transform = transform

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.transform(self.source.load_image(i))


ImagesLike = torch.Tensor | Dataset
"""A (N, 3, H, W) tensor, or a map-style dataset of (3, H, W) tensors."""


def image_batches(
    images: ImagesLike, batch_size: int, rank: int = 0, world: int = 1, num_workers: int = 0
) -> Iterator[tuple[range, torch.Tensor]]:
    """Yield (indices, (B, 3, H, W) pixels) for this rank's batches (see blip.distributed)."""
    batches = my_batches(len(images), batch_size, rank, world)
    if isinstance(images, torch.Tensor):
        for r in batches:
            yield r, images[r.start : r.stop]
        return
    idx = [i for r in batches for i in r]
    # every batch but the very last is full, so re-batching this rank's indices gives back the same batches
    loader = DataLoader(Subset(images, idx), batch_size=batch_size, shuffle=False, num_workers=num_workers)
    try:
        for r, px in zip(batches, loader, strict=True):
            yield r, px
    except InputError as e:  # from a worker process, torch puts the worker's traceback into the message: drop it
        msg = str(e)
        if "Traceback" in msg:
            msg = msg.strip().splitlines()[-1].removeprefix(f"{type(e).__module__}.{type(e).__name__}: ")
        raise InputError(msg) from None


def model_device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def default_workers(n: int | None, device: torch.device) -> int:
    """Image-loading worker processes: as given, else 4 on GPU (bounded by the CPUs) and 0 on CPU."""
    import os

    if n is not None:
        return n
    return min(4, os.cpu_count() or 1) if device.type == "cuda" else 0


def load_for_eval(
    source: Any,
    tokenizer: str | None,
    image_size: int | None,
    device: torch.device,
    dataset: str,
    split: str,
    data_root: str | None,
    on_stage: Callable[[str], None] | None = None,
) -> tuple[Any, Any]:
    """(the EvalSet, a blip.checkpoint.Loaded) for an evaluation; `source` is a model source, a Loaded, or a
    blip.Model. `on_stage(message)` is told before each load (the CLI shows a spinner)."""
    from blip.checkpoint import Loaded, load_model
    from blip.data.datasets import load_eval_set

    if on_stage:
        on_stage(f"loading {dataset} ({split})")
    eval_set = load_eval_set(dataset, split=split, data_root=data_root)
    if on_stage:
        on_stage(f"loading {getattr(source, 'source', source)}")
    if isinstance(source, Loaded):
        return eval_set, source
    if hasattr(source, "net") and hasattr(source, "tokenizer"):  # a blip.Model
        return eval_set, Loaded(source.net, source.tokenizer, source.source, source.kind)
    return eval_set, load_model(source, tokenizer=tokenizer, image_size=image_size, device=device)
