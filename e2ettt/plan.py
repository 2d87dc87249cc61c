"""A sweep's settings, its plan and the `Sweep` it yields, all decided before Ray starts.

`SweepConfig` holds every setting of a sweep (flags, grid files and `--set`
change it through `config.override`). `plan` turns it into settings: a
setting is a regime at one inner lr, chunk size, epochs, optimizer and
adapted-parameter choice, and a row is a setting at one seed. `pack` puts
the settings into trials: a trial (one Tune trial, one Ray Train worker
group) runs its settings one after the other, each at every seed in turn,
so that they share one start-up. The plan computes, once, everything a row
needs and everything that refers to it:

- `row_id`: inputs fingerprint, device, ranks, regime, quant and TTT
  settings, seed and segment; a resumed sweep skips rows already written;
- `setting_key`: the same without the seed and segment: the rows an
  interval is taken over;
- `control_key`: the same without the regime: the fp row with a regime
  row's control key is its control, matched on every setting at once;
- the segment of the validation stream the row evaluates, and the keys of
  the artifacts it reads (the regime's weights, its static curve and fp's).

Every check fails before any node starts: the settings' own in
`SweepConfig.validate` (run whenever a config is built), those against the
inputs (segments, chunk sizes, regimes the model can take) in `preflight`.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from e2ettt import artifacts, data, faults
from e2ettt.artifacts import Needs, Windowing
from e2ettt.config import ConfigError, config_hash, override
from e2ettt.evaluate import chunk_spans
from e2ettt.provenance import git_sha, versions
from e2ettt.quant.regimes import QuantConfig, parse_regime
from e2ettt.source import Inputs, SourceConfig, fingerprint, load_split
from e2ettt.storage import Store
from e2ettt.ttt import TTTConfig

if TYPE_CHECKING:  # the tables (pandas, pyarrow) are the driver's: trial workers import this module without them
    from e2ettt.tables import RunTables


@dataclass(frozen=True)
class Grid:
    # fp is the control; GPTQ and RTN int3 (~0.12 and ~0.19 bpb of damage on the reference model); a broken model of
    # the SpinQuant failure class (rotated weights decoded with another rotation, ~+3 bpb) and noise of about the same
    regimes: tuple = ("fp", "gptq-int3", "int3", "hadamard-int6-mismatch", "noise-0.93")  # quantization regimes
    # log-spaced: the best lr grows with the damage (0.1 for fp, 1 and more broken)
    inner_lrs: tuple = (0.03, 0.1, 0.3, 1.0, 3.0)  # inner learning rates
    # >= 2 windows of context each, so both ranks have work
    chunks: tuple = (512,)  # chunk sizes in target tokens (ttt.chunk_tokens)
    # run in turn in one trial; the best setting is chosen on the first half and reported on the second (10 and 10:
    # enough for a paired test to survive a correction); seed 0, the stream's opening scored without context, is left out
    seeds: tuple = tuple(range(1, 21))  # segments of the validation stream (distinct, non-overlapping; need max_tokens)
    epochs: tuple = (1,)  # passes over each chunk after scoring it
    optimizers: tuple = ("sgd",)  # inner optimizers (ttt.optimizer)
    params: tuple = ("all",)  # adapted parameters: all, norms, lora:R

    def validate(self) -> None:
        """The grid's own checks; its regimes are checked with the sweep's artifacts (`check_regimes`)."""
        for f in dataclasses.fields(self):
            values = getattr(self, f.name)
            if not values:
                raise ConfigError(f"grid.{f.name}: needs at least one value")
            repeated = sorted({str(v) for v in values if list(values).count(v) > 1})
            if repeated:
                raise ConfigError(f"grid.{f.name}: {', '.join(repeated)} given more than once")
        for lr in self.inner_lrs:
            if not (isinstance(lr, (int, float)) and not isinstance(lr, bool) and math.isfinite(lr) and lr >= 0):
                raise ConfigError(f"grid.inner_lrs: {lr!r} is not a finite learning rate >= 0")


def check_regimes(regimes, own: tuple[str, ...] = ()) -> None:
    """Every regime is a built-in form or the name of one of your own artifacts, which no built-in form may take."""
    for name in own:
        try:
            parse_regime(name)
        except ValueError:
            continue
        raise ConfigError(f"--artifact {name}=...: {name} is a built-in regime; give your artifact another name")
    for regime in regimes:
        parse_regime(regime, own)


@dataclass(frozen=True)
class SweepConfig:
    name: str = "demo"  # run name: tables go to OUT/NAME/
    out: str = "runs"  # parent directory of runs on the driver's machine
    storage: str = ""  # Tune/Train state and copies of artifacts and tables: a path or s3://, gs://, ... URI; empty = out
    source: SourceConfig = field(default_factory=SourceConfig)
    quant: QuantConfig = field(default_factory=QuantConfig)
    ttt: TTTConfig = field(default_factory=TTTConfig)  # settings shared by every trial
    grid: Grid = field(default_factory=Grid)
    workers: int = 2  # ranks per trial (CPU); with GPUs, one per GPU
    cpus_per_worker: int = 1  # CPU threads per rank (and per preparation task)
    gpus_per_trial: int = 0  # 0 = CPU (gloo); N = N ranks with one GPU each (NCCL); prep tasks then take one GPU
    max_worker_failures: int = 1  # a killed worker (or a preempted node) restarts the trial's worker group this often
    address: str = ""  # Ray address; empty = start a local Ray, "auto" = join the cluster this machine belongs to
    local_cpus: int = 0  # logical CPUs of a local Ray; 0 = the machine's cores (start-up is CPU-bound: oversubscribing is slower)
    max_concurrent: int = 0  # trials in flight; 0 = what the cluster can hold at its largest (autoscaler config)
    cluster_config: str = ""  # autoscaler config to size concurrency from; empty = ~/ray_bootstrap_config.yaml if joining
    start_timeout: float = 0.0  # seconds a trial may wait for its workers (nodes booting); 0 = 120 locally, 1800 on a cluster
    progress_seconds: float = 30.0  # how often the sweep prints where it stands
    report_seconds: float = 2.0  # how often a running trial sends its running numbers and new chunks to Tune
    stop_threshold: float = 0.02  # end a setting whose running recovery is below -this (bpb): TTT is hurting; 0 = never
    stop_min_fraction: float = 0.25  # ... judged only after this fraction of a seed's tokens
    scheduler: str = "fifo"  # fifo | asha: also cut settings by running recovery at rungs of tokens seen
    rerun_stopped: bool = False  # rerun rows a stopper ended (otherwise they count as done, like diverged ones)
    dashboard: bool = False  # start Ray's dashboard (local Ray) and export live per-trial metrics to it
    verbose: bool = False  # let Ray and Tune print their own status output
    dry_run: bool = False  # print the plan (trials, tokens, projected time, GPU-hours, cost) and exit before Ray starts
    usd_per_node_hour: float = 0.0  # on-demand price of a GPU node, for the plan's cost line; 0 = not shown
    gpus_per_node: int = 8  # GPUs of the cluster's node type (p5.48xlarge: 8), for node-hours
    settings_per_trial: int = 0  # settings one trial runs in turn (one start-up for all); 0 = as many as keep every slot busy
    faults: str = ""  # JSON by regime: faults a test injects into its trials (e2ettt/faults.py); empty = none

    def validate(self) -> None:
        checks = [
            (self.name and "/" not in self.name, f"name must be a non-empty directory name, got {self.name!r}"),
            (self.workers >= 1, f"workers must be >= 1, got {self.workers}"),
            (self.cpus_per_worker >= 1, f"cpus_per_worker must be >= 1, got {self.cpus_per_worker}"),
            (0 <= self.gpus_per_trial <= 64, f"gpus_per_trial must be in 0..64, got {self.gpus_per_trial}"),
            (self.max_worker_failures >= 0, f"max_worker_failures must be >= 0, got {self.max_worker_failures}"),
            (self.local_cpus >= 0, f"local_cpus must be >= 0, got {self.local_cpus}"),
            (self.max_concurrent >= 0, f"max_concurrent must be >= 0, got {self.max_concurrent}"),
            (self.start_timeout >= 0, f"start_timeout must be >= 0 seconds, got {self.start_timeout}"),
            (self.progress_seconds > 0, f"progress_seconds must be > 0, got {self.progress_seconds}"),
            (self.report_seconds > 0, f"report_seconds must be > 0, got {self.report_seconds}"),
            (self.stop_threshold >= 0, f"stop_threshold must be >= 0 bpb, got {self.stop_threshold}"),
            (0 <= self.stop_min_fraction <= 1, f"stop_min_fraction must be in [0, 1], got {self.stop_min_fraction}"),
            (self.scheduler in ("fifo", "asha"), f"scheduler must be fifo or asha, got {self.scheduler!r}"),
            (self.settings_per_trial >= 0, f"settings_per_trial must be >= 0, got {self.settings_per_trial}"),
        ]
        for ok, msg in checks:
            if not ok:
                raise ValueError(msg)
        faults.parse(self.faults)
        check_regimes(self.grid.regimes, self.source.artifact_names)
        settings(self)  # each setting of the grid passes TTTConfig's checks

    @property
    def ranks(self) -> int:
        return self.gpus_per_trial or self.workers

    @property
    def device(self) -> str:
        return "cuda" if self.gpus_per_trial else "cpu"

    @property
    def worker_start_timeout(self) -> float:
        return self.start_timeout or (1800.0 if self.address else 120.0)


@dataclass(frozen=True)
class RowSpec:
    """One row: a setting at one seed."""

    row_id: str
    seed: int
    segment_start: int  # first validation token of the segment
    prefix: int  # tokens before it that serve as context, never scored
    control_key: str
    weights: str  # artifact key of the regime's weights for this row (damage families draw theirs per seed)
    draw_seed: int  # the rotation, share and noise seed those weights were made with
    static: str  # artifact key: the regime's static curve over this row's windows
    fp_static: str  # ... and the unquantized model's


@dataclass(frozen=True)
class SettingSpec:
    """One regime at one TTT setting, with a row per seed."""

    setting_key: str
    regime: str
    ttt: TTTConfig  # seed 0; each row runs at its own seed
    rows: tuple[RowSpec, ...]
    protected: bool  # an fp control that regime rows are matched to: never stopped early

    @property
    def label(self) -> str:
        """"int3 lr=0.03 chunk=512", with what TTT does differently from the default (params=lora:8, ...)."""
        t = self.ttt
        other = [f"{k}={v}" for k, v, default in (("recipe", t.recipe, ""), ("params", t.params, "all"),
                                                  ("optimizer", t.optimizer, "sgd"), ("epochs", t.epochs, 1),
                                                  ("reset", t.reset, "never")) if v != default]
        return " ".join([f"{self.regime} lr={t.inner_lr:g} chunk={t.chunk_tokens}", *other])


@dataclass(frozen=True)
class TrialSpec:
    """What one trial runs, its settings one after the other (a value: it reaches every rank as it is)."""

    key: str  # names the trial's Train run
    inputs: Inputs
    settings: tuple[SettingSpec, ...]
    world_size: int
    threads: int  # CPU threads per rank
    report_seconds: float
    faults: str = ""  # what a test injects (`faults`): JSON by regime; empty in a user's run

    @property
    def label(self) -> str:
        first = self.settings[0].label
        return first if len(self.settings) == 1 else f"{first} and {len(self.settings) - 1} more setting(s)"

    @property
    def regimes(self) -> list[str]:
        return list(dict.fromkeys(s.regime for s in self.settings))

    @property
    def rows(self) -> list[tuple[SettingSpec, RowSpec]]:
        return [(s, r) for s in self.settings for r in s.rows]

    def without(self, done: set[str]) -> TrialSpec | None:
        """The trial with the rows in `done` left out (None if nothing is left)."""
        settings = tuple(dataclasses.replace(s, rows=rows) for s in self.settings
                         if (rows := tuple(r for r in s.rows if r.row_id not in done)))
        return (make_trial(settings, self.inputs, self.world_size, self.threads, self.report_seconds, self.faults)
                if settings else None)


def plan_settings(fingerprint: str, regime: str, ttts: list[TTTConfig], starts: dict[int, int], quant: QuantConfig,
                  device: str, world_size: int, protected: bool = False, own: dict | None = None) -> list[SettingSpec]:
    """A regime's settings: every key of each setting and of its rows, and the artifacts they read. `own`: the
    user's artifacts (`Inputs.artifacts`); an own regime's rows are keyed by its file's hash too, its control key
    is every other regime's."""
    own = own or {}
    base = {"inputs": fingerprint, "quant": dataclasses.asdict(quant), "device": device, "ranks": world_size}
    mine = {"regime": regime, **({"artifact": own[regime]["sha256"]} if regime in own else {})}
    dtype = ttts[0].dtype if ttts else "fp32"
    spec = parse_regime(regime, own)
    fp_weights = artifacts.weights_key(fingerprint, "fp", quant, device, dtype)
    drawn = {seed: draw_seed(quant, spec, seed) for seed in starts}
    weights = {seed: artifacts.weights_key(fingerprint, regime, dataclasses.replace(quant, rotation_seed=drawn[seed]),
                                           device, dtype, own.get(regime)) for seed in starts}
    out = []
    for ttt in ttts:
        d = dataclasses.asdict(ttt)
        rows = []
        for seed, start in starts.items():
            at = {"ttt": {**d, "seed": seed}, "segment_start": start}
            windowing = Windowing.of(ttt, start)
            rows.append(RowSpec(
                row_id=config_hash({**base, **mine, **at}, 16), seed=seed, segment_start=start,
                prefix=windowing.prefix, control_key=config_hash({**base, **at}, 16), weights=weights[seed],
                draw_seed=drawn[seed], static=artifacts.static_key(weights[seed], windowing, device),
                fp_static=artifacts.static_key(fp_weights, windowing, device)))
        key = config_hash({**base, **mine, "ttt": {**d, "seed": None}}, 16)
        out.append(SettingSpec(key, regime, ttt, tuple(rows), protected))
    return out


def draw_seed(quant: QuantConfig, regime, seed: int) -> int:
    """The seed a row's weights are made with: a damage family's draw (which weights a share treats, the wrong
    rotation, the noise) is new at every seed when `quant.draw_per_seed`, so that intervals cover the draw as well as
    the text; every other regime, and every regime without it, uses `quant.rotation_seed`."""
    return quant.rotation_seed + seed if quant.draw_per_seed and regime.draws else quant.rotation_seed


def make_trial(settings: tuple[SettingSpec, ...] | list[SettingSpec], inputs: Inputs, world_size: int, threads: int = 1,
               report_seconds: float = 2.0, faults: str = "") -> TrialSpec:
    """The one constructor of a trial: its settings, run in turn on one worker group, and the key that names it."""
    key = settings[0].setting_key if len(settings) == 1 else config_hash([s.setting_key for s in settings], 16)
    return TrialSpec(key, inputs, tuple(settings), world_size, threads, report_seconds, faults)


def pack(settings: list[SettingSpec], slots: int, per_trial: int = 0) -> list[list[SettingSpec]]:
    """Settings grouped into trials, in order: `per_trial` each, or (0) as few trials as keep `slots` trials busy.

    A trial pays a fixed cost to start (a Ray Train controller and worker processes that import torch, the
    process group, the model); settings packed into one trial share it, and each still gets its own rows,
    early-stopping verdicts and live reports."""
    if not settings:
        return []
    n = -(-len(settings) // per_trial) if per_trial else min(len(settings), max(1, slots))
    size, extra = divmod(len(settings), n)
    out, at = [], 0
    for i in range(n):
        take = size + (i < extra)
        out.append(settings[at : at + take])
        at += take
    return out


def settings(cfg: SweepConfig) -> list[TTTConfig]:
    """The grid's TTT settings (each validated), seed 0."""
    g = cfg.grid
    return [override(cfg.ttt, {"inner_lr": lr, "chunk_tokens": chunk, "seed": 0, "epochs": epochs, "optimizer": opt,
                               "params": params})
            for lr in g.inner_lrs for chunk in g.chunks for epochs in g.epochs for opt in g.optimizers for params in g.params]


def preflight(cfg: SweepConfig, inputs: Inputs, val: np.ndarray) -> dict[int, int]:
    """Every check of the settings against the inputs, before Ray starts (the settings' own checks ran when the
    config was built: `SweepConfig.validate`); returns each seed's segment start."""
    cfg.validate()
    starts = segments(val, cfg.ttt.max_tokens, cfg.grid.seeds, cfg.grid.chunks, cfg.ttt.heldout_tokens)
    artifacts.check_regimes(inputs, list(cfg.grid.regimes), cfg.quant)  # a regime the model cannot take
    return starts


def segments(val: np.ndarray, max_tokens: int, seeds, chunks, heldout: int = 0) -> dict[int, int]:
    """Each seed's segment start; a seed that cannot mean other text, or a chunk larger than a row's stream, fails."""
    data.heldout_span(val, max_tokens, heldout)  # the held-out slice fits beside a segment
    starts = {int(s): data.segment_start(val, max_tokens, int(s), heldout) for s in seeds}
    targets = data.segment(val, 0, max_tokens).size - 1
    for chunk in chunks:
        chunk_spans(targets, chunk)
    return starts


def plan(cfg: SweepConfig, fingerprint: str, starts: dict[int, int], own: dict | None = None) -> list[SettingSpec]:
    """Every setting of the grid, regime by regime (fp first when it is there), each with the grid's seeds."""
    protected = "fp" in cfg.grid.regimes and len(cfg.grid.regimes) > 1  # each fp setting is a control
    regimes = sorted(cfg.grid.regimes, key=lambda r: r != "fp")
    return [s for regime in regimes for s in plan_settings(fingerprint, regime, settings(cfg), starts, cfg.quant,
                                                           cfg.device, cfg.ranks, protected and regime == "fp", own)]


def needs(settings: list[SettingSpec], fingerprint: str, quant: QuantConfig, device: str, dtype: str) -> Needs:
    """The artifacts `settings` read: each regime's weights (fp's too: its static curves) and each static curve."""
    weights, static = {}, {}
    fp = artifacts.weights_key(fingerprint, "fp", quant, device, dtype)
    for s in settings:
        weights[fp] = ("fp", quant.rotation_seed)
        for r in s.rows:
            weights[r.weights] = (s.regime, r.draw_seed)
            windowing = Windowing.of(s.ttt, r.segment_start)
            static.update({r.static: (r.weights, windowing), r.fp_static: (fp, windowing)})
    return Needs(weights, static, {k: dtype for k in weights})


@dataclass(frozen=True)
class Sweep:
    """A planned sweep: the settings left to run and the trials they are packed into, where their rows go, and
    what they read."""

    cfg: SweepConfig
    inputs: Inputs
    fingerprint: str
    settings: tuple[SettingSpec, ...]  # with only the rows not yet in the table
    trials: tuple[TrialSpec, ...]  # the settings, packed
    all_rows: frozenset  # every row of the grid
    stream_targets: int  # target tokens of the whole validation stream
    row_targets: int  # target tokens of each row
    needs: Needs
    run_dir: Path
    store: Store  # Tune/Train state and artifact copies
    tables: RunTables
    pulled: int  # table parts taken from the storage URI
    git_sha: str
    versions: dict

    @property
    def todo(self) -> list[str]:
        return [r.row_id for s in self.settings for r in s.rows]

    def packed(self, slots: int) -> Sweep:
        """The same sweep with its settings packed for `slots` trials at once (or `settings_per_trial` each)."""
        cfg = self.cfg
        trials = tuple(make_trial(group, self.inputs, cfg.ranks, cfg.cpus_per_worker, cfg.report_seconds, cfg.faults)
                       for group in pack(list(self.settings), slots, cfg.settings_per_trial))
        return dataclasses.replace(self, trials=trials)


def open_sweep(cfg: SweepConfig, inputs: Inputs, code_dir: str | Path = ".", slots: int = 1) -> Sweep:
    """Check and plan `cfg` on `inputs`, leave out the rows the run directory already holds, and pack the
    rest into trials for `slots` trials at once."""
    from e2ettt.tables import RunTables

    fp = fingerprint(inputs)
    val = load_split(inputs, "val")
    starts = preflight(cfg, inputs, val)
    planned = plan(cfg, fp, starts, inputs.artifacts)
    run_dir = Path(cfg.out).expanduser().resolve() / cfg.name
    store = Store(cfg.storage or Path(cfg.out).expanduser())
    mirror = None if (store.local and Path(store.root) == run_dir.parent) else store
    tables = RunTables(run_dir, mirror, cfg.name)
    pulled = tables.pull()
    finished = tables.finished_ids(cfg.rerun_stopped)
    todo = tuple(dataclasses.replace(s, rows=rows) for s in planned
                 if (rows := tuple(r for r in s.rows if r.row_id not in finished)))
    made = needs(list(todo), fp, cfg.quant, cfg.device, cfg.ttt.dtype)
    sweep = Sweep(cfg, inputs, fp, todo, (), frozenset(r.row_id for s in planned for r in s.rows), val.size - 1,
                  data.segment(val, 0, cfg.ttt.max_tokens).size - 1, made, run_dir, store, tables, pulled,
                  git_sha(code_dir), versions())
    return sweep.packed(slots)
