"""The default grid with and without early stopping: wall time, TTT tokens spent, and the best settings.

Runs `python sweeps/healing_grid.py` twice under fresh names (the demo must be cached for a clean
figure): with the default stopper, and with `--set stop_threshold=0` (no stopping). Reports wall
time, TTT tokens actually scored, rows by status, and whether each regime's best setting (as
`python -m analysis` chooses it) is the same in both.

    python benchmarks/early_stopping.py [extra healing_grid flags]
    python benchmarks/early_stopping.py --smoke [--checkpoint F --data DIR --tokenizer F ...]

--smoke is healing_grid's own (its minimal grid), passed on with the rest; here it also sends the runs to a
temporary directory, runs only the first sweep (the second is planned with --dry-run, and its row of the table
measured on the first run's rows) and prints the table without recording it.
"""
from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import REPO, planned_only, record, scratch, shown

sys.path.insert(0, str(REPO))
from analysis.metrics import best_setting  # noqa: E402
from analysis.runs import load_run  # noqa: E402


def sweep(name: str, out: Path, extra: list[str], flags: list[str]) -> tuple[float, Path]:
    t0 = time.perf_counter()
    subprocess.run([sys.executable, str(REPO / "sweeps" / "healing_grid.py"), "--name", name, "--out", str(out),
                    *extra, *flags], check=True, cwd=REPO)
    return time.perf_counter() - t0, out / name


def main(flags: list[str]) -> None:
    smoke = "--smoke" in flags
    with scratch(smoke) as out:
        measure(out, flags, smoke)


def measure(out: Path, flags: list[str], smoke: bool) -> None:
    """Both runs under `out`, and their table."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    runs = {"default stopper": sweep(f"bench-stop-{stamp}", out, [], flags)}
    no_stopping = (f"bench-nostop-{stamp}", out, ["--set", "stop_threshold=0"], flags)
    if smoke:
        print(planned_only(["--name", no_stopping[0], "--out", str(out), *no_stopping[2], *flags]))
        runs["no stopping"] = runs["default stopper"]
    else:
        runs["no stopping"] = sweep(*no_stopping)
    best = {}
    rows = []
    for label, (wall, path) in runs.items():
        run = load_run(path)
        t = run.trials
        b = best_setting(t).set_index("regime")
        best[label] = {r: (float(b.loc[r, "inner_lr"]), int(b.loc[r, "chunk_tokens"]))
                       for r in b.index if "inner_lr" in b}
        status = t["status"].value_counts()
        rows.append({"run": label, "rows": len(t), "wall s": wall,
                     "TTT tokens scored": int(t["tokens_scored"].fillna(0).sum()),
                     "TTT s": float(t["ttt_seconds"].fillna(0).sum()),
                     "ok / diverged / stopped":
                         f"{status.get('ok', 0)} / {status.get('diverged', 0)} / {status.get('stopped', 0)}",
                     "run dir": shown(path)})
    same = best["default stopper"] == best["no stopping"]
    record("Early stopping on the default grid (demo cached)", rows, [
        f"best setting per regime (lr, chunk), with stopping: {best['default stopper']}",
        f"same best settings without stopping: {same}",
        "stopper: running recovery below -0.02 bpb after 25% of a seed's tokens, or a diverged seed, ends the trial "
        "(fp controls run on while a regime trial at their settings is pending or running)",
    ], append=not smoke)


if __name__ == "__main__":
    main(sys.argv[1:])
