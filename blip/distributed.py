"""torch.distributed plumbing for torchrun: process-group setup, gathers (with and without gradient), flags.

Launch with `torchrun --nproc_per_node N -m blipctl <command> ...`; a plain `python -m blipctl ...` is one
process and never touches torch.distributed (no "init_process_group" crash on a laptop, unlike the original).
NCCL on GPU, gloo on CPU. Control flags (stop requested, data exhausted) travel on a gloo group even under
NCCL, so checking them every step never blocks the CPU on the GPU stream.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    control_group: object | None = None
    """A gloo process group for small CPU-side collectives (None when world_size == 1)."""
    owns_group: bool = False
    """This call created the process group (and `cleanup` destroys it); False when the caller had one."""

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def resolve_device(device: str) -> str:
    """ "auto" -> "cuda" when a GPU is available, else "cpu"; anything else ("cpu", "cuda:1") as given."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def init_distributed(device: str = "auto") -> DistInfo:
    """Join the torchrun job described by the environment (WORLD_SIZE > 1), else run as one process.

    device: "auto" picks the local rank's GPU when CUDA is available, else the CPU; "cpu" / "cuda" force it.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if device not in ("auto", "cpu", "cuda"):
        raise ValueError(f"device must be auto, cpu or cuda, not {device!r}")
    use_cuda = torch.cuda.is_available() if device == "auto" else device == "cuda"
    dev = torch.device("cuda", local) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(dev)
    if world <= 1:
        return DistInfo(device=dev)
    owns = not dist.is_initialized()
    if owns:
        dist.init_process_group(backend="nccl" if use_cuda else "gloo", device_id=dev if use_cuda else None)
    control = dist.new_group(backend="gloo") if use_cuda else dist.group.WORLD
    return DistInfo(
        rank=dist.get_rank(),
        world_size=dist.get_world_size(),
        local_rank=local,
        device=dev,
        control_group=control,
        owns_group=owns,
    )


def cleanup(info: DistInfo) -> None:
    """Leave the process group if `init_distributed` created it.

    Runs in `finally` blocks, so it never waits for the other ranks: on the normal exit path call `barrier(info)`
    first, because a rank that tears down its gloo group while a peer still uses it can abort at exit.
    """
    if info.owns_group and dist.is_initialized():
        dist.destroy_process_group()


@contextlib.contextmanager
def process_group(device: str = "auto") -> Iterator[DistInfo]:
    """Join torchrun's process group when there is one, and leave it afterwards if this call created it.

    device: "auto", "cpu", "cuda", or "cuda:N" (a single process on that GPU). On a clean exit every rank meets
    at a barrier before any leaves the group.
    """
    from blip.errors import InputError

    if device.startswith("cuda:") and int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        torch.cuda.set_device(torch.device(device))
        yield DistInfo(device=torch.device(device))
        return
    if device not in ("auto", "cpu", "cuda"):
        raise InputError(f"device must be auto, cpu, cuda or cuda:N, not {device!r}", param="device")
    existed = dist.is_available() and dist.is_initialized()
    info = init_distributed(device)
    try:
        yield info
        barrier(info)  # reached only without an error: every rank done before any leaves the group
    finally:
        if not existed:
            cleanup(info)


def barrier(info: DistInfo) -> None:
    if info.distributed:
        dist.barrier(group=info.control_group)


def any_flag(info: DistInfo, *flags: bool) -> list[bool]:
    """Element-wise OR of boolean flags across ranks (one tiny CPU all-reduce)."""
    if not info.distributed:
        return list(flags)
    t = torch.tensor([int(f) for f in flags], dtype=torch.int32)
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=info.control_group)
    return [bool(v) for v in t.tolist()]


@torch.no_grad()
def gather_no_grad(x: torch.Tensor) -> torch.Tensor:
    """(B, ...) -> (W*B, ...) concatenated in rank order; no gradient (momentum features, ids, token ids)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts)


@torch.no_grad()
def pad_to_longest_across_ranks(
    ids: torch.Tensor, mask: torch.Tensor, pad_id: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, L) token ids and attention mask -> (B, L_max), right-padded to the longest L over all ranks.

    With `padding = "longest"` each rank pads its batch to its own longest caption; tensors gathered across ranks
    must have one shape. Extra positions are masked out, so the encoder's outputs do not change.
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return ids, mask
    n = torch.tensor([ids.shape[1]], device=ids.device)
    dist.all_reduce(n, op=dist.ReduceOp.MAX)
    extra = int(n) - ids.shape[1]
    if not extra:
        return ids, mask
    return F.pad(ids, (0, extra), value=pad_id), F.pad(mask, (0, extra), value=0)


class _GatherWithGrad(torch.autograd.Function):
    """all_gather whose backward sums every rank's gradient for this rank's slice.

    Written here rather than `torch.distributed.nn.functional.all_gather` (deprecated in recent torch) so it
    runs on gloo and NCCL alike. With a per-rank mean loss and DDP's gradient averaging this gives exactly the
    gradient of the global mean loss (no world-size factor, cf. open_clip#616).
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:  # noqa: ANN001
        ctx.rank, ctx.world = dist.get_rank(), dist.get_world_size()
        parts = [torch.empty_like(x) for _ in range(ctx.world)]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # noqa: ANN001
        grad = grad.contiguous()
        dist.all_reduce(grad)
        return grad.chunk(ctx.world)[ctx.rank]


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """(B, ...) -> (W*B, ...) in rank order; gradients flow back to the rank that produced each slice."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x
    return _GatherWithGrad.apply(x)


@torch.no_grad()
def all_reduce_sum(x: torch.Tensor) -> torch.Tensor:
    """Sum of `x` over ranks (a copy; no gradient)."""
    x = x.clone()
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(x)
    return x


def all_reduce_mean(values: dict[str, float], info: DistInfo) -> dict[str, float]:
    """Average scalar metrics over ranks (for logging)."""
    if not info.distributed or not values:
        return values
    keys = sorted(values)
    t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64)
    dist.all_reduce(t, group=info.control_group)
    return {k: v / info.world_size for k, v in zip(keys, t.tolist(), strict=True)}


def all_gather_object(obj: object, info: DistInfo) -> list[object]:
    """Every rank's `obj`, in rank order (RNG states for the checkpoint)."""
    if not info.distributed:
        return [obj]
    out: list[object] = [None] * info.world_size
    dist.all_gather_object(out, obj, group=info.control_group)
    return out


def broadcast_object(obj: object, info: DistInfo) -> object:
    """Rank 0's `obj` on every rank (e.g. the checkpoint path to resume from)."""
    if not info.distributed:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0, group=info.control_group)
    return box[0]


# ---- evaluation sharding -----------------------------------------------------------------------------------------
# Work is sharded by whole batches, round-robin over ranks (batch b goes to rank b % world). A batch then has the
# same contents whatever the number of processes, so every rank computes bit-identical numbers to a single process,
# and metrics do not depend on `--nproc_per_node`. Results are combined by summing zero-filled tensors (x + 0 == x
# exactly), not by the original's -100 fill, which shifts scores and can break near-ties. These read the current
# process group (set up by init_distributed / process_group) rather than take a DistInfo.
def rank_and_world() -> tuple[int, int]:
    """(rank, world size) of the current process group (set up by blip.distributed.init_distributed), or (0, 1)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def my_batches(n: int, batch_size: int, rank: int, world: int) -> list[range]:
    """This rank's index ranges: batches of `batch_size` over range(n), round-robin over ranks."""
    starts = range(0, n, batch_size)
    return [range(s, min(s + batch_size, n)) for b, s in enumerate(starts) if b % world == rank]


def sum_(t: torch.Tensor) -> torch.Tensor:
    """Sum a tensor over ranks, in place (a no-op in a single process)."""
    _, world = rank_and_world()
    if world > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def all_gather(obj: Any) -> list[Any]:
    """Every rank's picklable `obj`, in rank order, on every rank."""
    _, world = rank_and_world()
    if world == 1:
        return [obj]
    out: list[Any] = [None] * world
    dist.all_gather_object(out, obj)
    return out


def broadcast_from_main(obj: Any) -> Any:
    """Rank 0's picklable `obj` on every rank."""
    _, world = rank_and_world()
    if world == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]
