"""A sweep's settings and its plan, decided before Ray starts.

`SweepConfig` holds every setting of a sweep (the CLI and grid files change
it through `config.override`). `plan` turns it into trials: one Tune trial
per regime and setting (inner lr, chunk size, epochs, optimizer, adapted
parameters), each evaluating the grid's seeds in turn on one Ray Train
worker group, and one table row per seed. Every row gets three keys:

- `trial_id`: the cell (input fingerprint, device, ranks, regime, quant and
  TTT settings, seed) — a resumed sweep skips rows already in the table;
- `setting_key`: the same without the seed — the rows an interval is taken over;
- `control_key`: the same without the regime — the fp row with a regime
  row's control key is its control, matched on every setting at once.

Bad values (an unknown regime, a seed that cannot mean other text, a chunk
larger than the stream) raise here, in the driver, before any node starts.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

from e2ettt.config import ConfigError, config_hash, override
from e2ettt.quant.regimes import QuantConfig, parse_regime
from e2ettt.source import SourceConfig
from e2ettt.ttt import TTTConfig


@dataclass(frozen=True)
class Grid:
    regimes: tuple = ("fp", "gptq-int3", "int3", "int2")  # fp is the control; damage spans ~0.01 to ~0.4 bpb
    lrs: tuple = (1e-4, 0.03, 3.0)  # too small to matter .. helps .. diverges
    chunks: tuple = (512, 2048)  # chunk_tokens; >= 2 windows of context each, so both ranks have work
    seeds: tuple = (0, 1, 2, 3, 4, 5)  # validation segments (under a cap), run in turn in one trial; best: chosen on 0-2
    epochs: tuple = (1,)
    optimizers: tuple = ("sgd",)
    params: tuple = ("all",)  # all | norms | lora:R


@dataclass(frozen=True)
class SweepConfig:
    name: str = "demo"  # runs/<name>/
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
    stop_threshold: float = 0.02  # end a trial whose running recovery is below -this (bpb): TTT is hurting; 0 = never
    stop_min_fraction: float = 0.25  # ... judged only after this fraction of a seed's tokens
    scheduler: str = "fifo"  # fifo | asha: also rank trials by running recovery at rungs of tokens seen
    rerun_stopped: bool = False  # rerun rows a stopper ended (otherwise they count as done, like diverged ones)
    dashboard: bool = False  # start Ray's dashboard (local Ray) and export live per-trial metrics to it
    verbose: bool = False  # let Ray and Tune print their own status output
    dry_run: bool = False  # print the plan (trials, tokens, projected time, GPU-hours, cost) and exit before Ray starts
    usd_per_node_hour: float = 0.0  # on-demand price of a GPU node, for the plan's cost line; 0 = not shown
    gpus_per_node: int = 8  # GPUs of the cluster's node type (p5.48xlarge: 8), for node-hours
    fault: str = ""  # tests only: JSON fault injection {"regime or setting key": {...}}

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
        ]
        for ok, msg in checks:
            if not ok:
                raise ValueError(msg)

    @property
    def ranks(self) -> int:
        return self.gpus_per_trial or self.workers

    @property
    def device(self) -> str:
        return "cuda" if self.gpus_per_trial else "cpu"

    @property
    def on_cluster(self) -> bool:
        return bool(self.address)

    @property
    def worker_start_timeout(self) -> float:
        return self.start_timeout or (1800.0 if self.on_cluster else 120.0)


@dataclass(frozen=True)
class Trial:
    """One Tune trial: a regime at one setting, evaluated at each seed in turn."""

    key: str  # setting key of the regime's rows (the Train run is named after it)
    regime: str
    ttt: TTTConfig  # seed 0; each seed's config replaces it
    seeds: tuple[int, ...]
    row_keys: dict  # seed -> trial_id
    control_keys: dict  # seed -> control_key

    def at_seed(self, seed: int) -> TTTConfig:
        return dataclasses.replace(self.ttt, seed=seed)

    @property
    def label(self) -> str:
        return f"{self.regime} lr={self.ttt.lr:g} chunk={self.ttt.chunk_tokens}"


def _settings(cfg: SweepConfig) -> list[TTTConfig]:
    g = cfg.grid
    if not g.regimes or not g.lrs or not g.chunks or not g.seeds or not g.epochs or not g.optimizers or not g.params:
        raise ConfigError("grid: regimes, lrs, chunks, seeds, epochs, optimizers and params each need at least one value")
    out = []
    for lr in g.lrs:
        if not (isinstance(lr, (int, float)) and not isinstance(lr, bool) and math.isfinite(lr) and lr >= 0):
            raise ConfigError(f"grid.lrs: {lr!r} is not a finite learning rate >= 0")
        for chunk in g.chunks:
            for epochs in g.epochs:
                for opt in g.optimizers:
                    for params in g.params:
                        out.append(override(cfg.ttt, {"lr": lr, "chunk_tokens": chunk, "seed": 0, "epochs": epochs,
                                                      "optimizer": opt, "params": params}))
    return out


def plan(cfg: SweepConfig, fingerprint: str) -> list[Trial]:
    """Every trial of the grid, with the keys of its rows (regimes and settings validated here)."""
    cfg.validate()
    for regime in cfg.grid.regimes:
        parse_regime(regime)
    seeds = tuple(dict.fromkeys(int(s) for s in cfg.grid.seeds))
    if any(s < 0 for s in seeds):
        raise ConfigError(f"grid.seeds must be >= 0, got {list(seeds)}")
    base = {"inputs": fingerprint, "quant": dataclasses.asdict(cfg.quant), "device": cfg.device, "ranks": cfg.ranks}
    trials = []
    for regime in dict.fromkeys(cfg.grid.regimes):
        for ttt in _settings(cfg):
            ttt_d = dataclasses.asdict(ttt)
            trials.append(Trial(
                key=config_hash({**base, "regime": regime, "ttt": {**ttt_d, "seed": None}}, 16),
                regime=regime, ttt=ttt, seeds=seeds,
                row_keys={s: config_hash({**base, "regime": regime, "ttt": {**ttt_d, "seed": s}}, 16) for s in seeds},
                control_keys={s: config_hash({**base, "ttt": {**ttt_d, "seed": s}}, 16) for s in seeds},
            ))
    return trials
