"""One trial on one rank: load the shared artifacts, run score-first TTT, build the row.

`run_trial_on_rank(spec)` is what every rank runs, inside whatever process
group the launcher made (Ray Train's, or `launch.run_local`'s, or none at
W = 1). It returns the trial's row and curve on rank 0 and None elsewhere.
`spec` is plain JSON: inputs, the regime's and the fp control's artifact
directories, the TTT settings, threads, and optional fault injection used
by the tests (a killed worker, a raised exception).
"""
from __future__ import annotations

import os
import resource
import time
from pathlib import Path

import torch

from e2ettt import prepare
from e2ettt.distributed import world
from e2ettt.evaluate import DeviceTables, Score, as_tensor
from e2ettt.source import Inputs, load_tables
from e2ettt.ttt import ChunkRecord, TTTConfig, run_ttt


class InjectedFault(RuntimeError):
    """Raised on purpose by a trial's `fault.raise` setting (tests)."""


def _inject(fault: dict, rank: int, chunk: int) -> None:
    if fault.get("raise"):
        raise InjectedFault(fault["raise"])
    marker = fault.get("kill_once_marker")
    if marker and rank == fault.get("kill_rank", 1) and chunk == fault.get("kill_chunk", 0):
        if not Path(marker).exists():
            Path(marker).write_text(str(os.getpid()))
            os._exit(17)  # a worker dies without cleanup, as on a preempted node


def run_trial_on_rank(spec: dict, device: torch.device | str = "cpu") -> dict | None:
    rank, world_size = world()
    if spec.get("threads"):
        torch.set_num_threads(int(spec["threads"]))
    cfg = TTTConfig(**spec["ttt"])
    inputs = Inputs(**spec["inputs"])
    device = torch.device(device)
    t0 = time.perf_counter()
    tokens = as_tensor(prepare.eval_stream(inputs, cfg), device)
    tables = DeviceTables.from_tables(load_tables(inputs), device)
    static = prepare.prepare_static(inputs, spec["regime_path"], cfg)
    fp_static = prepare.prepare_static(inputs, spec["fp_path"], cfg)
    model = prepare.load_regime_model(inputs, spec["regime_path"]).to(device)
    fault = spec.get("fault") or {}
    load_seconds = time.perf_counter() - t0

    def on_chunk(rec: ChunkRecord) -> None:
        _inject(fault, rank, rec.chunk)

    result = run_ttt(model, tokens, tables, cfg, prepare.scores(static), on_chunk)
    if rank != 0:
        return None
    pre, post = prepare.total(fp_static), prepare.total(static)
    post_ttt = result.bpb if not result.diverged else float("nan")
    damage = post.bpb - pre.bpb
    recovery = post.bpb - post_ttt
    row = {
        "pre_quant_bpb": pre.bpb, "post_quant_bpb": post.bpb, "post_ttt_bpb": post_ttt,
        "damage": damage, "recovery": recovery,
        "recovery_frac": recovery / damage if damage != 0 else float("nan"),
        "first_chunk_delta": result.first_chunk_delta,
        "pre_quant_eval_val_bpb": Score(*fp_static["eval_val"]).bpb,
        "post_quant_eval_val_bpb": Score(*static["eval_val"]).bpb,
        "tokens_scored": result.total.tokens, "bytes_scored": result.total.bytes,
        "ttt_seconds": result.seconds, "tokens_per_second": result.tokens_per_second,
        "load_seconds": load_seconds, "diverged": result.diverged, "diverged_chunk": result.diverged_chunk,
        "world_size": world_size, "device": str(device.type),
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "status": "diverged" if result.diverged else "ok", "error": "",
    }
    curve = [{"chunk": c.chunk, "tokens_seen": c.tokens_seen, "ttt_bpb": c.ttt_bpb, "static_bpb": c.static_bpb,
              "running_ttt_bpb": c.running_ttt_bpb, "lr": c.lr, "bytes": c.bytes, "adapt_seconds": c.adapt_seconds}
             for c in result.chunks]
    return {"row": row, "curve": curve}

