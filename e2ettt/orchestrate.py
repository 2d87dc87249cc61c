"""Running a sweep on Ray: start or join Ray, prepare artifacts as Ray tasks, run the Tune grid, write the tables.

`run(cfg)` is the whole sweep:

1. resolve and fingerprint the inputs and plan the trials (bad settings fail
   here, before Ray starts);
2. start a local Ray (no address) or join a cluster (`address`), sized from
   the cluster's largest configuration, not from the nodes up at start;
3. quantize each regime once and compute each static curve once, as Ray
   tasks on the trials' kind of device (a GPU each on a GPU cluster); the
   results are Ray objects handed to trials, and the driver keeps copies in
   the storage (a local directory or a URI) so a resumed sweep reuses them;
4. run the Tune grid (`ray_trial.run_cell` per trial) with a callback that
   appends each finished trial's rows to the Parquet tables as it arrives and
   says where the sweep stands while nodes come up;
5. write `manifest.json` (config, code and package versions, every node
   that ran a trial) and compact the tables.

Nothing a trial reads was written by another node: artifacts travel as
Ray objects, inputs are on every node at the same path (cluster.yaml ships
them), and only the driver writes tables, manifest and storage copies.
"""
from __future__ import annotations

import dataclasses
import fcntl
import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from e2ettt import budget, prepare
from e2ettt.config import ConfigError
from e2ettt.data import segment_start
from e2ettt.evaluate import chunk_spans
from e2ettt.provenance import git_sha, hardware, versions
from e2ettt.quant.regimes import parse_regime
from e2ettt.ray_trial import stop_reason
from e2ettt.source import Inputs, fingerprint, load_source_model, load_split, resolve
from e2ettt.storage import Store
from e2ettt.sweep import SweepConfig, Trial, plan
from e2ettt.tables import RunTables

BOOTSTRAP_CONFIG = "~/ray_bootstrap_config.yaml"  # where `ray up` leaves the autoscaler config on the head


@dataclass
class Outcome:
    run_dir: Path
    row_keys: set  # every row of the grid
    todo: set  # rows this invocation set out to run
    wall_seconds: float = 0.0
    interrupted: bool = False
    dry_run: bool = False


@dataclass
class Sweep:
    """What the driver knows while a sweep runs."""

    cfg: SweepConfig
    inputs: Inputs
    fingerprint: str
    trials: dict[str, Trial]  # setting key -> trial, only those with seeds to run
    store: Store
    tables: RunTables
    sha: str
    versions: dict
    starts: dict = field(default_factory=dict)  # seed -> segment start
    stream_tokens: int = 0  # target tokens of the whole validation stream
    reports: dict = field(default_factory=dict)  # regime -> quantization report
    nodes: dict = field(default_factory=dict)  # node id -> what ran there
    live: Callable[[dict], None] = lambda result: None  # running numbers of a trial, as they arrive (dashboard)


# ---------------------------------------------------------------- Ray and the cluster's capacity

def start_ray(cfg: SweepConfig, log=print):
    """A local Ray of this machine's cores (even if an earlier `ray start` left an address behind), or the cluster."""
    import ray

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")  # a report waits for the previous one to be polled
    quiet = {"include_dashboard": cfg.dashboard, "log_to_driver": cfg.verbose, "configure_logging": True,
             "logging_level": "INFO" if cfg.verbose else "ERROR"}
    if cfg.dashboard:
        os.environ.setdefault("RAY_TRAIN_ENABLE_STATE_TRACKING", "1")  # Train runs and their workers in the dashboard
    if cfg.address:
        quiet.pop("include_dashboard")  # a cluster's dashboard is the head's
        context = ray.init(address=cfg.address, **quiet)
    else:
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")
        cpus = cfg.local_cpus or os.cpu_count() or 1
        context = ray.init(address="local", num_cpus=max(cpus, cfg.workers * cfg.cpus_per_worker),
                           num_gpus=None if cfg.gpus_per_trial else 0, resources={"trial_driver": 64}, **quiet)
    if cfg.dashboard:
        log(f"  dashboard: http://{context.dashboard_url} (Train runs; e2ettt_* metrics in its Metrics view with "
            "Prometheus/Grafana set up as Ray's docs describe)")
    return ray


def live_metrics():
    """Per-trial running numbers as Ray metrics (Prometheus, shown in the dashboard's Metrics view)."""
    from ray.util.metrics import Gauge

    tags = ("trial", "regime", "seed")
    gauges = {name: Gauge(f"e2ettt_{name}", description=text, tag_keys=tags) for name, text in (
        ("running_ttt_bpb", "running bpb of score-first TTT"), ("running_static_bpb", "running bpb without TTT"),
        ("running_recovery", "running static - TTT bpb (negative: TTT hurts)"), ("tokens_seen", "tokens scored"))}

    def update(result: dict) -> None:
        labels = {"trial": result["setting_key"], "regime": result["regime"], "seed": str(result["seed"])}
        for name, gauge in gauges.items():
            if name in result:
                gauge.set(float(result[name]), tags=labels)

    return update


def trial_demand(cfg: SweepConfig) -> dict[str, float]:
    """Resources one trial takes: its workers, plus its driver's slot on the head."""
    demand = {"CPU": cfg.ranks * cfg.cpus_per_worker}
    if cfg.gpus_per_trial:
        demand["GPU"] = cfg.gpus_per_trial
    return demand


def read_cluster_config(cfg: SweepConfig) -> tuple[dict | None, str]:
    path = Path(os.path.expanduser(cfg.cluster_config or (BOOTSTRAP_CONFIG if cfg.address else "")))
    if not str(path) or str(path) == "." or not path.is_file():
        if cfg.cluster_config:
            raise ConfigError(f"--cluster-config {cfg.cluster_config}: file does not exist")
        return None, ""
    try:
        return yaml.safe_load(path.read_text()), str(path)
    except yaml.YAMLError as exc:
        raise ConfigError(f"--cluster-config {path}: not valid YAML ({str(exc).splitlines()[0]})") from None


def capacity_from_config(config: dict, demand: dict[str, float], strict: bool) -> tuple[int, int, int]:
    """(trials that fit at the cluster's largest, worker nodes at most, trial_driver slots).

    Node counts: the head once, each worker type up to its max_workers, all
    worker types together up to the top-level max_workers (filled with the
    types that fit most trials first). With `strict` (GPU trials, STRICT_PACK)
    a trial must fit on one node; otherwise its workers may spread.
    """
    types = config.get("available_node_types", {})
    head = config.get("head_node_type")
    budget = int(config.get("max_workers", sum(t.get("max_workers", 0) for n, t in types.items() if n != head)))

    def fits(res: dict) -> int:
        return min((int(res.get(r, 0) // need) for r, need in demand.items()), default=0)

    counts = {head: 1} if head in types else {}
    for name in sorted((n for n in types if n != head), key=lambda n: -fits(types[n].get("resources", {}))):
        counts[name] = min(int(types[name].get("max_workers", 0)), budget)
        budget -= counts[name]
    if strict:
        trials = sum(n * fits(types[t].get("resources", {})) for t, n in counts.items())
    else:
        total = {r: sum(n * types[t].get("resources", {}).get(r, 0) for t, n in counts.items()) for r in demand}
        trials = fits(total)
    drivers = int(sum(n * types[t].get("resources", {}).get("trial_driver", 0) for t, n in counts.items()))
    return trials, sum(n for t, n in counts.items() if t != head), drivers


def max_concurrent(ray, cfg: SweepConfig, log) -> int:
    """Trials in flight: --max-concurrent, else what the autoscaler config holds at its largest, else what is up now."""
    demand = trial_demand(cfg)
    config, path = read_cluster_config(cfg)
    if config is not None:
        trials, nodes, drivers = capacity_from_config(config, demand, strict=bool(cfg.gpus_per_trial))
        if trials == 0:
            raise ConfigError(f"{path}: no node type can hold a trial needing {demand} "
                              f"({cfg.ranks} ranks × {cfg.cpus_per_worker} CPU{', 1 GPU' if cfg.gpus_per_trial else ''} each)")
        if drivers == 0:
            raise ConfigError(f"{path}: no node declares the 'trial_driver' resource that trial drivers run in "
                              "(give the head node resources: {\"trial_driver\": N})")
        n = cfg.max_concurrent or min(trials, drivers)
        log(f"  cluster: up to {nodes} worker nodes ({path}) hold {trials} trial(s) at once; running {n} at a time")
        return n
    res = ray.cluster_resources()
    up = min((int(res.get(r, 0) // need) for r, need in demand.items()), default=1)
    if cfg.address and not cfg.max_concurrent:
        log(f"  cluster: no autoscaler config found ({BOOTSTRAP_CONFIG} or --cluster-config); sizing from the "
            f"{len(ray.nodes())} node(s) up now: {max(1, up)} trial(s) at once (--max-concurrent to change)")
    return cfg.max_concurrent or max(1, up)


# ---------------------------------------------------------------- artifacts as Ray objects

def _task_options(cfg: SweepConfig) -> dict:
    """Prep tasks run where trials run: one GPU each on a GPU sweep (same device and dtype as the TTT scores)."""
    return {"num_cpus": cfg.cpus_per_worker, "num_gpus": 1 if cfg.gpus_per_trial else 0}


def prepare_artifacts(ray, sw: Sweep, log) -> dict[str, object]:
    """Every artifact the trials need, as object refs by name (weights key, static key)."""
    cfg, store, name = sw.cfg, sw.store, sw.cfg.name
    regimes = list(dict.fromkeys(["fp"] + [t.regime for t in sw.trials.values()]))
    wkeys = {r: prepare.regime_key(sw.fingerprint, r, cfg.quant, cfg.device) for r in regimes}
    opts = _task_options(cfg)
    quantize = ray.remote(**opts)(prepare.quantize_regime).options(num_returns=2)
    static_task = ray.remote(**opts)(prepare.static_scores)
    t0 = time.perf_counter()
    refs, pending = {}, {}
    for r in regimes:
        cached = prepare.load_regime(store, f"{name}/artifacts/{wkeys[r]}")
        if cached is not None:
            sw.reports[r] = cached[0]
            refs[wkeys[r]] = ray.put(cached[1])
            log(f"  {r:>20}: quantized weights reused from {store.url(f'{name}/artifacts/{wkeys[r]}')}")
        else:
            report_ref, state_ref = quantize.remote(sw.inputs, r, cfg.quant, cfg.device, cfg.cpus_per_worker)
            refs[wkeys[r]] = state_ref
            pending[report_ref] = r
    while pending:
        done, _ = ray.wait(list(pending), num_returns=1)
        r = pending.pop(done[0])
        sw.reports[r] = rep = ray.get(done[0])
        prepare.save_regime(store, f"{name}/artifacts/{wkeys[r]}", rep, ray.get(refs[wkeys[r]]))
        log(f"  {r:>20}: {rep['quantized_params']:>10,} params quantized, {rep['artifact_bytes']:>10,} bytes (lzma), "
            f"{rep['seconds']:.1f} s on {rep['device']}")
    needed: dict[str, dict] = {r: {} for r in regimes}  # regime -> static key -> TTT config
    for t in sw.trials.values():
        for seed in t.seeds:
            c = t.at_seed(seed)
            for r in {t.regime, "fp"}:
                needed[r][prepare.static_key(wkeys[r], c, cfg.device)] = c
    jobs = {}
    for r, configs in needed.items():
        todo = {}
        for key, c in configs.items():
            cached = prepare.load_static(store, f"{name}/artifacts/{key}")
            if cached is not None:
                refs[key] = ray.put(cached)
            else:
                todo[key] = c
        if todo:
            jobs[static_task.remote(sw.inputs, refs[wkeys[r]], list(todo.values()), cfg.device, cfg.cpus_per_worker)] = todo
    n_static = sum(len(v) for v in jobs.values())
    while jobs:
        done, _ = ray.wait(list(jobs), num_returns=1)
        todo = jobs.pop(done[0])
        for key, static in zip(todo, ray.get(done[0])):
            prepare.save_static(store, f"{name}/artifacts/{key}", static)
            refs[key] = ray.put(static)
    log(f"  {len(regimes)} regimes ready, {n_static} static curves computed "
        f"({sum(len(v) for v in needed.values()) - n_static} reused) in {time.perf_counter() - t0:.0f} s")
    return refs


def trial_config(sw: Sweep, t: Trial) -> dict:
    """What Tune hands `run_cell`: the trial's spec (artifacts by name) and its resources."""
    cfg = sw.cfg
    wkey = {r: prepare.regime_key(sw.fingerprint, r, cfg.quant, cfg.device) for r in {t.regime, "fp"}}
    static = {str(s): {role: prepare.static_key(wkey[r], t.at_seed(s), cfg.device)
                       for role, r in (("regime", t.regime), ("fp", "fp"))} for s in t.seeds}
    faults = json.loads(cfg.fault) if cfg.fault else {}
    fault = faults.get(t.regime) or faults.get(t.key) or {}
    spec = {"key": t.key, "inputs": sw.inputs.as_dict(), "regime": t.regime, "ttt": dataclasses.asdict(t.ttt),
            "seeds": list(t.seeds), "weights": wkey[t.regime], "static": static, "threads": cfg.cpus_per_worker, "fault": fault,
            "report_seconds": cfg.report_seconds, "stop_rule": [cfg.stop_threshold, cfg.stop_min_fraction]}
    resources = {"workers": cfg.ranks, "cpus_per_worker": cfg.cpus_per_worker,
                 "gpus_per_worker": 1 if cfg.gpus_per_trial else 0, "max_worker_failures": cfg.max_worker_failures,
                 "storage_path": sw.store.url(f"{cfg.name}/ray/train"), "start_timeout": cfg.worker_start_timeout,
                 "extra": fault.get("resources", {})}
    return {"key": t.key, "spec": spec, "resources": resources}


# ---------------------------------------------------------------- rows

def trial_row(sw: Sweep, t: Trial, seed: int, numbers: dict, node_id: str) -> dict:
    """One table row: the trial's numbers and every setting that can change them."""
    spec = parse_regime(t.regime)
    ttt = dataclasses.asdict(t.at_seed(seed))
    row = {"trial_id": t.row_keys[seed], "setting_key": t.key, "control_key": t.control_keys[seed],
           "config_hash": t.row_keys[seed], "regime": t.regime, "bits": spec.bits,
           "method": spec.method + ("+hadamard" if spec.rotate else ""),
           **{("inner_lr" if k == "lr" else k): v for k, v in ttt.items()},
           **{f"quant_{k}": v for k, v in dataclasses.asdict(sw.cfg.quant).items()},
           "segment_start": sw.starts.get(seed, 0), "input_fingerprint": sw.fingerprint,
           "checkpoint": sw.inputs.checkpoint, "node_id": node_id,
           "artifact_bytes": sw.reports.get(t.regime, {}).get("artifact_bytes"),
           "git_sha": sw.sha, "versions": json.dumps(sw.versions, sort_keys=True),
           "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S"), "world_size": sw.cfg.ranks, "device": sw.cfg.device,
           "stream_tokens": sw.stream_tokens}
    row.update(numbers)
    row["projected_full_seconds"] = budget.projected_full_seconds(sw.stream_tokens, row.get("tokens_per_second"))
    return row


class StopBoard:
    """A small Ray actor the trials' rank 0 asks, at each report, whether the sweep's stopper ended them.

    Tune's own way to end a trial stops the trial's driver, but the Ray Train run inside it (controller
    and workers, blocked on their next report) keeps its resources, and the next trial's workers cannot
    start. So the stopper's decision is posted here, and the trial's ranks end together at the next
    chunk boundary: partial curve and rows kept, resources freed, no rank left in a collective.
    """

    def __init__(self):
        self.reasons: dict[str, str] = {}
        self.verdicts: dict[tuple, str] = {}

    def stop(self, key: str, why: str) -> None:
        self.reasons.setdefault(key, why)

    def reason(self, key: str) -> str:
        return self.reasons.get(key, "")

    def verdict_for(self, key: str, seed: int, why: str) -> None:
        """The stopper's decision on a finished seed ("" = go on), for a trial waiting to start its next seed."""
        self.verdicts[(key, seed)] = why

    def verdict(self, key: str, seed: int) -> str | None:
        return self.verdicts.get((key, seed))


class StopBook:
    """Which trials are done, which a stopper ended, and which fp controls must keep running.

    The fp trial of a setting is the control of every regime trial with the same TTT settings: it is
    never stopped while one of those is still pending or running, because their healing fractions need it.
    """

    def __init__(self, trials: dict[str, Trial], board=None):
        fp = {json.dumps(dataclasses.asdict(t.ttt), sort_keys=True): k for k, t in trials.items() if t.regime == "fp"}
        self.dependents: dict[str, set] = {k: set() for k in fp.values()}
        for k, t in trials.items():
            control = fp.get(json.dumps(dataclasses.asdict(t.ttt), sort_keys=True))
            if t.regime != "fp" and control:
                self.dependents[control].add(k)
        self.done: set[str] = set()
        self.stopped: dict[str, str] = {}  # setting key -> why
        self.board = board

    def protected(self, key: str) -> bool:
        return bool(self.dependents.get(key, set()) - self.done)

    def stop(self, key: str, why: str) -> bool:
        """Post a stop unless the trial is a control still needed; return whether it stops."""
        if key in self.stopped:
            return True
        if self.protected(key):
            return False
        self.stopped[key] = why
        self.done.add(key)
        if self.board is not None:
            self.board.stop.remote(key, why)
        return True


def make_stopper(book: StopBook, cfg: SweepConfig):
    from ray.tune import Stopper

    class HurtingStopper(Stopper):
        """Ends a trial whose score-first TTT makes its own regime worse than no TTT (running recovery below
        -stop_threshold bpb after stop_min_fraction of a seed's tokens), or one of whose seeds diverged; judged
        per regime against its own static curve, so a damaged regime is never stopped for being damaged."""

        def __call__(self, trial_id: str, result: dict) -> bool:
            key = result.get("setting_key", "")
            if result.get("kind") == "payload":
                book.done.add(key)
                return False
            why = stop_reason(result, cfg.stop_threshold, cfg.stop_min_fraction)
            stops = bool(why) and book.stop(key, why)  # the trial's ranks end at their next report (StopBoard)
            if result.get("kind") == "seed_done" and book.board is not None:
                book.board.verdict_for.remote(key, result["seed"], why if stops else "")  # a rank may wait for it
            return False

        def stop_all(self) -> bool:
            return False

    return HurtingStopper()


def make_scheduler(book: StopBook, cfg: SweepConfig, tokens_per_trial: int):
    """FIFO, or ASHA over running recovery at rungs of tokens seen (fp controls protected as by the stopper)."""
    if cfg.scheduler == "fifo":
        return None
    from ray.tune.schedulers import ASHAScheduler, TrialScheduler

    class ProtectedASHA(ASHAScheduler):
        def on_trial_result(self, tune_controller, trial, result):
            decision = super().on_trial_result(tune_controller, trial, result)
            if decision == TrialScheduler.STOP:
                why = f"ASHA: running recovery {result.get('running_recovery', float('nan')):+.4f} bpb below its rung"
                book.stop(result.get("setting_key", ""), why)  # ended through the StopBoard, at a chunk boundary
                return TrialScheduler.CONTINUE
            return decision

    grace = max(1, int(tokens_per_trial * cfg.stop_min_fraction))
    return ProtectedASHA(time_attr="tokens_seen", metric="running_recovery", mode="max", max_t=max(grace + 1, tokens_per_trial),
                         grace_period=grace, reduction_factor=3)


def make_callback(sw: Sweep, book: StopBook, total_rows: int, concurrency: int, log):
    from ray.tune import Callback

    class TableWriter(Callback):
        """Writes each seed's row (and the curve streamed before it) as it arrives; stopped trials keep their
        partial curves; says where the sweep stands every progress_seconds."""

        def __init__(self):
            self.rows = 0
            self.t0 = time.perf_counter()
            self.last_line = self.t0
            self.started: dict[str, float] = {}  # trial id -> wall time its driver started
            self.walls: list[float] = []  # finished trials' wall times
            self.chunks: dict[str, list] = {}  # trial id -> chunks of the seed in progress
            self.attempt: dict[str, str] = {}
            self.written: dict[str, set] = {}  # trial id -> seeds with a row

        def _trial(self, trial) -> Trial:
            return sw.trials[trial.config["trial"]["key"]]

        def _write(self, trial, seed: int, numbers: dict, curve: list) -> None:
            t = self._trial(trial)
            done = self.written.setdefault(trial.trial_id, set())
            if seed in done:  # a worker group restarted and ran the seed again: the first row stands
                return
            done.add(seed)
            if numbers.get("started_at") and trial.trial_id in self.started:
                numbers["startup_seconds"] = numbers["started_at"] - self.started[trial.trial_id]
            row = trial_row(sw, t, seed, numbers, numbers.pop("node_id", ""))
            sw.tables.append(row, curve)
            if row["status"] in ("ok", "diverged"):
                sw.nodes.setdefault(row["node_id"], {k: row.get(k) for k in ("hostname", "device", "device_name")})
            self.rows += 1
            self._print(t, seed, row)

        def _print(self, t: Trial, seed: int, row: dict) -> None:
            head = f"[{self.rows}/{total_rows}] {t.label:<34} seed={seed}"
            if row["status"] == "ok":
                log(f"{head}  post-quant {row['post_quant_bpb']:.4f} -> post-TTT {row['post_ttt_bpb']:.4f} bpb "
                    f"(recovery {row['recovery']:+.4f}), {row['ttt_seconds']:.1f} s TTT")
            elif row["status"] == "diverged":
                log(f"{head}  diverged at chunk {row.get('diverged_chunk')}")
            elif row["status"] == "stopped":
                log(f"{head}  stopped at {row['tokens_scored']:,} tokens: {row['error']}")
            else:
                log(f"{head}  ERROR {row['error']}")

        def _unwritten(self, trial) -> list[int]:
            return [s for s in trial.config["trial"]["spec"]["seeds"] if s not in self.written.get(trial.trial_id, set())]

        def on_trial_start(self, iteration, trials, trial, **info):
            self.started[trial.trial_id] = time.time()

        def on_trial_result(self, iteration, trials, trial, result, **info):
            kind = result.get("kind")
            tid = trial.trial_id
            if kind in ("chunks", "seed_done"):
                if self.attempt.get(tid) != result["attempt"]:  # first report, or a restarted worker group
                    self.attempt[tid], self.chunks[tid] = result["attempt"], []
                self.chunks.setdefault(tid, []).extend(json.loads(result["chunks"]))
                sw.live(result)
            if kind == "seed_done" and result["row"]:
                self._write(trial, result["seed"], {**json.loads(result["row"]), "node_id": result["node_id"]},
                            self.chunks.pop(tid, []))
            elif kind == "payload":
                payload = json.loads(result["payload"])
                self.walls.append(time.time() - self.started.get(tid, time.time()))
                for seed in self._unwritten(trial):
                    message = payload.get("error", "the trial ended without a row for this seed")
                    self._write(trial, seed, {"status": "error", "error": message, "traceback": payload.get("traceback", ""),
                                              "trial_seconds": payload.get("trial_seconds")}, [])

        def on_trial_error(self, iteration, trials, trial, **info):
            err = getattr(trial, "error_msg", None) or "trial process failed"
            for seed in self._unwritten(trial):
                self._write(trial, seed, {"status": "error", "error": str(err).strip().splitlines()[-1][:500]}, [])
            book.done.add(trial.config["trial"]["key"])

        def on_step_end(self, iteration, trials, **info):
            now = time.perf_counter()
            if now - self.last_line < sw.cfg.progress_seconds:
                return
            self.last_line = now
            log(progress_line(trials, len(sw.trials), self.rows, total_rows, now - self.t0, self.walls, concurrency, sw.cfg))

    return TableWriter()


def progress_line(trials, n_trials: int, rows_done: int, rows_total: int, elapsed: float, walls: list[float],
                  concurrency: int, cfg: SweepConfig) -> str:
    """Where a sweep stands: rows, trials by state, an ETA from measured trial times, and nodes up.

    Tune creates trials only as slots free up, so pending = all trials − started ones."""
    import ray

    states = [t.status for t in trials]
    running = states.count("RUNNING")
    done = len(states) - running - states.count("PENDING")
    pending = n_trials - done - running
    eta = ""
    if walls:
        left = pending + running / 2  # a running trial is about half done
        eta = f"; ETA {sorted(walls)[len(walls) // 2] * left / max(1, min(concurrency, n_trials)) / 60:.0f} min"
    alive = [n for n in ray.nodes() if n.get("Alive")]
    key = "GPU" if cfg.gpus_per_trial else "CPU"
    units = sum(n["Resources"].get(key, 0) for n in alive)
    return (f"  ... {elapsed / 60:.1f} min: {rows_done}/{rows_total} rows; trials {done} done, {running} running, "
            f"{pending} pending{eta}; cluster: {len(alive)} node(s) up with {units:g} {key} "
            f"({trial_demand(cfg)[key]:g} {key} per trial)")


# ---------------------------------------------------------------- the Tune run, the manifest, the whole sweep

def dry_run_plan(sw: Sweep, targets: int) -> list[str]:
    """What the sweep would run and cost, from measured rates in this run's rows where they exist."""
    cfg = sw.cfg
    model = load_source_model(sw.inputs)
    matrix_params = sum(p.numel() for p in model.parameters() if p.ndim >= 2)
    done = sw.tables.trials
    if not done.empty:
        done = done[(done["status"] == "ok") & (done["input_fingerprint"] == sw.fingerprint)
                    & (done["device"] == cfg.device) & (done["world_size"] == cfg.ranks)]

    def measured(t: Trial) -> float | None:
        if done.empty:
            return None
        same = done[(done["epochs"] == t.ttt.epochs) & (done["dtype"] == t.ttt.dtype) & (done["params"] == t.ttt.params)]
        return float(same["tokens_per_second"].median()) if len(same) else None

    costs = [budget.trial_cost(t.label, len(t.seeds) * targets, cfg.ranks, cfg.device, cfg.ttt.dtype, matrix_params,
                               t.ttt.epochs, t.ttt.fuse_score, measured(t)) for t in sw.trials.values()]
    config, _ = read_cluster_config(cfg)
    demand = trial_demand(cfg)
    if config is not None:
        concurrency = cfg.max_concurrent or capacity_from_config(config, demand, strict=bool(cfg.gpus_per_trial))[0]
    elif not cfg.address:
        concurrency = cfg.max_concurrent or max(1, int((cfg.local_cpus or os.cpu_count() or 1) // demand["CPU"]))
    else:
        concurrency = cfg.max_concurrent or None
    rows = sum(len(t.seeds) for t in sw.trials.values())
    lines = [f"dry run: nothing started. {len(sw.trials)} trials to run ({rows} rows), "
             f"{cfg.ranks} {cfg.device.upper()} ranks each, {targets:,} tokens per row, "
             f"model {matrix_params:,} matrix parameters"]
    for c in costs[:12]:
        lines.append(f"    {c.label:<34} {c.tokens:>12,} tokens  ~{c.seconds:>8.0f} s ({c.source})")
    if len(costs) > 12:
        lines.append(f"    ... and {len(costs) - 12} more")
    return lines + budget.plan_lines(costs, cfg.ranks, cfg.device, concurrency, cfg.gpus_per_node, cfg.usd_per_node_hour)


def write_json_atomic(path: Path, obj) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=1, default=float))
    os.replace(tmp, path)


def run_trials(ray, sw: Sweep, configs: list[dict], refs: dict, concurrency: int, log) -> bool:
    """The Tune grid; returns whether it was interrupted (Ctrl-C)."""
    from ray import tune

    from e2ettt.ray_trial import run_cell

    if not sw.cfg.verbose:
        os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")  # no status box; this module prints its own lines
    # Tune's JSON/CSV/TensorBoard loggers would copy every report (curve chunks included) into result files.
    os.environ.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")
    total = sum(len(c["spec"]["seeds"]) for c in configs)
    board = ray.remote(num_cpus=0)(StopBoard).remote()
    book = StopBook(sw.trials, board)
    tokens_per_trial = max(len(c["spec"]["seeds"]) for c in configs) * (sw.cfg.ttt.max_tokens or 1)
    tuner = tune.Tuner(
        tune.with_resources(tune.with_parameters(run_cell, artifacts=refs, board=board), {"trial_driver": 1}),
        param_space={"trial": tune.grid_search(configs)},
        # reuse_actors: the trial driver process (which imports Ray Train and torch) survives from one
        # trial to the next; each trial still gets a fresh TorchTrainer. (Trials end by finishing; a stopped
        # one finishes early through the StopBoard, so Tune never has to end a driver mid-fit.)
        tune_config=tune.TuneConfig(max_concurrent_trials=concurrency, reuse_actors=True,
                                    scheduler=make_scheduler(book, sw.cfg, tokens_per_trial)),
        run_config=tune.RunConfig(name=f"tune-{time.strftime('%Y%m%d-%H%M%S')}",
                                  storage_path=sw.store.url(f"{sw.cfg.name}/ray"),
                                  stop=make_stopper(book, sw.cfg),
                                  callbacks=[make_callback(sw, book, total, concurrency, log)],
                                  verbose=2 if sw.cfg.verbose else 0,
                                  failure_config=tune.FailureConfig(max_failures=0)),
    )
    grid = tuner.fit()
    return any(r.error is not None and "KeyboardInterrupt" in str(r.error) for r in grid)


def write_manifest(sw: Sweep, run_dir: Path, extra: dict) -> None:
    """Merge this invocation into manifest.json (under a lock: two sweeps may share a run directory)."""
    path = run_dir / "manifest.json"
    with open(run_dir / ".manifest.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        old = json.loads(path.read_text()) if path.exists() else {}
        configs = dict(old.get("configs", {}))
        for t in sw.trials.values():
            for seed in t.seeds:
                configs[t.row_keys[seed]] = {"regime": t.regime, "ttt": dataclasses.asdict(t.at_seed(seed)),
                                             "quant": dataclasses.asdict(sw.cfg.quant), "device": sw.cfg.device,
                                             "ranks": sw.cfg.ranks, "inputs": sw.fingerprint}
        manifest = {"config": dataclasses.asdict(sw.cfg), "inputs": {**sw.inputs.as_dict(), "fingerprint": sw.fingerprint},
                    "git_sha": sw.sha, "versions": sw.versions, "driver": hardware(),
                    "nodes": {**old.get("nodes", {}), **sw.nodes},
                    "regimes": {**old.get("regimes", {}), **{r: {k: v for k, v in rep.items() if k != "tensors"}
                                                             for r, rep in sw.reports.items()}},
                    "configs": configs, "runs": old.get("runs", []) + [extra]}
        write_json_atomic(path, manifest)
    if sw.tables.store is not None:  # kept beside the tables' copies
        sw.tables.store.write_bytes(f"{sw.cfg.name}/manifest.json", path.read_bytes())


def run(cfg: SweepConfig, log=print, code_dir: str | os.PathLike = ".") -> Outcome:
    """The whole sweep; bad inputs or settings raise (ValueError/OSError) before Ray starts."""
    t_start = time.perf_counter()
    cfg.validate()
    inputs = resolve(cfg.source, log=log)
    if inputs.demo:
        log(f"demo model: {inputs.demo['parameters']:,} parameters, validation bpb {inputs.demo['val_bpb']:.4f} "
            f"(eval_val over all {inputs.demo['val_tokens']:,} validation tokens); cache {Path(inputs.checkpoint).parent}")
    fp = fingerprint(inputs)
    trials = plan(cfg, fp)
    val = load_split(inputs, "val")
    starts = {s: segment_start(val, cfg.ttt.max_tokens, s) for s in cfg.grid.seeds}  # seeds that cannot mean other text fail here
    targets = cfg.ttt.max_tokens if 0 < cfg.ttt.max_tokens < val.size - 1 else val.size - 1
    for chunk in set(cfg.grid.chunks):
        chunk_spans(targets, chunk)  # a chunk larger than the stream fails here
    prepare.check_regimes(inputs, list(cfg.grid.regimes), cfg.quant)  # a regime the model cannot take fails here
    log(f"  inputs checked ({fp}): {val.size - 1:,} validation targets, {targets:,} per row; "
        f"{time.perf_counter() - t_start:.0f} s")
    run_dir = Path(cfg.out).resolve() / cfg.name
    store = Store(cfg.storage or cfg.out)
    mirror = None if (store.local and Path(store.root) == run_dir.parent) else store
    tables = RunTables(run_dir, mirror, cfg.name)
    pulled = tables.pull()
    finished = tables.finished_ids(cfg.rerun_stopped)
    todo_trials = {}
    for t in trials:
        left = tuple(s for s in t.seeds if t.row_keys[s] not in finished)
        if left:
            todo_trials[t.key] = dataclasses.replace(t, seeds=left)
    all_rows = {k for t in trials for k in t.row_keys.values()}
    todo_rows = {t.row_keys[s] for t in todo_trials.values() for s in t.seeds}
    sw = Sweep(cfg, inputs, fp, todo_trials, store, tables, git_sha(code_dir), versions(), starts, val.size - 1)
    log(f"healing_grid: {len(trials)} trials × {len(cfg.grid.seeds)} seed(s) = {len(all_rows)} rows "
        f"({len(all_rows) - len(todo_rows)} already in {run_dir / 'trials.parquet'}"
        f"{f', {pulled} parts taken from {store.uri}' if pulled else ''}); {cfg.ranks} {cfg.device.upper()} ranks per trial, "
        f"{cfg.ttt.max_tokens or 'all'} validation tokens per row")
    outcome = Outcome(run_dir, all_rows, todo_rows)
    if cfg.dry_run:
        for line in dry_run_plan(sw, targets):
            log(line)
        outcome.dry_run = True
        return outcome
    ray = start_ray(cfg, log)
    if cfg.dashboard:
        sw.live = live_metrics()
    try:
        concurrency = max_concurrent(ray, cfg, log)
        if todo_trials:
            refs = prepare_artifacts(ray, sw, log)
            configs = [trial_config(sw, t) for t in todo_trials.values()]
            outcome.interrupted = run_trials(ray, sw, configs, refs, concurrency, log)
    except KeyboardInterrupt:
        outcome.interrupted = True
    finally:
        outcome.wall_seconds = time.perf_counter() - t_start
        write_manifest(sw, run_dir, {"started_rows": len(todo_rows), "wall_seconds": outcome.wall_seconds,
                                     "interrupted": outcome.interrupted, "storage": store.uri,
                                     "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S")})
        ray.shutdown()
        tables.compact()
    return outcome
