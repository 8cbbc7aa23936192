"""Plumbing shared by the retrieval and caption evaluations: image inputs, progress reporting.

Precision (bf16 autocast) comes from blip.precision, as for every other entry point.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any, Protocol

import torch
from torch.utils.data import DataLoader, Dataset, Subset

from blip.eval.distributed import my_batches

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
    """Yield (indices, (B, 3, H, W) pixels) for this rank's batches (see blip.eval.distributed)."""
    batches = my_batches(len(images), batch_size, rank, world)
    if isinstance(images, torch.Tensor):
        for r in batches:
            yield r, images[r.start : r.stop]
        return
    idx = [i for r in batches for i in r]
    # every batch but the very last is full, so re-batching this rank's indices gives back the same batches
    loader = DataLoader(Subset(images, idx), batch_size=batch_size, shuffle=False, num_workers=num_workers)
    for r, px in zip(batches, loader, strict=True):
        yield r, px


def model_device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device
