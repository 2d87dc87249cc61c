"""Sweep overhead and memory: the default grid's wall time against its trials' TTT time.

Runs `python sweeps/healing_grid.py --name <fresh>` (the demo must be cached
for a clean figure) while sampling the resident memory of the whole process
tree (driver, raylet, Ray workers) every 0.5 s. Reports wall time, the sum of
TTT seconds, the overhead (wall − TTT sum, as a share of wall), per-trial
start-up (trial wall − TTT seconds), and peak memory per worker and overall.

    python benchmarks/sweep_overhead.py [extra healing_grid flags]
"""
from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import REPO, record


def tree_rss(proc: psutil.Process) -> int:
    total = 0
    for p in [proc] + proc.children(recursive=True):
        try:
            total += p.memory_info().rss
        except psutil.Error:
            pass
    return total


def ray_rss() -> int:
    """Ray's daemons run outside the driver's tree (setsid): add every ray:: and raylet process."""
    total = 0
    for p in psutil.process_iter(["name", "cmdline"]):
        try:
            cmd = " ".join(p.info["cmdline"] or [])
            if "ray::" in cmd or "raylet" in cmd or "gcs_server" in cmd or "ray/_private" in cmd:
                total += p.memory_info().rss
        except psutil.Error:
            pass
    return total


def main() -> None:
    name = f"bench-{time.strftime('%Y%m%d-%H%M%S')}"
    cmd = [sys.executable, str(REPO / "sweeps" / "healing_grid.py"), "--name", name, "--out", str(REPO / "runs")] + sys.argv[1:]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=REPO)
    handle = psutil.Process(proc.pid)
    peak = 0
    while proc.poll() is None:
        try:
            peak = max(peak, tree_rss(handle) + ray_rss())
        except psutil.Error:
            pass
        time.sleep(0.5)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"sweep failed with exit code {proc.returncode}")
    trials = pd.read_parquet(REPO / "runs" / name / "trials.parquet")
    ttt = trials["ttt_seconds"].sum()
    startup = trials.groupby("setting_key")["startup_seconds"].min().dropna()  # the first seed's row carries it
    rows = [{"trials": trials["setting_key"].nunique(), "rows": len(trials),
             "wall s": wall, "sum TTT s": ttt, "overhead s": wall - ttt,
             "overhead share": (wall - ttt) / wall, "start-up s/trial (median)": float(startup.median()),
             "peak RSS/worker MB (max)": float(trials["peak_rss_mb"].max()),
             "peak RSS whole sweep GB": peak / 2**30}]
    record("Sweep overhead and memory (default grid, demo cached)", rows, [
        "overhead = wall time of the whole command (Ray start, quantization, static curves, worker-group start-up, "
        "artifact loading, table writes) minus the sum of the trials' TTT seconds",
        "start-up s/trial = from the trial driver's start until rank 0 runs the trial (placement, worker-group start-up)",
        f"run: runs/{name}",
    ])


if __name__ == "__main__":
    main()
