"""Where a sweep runs: a local Ray or a cluster, how many trials it holds at once, and what is up now.

`start_ray` starts a local Ray of this machine's cores (even if an earlier
`ray start` left an address behind) or joins the cluster at `address`.
`concurrency` is the one answer to "how many trials at once": the
`--max-concurrent` flag, else what the cluster holds at its largest (the
autoscaler config the head was started with, not the nodes up now, so
that pending trials make the autoscaler add nodes), else what is up now.
`refuse_unoffered` turns a GPU count no node can give into one line before
Ray starts; `wait_for_workers` waits, printing where it stands, until the
cluster can place one trial's workers, and ends the sweep with one line
after the start timeout if it never can.
"""
from __future__ import annotations

import os
import socket
import time
from pathlib import Path

import ray
import yaml

from e2ettt.config import ConfigError
from e2ettt.plan import SweepConfig

BOOTSTRAP_CONFIG = "~/ray_bootstrap_config.yaml"  # where `ray up` leaves the autoscaler config on the head


def start_ray(cfg: SweepConfig, log=print) -> bool:
    """A local Ray of this machine's cores, or the cluster at `cfg.address`; returns whether it started one (the
    caller then shuts it down). A Ray this process is already connected to, with no `--address` given, is used as
    it is and left running, as Ray Tune does (a notebook's, or a test session's shared one)."""
    if ray.is_initialized():
        if cfg.address:
            raise ConfigError(f"--address {cfg.address}: this process is already connected to a Ray; "
                              "leave --address out to use it, or call ray.shutdown() first")
        log("  using the Ray this process is already connected to")
        return False
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    # Read by each trial's Ray Train controller: a report waits for the previous one to be polled; with the
    # dashboard, Train runs and their workers are shown in it.
    train_env = {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.2"}
    if cfg.dashboard:
        train_env["RAY_TRAIN_ENABLE_STATE_TRACKING"] = "1"
    for key, value in train_env.items():
        os.environ.setdefault(key, value)  # a local Ray's processes inherit the driver's environment ...
    quiet = {"include_dashboard": cfg.dashboard, "log_to_driver": cfg.verbose, "configure_logging": True,
             "logging_level": "INFO" if cfg.verbose else "ERROR"}
    if cfg.address:
        quiet.pop("include_dashboard")  # a cluster's dashboard is the head's
        # ... a cluster's were started by `ray start` on each node: the job's runtime environment carries it there
        context = ray.init(address=cfg.address, runtime_env={"env_vars": {k: os.environ[k] for k in train_env}}, **quiet)
    else:
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")
        forget_dead_address(log)
        context = ray.init(address="local", num_cpus=max(local_cpus(cfg), cfg.workers * cfg.cpus_per_worker),
                           num_gpus=None if cfg.gpus_per_trial else 0, resources={"trial_driver": 64}, **quiet)
    if cfg.dashboard:
        log(f"  dashboard: http://{context.dashboard_url} (Train runs; e2ettt_* metrics in its Metrics view with "
            "Prometheus/Grafana set up as Ray's docs describe)")
    return True


def forget_dead_address(log=print) -> bool:
    """Remove the address `ray start` left in Ray's temp directory when no Ray listens there any more, as `ray stop`
    would have; returns whether it did. A head stopped any other way (killed, crashed, a reboot) leaves the file, and
    the processes of a local Ray read it whenever they look for the State API: each trial's Ray Train placement-group
    cleaner then waits on a dead address for about 12 s before the trial can end."""
    from ray._common.utils import get_ray_address_file, reset_ray_address

    path = Path(get_ray_address_file(None))
    try:
        address = path.read_text().strip()
    except OSError:
        return False  # none (or not ours to read)
    try:
        host, port = address.rsplit(":", 1)
        with socket.create_connection((host, int(port)), timeout=1.0):
            return False  # a Ray is up there: its file, not ours to touch
    except (OSError, ValueError):
        pass
    reset_ray_address()
    log(f"  removed {path}: it named {address}, where no Ray listens (a head stopped without `ray stop`)")
    return True


def local_cpus(cfg: SweepConfig) -> int:
    return cfg.local_cpus or os.cpu_count() or 1


def trial_demand(cfg: SweepConfig) -> dict[str, float]:
    """Resources one trial's workers take (its driver takes a `trial_driver` slot besides)."""
    demand = {"CPU": cfg.ranks * cfg.cpus_per_worker}
    if cfg.gpus_per_trial:
        demand["GPU"] = cfg.gpus_per_trial
    return demand


def read_cluster_config(cfg: SweepConfig) -> tuple[dict | None, str]:
    """The autoscaler config to size the sweep from (`--cluster-config`, or the head's when joining), if any."""
    given = cfg.cluster_config or (BOOTSTRAP_CONFIG if cfg.address else "")
    if not given:
        return None, ""
    path = Path(given).expanduser()
    if not path.is_file():
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


def concurrency(cfg: SweepConfig, resources_now: dict | None = None, log=None) -> int | None:
    """Trials in flight: --max-concurrent, else what the autoscaler config holds at its largest, else what
    `resources_now` (the cluster's resources; None before Ray starts) holds; None if nothing tells."""
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
        if log:
            log(f"  cluster: up to {nodes} worker nodes ({path}) hold {trials} trial(s) at once; running {n} at a time")
        return n
    drivers = int(resources_now.get("trial_driver", 0)) if resources_now is not None else None
    if cfg.address and drivers == 0:  # Tune would wait for it forever, --max-concurrent or not
        raise ConfigError(f"--address {cfg.address}: no node of this cluster has the 'trial_driver' resource that trial "
                          "drivers run in; start its head with ray start --head --resources='{\"trial_driver\": 8}' "
                          "(README: One GPU machine)")
    if cfg.max_concurrent:
        return cfg.max_concurrent
    if resources_now is None:
        return None if cfg.address else max(1, int(local_cpus(cfg) // demand["CPU"]))
    up = max(1, min([int(resources_now.get(r, 0) // need) for r, need in demand.items()] + [drivers], default=1))
    if cfg.address and log:
        log(f"  cluster: no autoscaler config found ({BOOTSTRAP_CONFIG} or --cluster-config); sizing from the "
            f"resources up now: {up} trial(s) at once (--max-concurrent to change)")
    return up


def refuse_unoffered(cfg: SweepConfig) -> None:
    """A local Ray offers this machine's GPUs only: more per trial than it has is one line, before Ray starts.
    (On a cluster, `concurrency` checks the autoscaler config's node types; with none, `wait_for_workers` waits.)"""
    if not cfg.gpus_per_trial or cfg.address:
        return
    import torch

    have = torch.cuda.device_count()
    if cfg.gpus_per_trial > have:
        raise ConfigError(f"--gpus-per-trial {cfg.gpus_per_trial}: this machine has {have} GPU(s), and a local Ray "
                          "offers only its own (join a cluster with GPU nodes: --address)")


def wait_for_workers(cfg: SweepConfig, log=print) -> None:
    """Returns once the cluster can place one trial's workers (on an autoscaling cluster, the request brings a node
    up). Prints where it stands every `progress_seconds`; after the start timeout, raises TimeoutError naming what
    no node offered. The preparation tasks need a subset of the same resources, so they cannot wait silently."""
    from ray.util.placement_group import placement_group, remove_placement_group

    per_worker = {"CPU": cfg.cpus_per_worker, **({"GPU": 1} if cfg.gpus_per_trial else {})}
    pg = placement_group([per_worker] * cfg.ranks, strategy="STRICT_PACK" if cfg.gpus_per_trial else "PACK")
    placed, limit, t0 = pg.ready(), cfg.worker_start_timeout, time.monotonic()
    try:
        while True:
            waited = time.monotonic() - t0
            ready, _ = ray.wait([placed], timeout=max(0.0, min(cfg.progress_seconds, limit - waited)))
            if ready:
                if waited >= cfg.progress_seconds:
                    log(f"  nodes ready after {time.monotonic() - t0:.0f} s; {standing(cfg)}")
                return
            waited = time.monotonic() - t0
            need = f"{cfg.ranks} worker(s) × {per_worker}{' on one node' if cfg.gpus_per_trial else ''}"
            if waited >= limit:
                raise TimeoutError(f"no node offered {need} within --start-timeout {limit:g} s ({standing(cfg)}): "
                                   "nodes that never came up (quota, capacity, launch errors: `ray monitor cluster.yaml`) "
                                   "or a resource no node type has")
            log(f"  waiting for nodes: {waited:.0f} of {limit:g} s for {need}; {standing(cfg)}")
    finally:
        remove_placement_group(pg)


def standing(cfg: SweepConfig) -> str:
    """Nodes up and what they offer, for progress lines."""
    alive = [n for n in ray.nodes() if n.get("Alive")]
    key = "GPU" if cfg.gpus_per_trial else "CPU"
    units = sum(n["Resources"].get(key, 0) for n in alive)
    return f"cluster: {len(alive)} node(s) up with {units:g} {key} ({trial_demand(cfg)[key]:g} {key} per trial)"


def live_metrics():
    """Per-trial running numbers as Ray metrics (Prometheus, shown in the dashboard's Metrics view)."""
    from ray.util.metrics import Gauge

    tags = ("setting", "regime", "seed")
    gauges = {name: Gauge(f"e2ettt_{name}", description=text, tag_keys=tags) for name, text in (
        ("running_ttt_bpb", "running bpb of score-first TTT"), ("running_static_bpb", "running bpb without TTT"),
        ("running_recovery", "running static - TTT bpb (negative: TTT hurts)"), ("tokens_seen", "tokens scored"))}

    def update(result: dict) -> None:
        labels = {"setting": result["setting_key"], "regime": result["regime"], "seed": str(result["seed"])}
        for name, gauge in gauges.items():
            if name in result:
                gauge.set(float(result[name]), tags=labels)

    return update
