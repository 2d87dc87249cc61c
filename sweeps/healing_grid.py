#!/usr/bin/env python
"""healing_grid: how much quantization damage can score-first TTT repair?

A Ray Tune grid over quant regime × inner lr × chunk tokens × seed (× epochs,
optimizer, adapted parameters). Each trial is one Ray Train TorchTrainer
whose W workers run score-first TTT in lockstep (gloo on CPU, NCCL on GPU).
Each regime is quantized once and its static curves computed once, as Ray
tasks, before any trial; trials read those artifacts.

    python sweeps/healing_grid.py                 # embedded demo, default grid, local Ray
    python sweeps/healing_grid.py --smoke         # a minute: fp + int3, one lr, one chunk size
    python sweeps/healing_grid.py --checkpoint final_model.pt --data DIR \
        --tokenizer fineweb_1024_bpe.model --gpus-per-trial 8 --address auto

Writes runs/<name>/trials.parquet, curves.parquet and manifest.json; rerunning
the same command skips finished trials (a changed grid runs only new cells).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from e2ettt.config import ConfigError, config_hash, override
from e2ettt.demo import DEMO_QUANT_MIN_NUMEL
from e2ettt.prepare import eval_stream, windowing, write_json_atomic
from e2ettt.provenance import git_sha, hardware, versions
from e2ettt.quant.regimes import QuantConfig, RegimeError, parse_regime
from e2ettt.source import Inputs, SourceConfig, resolve
from e2ettt.tables import RunTables
from e2ettt.ttt import TTTConfig

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # analysis/ sits beside sweeps/
from analysis.report import trial_summary  # noqa: E402


@dataclass(frozen=True)
class Grid:
    regimes: tuple = ("fp", "gptq-int3", "int3", "int2")  # fp is the control; damage spans ~0.01 to ~0.4 bpb
    lrs: tuple = (1e-4, 0.03, 3.0)  # too small to matter .. helps .. diverges
    chunks: tuple = (512, 2048)  # chunk_tokens; >= 2 windows of context each, so both ranks have work
    seeds: tuple = (0,)  # seed 0 = start of the stream; others sample another segment under a cap
    epochs: tuple = (1,)
    optimizers: tuple = ("sgd",)
    params: tuple = ("all",)  # all | norms | lora:R


@dataclass(frozen=True)
class SweepConfig:
    name: str = "demo"  # runs/<name>/
    out: str = "runs"  # parent directory of runs
    source: SourceConfig = field(default_factory=SourceConfig)
    quant: QuantConfig = field(default_factory=QuantConfig)
    ttt: TTTConfig = field(default_factory=TTTConfig)  # settings shared by every trial
    grid: Grid = field(default_factory=Grid)
    workers: int = 2  # ranks per trial (CPU); with GPUs, one per GPU
    cpus_per_worker: int = 1  # CPU threads per rank
    gpus_per_trial: int = 0  # 0 = CPU (gloo); N = N ranks with one GPU each (NCCL)
    max_worker_failures: int = 1  # a killed worker restarts the trial's worker group this often
    address: str = ""  # Ray address; empty = start a local Ray, "auto" = join a cluster
    local_cpus: int = 0  # logical CPUs of a local Ray; 0 = the machine's cores (start-up is CPU-bound: oversubscribing is slower)
    fault: str = ""  # tests only: JSON fault injection {"cell": {...}}


# The embedded demo's model is tiny: quantize matrices above 4,096 entries (parameter-golf's
# 65,536 would leave all but the embedding in float) and evaluate 8,192 validation tokens
# per trial so the default grid fits in 10 minutes on 2 cores (each trial's TorchTrainer
# start-up costs ~16 s there, more than its TTT).
DEMO_DEFAULTS = {"quant.min_numel": DEMO_QUANT_MIN_NUMEL, "ttt.max_tokens": 8192, "ttt.context": 256}
SMOKE = {"grid.regimes": ("fp", "int3"), "grid.lrs": (0.03,), "grid.chunks": (256,), "grid.seeds": (0,),
         "ttt.max_tokens": 2048, "name": "smoke"}

LIST_FLAGS = {"regimes": (str, "grid.regimes"), "lrs": (float, "grid.lrs"), "chunks": (int, "grid.chunks"),
              "seeds": (int, "grid.seeds"), "epochs": (int, "grid.epochs"), "optimizers": (str, "grid.optimizers"),
              "params": (str, "grid.params")}
SCALAR_FLAGS = {"checkpoint": "source.checkpoint", "data": "source.data", "tokenizer": "source.tokenizer",
                "model_fn": "source.model_fn", "cache_dir": "source.cache_dir", "workers": "workers",
                "cpus_per_worker": "cpus_per_worker", "gpus_per_trial": "gpus_per_trial",
                "max_tokens": "ttt.max_tokens", "context": "ttt.context", "out": "out", "name": "name",
                "address": "address", "max_worker_failures": "max_worker_failures", "local_cpus": "local_cpus"}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--grid", help="YAML or JSON file of settings (dotted keys or nested), applied before flags")
    p.add_argument("--smoke", action="store_true", help="minimal grid: fp + int3, one lr, one chunk size, 2048 tokens")
    for flag in LIST_FLAGS:
        p.add_argument(f"--{flag.replace('_', '-')}", help=f"comma-separated {flag}")
    for flag in SCALAR_FLAGS:
        p.add_argument(f"--{flag.replace('_', '-')}")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="any setting by dotted key, e.g. --set ttt.optimizer=adamw --set quant.calib_tokens=32768")
    return p.parse_args(argv)


def _flatten(obj: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in obj.items():
        if isinstance(v, dict) and k != "fault":
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[prefix + k] = tuple(v) if isinstance(v, list) else v
    return out


def _split(value: str, kind, flag: str) -> tuple:
    items = [s.strip() for s in str(value).split(",") if s.strip()]
    try:
        return tuple(kind(s) for s in items)
    except ValueError:
        raise ConfigError(f"--{flag}: cannot read {value!r} as a list of {kind.__name__}") from None


def build_config(args: argparse.Namespace) -> SweepConfig:
    """Defaults, demo preset, smoke preset, grid file, flags, --set: later wins."""
    updates: dict[str, Any] = {}
    if args.grid:
        path = Path(args.grid)
        if not path.is_file():
            raise ConfigError(f"--grid {path}: file does not exist")
        try:
            loaded = yaml.safe_load(path.read_text())  # JSON is YAML
        except yaml.YAMLError as exc:
            raise ConfigError(f"--grid {path}: not valid YAML/JSON ({str(exc).splitlines()[0]})") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"--grid {path}: expected a mapping of settings, got {type(loaded).__name__}")
        updates.update(_flatten(loaded))
    if args.smoke:
        updates = {**SMOKE, **updates}
    for flag, (kind, key) in LIST_FLAGS.items():
        if getattr(args, flag) is not None:
            updates[key] = _split(getattr(args, flag), kind, flag)
    for flag, key in SCALAR_FLAGS.items():
        if getattr(args, flag) is not None:
            updates[key] = getattr(args, flag)
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep:
            raise ConfigError(f"--set {item!r}: expected KEY=VALUE")
        updates[key.strip()] = yaml.safe_load(value)
    if not updates.get("source.checkpoint"):
        updates = {**DEMO_DEFAULTS, **updates}
    try:
        return override(SweepConfig(), updates)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None


def cells(cfg: SweepConfig) -> list[dict]:
    """Every grid cell as TTT overrides, validated (bad values fail here, before Ray)."""
    g = cfg.grid
    for name in g.regimes:
        parse_regime(name)
    if not g.regimes or not g.lrs or not g.chunks or not g.seeds:
        raise ConfigError("grid: regimes, lrs, chunks and seeds must each have at least one value")
    out = []
    for regime in dict.fromkeys(g.regimes):
        for lr in g.lrs:
            if not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr >= 0):
                raise ConfigError(f"grid.lrs: {lr!r} is not a finite learning rate >= 0")
            for chunk in g.chunks:
                for seed in g.seeds:
                    for epochs in g.epochs:
                        for opt in g.optimizers:
                            for params in g.params:
                                ttt = override(cfg.ttt, {"lr": lr, "chunk_tokens": chunk, "seed": seed,
                                                         "epochs": epochs, "optimizer": opt, "params": params})
                                out.append({"regime": regime, "ttt": dataclasses.asdict(ttt)})
    return out


def cell_key(inputs: Inputs, cfg: SweepConfig, cell: dict) -> str:
    return config_hash({"checkpoint": inputs.checkpoint, "mtime": os.path.getmtime(inputs.checkpoint),
                        "data": inputs.data, "quant": dataclasses.asdict(cfg.quant), **cell})


def start_ray(cfg: SweepConfig):
    import ray

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "120")
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")  # default 2 s adds up to 2 s per trial
    if cfg.address:
        ray.init(address=cfg.address, include_dashboard=False, log_to_driver=False)
    else:
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")
        cpus = cfg.local_cpus or os.cpu_count() or 1
        ray.init(num_cpus=max(cpus, cfg.workers * cfg.cpus_per_worker), resources={"trial_driver": 64},
                 include_dashboard=False, log_to_driver=False, configure_logging=True, logging_level="ERROR")
    return ray


def max_concurrent(ray, cfg: SweepConfig) -> int:
    res = ray.cluster_resources()
    if cfg.gpus_per_trial:
        return max(1, int(res.get("GPU", 0) // cfg.gpus_per_trial))
    return max(1, int(res.get("CPU", 1) // (cfg.workers * cfg.cpus_per_worker)))


def prepare_artifacts(ray, cfg: SweepConfig, inputs: Inputs, run_dir: Path, todo: list[dict], log) -> dict[str, dict]:
    """Quantize each regime once and compute each static curve once, as Ray tasks."""
    from e2ettt.prepare import prepare_regime, prepare_static

    regimes = list(dict.fromkeys(["fp"] + [c["regime"] for c in todo]))
    quantize = ray.remote(num_cpus=1)(prepare_regime)
    static = ray.remote(num_cpus=1)(prepare_static)
    t0 = time.perf_counter()
    pending = {quantize.remote(run_dir, inputs, r, cfg.quant, 1): r for r in regimes}
    reports = {}
    while pending:
        done, _ = ray.wait(list(pending), num_returns=1)
        regime = pending.pop(done[0])
        reports[regime] = ray.get(done[0])
        r = reports[regime]
        log(f"  quantized {regime:>20}: {r['quantized_params']:>9,} params, {r['artifact_bytes']:>9,} bytes (lzma), "
            f"{r['seconds']:.1f} s")
    jobs = {}
    for c in todo:
        for regime in ("fp", c["regime"]):
            ttt = TTTConfig(**c["ttt"])
            key = (regime, json.dumps(windowing(ttt), sort_keys=True))
            if key not in jobs:
                jobs[key] = static.remote(inputs, reports[regime]["dir"], ttt, 1)
    ray.get(list(jobs.values()))
    log(f"  {len(regimes)} regimes quantized and {len(jobs)} static curves ready in {time.perf_counter() - t0:.0f} s")
    return reports


def trial_row(cell: dict, key: str, payload: dict, report: dict, cfg: SweepConfig, sha: str) -> dict:
    ttt = cell["ttt"]
    spec = parse_regime(cell["regime"])
    method = spec.method + ("+hadamard" if spec.rotate else "")
    row = {"trial_id": key, "regime": cell["regime"], "bits": spec.bits, "method": method,
           "inner_lr": ttt["lr"], "chunk_tokens": ttt["chunk_tokens"], "epochs": ttt["epochs"],
           "optimizer": ttt["optimizer"], "momentum": ttt["momentum"], "params": ttt["params"], "seed": ttt["seed"],
           "world_size": cfg.gpus_per_trial or cfg.workers, "device": "cuda" if cfg.gpus_per_trial else "cpu"}
    row.update(payload["row"])
    row.update({"artifact_bytes": report["artifact_bytes"], "config_hash": key, "git_sha": sha,
                "context": ttt["context"], "max_tokens": ttt["max_tokens"], "schedule": ttt["schedule"],
                "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S")})
    return row


def make_callback(tables: RunTables, by_key: dict, reports: dict, cfg: SweepConfig, sha: str, total: int, log):
    from ray.tune import Callback

    class TableWriter(Callback):
        """Appends each finished trial to the tables (atomically) and prints a progress line."""

        def __init__(self):
            self.done = 0

        def _record(self, trial, payload: dict) -> None:
            key = trial.config["cell"]["cell_key"]
            cell = by_key[key]
            row = trial_row(cell, key, payload, reports[cell["regime"]], cfg, sha)
            tables.append(row, payload.get("curve", []))
            self.done += 1
            t = cell["ttt"]
            head = f"[{self.done}/{total}] {cell['regime']:>10} lr={t['lr']:<7g} chunk={t['chunk_tokens']:<5} seed={t['seed']}"
            if row["status"] == "ok":
                log(f"{head}  post-quant {row['post_quant_bpb']:.4f} -> post-TTT {row['post_ttt_bpb']:.4f} bpb "
                    f"(recovery {row['recovery']:+.4f}), {row['ttt_seconds']:.1f} s TTT")
            elif row["status"] == "diverged":
                log(f"{head}  diverged at chunk {row.get('diverged_chunk')}")
            else:
                log(f"{head}  ERROR {row['error']}")

        def on_trial_result(self, iteration, trials, trial, result, **info):
            if "payload" in result:
                self._record(trial, json.loads(result["payload"]))

        def on_trial_error(self, iteration, trials, trial, **info):
            err = getattr(trial, "error_msg", None) or "trial process failed"
            self._record(trial, {"row": {"status": "error", "error": str(err).strip().splitlines()[-1][:500]}, "curve": []})

    return TableWriter()


def write_manifest(run_dir: Path, cfg: SweepConfig, inputs: Inputs, reports: dict, keys: dict, sha: str, extra: dict) -> None:
    path = run_dir / "manifest.json"
    old = json.loads(path.read_text()) if path.exists() else {}
    configs = {**old.get("configs", {}), **{k: v for k, v in keys.items()}}
    manifest = {"config": dataclasses.asdict(cfg), "inputs": inputs.as_dict(), "git_sha": sha, "versions": versions(),
                "hardware": hardware(),
                "regimes": {r: {k: v for k, v in rep.items() if k != "tensors"} for r, rep in reports.items()},
                "configs": configs, "runs": old.get("runs", []) + [extra]}
    write_json_atomic(path, manifest)


def log(msg: str) -> None:
    print(msg, flush=True)


def main(argv: list[str] | None = None) -> int:
    try:
        args = parse_args(argv)
        cfg = build_config(args)
        all_cells = cells(cfg)
    except (ConfigError, RegimeError, ValueError) as exc:
        print(f"healing_grid: error: {exc}", file=sys.stderr)
        return 2
    t_start = time.perf_counter()
    try:
        inputs = resolve(cfg.source, log=log)
        if inputs.demo:
            log(f"demo model: {inputs.demo['parameters']:,} parameters, validation bpb {inputs.demo['val_bpb']:.4f} "
                f"(eval_val over all {inputs.demo['val_tokens']:,} validation tokens); cache {Path(inputs.checkpoint).parent}")
        for c in all_cells:  # chunk larger than the stream, etc.: fail before Ray starts
            eval_stream(inputs, TTTConfig(**c["ttt"]))
    except (ValueError, OSError) as exc:
        print(f"healing_grid: error: {exc}", file=sys.stderr)
        return 2
    run_dir = Path(cfg.out).resolve() / cfg.name
    tables = RunTables(run_dir)
    keys = {cell_key(inputs, cfg, c): c for c in all_cells}
    finished = tables.finished_ids()
    todo = {k: c for k, c in keys.items() if k not in finished}
    sha = git_sha(REPO)
    log(f"healing_grid: {len(keys)} cells ({len(keys) - len(todo)} already in {run_dir / 'trials.parquet'}), "
        f"{cfg.gpus_per_trial or cfg.workers} {'GPU' if cfg.gpus_per_trial else 'CPU'} workers per trial, "
        f"{cfg.ttt.max_tokens or 'all'} validation tokens per trial")
    reports: dict = {}
    interrupted = False
    ray = start_ray(cfg)
    try:
        reports = prepare_artifacts(ray, cfg, inputs, run_dir, list(todo.values()) or list(keys.values()), log)
        if todo:
            interrupted = run_trials(ray, cfg, inputs, run_dir, tables, todo, reports, sha, log)
    except KeyboardInterrupt:
        interrupted = True
    finally:
        wall = time.perf_counter() - t_start
        write_manifest(run_dir, cfg, inputs, reports, keys, sha,
                       {"started_cells": len(todo), "wall_seconds": wall, "interrupted": interrupted,
                        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S")})
        ray.shutdown()
    tables = RunTables(run_dir)
    if not tables.trials.empty:
        log("\n" + trial_summary(tables.trials[tables.trials["trial_id"].isin(keys)]).to_string(index=False))
    ran = tables.trials[tables.trials["trial_id"].isin(todo)] if todo and not tables.trials.empty else tables.trials.iloc[:0]
    interrupted = interrupted or len(ran) < len(todo)
    log(f"\n{'stopped early' if interrupted else 'done'}: {len(ran)} of {len(todo)} trials finished in {wall:.0f} s wall "
        f"({ran['ttt_seconds'].sum() if len(ran) else 0:.0f} s of it inside TTT); tables in {run_dir}")
    if interrupted:
        log("rerun the same command to run the remaining trials (finished ones are skipped)")
    if cfg.ttt.max_tokens:
        log(f"note: each trial evaluated {cfg.ttt.max_tokens:,} validation tokens (ttt.max_tokens); "
            "numbers describe that segment, not the whole validation stream")
    return 130 if interrupted else 0


def run_trials(ray, cfg: SweepConfig, inputs: Inputs, run_dir: Path, tables: RunTables, todo: dict,
               reports: dict, sha: str, log) -> bool:
    from ray import tune

    from e2ettt.ray_trial import run_cell

    fault = json.loads(cfg.fault) if cfg.fault else {}
    resources = {"workers": cfg.gpus_per_trial or cfg.workers, "cpus_per_worker": cfg.cpus_per_worker,
                 "gpus_per_worker": 1 if cfg.gpus_per_trial else 0, "max_worker_failures": cfg.max_worker_failures,
                 "storage_path": str(run_dir / "ray" / "train")}
    configs = []
    for key, c in todo.items():
        spec = {"inputs": inputs.as_dict(), "regime_path": reports[c["regime"]]["dir"], "fp_path": reports["fp"]["dir"],
                "ttt": c["ttt"], "threads": cfg.cpus_per_worker, "fault": fault.get(c["regime"]) or fault.get(key)}
        configs.append({"cell_key": key, "spec": spec, "resources": resources})
    callback = make_callback(tables, todo, reports, cfg, sha, len(todo), log)
    tuner = tune.Tuner(
        tune.with_resources(run_cell, {"trial_driver": 1}),
        param_space={"cell": tune.grid_search(configs)},
        # reuse_actors: the trial driver process (which imports Ray Train and torch) survives from one
        # trial to the next; this saves ~4 s per trial here. Each trial still gets a fresh TorchTrainer.
        tune_config=tune.TuneConfig(max_concurrent_trials=max_concurrent(ray, cfg), reuse_actors=True),
        run_config=tune.RunConfig(name=f"tune-{time.strftime('%Y%m%d-%H%M%S')}", storage_path=str(run_dir / "ray"),
                                  callbacks=[callback], verbose=0,
                                  failure_config=tune.FailureConfig(max_failures=0)),
    )
    grid = tuner.fit()
    return any(r.error is not None and "KeyboardInterrupt" in str(r.error) for r in grid)


if __name__ == "__main__":
    sys.exit(main())
