"""Sharding evaluation work over torchrun ranks (the group is set up by blip.distributed.init_distributed).

Work is sharded by whole batches, round-robin over ranks (batch b goes to rank b % world). A batch then has
the same contents whatever the number of processes, so every rank computes bit-identical numbers to a single
process, and metrics do not depend on `--nproc_per_node`. Results are combined by summing zero-filled
tensors (x + 0 == x exactly), not by the original's -100 fill, which shifts scores and can break near-ties.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist


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
