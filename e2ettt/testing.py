"""Rank functions for the multi-process tests (importable by spawned ranks)."""
from __future__ import annotations

import torch

from e2ettt.distributed import checksum, world
from e2ettt.evaluate import DeviceTables
from e2ettt.ttt import TTTConfig, run_ttt


def ttt_rank(model, tokens, tables: DeviceTables, cfg: TTTConfig) -> dict:
    """Run TTT on this rank; return totals and every rank's weight checksum (gathered)."""
    result = run_ttt(model, tokens, tables, cfg)
    mine = checksum(list(model.parameters()))
    rank, world_size = world()
    sums = [mine]
    if world_size > 1:
        sums = [torch.empty_like(mine) for _ in range(world_size)]
        torch.distributed.all_gather(sums, mine)
    return {"nll": result.total.nll, "bytes": result.total.bytes, "tokens": result.total.tokens,
            "diverged": result.diverged, "diverged_chunk": result.diverged_chunk,
            "checksums": [s.tolist() for s in sums], "chunks": [c.ttt_bpb for c in result.chunks]}
