"""The sweep's Parquet tables, appended to and always written atomically.

`trials.parquet` holds one row per trial, `curves.parquet` one row per
trial and chunk (DESIGN.md, "The tables"). Every write goes to a temporary
file in the same directory and is renamed over the old table, so a crash
or Ctrl-C leaves either the old table or the new one, never a torn file.
"""
from __future__ import annotations

import os
from pathlib import Path

import pandas as pd

TRIAL_COLUMNS = [
    "trial_id", "regime", "bits", "method", "inner_lr", "chunk_tokens", "epochs", "optimizer", "momentum",
    "params", "seed", "world_size", "device", "pre_quant_bpb", "post_quant_bpb", "post_ttt_bpb", "damage",
    "recovery", "recovery_frac", "first_chunk_delta", "tokens_scored", "bytes_scored", "ttt_seconds",
    "tokens_per_second", "diverged", "status", "error", "artifact_bytes", "config_hash", "git_sha",
]
CURVE_COLUMNS = ["trial_id", "chunk", "tokens_seen", "ttt_bpb", "static_bpb", "running_ttt_bpb", "lr", "bytes"]


def write_parquet_atomic(df: pd.DataFrame, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    df.to_parquet(tmp, index=False)
    os.replace(tmp, path)


class RunTables:
    def __init__(self, run_dir: str | os.PathLike):
        self.dir = Path(run_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.trials_path = self.dir / "trials.parquet"
        self.curves_path = self.dir / "curves.parquet"
        self.trials = pd.read_parquet(self.trials_path) if self.trials_path.exists() else pd.DataFrame()
        self.curves = pd.read_parquet(self.curves_path) if self.curves_path.exists() else pd.DataFrame()

    def finished_ids(self) -> set[str]:
        """Trials that need no rerun: finished (ok) or diverged. Errors are retried."""
        if self.trials.empty:
            return set()
        done = self.trials[self.trials["status"].isin(["ok", "diverged"])]
        return set(done["trial_id"])

    def append(self, row: dict, curve: list[dict]) -> None:
        tid = row["trial_id"]
        new = pd.DataFrame([row])
        ordered = [c for c in TRIAL_COLUMNS if c in new] + [c for c in new if c not in TRIAL_COLUMNS]
        keep = self.trials[self.trials["trial_id"] != tid] if not self.trials.empty else self.trials
        self.trials = pd.concat([keep, new[ordered]], ignore_index=True) if not keep.empty else new[ordered]
        if curve:
            c = pd.DataFrame(curve).assign(trial_id=tid)
            c = c[[k for k in CURVE_COLUMNS if k in c] + [k for k in c if k not in CURVE_COLUMNS]]
            old = self.curves[self.curves["trial_id"] != tid] if not self.curves.empty else self.curves
            self.curves = pd.concat([old, c], ignore_index=True) if not old.empty else c
            write_parquet_atomic(self.curves, self.curves_path)
        write_parquet_atomic(self.trials, self.trials_path)
