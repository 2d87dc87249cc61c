"""One trial on one rank: load the regime's weights once, then each row (a setting at a seed) in turn.

`run_trial_on_rank(spec, artifacts, device)` is what every rank runs,
inside whatever process group the launcher made (Ray Train's,
`launch.run_local`'s, or none at W = 1). `artifacts` maps the keys in the
spec to values, or to handles that `fetch` turns into values (Ray object
refs: weights and static curves then travel through Ray's object store,
never through a disk another node wrote). It returns, on rank 0, each row's
measured columns and curve (None elsewhere). A `Progress` hears about the
trial as it runs; the Ray trial's streams it to Tune and asks the sweep's
stop board whether a setting should end.
"""
from __future__ import annotations

import copy
import dataclasses
import enum
import platform
import resource
import socket
import time
from collections.abc import Callable, Mapping

import torch

from e2ettt import data, faults
from e2ettt.adapt import merge_, select_params
from e2ettt.artifacts import Windowing, heldout_score, load_regime_model, scores
from e2ettt.distributed import all_reduce_sum_, share, world
from e2ettt.evaluate import DeviceTables, as_tensor
from e2ettt.plan import RowSpec, SettingSpec, TrialSpec
from e2ettt.quant.apply import requantize_
from e2ettt.rows import CurvePoint, Measured, measure
from e2ettt.source import load_split, load_tables, load_target_bytes, set_threads
from e2ettt.tokenizer import decoded_bytes, load_tokenizer
from e2ettt.ttt import ChunkRecord, gradient_stats, run_ttt


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return platform.processor() or platform.machine()


class ChunkSignal(enum.IntFlag):
    """What rank 0 asks of every rank at a chunk. It rides on the chunk's score all-reduce (a sum, so only rank 0
    sets it; the others send NONE) and comes back to every rank as the chunk record's `signal`."""

    NONE = 0
    REPORT = 1  # send the running numbers (and the chunks since the last report) now
    STOP = 2  # end the setting after this chunk


class RowVote(enum.IntEnum):
    """What rank 0 says before each row, all-reduced (a sum: only rank 0 votes) so that every rank agrees."""

    RUN = 0
    STOPPED = 1  # the sweep's stop board ended the setting: the row is written as stopped, not run
    DONE = 2  # an earlier attempt of the trial (a worker group that died) already wrote the row


class Progress:
    """What a trial says while it runs; the default says nothing.

    Every method is called on every rank, in the same order, so an implementation may run collectives.
    """

    def signal(self) -> ChunkSignal:
        """This rank's `ChunkSignal`, once per chunk; summed over ranks into the chunk record's `signal`."""
        return ChunkSignal.NONE

    def row_started(self, setting: SettingSpec, row: RowSpec, static: dict, fp_static: dict) -> None:
        pass

    def chunk(self, setting: SettingSpec, row: RowSpec, record: ChunkRecord) -> bool:
        """Return True to end the setting after this chunk (decided from `record.signal`, the same on every rank)."""
        return False

    def row_vote(self, setting: SettingSpec, row: RowSpec) -> RowVote:
        """This rank's `RowVote` before each row (rank 0's decides: the others vote RUN)."""
        return RowVote.RUN

    def stop_reason(self, setting: SettingSpec) -> str:
        return "stopped"

    def row_done(self, setting: SettingSpec, row: RowSpec, measured: Measured | None, curve: list[CurvePoint] | None) -> None:
        """`measured` and `curve` on rank 0, None elsewhere."""


def run_trial_on_rank(spec: TrialSpec, artifacts: Mapping, device: torch.device | str = "cpu",
                      fetch: Callable = lambda v: v, progress: Progress | None = None,
                      where: dict | None = None) -> list[tuple[RowSpec, Measured, list[CurvePoint]]] | None:
    """Every row of `spec` on this rank; on rank 0, each row's measured columns and curve. `where` adds to every
    row's measured columns (the Ray node, the trial's start-up times)."""
    rank, world_size = world()
    if world_size != spec.world_size:
        raise RuntimeError(f"trial {spec.key} was planned for {spec.world_size} ranks but runs on {world_size}")
    progress = progress or Progress()
    set_threads(spec.threads)
    device = torch.device(device)
    started_at = time.time()
    t0 = time.perf_counter()
    tables = DeviceTables.from_tables(load_tables(spec.inputs), device)
    sp = load_tokenizer(spec.inputs.tokenizer)  # the row alarms count bytes off its decoder
    val = load_split(spec.inputs, "val")  # read once: every row takes its segment from it
    val_bytes = load_target_bytes(spec.inputs)  # each target's bytes from the dataset's sidecars, if it has them
    setup_seconds = time.perf_counter() - t0
    where = {"device_name": device_name(device), "hostname": socket.gethostname(), "started_at": started_at,
             **(where or {})}
    out = []
    weights, base = None, None
    grad_stats: dict = {}
    for setting in spec.settings:
        fault = faults.for_regime(spec.faults, setting.regime)
        stopped = False
        for row in setting.rows:
            t1 = time.perf_counter()
            vote = RowVote(round(all_reduce_sum_(torch.tensor([float(progress.row_vote(setting, row))],
                                                               device=device)).item()))
            if vote is RowVote.DONE:  # written before a restarted worker group started again
                continue
            stopped = stopped or vote is RowVote.STOPPED
            if stopped:  # the sweep's stop board ended this setting: its remaining rows are not run
                measured = Measured(status="stopped", error=progress.stop_reason(setting), **where) if rank == 0 else None
                progress.row_done(setting, row, measured, [] if rank == 0 else None)
                continue
            if weights != row.weights:  # rows of one regime share its weights (but for per-seed draws): loaded once
                weights, base = row.weights, None
                state = fetch(artifacts[row.weights])
                base = load_regime_model(spec.inputs, state, device, setting.ttt.dtype)  # each row adapts a copy
            cfg = dataclasses.replace(setting.ttt, seed=row.seed)
            static, fp_static = fetch(artifacts[row.static]), fetch(artifacts[row.fp_static])
            tokens = as_tensor(data.segment(val, row.segment_start, cfg.max_tokens, row.prefix), device)
            sidecar = None if val_bytes is None else data.segment(val_bytes, row.segment_start, cfg.max_tokens, row.prefix)
            model = copy.deepcopy(base)
            load_seconds = time.perf_counter() - t1 + setup_seconds
            setup_seconds = 0.0  # the trial's first row carries the trial's set-up
            progress.row_started(setting, row, static, fp_static)

            def chunk_done(rec: ChunkRecord, setting=setting, row=row, fault=fault) -> bool:
                faults.inject(fault, rank, rec.chunk)
                return progress.chunk(setting, row, rec)

            stats = None
            if cfg.optimizer == "dyneval":  # the train split's mean squared gradients, once per weights and choice
                key = (row.weights, cfg.params, cfg.context, cfg.stats_tokens, cfg.dtype,
                       cfg.seed if cfg.params.startswith("lora") else None)  # LoRA's A is drawn per seed
                if key not in grad_stats:
                    grad_stats[key] = dyneval_stats(spec, copy.deepcopy(base), cfg, device)
                stats = grad_stats[key]
            result = run_ttt(model, tokens, tables.for_stream(sidecar), cfg, scores(static), chunk_done, progress.signal,
                             row.prefix, stats)
            stopped = result.stopped
            measured = curve = None
            if rank == 0:
                window = Windowing.of(cfg, row.segment_start)
                adapted = requant = None
                if static.get("heldout") and not (result.diverged or result.stopped):
                    merge_(model)  # what TTT learnt, as plain weights
                    adapted = heldout_score(model, val, val_bytes, window, tables, device)
                    if state.grid:
                        requantize_(model, state.grid)
                        requant = heldout_score(model, val, val_bytes, window, tables, device)
                targets = tokens.numel() - 1 - row.prefix
                text_bytes = (decoded_bytes(sp, tokens.cpu().numpy(), row.prefix + 1) if sidecar is None
                              else int(sidecar[row.prefix + 1 :].sum()))  # the sidecar's bytes are the text's
                measured = measure(result, static, fp_static, targets, text_bytes, progress.stop_reason(setting),
                                   adapted=adapted, requant=requant,
                                   load_seconds=load_seconds, ended_at=time.time(),
                                   peak_rss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, **where)
                curve = [CurvePoint.of(c) for c in result.chunks]
                out.append((row, measured, curve))
            progress.row_done(setting, row, measured, curve)
    return out if rank == 0 else None


def dyneval_stats(spec: TrialSpec, model, cfg, device) -> list:
    """Dynamic evaluation's mean squared gradients of `cfg.params` at the regime's weights, over `cfg.stats_tokens` of
    the train split in context-long sequences spread across it (never validation), each rank a share."""
    rank, world_size = world()
    n = max(1, cfg.stats_tokens // cfg.context)
    seqs = torch.as_tensor(data.spread_sequences(spec.inputs.data, "train", n, cfg.context + 1, spec.inputs.vocab_size))
    rows = share(list(seqs.view(-1, cfg.context + 1)), [1] * n, rank, world_size)
    params = select_params(model, cfg.params, cfg.seed)
    mine = torch.stack(rows).to(device) if rows else torch.zeros(0, cfg.context + 1, dtype=torch.long, device=device)
    return gradient_stats(model, params, mine, cfg.autocast_dtype)
