"""Lockstep helpers over torch.distributed that vanish at world size 1.

Everything reduced is a sum (never a per-rank mean); no call here touches a
process group unless one is initialized.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import TypeVar

import torch
import torch.distributed as dist
from torch import Tensor

T = TypeVar("T")


class LockstepError(RuntimeError):
    """Ranks that should hold identical weights do not."""


def world() -> tuple[int, int]:
    """(rank, world_size); (0, 1) without an initialized process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def all_reduce_sum_(t: Tensor) -> Tensor:
    if world()[1] > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def share(items: Sequence[T], weights: Sequence[int], rank: int, world_size: int) -> list[T]:
    """Rank's contiguous share of `items`, near-equal by total weight.

    Item i goes to the rank whose slice of [0, total) holds the item's
    starting offset, so shares are contiguous, ordered by rank, and a rank
    may get nothing when there are fewer items than ranks.
    """
    total = sum(weights)
    out, offset = [], 0
    for item, w in zip(items, weights):
        if total and min(world_size - 1, offset * world_size // total) == rank:
            out.append(item)
        offset += w
    return out


def checksum(params: Sequence[Tensor]) -> Tensor:
    """Float64 fingerprint of parameter values: the sums of their L1 and squared L2 norms, one fused
    reduction over all tensors (bit-identical weights give equal fingerprints)."""
    if not params:
        return torch.zeros(2, dtype=torch.float64)
    flat = [p.detach() for p in params]
    l1 = torch.stack(torch._foreach_norm(flat, 1)).double().sum()
    l2 = torch.stack(torch._foreach_norm(flat, 2)).double().square().sum()
    return torch.stack([l1, l2])


def assert_same_weights(params: Sequence[Tensor], where: str) -> None:
    """All-gather the checksum and stop with LockstepError if any rank differs."""
    rank, world_size = world()
    if world_size == 1:
        return
    mine = checksum(params)
    gathered = [torch.empty_like(mine) for _ in range(world_size)]
    dist.all_gather(gathered, mine)
    for r, other in enumerate(gathered):
        if not torch.equal(other, gathered[0]):
            raise LockstepError(
                f"{where}: rank {r} weights checksum {other.tolist()} differs from rank 0 {gathered[0].tolist()}"
            )
