"""Where a sweep's wall time goes: TTT against the fixed cost of starting trials, with one setting per trial and packed.

Runs the same grid twice under fresh names (the demo must be cached for a
clean figure): `--set settings_per_trial=1` (each setting its own trial, as
the sweep ran before trials held several settings) and the default
packing. For each run it reports the sweep's own closing line (rows, wall,
seconds inside TTT, the fixed share (wall − TTT) / wall), and the median
over trials of each part of a trial's start-up:

- before the trial's driver runs: Tune scheduling the trial (`startup_seconds`
  minus everything below);
- from the rows' timestamps: Tune starting the trial to its driver starting
  the Ray Train run; that to rank 0's process starting (the controller, its
  helper actors, the placement group, the worker processes); that to rank 0
  entering the trial (imports, process group, Train context); with Ray
  Train's own timings from its controller's log ("[Worker Group
  Initialization]" lines: placement group, worker actors created, train
  context initialized) beside them;
- on rank 0: artifact fetch and model build (the first row's
  `load_seconds`), and the set-up of every later row.

    python benchmarks/sweep_overhead.py [healing_grid flags]     # default: the grid of issue 22
    python benchmarks/sweep_overhead.py --smoke [--checkpoint F --data DIR --tokenizer F ...]

--smoke is healing_grid's own (its minimal grid), passed on with the rest; here it also sends the runs to a
temporary directory, runs only the packed sweep (the one-setting-per-trial sweep is planned with --dry-run, and its
column measured on the packed run) and prints the table without recording it.
"""
from __future__ import annotations

import glob
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import REPO, planned_only, record, scratch, shown

GRID = ["--regimes", "fp,int3", "--lrs", "0.01,0.03,0.1", "--chunks", "512", "--seeds", "0,1,2"]
CLOSING = re.compile(r"(\d+) of (\d+) rows written in (\d+) s wall \((\d+) s of it inside TTT\)")
PARTS = {"placement group": r"Placement group ready in ([\d.]+)s", "worker actors": r"worker actors created in ([\d.]+)s",
         "train context": r"Train context initialized on workers in ([\d.]+)s",
         "worker group total": r"Worker group startup completed in ([\d.]+)s total"}


def controller_parts(since: float) -> dict[str, float]:
    """Medians of Ray Train's own start-up timings, from the controller logs of runs started after `since`."""
    found: dict[str, list[float]] = {k: [] for k in PARTS}
    for path in glob.glob("/tmp/ray/session_*/logs/train/ray-train-sys-controller-*.log"):
        if os.path.getmtime(path) < since:
            continue
        for line in Path(path).read_text().splitlines():
            message = json.loads(line).get("message", "") if line.startswith("{") else line
            for part, pattern in PARTS.items():
                if m := re.search(pattern, message):
                    found[part].append(float(m.group(1)))
    return {part: float(pd.Series(v).median()) if v else float("nan") for part, v in found.items()}


def sweep(name: str, runs: Path, flags: list[str], extra: list[str]) -> tuple[str, str, float]:
    """Run the sweep: its name, its printed output and when it started."""
    t0 = time.time()
    cmd = [sys.executable, str(REPO / "sweeps" / "healing_grid.py"), "--name", name, "--out", str(runs), *flags, *extra]
    out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"sweep failed ({out.returncode}):\n{out.stdout[-3000:]}{out.stderr[-3000:]}")
    return name, out.stdout, t0


def measure(runs: Path, name: str, stdout: str, t0: float) -> dict:
    """The table's column of the sweep `name` (its closing line, rows and Ray Train's controller logs)."""
    rows_done, rows_todo, wall, ttt = (int(v) for v in CLOSING.search(stdout).groups())
    rows = pd.read_parquet(runs / name / "trials.parquet")
    ran = rows[rows["tokens_scored"] > 0].sort_values("ended_at")
    first = ran.groupby("trial_key").head(1)  # a trial's first row carries its start-up and model build
    later = ran.drop(first.index)
    parts = controller_parts(t0)

    def median(a: str, b: str) -> float:
        return float((first[b] - first[a]).median())

    return {"trials": rows["trial_key"].nunique(), "rows": rows_done, "wall s": wall, "TTT s": ttt,
            "fixed share": (wall - ttt) / wall,
            "start-up s/trial": float(first["startup_seconds"].median()),
            "  Tune starts the trial's fit s": median("trial_started_at", "fit_started_at"),
            "  fit to rank 0's process s": median("fit_started_at", "worker_spawned_at"),
            "  rank 0's process to the trial s": median("worker_spawned_at", "started_at"),
            "  (Ray: placement group s)": parts["placement group"], "  (Ray: worker actors s)": parts["worker actors"],
            "  (Ray: train context s)": parts["train context"],
            "fetch + model build s (first row)": float(first["load_seconds"].median()),
            "row set-up s (later rows)": float(later["load_seconds"].median()) if len(later) else float("nan"),
            "TTT s/row": float(ran["ttt_seconds"].median()),
            "trial s (median)": float(rows.groupby("trial_key")["trial_seconds"].max().median()),
            "run": shown(runs / name)}


def main(flags: list[str]) -> None:
    flags = flags or GRID
    smoke = "--smoke" in flags
    stamp = time.strftime("%Y%m%d-%H%M%S")
    one = ["--set", "settings_per_trial=1"]
    with scratch(smoke) as out:
        if smoke:
            print(planned_only(["--name", f"bench-one-{stamp}", "--out", str(out), *flags, *one]))
        alone = None if smoke else sweep(f"bench-one-{stamp}", out, flags, one)
        packed = sweep(f"bench-packed-{stamp}", out, flags, [])
        alone = alone or packed
        runs = [("one setting per trial", measure(out, *alone)), ("packed (default)", measure(out, *packed))]
    table = [{"part": k, **{label: v[k] for label, v in runs}} for k in runs[0][1]]
    record(f"Sweep overhead: `{' '.join(flags)}` (demo cached)", table, [
        "wall and TTT s: the sweep's own closing line; fixed share = (wall - TTT) / wall",
        "start-up s/trial: from Tune starting the trial to rank 0 entering it (median over trials), split by the "
        "rows' timestamps; the (Ray: ...) lines are Ray Train's own timings from its controller log, which overlap them",
        "trial s: from Tune starting the trial to its last row",
    ], append=not smoke)


if __name__ == "__main__":
    main(sys.argv[1:])
