"""One trial on one rank: for each seed, load the regime's weights, run score-first TTT, build the row.

`run_trial_on_rank(spec, device)` is what every rank runs, inside whatever
process group the launcher made (Ray Train's, `launch.run_local`'s, or none
at W = 1). It returns, on rank 0, one row and curve per seed (None
elsewhere). `spec` holds the inputs, the regime, the TTT settings, the seeds,
and the artifacts as values — or as handles that `fetch` turns into values
(Ray object refs on a cluster: the weights then travel through Ray's object
store, never through a disk another node wrote). Optional fault injection
(a killed worker, a raised exception) serves the tests.
"""
from __future__ import annotations

import copy
import os
import platform
import resource
import socket
import time
from collections.abc import Callable
from pathlib import Path

import torch

from e2ettt import prepare
from e2ettt.distributed import all_reduce_sum_, world
from e2ettt.evaluate import DeviceTables, Score, as_tensor
from e2ettt.source import Inputs, load_split, load_tables, set_threads
from e2ettt.ttt import ChunkRecord, TTTConfig, run_ttt


class InjectedFault(RuntimeError):
    """Raised on purpose by a trial's `fault.raise` setting (tests)."""


def _inject(fault: dict, rank: int, chunk: int) -> None:
    if fault.get("hold_seconds") and chunk == 0:  # a trial that occupies its node for a while
        time.sleep(float(fault["hold_seconds"]))
    if fault.get("raise"):
        raise InjectedFault(fault["raise"])
    marker = fault.get("kill_once_marker")
    if marker and rank == fault.get("kill_rank", 1) and chunk == fault.get("kill_chunk", 0):
        if not Path(marker).exists():
            Path(marker).write_text(str(os.getpid()))
            os._exit(17)  # a worker dies without cleanup, as on a preempted node


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return platform.processor() or platform.machine()


def result_row(result, static: dict, fp_static: dict, stop_reason: str = "") -> dict:
    """The numbers of one seed's trial: pre/post-quant from the static curves, post-TTT from the run
    (none when it diverged or was stopped: its running bpb covers only part of the segment)."""
    pre, post = prepare.total(fp_static), prepare.total(static)
    post_ttt = result.bpb if not (result.diverged or result.stopped) else float("nan")
    damage = post.bpb - pre.bpb
    recovery = post.bpb - post_ttt
    return {
        "pre_quant_bpb": pre.bpb, "post_quant_bpb": post.bpb, "post_ttt_bpb": post_ttt,
        "damage": damage, "recovery": recovery, "recovery_frac": recovery / damage if damage != 0 else float("nan"),
        "first_chunk_delta": result.first_chunk_delta,
        "pre_quant_eval_val_bpb": Score(*fp_static["eval_val"]).bpb,
        "post_quant_eval_val_bpb": Score(*static["eval_val"]).bpb,
        "tokens_scored": result.total.tokens, "bytes_scored": result.total.bytes,
        "ttt_seconds": result.seconds, "tokens_per_second": result.tokens_per_second,
        "diverged": result.diverged, "diverged_chunk": result.diverged_chunk,
        "status": "diverged" if result.diverged else "stopped" if result.stopped else "ok",
        "error": stop_reason if result.stopped else "",
    }


def curve_point(c: ChunkRecord) -> dict:
    """A chunk as one row of curves.parquet."""
    return {"chunk": c.chunk, "tokens_seen": c.tokens_seen, "ttt_bpb": c.ttt_bpb, "static_bpb": c.static_bpb,
            "running_ttt_bpb": c.running_ttt_bpb, "lr": c.lr, "bytes": c.bytes, "adapt_seconds": c.adapt_seconds}


class Progress:
    """What a trial says while it runs; the default says nothing. The sweep's Ray trial streams it to Tune.

    Every method is called on every rank, in the same order, so an implementation may run collectives.
    """

    def signal(self) -> float:
        """This rank's vote, once per chunk, summed over ranks into the chunk record's `signal`."""
        return 0.0

    def seed_started(self, seed: int, static: dict, fp_static: dict) -> None:
        pass

    def chunk(self, seed: int, record: ChunkRecord) -> bool:
        """Return True to end the trial after this chunk (decided from `record.signal`, the same on every rank)."""
        return False

    def stop_vote(self) -> float:
        """This rank's vote, before each seed, to end the trial there (summed over ranks: > 0 ends it)."""
        return 0.0

    def stop_reason(self) -> str:
        return "stopped"

    def seed_done(self, seed: int, row: dict | None, curve: list[dict] | None) -> None:
        """`row` and `curve` on rank 0, None elsewhere."""


def run_trial_on_rank(spec: dict, device: torch.device | str = "cpu", fetch: Callable = lambda v: v,
                      progress: Progress | None = None) -> dict | None:
    rank, world_size = world()
    progress = progress or Progress()
    set_threads(int(spec.get("threads") or 0))
    device = torch.device(device)
    inputs = Inputs(**spec["inputs"])
    fault = spec.get("fault") or {}
    started_at = time.time()
    t0 = time.perf_counter()
    base = prepare.load_regime_model(inputs, fetch(spec["weights"]), device)  # each seed adapts its own copy
    tables = DeviceTables.from_tables(load_tables(inputs), device)
    val = load_split(inputs, "val")  # read once: every seed takes its segment from it
    setup_seconds = time.perf_counter() - t0
    seeds = []
    stopped = False
    for seed in spec["seeds"]:
        stopped = stopped or all_reduce_sum_(torch.tensor([progress.stop_vote()], device=device)).item() > 0
        if stopped:  # the sweep's stopper ended this trial: its remaining seeds are not run
            row = {"status": "stopped", "error": progress.stop_reason(), "tokens_scored": 0} if rank == 0 else None
            if row is not None:
                seeds.append({"seed": seed, "row": row, "curve": []})
            progress.seed_done(seed, row, [] if row is not None else None)
            continue
        t1 = time.perf_counter()
        cfg = TTTConfig(**{**spec["ttt"], "seed": seed})
        static, fp_static = fetch(spec["static"][str(seed)]["regime"]), fetch(spec["static"][str(seed)]["fp"])
        tokens = as_tensor(prepare.eval_stream(inputs, cfg, val), device)
        model = copy.deepcopy(base)
        load_seconds = time.perf_counter() - t1 + setup_seconds
        setup_seconds = 0.0  # the first seed's row carries the trial's set-up
        progress.seed_started(seed, static, fp_static)

        def chunk_done(rec: ChunkRecord, seed=seed) -> bool:
            _inject(fault, rank, rec.chunk)
            return progress.chunk(seed, rec)

        result = run_ttt(model, tokens, tables, cfg, prepare.scores(static), chunk_done, progress.signal)
        stopped = result.stopped
        row = curve = None
        if rank == 0:
            row = {**result_row(result, static, fp_static, progress.stop_reason()), "load_seconds": load_seconds,
                   "world_size": world_size,
                   "device": device.type, "device_name": device_name(device), "hostname": socket.gethostname(),
                   "started_at": started_at, "ended_at": time.time(),
                   "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
            curve = [curve_point(c) for c in result.chunks]
            seeds.append({"seed": seed, "row": row, "curve": curve})
        progress.seed_done(seed, row, curve)
    return {"seeds": seeds} if rank == 0 else None
