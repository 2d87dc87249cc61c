"""A table row, built in one place: setting columns known at plan time, measured columns from the worker.

A row is one setting at one seed. Its columns come from three places, and
`build` refuses a column that two of them claim (a silent overwrite would
record, say, the planned device instead of the one that ran):

- setting columns (`setting_columns`): keys, regime, every TTT and quant
  setting, the segment, the inputs, code and package versions, all known
  when the sweep is planned;
- measured columns (`Measured`): what rank 0 measured, sent to the driver
  inside a typed `Report`;
- driver columns: start-up seen from the driver, the projection, times.

`Assembler` turns the reports of running trials into rows and curves: it
keeps a row's curve points until the row ends, starts a row's curve anew
when a restarted worker group sends it again, and writes a row once.
"""
from __future__ import annotations

import dataclasses
import json
import math
import time
from dataclasses import dataclass

from e2ettt import budget
from e2ettt.artifacts import scores, total
from e2ettt.evaluate import Score
from e2ettt.plan import RowSpec, SettingSpec, Sweep, TrialSpec
from e2ettt.quant.regimes import parse_regime
from e2ettt.ttt import ChunkRecord, TTTResult


class RowError(ValueError):
    """A row whose columns come from two places, or a report for a row the sweep did not plan."""


@dataclass(frozen=True)
class CurvePoint:
    """One chunk of a row's healing curve (a row of curves.parquet)."""

    chunk: int
    tokens_seen: int
    ttt_bpb: float
    static_bpb: float
    running_ttt_bpb: float
    inner_lr: float
    bytes: float
    adapt_seconds: float

    @classmethod
    def of(cls, c: ChunkRecord) -> CurvePoint:
        return cls(c.chunk, c.tokens_seen, c.ttt_bpb, c.static_bpb, c.running_ttt_bpb, c.inner_lr, c.bytes, c.adapt_seconds)


@dataclass(frozen=True)
class Measured:
    """The columns rank 0 measures for one row."""

    status: str  # ok | diverged | stopped
    pre_quant_bpb: float = math.nan
    post_quant_bpb: float = math.nan
    post_ttt_bpb: float = math.nan
    damage: float = math.nan
    recovery: float = math.nan
    recovery_frac: float = math.nan
    first_chunk_delta: float = math.nan
    pre_quant_eval_val_bpb: float = math.nan
    post_quant_eval_val_bpb: float = math.nan
    tokens_scored: int = 0
    bytes_scored: float = 0.0
    trained_targets: int = 0  # targets the adaptation took a loss on (all epochs and chunks)
    trained_positions: int = 0  # positions its forward passes ran over: what the adaptation cost
    ttt_seconds: float = math.nan
    tokens_per_second: float = math.nan
    load_seconds: float = math.nan
    diverged: bool = False
    diverged_chunk: int = -1
    error: str = ""
    device_name: str = ""
    hostname: str = ""
    node_id: str = ""
    fit_started_at: float = math.nan  # unix seconds: the trial's driver started its Ray Train run
    worker_spawned_at: float = math.nan  # ... rank 0's process started
    started_at: float = math.nan  # ... rank 0 entered the trial
    ended_at: float = math.nan  # ... this row ended
    peak_rss_mb: float = math.nan
    alarms: str = ""  # the row's own checks that failed (`row_alarms`), comma-separated; "" when all passed
    heldout_fp_bpb: float = math.nan  # the held-out slice (no segment touches it), static: the unquantized model
    heldout_quant_bpb: float = math.nan  # ... the regime's weights
    heldout_adapted_bpb: float = math.nan  # ... the weights TTT left at the end of the segment
    heldout_requant_bpb: float = math.nan  # ... those weights put back on the regime's grid (its scales, new codes)


ALARM_TOLERANCE = 1e-5  # bpb: chunk 0 scored on several ranks may differ from the one-rank static score by rounding


def row_alarms(result: TTTResult, static: dict, targets: int, text_bytes: int) -> str:
    """The checks every row runs on itself; the names of those that failed, comma-separated ("" when none).

    - first_chunk: chunk 0's TTT score is not the static score of chunk 0 (by more than ALARM_TOLERANCE): TTT
      and the static curves score other windows or another dtype, or TTT adapted on a chunk before scoring it;
    - targets: a chunk's TTT target or byte count differs from the static curve's, or a finished row scored
      another number of targets than its segment holds (a chunk boundary scored twice or skipped);
    - bytes: a finished row's byte total is not the UTF-8 bytes of its decoded text (`text_bytes`): the
      leading space, byte-fallback or control pieces counted wrongly;
    - lr0: a row at inner lr 0 (TTT that never moves the weights: a canary) whose score differs from the static
      curve at some chunk: the static curve is not over the TTT windows beyond chunk 0.
    """
    failed = []
    if result.chunks and not abs(result.first_chunk_delta) <= ALARM_TOLERANCE:
        failed.append("first_chunk")
    if all(c.inner_lr == 0 for c in result.chunks) and any(
            not abs(c.ttt_bpb - c.static_bpb) <= ALARM_TOLERANCE for c in result.chunks):
        failed.append("lr0")
    finished = not (result.diverged or result.stopped)
    same = all(c.tokens == s.tokens and c.bytes == s.bytes for c, s in zip(result.chunks, scores(static)))
    if not same or (finished and result.total.tokens != targets):
        failed.append("targets")
    if finished and result.total.bytes != text_bytes:
        failed.append("bytes")
    return ",".join(failed)


def heldout_bpb(static: dict) -> float:
    return Score(*static["heldout"]).bpb if static.get("heldout") else math.nan


def measure(result: TTTResult, static: dict, fp_static: dict, targets: int, text_bytes: int, stop_reason: str = "",
            adapted: Score | None = None, requant: Score | None = None, **where) -> Measured:
    """One seed's numbers: pre/post-quant from the static curves, post-TTT from the run (none when it
    diverged or was stopped: its running bpb covers only part of the segment), and the row's alarms
    (`targets` and `text_bytes`: the target tokens of its segment and the UTF-8 bytes of their text)."""
    pre, post = total(fp_static), total(static)
    post_ttt = result.bpb if not (result.diverged or result.stopped) else math.nan
    damage = post.bpb - pre.bpb
    recovery = post.bpb - post_ttt
    return Measured(
        status="diverged" if result.diverged else "stopped" if result.stopped else "ok",
        pre_quant_bpb=pre.bpb, post_quant_bpb=post.bpb, post_ttt_bpb=post_ttt, damage=damage, recovery=recovery,
        recovery_frac=recovery / damage if damage != 0 else math.nan, first_chunk_delta=result.first_chunk_delta,
        pre_quant_eval_val_bpb=Score(*fp_static["eval_val"]).bpb, post_quant_eval_val_bpb=Score(*static["eval_val"]).bpb,
        tokens_scored=result.total.tokens, bytes_scored=result.total.bytes, trained_targets=result.trained_targets,
        trained_positions=result.trained_positions, ttt_seconds=result.seconds,
        tokens_per_second=result.tokens_per_second, diverged=result.diverged, diverged_chunk=result.diverged_chunk,
        error=stop_reason if result.stopped else "", alarms=row_alarms(result, static, targets, text_bytes),
        heldout_fp_bpb=heldout_bpb(fp_static), heldout_quant_bpb=heldout_bpb(static),
        heldout_adapted_bpb=adapted.bpb if adapted is not None else math.nan,
        heldout_requant_bpb=requant.bpb if requant is not None else math.nan, **where)


@dataclass(frozen=True)
class Report:
    """What a running trial sends the driver about a row: new curve points, and its measured columns at its end."""

    row_id: str
    attempt: str  # the worker group that sent it: a restarted group sends the row's curve again from chunk 0
    points: tuple[CurvePoint, ...] = ()
    measured: Measured | None = None


def setting_columns(sweep: Sweep, trial: TrialSpec, setting: SettingSpec, row: RowSpec, report: dict) -> dict:
    """Every column of a row that is known when the sweep is planned (`report`: its regime's quantization report)."""
    spec = parse_regime(setting.regime, sweep.inputs.artifacts)
    return {"row_id": row.row_id, "setting_key": setting.setting_key, "control_key": row.control_key,
            "trial_key": trial.key, "regime": setting.regime, "bits": spec.bits,
            "method": spec.method + ("+hadamard" if spec.rotate else ""), "family": spec.family,
            "strength": spec.strength,
            **dataclasses.asdict(dataclasses.replace(setting.ttt, seed=row.seed)),
            **{f"quant_{k}": v for k, v in dataclasses.asdict(sweep.cfg.quant).items()},
            "segment_start": row.segment_start, "draw_seed": row.draw_seed, "world_size": trial.world_size,
            "device": sweep.cfg.device,
            "input_fingerprint": sweep.fingerprint, "checkpoint": sweep.inputs.checkpoint,
            "stream_tokens": sweep.stream_targets, "artifact_bytes": report.get("artifact_bytes"),
            "weights_decoder": report.get("decoder", ""),
            "git_sha": sweep.git_sha, "versions": json.dumps(sweep.versions, sort_keys=True)}


def build(columns: dict, measured: Measured, **driver) -> dict:
    """A whole row: setting columns, measured columns and the driver's own; no column from two places."""
    numbers = dataclasses.asdict(measured)
    clash = sorted((set(columns) & set(numbers)) | (set(columns) & set(driver)) | (set(numbers) & set(driver)))
    if clash:
        raise RowError(f"row {columns.get('row_id')}: columns {clash} come from two places")
    row = {**columns, **numbers, **driver, "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S")}
    row["projected_full_seconds"] = budget.projected_full_seconds(row["stream_tokens"], row["tokens_per_second"],
                                                                  row.get("startup_seconds", math.nan))
    return row


def error_row(columns: dict, message: str, traceback: str = "", **driver) -> dict:
    """The row of a seed its trial could not run: the setting columns, the error and its traceback."""
    return build(columns, Measured(status="error", error=message), traceback=traceback, **driver)


class Assembler:
    """Rows and curves out of the reports of running trials (one per sweep, in the driver)."""

    def __init__(self, columns: dict[str, dict]):
        self.columns = columns  # row id -> setting columns
        self.points: dict[str, list[CurvePoint]] = {}
        self.attempt: dict[str, str] = {}
        self.written: set[str] = set()

    def add(self, report: Report, **driver) -> tuple[dict, list[dict]] | None:
        """Take a report; return the row and its curve when the report ends a row not written before."""
        if report.row_id not in self.columns:
            raise RowError(f"a report for row {report.row_id}, which this sweep did not plan")
        if report.row_id in self.written:  # a restarted worker group ran the row again: the first row stands
            return None
        if self.attempt.get(report.row_id) != report.attempt:  # first report, or a restarted worker group
            self.attempt[report.row_id], self.points[report.row_id] = report.attempt, []
        self.points[report.row_id].extend(report.points)
        if report.measured is None:
            return None
        self.written.add(report.row_id)
        curve = [dataclasses.asdict(p) for p in self.points.pop(report.row_id)]
        return build(self.columns[report.row_id], report.measured, **driver), curve

    def error(self, row_id: str, message: str, traceback: str = "", **driver) -> dict | None:
        """The error row of a row its trial never finished (None if it was written)."""
        if row_id in self.written:
            return None
        self.written.add(row_id)
        self.points.pop(row_id, None)
        return error_row(self.columns[row_id], message, traceback, **driver)
