"""Autoscaling on this machine: trials in flight against capacity, start-up on new nodes against warm ones.

Starts a Ray head with Ray's fake multi-node provider (0 worker nodes, at
most `--nodes`, each with 2 CPUs: one 2-rank trial per node), then runs the
demo's smoke grid over four regimes twice: first cold (every node is added
by the autoscaler while trials wait), then warm (same grid under a new
name, the nodes still up). Reports the capacity the sweep sized itself to,
the most trials seen running at once (from the rows' worker-side start and
end times), and the per-trial start-up (trial driver start until rank 0
runs: placement, node boot, worker-group start).

    python benchmarks/fake_cluster.py [--nodes 2] [healing_grid flags]
    python benchmarks/fake_cluster.py --smoke [--checkpoint F --data DIR --tokenizer F ...]

--smoke: at most 1 node (unless --nodes says otherwise), healing_grid's smoke grid cut to its fp setting
(one trial, one seed) and the cold run only (its rows fill both lines of the table); the table is printed,
not recorded. Other flags go on to healing_grid.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import REPO, record, scratch

from e2ettt.launch import free_port
from e2ettt.testing import fake_autoscaling_config, ray_node


def in_flight(trials: pd.DataFrame) -> int:
    """Most trials whose [start, end] on their nodes overlap at one instant."""
    spans = trials.groupby("trial_key").agg(start=("started_at", "min"), end=("ended_at", "max"))
    events = sorted([(s, 1) for s in spans["start"]] + [(e, -1) for e in spans["end"]])
    best = now = 0
    for _, step in events:
        now += step
        best = max(best, now)
    return best


def sweep(name: str, port: int, config: Path, out: Path, flags: list[str]) -> tuple[pd.DataFrame, float]:
    t0 = time.perf_counter()
    subprocess.run([sys.executable, str(REPO / "sweeps" / "healing_grid.py"), "--smoke", *flags, "--name", name,
                    "--out", str(out), "--address", f"127.0.0.1:{port}", "--cluster-config", str(config),
                    "--settings-per-trial", "1"], check=True, cwd=REPO)
    return pd.read_parquet(out / name / "trials.parquet"), time.perf_counter() - t0


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--nodes", type=int, help="most worker nodes the autoscaler may add (default 2; --smoke: 1)")
    p.add_argument("--smoke", action="store_true", help="1 node, the smoke grid's fp setting; print, do not record")
    args, flags = p.parse_known_args(argv)
    args.nodes = args.nodes or (1 if args.smoke else 2)
    grid = (["--regimes", "fp"] if args.smoke else ["--regimes", "fp,int3,int4,int2", "--seeds", "0,1"]) + flags
    if args.smoke:
        with scratch(True) as work:
            measure(args.nodes, grid, work, smoke=True)
    else:
        measure(args.nodes, grid, Path(tempfile.mkdtemp(prefix="e2ettt-fake-cluster-")), smoke=False)


def measure(nodes: int, grid: list[str], work: Path, smoke: bool) -> None:
    """The cold and the warm run on a fake cluster of at most `nodes` worker nodes, and their table."""
    import ray as ray_module

    port = free_port()
    config = work / "autoscaler.yaml"
    gcs = f"{ray_module._private.services.get_node_ip_address()}:{port}"
    config.write_text(yaml.safe_dump(fake_autoscaling_config(gcs, worker_cpus=2, max_workers=nodes)))
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    with ray_node("--head", f"--port={port}", f"--autoscaling-config={config}", "--num-cpus=0",
                  "--resources={\"trial_driver\": 8}", "--include-dashboard=false", "--disable-usage-stats",
                  env={"RAY_FAKE_CLUSTER": "1", "AUTOSCALER_UPDATE_INTERVAL_S": "1"}):
        cold, cold_wall = sweep("cold", port, config, work, grid)
        # a smoke run measures its one sweep twice: the warm run has the same flags, only the nodes already up
        warm, warm_wall = (cold, cold_wall) if smoke else sweep("warm", port, config, work, grid)
    rows = []
    runs = (("cold: nodes added by the autoscaler", cold, cold_wall), ("warm: nodes already up", warm, warm_wall))
    for label, trials, wall in runs:
        per_trial = trials.groupby("trial_key")["startup_seconds"].min()
        ok = int((trials["status"] == "ok").sum())
        rows.append({"run": label, "trials": len(per_trial), "rows ok": f"{ok} of {len(trials)}",
                     "capacity (trials at once)": nodes, "most in flight": in_flight(trials),
                     "worker nodes used": trials["node_id"].nunique(),
                     "start-up s/trial (median)": float(per_trial.median()), "start-up s/trial (max)": float(per_trial.max()),
                     "wall s": wall})
    regimes, seeds = cold["regime"].nunique(), cold["seed"].nunique()
    record(f"Fake autoscaling cluster (0 to {nodes} worker nodes of 2 CPUs, demo smoke grid × {regimes} regimes × {seeds} "
           f"seeds)", rows, ["start-up = trial driver start until rank 0 runs the trial (placement group, node start, worker "
                             "group)", "most in flight: from the rows' worker-side start and end times; capacity: what the "
                             "sweep sized itself to from the autoscaler config"], append=not smoke)


if __name__ == "__main__":
    main()
