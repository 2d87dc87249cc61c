"""Reading a run: the two Parquet tables and the manifest, with one clear error if they are not there."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from e2ettt.tables import newest_curves, newest_rows, read_parts

TRIAL_REQUIRED = ["row_id", "regime", "inner_lr", "chunk_tokens", "seed", "pre_quant_bpb", "post_quant_bpb",
                  "post_ttt_bpb", "damage", "recovery", "recovery_frac", "first_chunk_delta", "diverged", "status"]
CURVE_REQUIRED = ["row_id", "chunk", "tokens_seen", "ttt_bpb", "static_bpb", "running_ttt_bpb"]
# Settings a table row may carry; a table without control and setting keys (one made by hand) is matched on every
# one of these that is present (and, for the control, the seed).
DISPLAY_SETTINGS = ["inner_lr", "chunk_tokens", "epochs", "optimizer", "params", "recipe", "context", "stride",
                    "max_tokens", "momentum", "weight_decay", "schedule", "grad_clip", "step_windows", "train_windows",
                    "reset", "phase_docs", "phase_lr", "decay_to_start", "dtype", "device", "world_size"]
MATCH_SETTINGS = DISPLAY_SETTINGS + ["micro_batch", "fuse_score", "diverge_bpb", "input_fingerprint", "heldout_tokens",
                                     "stats_tokens"]
# What TTT does, as opposed to what is scored and how (the windows): the fp reference of a regime row is fp's best
# choice of these, on the same windows, segment and inputs.
TTT_SETTINGS = ["inner_lr", "schedule", "momentum", "weight_decay", "epochs", "step_windows", "optimizer", "params",
                "grad_clip", "fuse_score", "diverge_bpb", "checksum_every", "recipe", "train_windows",
                "phase_docs", "phase_lr", "decay_to_start", "stats_tokens"]
WINDOW_SETTINGS = [c for c in MATCH_SETTINGS if c not in TTT_SETTINGS]  # with the seed: the same segment


class RunError(ValueError):
    """A run directory whose tables are missing or malformed; the message names the file."""


@dataclass
class Run:
    dir: Path
    name: str
    trials: pd.DataFrame
    curves: pd.DataFrame
    manifest: dict


def _read(path: Path, required: list[str]) -> pd.DataFrame:
    """A table (a directory of parts, or one Parquet file), newest version of each row."""
    if not path.exists():
        raise RunError(f"{path}: table not found (did the sweep write this run?)")
    try:
        df = read_parts(path)
    except Exception as exc:  # pyarrow raises several types for a corrupt file
        raise RunError(f"{path}: not a readable Parquet table ({str(exc).splitlines()[0]})") from None
    if df.empty:
        raise RunError(f"{path}: the table has no rows yet")
    missing = [c for c in required if c not in df.columns]
    if missing:
        raise RunError(f"{path}: missing columns {missing}")
    return df


def load_run(run_dir: str | Path) -> Run:
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise RunError(f"{run_dir}: run directory does not exist")
    trials = newest_rows(_read(run_dir / "trials.parquet", TRIAL_REQUIRED))
    curves_path = run_dir / "curves.parquet"
    curves = newest_curves(_read(curves_path, CURVE_REQUIRED)) if curves_path.exists() else pd.DataFrame(columns=CURVE_REQUIRED)
    manifest = {}
    if (run_dir / "manifest.json").is_file():
        try:
            manifest = json.loads((run_dir / "manifest.json").read_text())
        except json.JSONDecodeError as exc:
            raise RunError(f"{run_dir / 'manifest.json'}: not valid JSON ({exc})") from None
    return Run(run_dir, run_dir.name, with_keys(trials), curves, manifest)


def _text(columns: pd.DataFrame) -> pd.DataFrame:
    """Settings as text for a key, a missing one as "nan" (pandas 3's astype(str) keeps missing values missing)."""
    return columns.astype(object).where(columns.notna(), "nan").astype(str)


def with_keys(trials: pd.DataFrame) -> pd.DataFrame:
    """Rows without `control_key`/`setting_key` (a table made by hand) get them from every setting column present;
    every row gets `window_key` (its setting columns but those of what TTT does: `WINDOW_SETTINGS`)."""
    trials = trials.copy()
    for col, default in (("epochs", 1), ("optimizer", "sgd"), ("params", "all")):
        if col not in trials:
            trials[col] = default
    present = [c for c in MATCH_SETTINGS if c in trials]
    settings = _text(trials[present]).agg("|".join, axis=1) if present else ""
    if "control_key" not in trials or trials["control_key"].isna().any():
        derived = settings + "|seed=" + trials["seed"].astype(str)
        trials["control_key"] = trials["control_key"].fillna(derived) if "control_key" in trials else derived
    if "setting_key" not in trials or trials["setting_key"].isna().any():
        derived = trials["regime"].astype(str) + "|" + settings
        trials["setting_key"] = trials["setting_key"].fillna(derived) if "setting_key" in trials else derived
    window = [c for c in WINDOW_SETTINGS if c in trials]  # the fp reference's group: all but what TTT does
    trials["window_key"] = _text(trials[window]).agg("|".join, axis=1) if window else ""
    return trials
