"""The sweep's tables: Parquet datasets that are appended to, one part file per finished row.

`runs/<name>/trials.parquet/` and `runs/<name>/curves.parquet/` are
directories of parts; `pd.read_parquet("runs/<name>/trials.parquet")` reads
either back as one table. Appending writes one new part (a temporary file
renamed into place), so appending is O(1) per row, a crash or Ctrl-C
never tears a table, and two sweeps writing into one run directory cannot
overwrite each other's rows. A row key (`row_id`) written twice (an
errored row rerun) keeps its newest row: `read` drops the older one, and
`compact` (under a lock, at the end of a sweep) merges every part into one.

Every part has the same columns (TRIAL_SCHEMA, CURVE_SCHEMA), so a reader
never loses a column that only later parts carry. A `Store` (storage URI)
gets a copy of each part, and a sweep resumed on a fresh machine takes the
parts it lacks from there.
"""
from __future__ import annotations

import fcntl
import io
import os
import time
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from e2ettt.storage import Store

# Every TTTConfig field and every QuantConfig field (quant_*);
# a test keeps these lists equal to the dataclasses. Written out so that reading tables needs no torch.
TTT_COLUMNS = [
    ("chunk_tokens", pa.int64()), ("context", pa.int64()), ("stride", pa.int64()), ("optimizer", pa.string()),
    ("inner_lr", pa.float64()), ("schedule", pa.string()), ("momentum", pa.float64()),
    ("weight_decay", pa.float64()), ("decay_to_start", pa.float64()), ("epochs", pa.int64()),
    ("train_windows", pa.string()), ("reset", pa.string()), ("phase_docs", pa.int64()), ("phase_lr", pa.float64()),
    ("step_windows", pa.int64()),
    ("micro_batch", pa.int64()), ("grad_clip", pa.float64()), ("params", pa.string()), ("max_tokens", pa.int64()),
    ("heldout_tokens", pa.int64()),
    ("seed", pa.int64()), ("dtype", pa.string()), ("fuse_score", pa.bool_()), ("diverge_bpb", pa.float64()),
    ("checksum_every", pa.int64()), ("stats_tokens", pa.int64()), ("recipe", pa.string()),
]
QUANT_COLUMNS = [
    ("quant_min_numel", pa.int64()), ("quant_embed_bits", pa.int64()), ("quant_grid", pa.string()),
    ("quant_clip_q", pa.float64()),
    ("quant_calib_tokens", pa.int64()), ("quant_calib_seq_len", pa.int64()), ("quant_gptq_block", pa.int64()),
    ("quant_gptq_damp", pa.float64()), ("quant_act_order", pa.bool_()), ("quant_rotation_seed", pa.int64()),
    ("quant_linear_types", pa.string()), ("quant_keep_float", pa.string()), ("quant_min_share", pa.float64()),
    ("quant_draw_per_seed", pa.bool_()),
]

TRIAL_SCHEMA = pa.schema([
    ("row_id", pa.string()),  # hash of the row's config (inputs, regime, every setting, seed and segment)
    ("setting_key", pa.string()),  # everything but the seed: rows of one setting differ only in seed
    ("control_key", pa.string()),  # everything but the regime: the fp row with this key is the control
    ("trial_key", pa.string()),  # the trial (one Ray Train run) that ran the row
    ("regime", pa.string()), ("bits", pa.int64()), ("method", pa.string()),
    ("family", pa.string()),  # control, pg-int8, rtn, gptq, hadamard-rtn, hadamard-gptq, structured, unstructured, own
    ("strength", pa.float64()),  # the family's knob: the noise size, or the share of weights the regime treats
    *TTT_COLUMNS,
    ("segment_start", pa.int64()),  # first validation token of the row's segment
    ("draw_seed", pa.int64()),  # the rotation, share and noise seed the row's weights were made with
    *QUANT_COLUMNS,
    ("world_size", pa.int64()), ("device", pa.string()), ("device_name", pa.string()),
    ("node_id", pa.string()), ("hostname", pa.string()),
    ("input_fingerprint", pa.string()), ("checkpoint", pa.string()),
    ("pre_quant_bpb", pa.float64()), ("post_quant_bpb", pa.float64()), ("post_ttt_bpb", pa.float64()),
    ("damage", pa.float64()), ("recovery", pa.float64()), ("recovery_frac", pa.float64()),
    ("first_chunk_delta", pa.float64()),
    ("pre_quant_eval_val_bpb", pa.float64()), ("post_quant_eval_val_bpb", pa.float64()),
    # the held-out slice (the stream's last ttt.heldout_tokens targets, in no segment), static: fp, the regime, the
    # weights TTT left, and those put back on the regime's grid (NaN without a slice, or without a grid: fp, own)
    ("heldout_fp_bpb", pa.float64()), ("heldout_quant_bpb", pa.float64()), ("heldout_adapted_bpb", pa.float64()),
    ("heldout_requant_bpb", pa.float64()),
    ("tokens_scored", pa.int64()), ("bytes_scored", pa.float64()),
    ("trained_targets", pa.int64()), ("trained_positions", pa.int64()),  # what the adaptation took a loss on / ran over
    ("ttt_seconds", pa.float64()), ("tokens_per_second", pa.float64()), ("load_seconds", pa.float64()),
    ("stream_tokens", pa.int64()),  # target tokens of the whole validation stream
    ("projected_full_seconds", pa.float64()),  # TTT over the whole stream at this row's tokens/s, same hardware
    ("startup_seconds", pa.float64()),  # Tune started the trial -> rank 0 entered it (the trial's fixed cost)
    ("trial_seconds", pa.float64()),  # Tune started the trial -> this row ended
    ("peak_rss_mb", pa.float64()),
    # unix seconds: Tune started the trial (driver); its Ray Train run started; rank 0's process started; rank 0
    # entered the trial; this row ended (rank 0's clock but the first)
    ("trial_started_at", pa.float64()), ("fit_started_at", pa.float64()), ("worker_spawned_at", pa.float64()),
    ("started_at", pa.float64()), ("ended_at", pa.float64()),
    ("diverged", pa.bool_()), ("diverged_chunk", pa.int64()),
    ("status", pa.string()), ("error", pa.string()), ("traceback", pa.string()),
    ("alarms", pa.string()),  # the row's own checks that failed (first_chunk, targets, bytes, lr0: rows.row_alarms); "" none
    ("artifact_bytes", pa.int64()),
    ("weights_decoder", pa.string()),  # what produced the regime's weights: the checkpoint's format, e2ettt's codes, your file's
    ("git_sha", pa.string()), ("versions", pa.string()), ("finished_at", pa.string()), ("written_at", pa.int64()),
])
CURVE_SCHEMA = pa.schema([
    ("row_id", pa.string()), ("chunk", pa.int64()), ("tokens_seen", pa.int64()),
    ("ttt_bpb", pa.float64()), ("static_bpb", pa.float64()), ("running_ttt_bpb", pa.float64()),
    ("inner_lr", pa.float64()), ("bytes", pa.float64()), ("adapt_seconds", pa.float64()), ("written_at", pa.int64()),
])


class TableError(ValueError):
    """A row that does not fit the table's columns; the message names the column."""


def to_arrow(rows: list[dict], schema: pa.Schema) -> pa.Table:
    unknown = sorted({k for r in rows for k in r} - set(schema.names))
    if unknown:
        raise TableError(f"columns {unknown} are not in the table schema")
    columns = {name: [r.get(name) for r in rows] for name in schema.names}
    try:
        return pa.Table.from_pydict(columns, schema=schema)
    except (pa.ArrowInvalid, pa.ArrowTypeError) as exc:
        raise TableError(f"a row does not fit the schema: {exc}") from None


def _parquet_bytes(table: pa.Table) -> bytes:
    buf = io.BytesIO()
    pq.write_table(table, buf)
    return buf.getvalue()


def read_parts(path: str | os.PathLike) -> pd.DataFrame:
    """A table written as a directory of parts (or as one Parquet file, e.g. by pandas), all rows."""
    path = Path(path)
    parts = [path] if path.is_file() else sorted(path.glob("part-*.parquet"))
    frames = []
    for part in parts:
        try:
            frame = pq.read_table(part).to_pandas()
            frames.append(frame)
        except FileNotFoundError:  # compacted away by another sweep while we listed
            continue
    frames = [f for f in frames if not f.empty]
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def newest_rows(trials: pd.DataFrame) -> pd.DataFrame:
    """One row per row_id: the newest written (an errored row rerun, a row kept twice by a compaction race)."""
    if trials.empty or "written_at" not in trials:
        return trials
    return trials.sort_values("written_at", kind="stable").drop_duplicates("row_id", keep="last").reset_index(drop=True)


def newest_curves(curves: pd.DataFrame) -> pd.DataFrame:
    """Each row's curve as last written (the points of one part)."""
    if curves.empty or "written_at" not in curves:
        return curves
    newest = curves.groupby("row_id")["written_at"].transform("max")
    return curves[curves["written_at"] == newest].reset_index(drop=True)


class Dataset:
    """One table: a directory of part files with one schema (and an optional mirror in a Store)."""

    def __init__(self, path: Path, schema: pa.Schema, store: Store | None = None, key: str = ""):
        self.path, self.schema, self.store, self.key = Path(path), schema, store, key
        self.path.mkdir(parents=True, exist_ok=True)

    def parts(self) -> list[Path]:
        return sorted(self.path.glob("part-*.parquet"))

    def write_part(self, name: str, table: pa.Table) -> None:
        data = _parquet_bytes(table)
        tmp = self.path / f".{name}.tmp{os.getpid()}"
        tmp.write_bytes(data)
        os.replace(tmp, self.path / name)
        if self.store is not None:
            self.store.write_bytes(f"{self.key}/{name}", data)

    def read(self) -> pd.DataFrame:
        df = read_parts(self.path)
        return df if not df.empty else pd.DataFrame({n: pd.Series(dtype=object) for n in self.schema.names})

    def pull(self) -> int:
        """Copy parts that exist only in the store (a sweep resumed on another machine); return how many."""
        if self.store is None:
            return 0
        have = {p.name for p in self.parts()}
        new = [n for n in self.store.list(self.key) if n.startswith("part-") and n not in have]
        for name in new:
            data = self.store.read_bytes(f"{self.key}/{name}")
            if data is not None:
                tmp = self.path / f".{name}.tmp{os.getpid()}"
                tmp.write_bytes(data)
                os.replace(tmp, self.path / name)
        return len(new)


class RunTables:
    """trials.parquet and curves.parquet of one run directory."""

    def __init__(self, run_dir: str | os.PathLike, store: Store | None = None, name: str = ""):
        self.dir = Path(run_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.store = store  # where copies of the parts go (None: the run directory is the storage)
        self.trials_set = Dataset(self.dir / "trials.parquet", TRIAL_SCHEMA, store, f"{name}/trials.parquet")
        self.curves_set = Dataset(self.dir / "curves.parquet", CURVE_SCHEMA, store, f"{name}/curves.parquet")

    @property
    def trials(self) -> pd.DataFrame:
        return newest_rows(self.trials_set.read())

    @property
    def curves(self) -> pd.DataFrame:
        return newest_curves(self.curves_set.read())

    def finished_ids(self, rerun_stopped: bool = False) -> set[str]:
        """Rows that need no rerun: ok, diverged, and (unless asked to rerun them) stopped. Errors are retried."""
        done = {"ok", "diverged"} | (set() if rerun_stopped else {"stopped"})
        t = self.trials
        return set(t.loc[t["status"].isin(done), "row_id"]) if not t.empty else set()

    def append(self, row: dict, curve: list[dict]) -> None:
        """Add one row and its curve, each as a new part file (curve first: a row never lacks its curve)."""
        stamp = time.time_ns()
        name = f"part-{row['row_id']}-{stamp}-{os.getpid()}.parquet"
        if curve:
            points = [{**c, "row_id": row["row_id"], "written_at": stamp} for c in curve]
            self.curves_set.write_part(name, to_arrow(points, CURVE_SCHEMA))
        self.trials_set.write_part(name, to_arrow([{**row, "written_at": stamp}], TRIAL_SCHEMA))

    def pull(self) -> int:
        return self.trials_set.pull() + self.curves_set.pull()

    def compact(self) -> None:
        """Merge each table's parts into one (newest row per row id), under a lock shared by every sweep of this run."""
        with open(self.dir / ".tables.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            for dataset, frame in ((self.trials_set, lambda: self.trials), (self.curves_set, lambda: self.curves)):
                parts = dataset.parts()
                if len(parts) < 2:
                    continue
                df = frame()
                name = f"part-compact-{time.time_ns()}-{os.getpid()}.parquet"
                table = pa.Table.from_pandas(df[dataset.schema.names], schema=dataset.schema, preserve_index=False)
                dataset.write_part(name, table)
                for p in parts:
                    p.unlink(missing_ok=True)
                    if dataset.store is not None:
                        dataset.store.delete(f"{dataset.key}/{p.name}")
