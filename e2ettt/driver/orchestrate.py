"""The recipe of a sweep: plan, start Ray, make the artifacts, run the Tune grid, record.

`run(cfg)` is the whole sweep, read top to bottom:

1. resolve the inputs, check every setting against them and plan the
   trials (`plan.open_sweep`; bad input fails here, before Ray starts),
   leaving out rows the run directory already holds;
2. start a local Ray, or join a cluster (`cluster.start_ray`), size the
   trials in flight from the cluster at its largest, and wait (printing)
   until it can place a trial's workers;
3. quantize each regime once and compute each static curve once, as Ray
   tasks on the trials' kind of device (`prepare.prepare`);
4. run the Tune grid (`run_trials`): one `trial.run_trial` per trial,
   a stop board that holds every early-stopping verdict, and a recorder
   that appends each row to the Parquet tables as it arrives;
5. write `manifest.json` and compact the tables.

Nothing a trial reads was written by another node: artifacts travel as
Ray objects, inputs are on every node at the same path (cluster.yaml ships
them), and only the driver writes tables, manifest and storage copies.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import ray
from ray import tune

from e2ettt import budget
from e2ettt.driver import cluster
from e2ettt.driver.prepare import prepare
from e2ettt.driver.recorder import Recorder, write_manifest
from e2ettt.driver.stopping import StopBoard, board_args
from e2ettt.driver.trial import run_trial
from e2ettt.plan import Sweep, SweepConfig, open_sweep
from e2ettt.source import load_source_model, resolve


@dataclass
class Outcome:
    run_dir: Path
    row_ids: frozenset  # every row of the grid
    todo: list  # rows this invocation set out to run
    wall_seconds: float = 0.0
    interrupted: bool = False
    dry_run: bool = False
    nodes: dict = field(default_factory=dict)


def run(cfg: SweepConfig, log=print, code_dir: str | os.PathLike = ".") -> Outcome:
    """The whole sweep; bad inputs or settings raise (ValueError/OSError) before Ray starts."""
    t_start = time.perf_counter()
    inputs = resolve(cfg.source, log=log)
    if inputs.demo:
        log(f"demo model: {inputs.demo['parameters']:,} parameters, validation bpb {inputs.demo['val_bpb']:.4f} "
            f"(eval_val over all {inputs.demo['val_tokens']:,} validation tokens); cache {Path(inputs.checkpoint).parent}")
    cluster.refuse_unoffered(cfg)
    sweep = open_sweep(cfg, inputs, code_dir, cluster.concurrency(cfg) or 1)
    log(f"  inputs checked ({sweep.fingerprint}): {sweep.stream_targets:,} validation targets, {sweep.row_targets:,} "
        f"per row; {time.perf_counter() - t_start:.0f} s")
    done = len(sweep.all_rows) - len(sweep.todo)
    log(f"healing_grid: {len(sweep.all_rows) // len(cfg.grid.seeds)} settings × {len(cfg.grid.seeds)} seed(s) = "
        f"{len(sweep.all_rows)} rows ({done} already in {sweep.run_dir / 'trials.parquet'}"
        f"{f', {sweep.pulled} parts taken from {sweep.store.uri}' if sweep.pulled else ''}); {len(sweep.settings)} "
        f"setting(s) to run in {len(sweep.trials)} trial(s) of {cfg.ranks} {cfg.device.upper()} ranks, "
        f"{cfg.ttt.max_tokens or 'all'} validation tokens per row")
    outcome = Outcome(sweep.run_dir, sweep.all_rows, sweep.todo)
    if cfg.dry_run:
        for line in dry_run_plan(sweep):
            log(line)
        outcome.dry_run = True
        return outcome
    if not sweep.trials:
        log("nothing to run: every row of the grid is in the table")
        return outcome
    started = cluster.start_ray(cfg, log)
    reports: dict = {}
    try:
        slots = cluster.concurrency(cfg, ray.cluster_resources(), log)
        if cluster.concurrency(cfg) is None:  # joined a cluster of unknown size: pack for what is up now
            sweep = sweep.packed(slots)
        if sweep.trials:
            cluster.wait_for_workers(cfg, log)
            refs, reports = prepare(sweep.needs, inputs, cfg.quant, cfg.device, cfg.cpus_per_worker, sweep.store,
                                    f"{cfg.name}/artifacts", log)
            outcome.interrupted = run_trials(sweep, refs, reports, slots, outcome, log)
    except KeyboardInterrupt:
        outcome.interrupted = True
    finally:
        outcome.wall_seconds = time.perf_counter() - t_start
        write_manifest(sweep, reports, outcome.nodes, {
            "started_rows": len(sweep.todo), "wall_seconds": outcome.wall_seconds, "interrupted": outcome.interrupted,
            "storage": sweep.store.uri, "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S")})
        if started:
            ray.shutdown()
        sweep.tables.compact()
    return outcome


def run_trials(sweep: Sweep, refs: dict, reports: dict, slots: int, outcome: Outcome, log) -> bool:
    """The Tune grid, one trial per `TrialSpec`; returns whether it was interrupted (Ctrl-C)."""
    cfg = sweep.cfg
    if not cfg.verbose:
        os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")  # no status box; the recorder prints its own lines
    # Tune's JSON/CSV/TensorBoard loggers would copy every report (curve chunks included) into result files.
    os.environ.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")
    board = ray.remote(num_cpus=0)(StopBoard).remote(*board_args(sweep))
    resources = {"cpus_per_worker": cfg.cpus_per_worker, "gpus_per_worker": 1 if cfg.gpus_per_trial else 0,
                 "max_worker_failures": cfg.max_worker_failures, "start_timeout": cfg.worker_start_timeout,
                 "storage_path": sweep.store.url(f"{cfg.name}/ray/train")}
    recorder = Recorder(sweep, reports, slots, log, board, cluster.live_metrics() if cfg.dashboard else None)
    trainable = tune.with_parameters(run_trial, specs={t.key: t for t in sweep.trials}, artifacts=refs, board=board,
                                     resources=resources)
    tuner = tune.Tuner(
        tune.with_resources(trainable, {"trial_driver": 1}),
        param_space={"trial": tune.grid_search([t.key for t in sweep.trials])},
        # reuse_actors: the trial driver process (which imports Ray Train and torch) survives from one
        # trial to the next; each trial still gets a fresh TorchTrainer. Trials end by finishing (a stopped
        # setting ends through the stop board), so Tune never has to end a driver mid-fit.
        tune_config=tune.TuneConfig(max_concurrent_trials=slots, reuse_actors=True),
        run_config=tune.RunConfig(name=f"tune-{time.strftime('%Y%m%d-%H%M%S')}", storage_path=sweep.store.url(f"{cfg.name}/ray"),
                                  callbacks=[recorder], verbose=2 if cfg.verbose else 0,
                                  failure_config=tune.FailureConfig(max_failures=0)),
    )
    try:
        grid = tuner.fit()
    finally:
        outcome.nodes.update(recorder.nodes)
    return any(r.error is not None and "KeyboardInterrupt" in str(r.error) for r in grid)


def dry_run_plan(sweep: Sweep) -> list[str]:
    """What the sweep would run and cost, from measured rates and start-ups in this run's rows where they exist."""
    cfg = sweep.cfg
    matrix_params = sum(p.numel() for p in load_source_model(sweep.inputs).parameters() if p.ndim >= 2)
    done = sweep.tables.trials
    if not done.empty:
        done = done[(done["status"] == "ok") & (done["input_fingerprint"] == sweep.fingerprint)
                    & (done["device"] == cfg.device) & (done["world_size"] == cfg.ranks)]

    def measured(ttt) -> float | None:
        if done.empty:
            return None
        same = done[(done["epochs"] == ttt.epochs) & (done["dtype"] == ttt.dtype) & (done["params"] == ttt.params)
                    & (done["context"] == ttt.context) & (done["stride"] == ttt.stride)
                    & (done.get("train_windows", "scored") == ttt.train_windows)
                    & (done.get("reset", "never") == ttt.reset)]
        return float(same["tokens_per_second"].median()) if len(same) else None

    startups = done.groupby("trial_key")["startup_seconds"].min().dropna() if not done.empty else []
    costs = [budget.setting_cost(s.label, len(s.rows) * sweep.row_targets, cfg.ranks, cfg.device, cfg.ttt.dtype,
                                 matrix_params, s.ttt.epochs, s.ttt.fuse_score, measured(s.ttt), s.ttt.context,
                                 s.ttt.stride or s.ttt.context, s.ttt.train_windows == "sequences")
             for s in sweep.settings]
    lines = [f"dry run: nothing started. {len(sweep.settings)} settings to run ({len(sweep.todo)} rows) in "
             f"{len(sweep.trials)} trial(s) of {cfg.ranks} {cfg.device.upper()} ranks, {sweep.row_targets:,} tokens per row, "
             f"model {matrix_params:,} matrix parameters"]
    for c in costs[:12]:
        lines.append(f"    {c.label:<44} {c.tokens:>10,} tokens  ~{c.seconds:>7.0f} s of TTT ({c.source})")
    if len(costs) > 12:
        lines.append(f"    ... and {len(costs) - 12} more")
    return lines + budget.plan_lines(costs, len(sweep.trials), float(startups.median()) if len(startups) else None,
                                     cfg.ranks, cfg.device, cluster.concurrency(cfg), cfg.gpus_per_node, cfg.usd_per_node_hour)
