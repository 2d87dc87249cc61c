"""The sweep's recorder: a Tune callback that writes rows as they arrive, says where the sweep stands,
and the manifest that ties every row to its config, code and packages.

Rows reach the driver as typed `rows.Report`s inside Tune results; the
recorder hands them to the `rows.Assembler` (the one place a row is
built), appends each finished row and its curve to the Parquet tables,
and prints one line per row. A trial that ends, or fails, without some of
its rows gets an `error` row for each. Every `progress_seconds` it prints
rows done, trials by state, an ETA from measured trial times, and the
nodes up.
"""
from __future__ import annotations

import dataclasses
import fcntl
import json
import math
import os
import time
from pathlib import Path

from ray.tune import Callback

from e2ettt.driver import cluster
from e2ettt.plan import Sweep, TrialSpec
from e2ettt.provenance import hardware
from e2ettt.rows import Assembler, setting_columns


class Recorder(Callback):
    """The Tune callback of `sweep` (`reports`: each regime's quantization report; `board`: the stop board, told of
    every row written, so that a worker group that restarts does not run it again; `live`: a metrics sink)."""

    def __init__(self, sweep: Sweep, reports: dict, concurrency: int, log, board=None, live=None):
        self.sweep, self.concurrency, self.log, self.board, self.live = sweep, concurrency, log, board, live
        self.specs = {t.key: t for t in sweep.trials}
        self.columns = {r.row_id: setting_columns(sweep, t, s, r, reports.get(s.regime, {}))
                        for t in sweep.trials for s, r in t.rows}
        self.labels = {r.row_id: (s.label, r.seed) for t in sweep.trials for s, r in t.rows}
        self.assembler = Assembler(self.columns)
        self.rows = 0
        self.t0 = self.last_line = time.perf_counter()
        self.started: dict[str, float] = {}  # Tune trial id -> when its driver started (unix seconds)
        self.walls: list[float] = []  # finished trials' wall times
        self.nodes: dict[str, dict] = {}  # node id -> what ran there

    def _spec(self, trial) -> TrialSpec:
        return self.specs[trial.config["trial"]]

    def _append(self, row: dict, curve: list[dict]) -> None:
        self.sweep.tables.append(row, curve)
        if self.board is not None:
            self.board.row_written.remote(row["row_id"])
        if row["status"] in ("ok", "diverged"):
            self.nodes.setdefault(row["node_id"], {k: row.get(k) for k in ("hostname", "device", "device_name")})
        self.rows += 1
        label, seed = self.labels[row["row_id"]]
        head = f"[{self.rows}/{len(self.columns)}] {label:<44} seed={seed}"
        alarms = f"  ALARMS {row['alarms']}: the pipeline is wrong, not the model (README: row alarms)" \
            if row.get("alarms") else ""
        if row["status"] == "ok":
            self.log(f"{head}  post-quant {row['post_quant_bpb']:.4f} -> post-TTT {row['post_ttt_bpb']:.4f} bpb "
                f"(recovery {row['recovery']:+.4f}), {row['ttt_seconds']:.1f} s TTT{alarms}")
        elif row["status"] == "diverged":
            self.log(f"{head}  diverged at chunk {row['diverged_chunk']}{alarms}")
        elif row["status"] == "stopped":
            self.log(f"{head}  stopped at {row['tokens_scored']:,} tokens: {row['error']}{alarms}")
        else:
            self.log(f"{head}  ERROR {row['error']}")

    def _times(self, trial, m=None) -> dict:
        """When Tune started the trial, and (with a row's measured columns) its start-up and the row's end."""
        start = self.started.get(trial.trial_id, math.nan)
        return {"trial_started_at": start, "startup_seconds": m.started_at - start if m else math.nan,
                "trial_seconds": (m.ended_at if m and not math.isnan(m.ended_at) else time.time()) - start}

    def _errors(self, trial, message: str, traceback: str = "") -> None:
        for _, r in self._spec(trial).rows:
            row = self.assembler.error(r.row_id, message, traceback, **self._times(trial))
            if row is not None:
                self._append(row, [])

    def on_trial_start(self, iteration, trials, trial, **info):
        self.started[trial.trial_id] = time.time()

    def on_trial_result(self, iteration, trials, trial, result, **info):
        if result.get("kind") == "report":
            report = result.pop("report")  # Tune keeps the last result: not the curve points
            done = self.assembler.add(report, **self._times(trial, report.measured))
            if done is not None:
                self._append(*done)
            if self.live is not None and "seed" in result:
                self.live(result)
        elif result.get("kind") == "end":
            self.walls.append(time.time() - self.started.get(trial.trial_id, time.time()))
            self._errors(trial, result["error"] or "the trial ended without a row for this seed", result["traceback"])

    def on_trial_error(self, iteration, trials, trial, **info):
        err = getattr(trial, "error_msg", None) or "trial process failed"
        self._errors(trial, str(err).strip().splitlines()[-1][:500])

    def on_step_end(self, iteration, trials, **info):
        now = time.perf_counter()
        if now - self.last_line >= self.sweep.cfg.progress_seconds:
            self.last_line = now
            self.log(self.progress_line(trials, now - self.t0))

    def progress_line(self, trials, elapsed: float) -> str:
        """Tune creates trials only as slots free up, so pending = all trials − started ones."""
        states = [t.status for t in trials]
        running = states.count("RUNNING")
        done = len(states) - running - states.count("PENDING")
        pending = len(self.specs) - done - running
        eta = ""
        if self.walls:
            left = pending + running / 2  # a running trial is about half done
            median = sorted(self.walls)[len(self.walls) // 2]
            eta = f"; ETA {median * left / max(1, min(self.concurrency, len(self.specs))) / 60:.0f} min"
        return (f"  ... {elapsed / 60:.1f} min: {self.rows}/{len(self.columns)} rows; trials {done} done, {running} running, "
                f"{pending} pending{eta}; {cluster.standing(self.sweep.cfg)}")


def write_json_atomic(path: Path, obj) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=1, default=float))
    os.replace(tmp, path)


def write_manifest(sweep: Sweep, reports: dict, nodes: dict, run: dict) -> None:
    """Merge this invocation into manifest.json (under a lock: two sweeps may share a run directory):
    the config, inputs, code and package versions, every node that ran a row, each regime's quantization
    report, the config of every row, and a log of runs."""
    path = sweep.run_dir / "manifest.json"
    with open(sweep.run_dir / ".manifest.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        old = json.loads(path.read_text()) if path.exists() else {}
        configs = dict(old.get("configs", {}))
        for t in sweep.trials:
            for s, r in t.rows:
                configs[r.row_id] = {"regime": s.regime, "ttt": dataclasses.asdict(dataclasses.replace(s.ttt, seed=r.seed)),
                                     "segment_start": r.segment_start, "quant": dataclasses.asdict(sweep.cfg.quant),
                                     "device": sweep.cfg.device, "ranks": t.world_size, "inputs": sweep.fingerprint}
        manifest = {"config": dataclasses.asdict(sweep.cfg),
                    "inputs": {**sweep.inputs.as_dict(), "fingerprint": sweep.fingerprint},
                    "git_sha": sweep.git_sha, "versions": sweep.versions, "driver": hardware(),
                    "nodes": {**old.get("nodes", {}), **nodes},
                    "regimes": {**old.get("regimes", {}), **{r: {k: v for k, v in rep.items() if k != "tensors"}
                                                             for r, rep in reports.items()}},
                    "configs": configs, "runs": old.get("runs", []) + [run]}
        write_json_atomic(path, manifest)
    if sweep.tables.store is not None:  # kept beside the tables' copies
        sweep.tables.store.write_bytes(f"{sweep.cfg.name}/manifest.json", path.read_bytes())
