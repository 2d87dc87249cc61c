"""The row builder: every column from exactly one place, curves that survive a restarted worker group, one row per key."""
import dataclasses
from pathlib import Path

import pytest

from e2ettt.evaluate import Score
from e2ettt.plan import Sweep, SweepConfig, make_trial, plan_settings
from e2ettt.quant.regimes import QuantConfig
from e2ettt.rows import Assembler, CurvePoint, Measured, Report, RowError, build, error_row, measure, row_alarms, setting_columns
from e2ettt.source import Inputs
from e2ettt.tables import TRIAL_SCHEMA, to_arrow
from e2ettt.ttt import ChunkRecord, TTTConfig, TTTResult

INPUTS = Inputs("/ckpt.pt", "/data", "/tok.model", "", 1024)


def settings(regime="int3", starts=None):
    return plan_settings("fp123", regime, [TTTConfig(inner_lr=0.03, chunk_tokens=256)], starts or {0: 0, 1: 100},
                         QuantConfig(), "cpu", 2)


def planned():
    trial = make_trial(settings(), INPUTS, 2)
    sweep = Sweep(SweepConfig(), INPUTS, "fp123", trial.settings, (trial,), frozenset(), 10_000, 1024, None, Path("."), None,
                  None, 0, "abc", {"torch": "x"})
    columns = {r.row_id: setting_columns(sweep, trial, s, r, {"artifact_bytes": 1234, "decoder": "e2ettt_packed_v1"})
               for s, r in trial.rows}
    return trial, columns


def point(k):
    return CurvePoint(k, 256 * (k + 1), 1.7, 1.8, 1.7, 0.03, 300.0, 0.01)


def test_a_whole_row_fills_every_column_of_the_table():
    trial, columns = planned()
    (_, r), _ = trial.rows
    row = build(columns[r.row_id], Measured("ok", tokens_per_second=1000.0), trial_started_at=1.0, startup_seconds=3.0,
                trial_seconds=9.0, traceback="")
    assert set(TRIAL_SCHEMA.names) - set(row) == {"written_at"}  # the table writer stamps it
    to_arrow([row], TRIAL_SCHEMA)  # and every value fits its column's type
    assert row["seed"] == 0 and row["segment_start"] == 0 and row["inner_lr"] == 0.03 and row["trial_key"] == trial.key
    assert row["projected_full_seconds"] == pytest.approx(13.0)  # 10,000 stream tokens at 1,000 tokens/s + start-up


def test_a_column_from_two_places_is_refused_not_overwritten():
    trial, columns = planned()
    (_, r), _ = trial.rows
    with pytest.raises(RowError, match=r"columns \['device'\] come from two places"):
        build(columns[r.row_id], Measured("ok"), device="cuda")
    with pytest.raises(RowError, match="come from two places"):
        build({**columns[r.row_id], "hostname": "driver"}, Measured("ok", hostname="worker"))


def test_a_row_gets_its_curve_and_a_restarted_worker_group_starts_it_anew():
    trial, columns = planned()
    (_, r0), (_, r1) = trial.rows
    rows = Assembler(columns)
    assert rows.add(Report(r0.row_id, "attempt-1", (point(0), point(1)))) is None
    # the worker group died and restarted: its new attempt sends the row's curve again from chunk 0
    assert rows.add(Report(r0.row_id, "attempt-2", (point(0),))) is None
    row, curve = rows.add(Report(r0.row_id, "attempt-2", (point(1), point(2)), Measured("ok")))
    assert [c["chunk"] for c in curve] == [0, 1, 2] and row["row_id"] == r0.row_id
    assert rows.add(Report(r0.row_id, "attempt-3", (point(0),), Measured("ok"))) is None  # written once: the first stands
    assert rows.error(r0.row_id, "late failure") is None
    err = rows.error(r1.row_id, "boom", "Traceback ...", trial_seconds=4.0)
    assert err["status"] == "error" and err["error"] == "boom" and err["trial_seconds"] == 4.0
    assert rows.error(r1.row_id, "again") is None
    with pytest.raises(RowError, match="did not plan"):
        rows.add(Report("unknown", "a"))


def test_rows_of_one_setting_differ_only_in_seed_and_segment_and_match_their_control():
    trial, columns = planned()
    (fp,) = settings("fp")
    a, b = (columns[r.row_id] for _, r in trial.rows)
    assert a["setting_key"] == b["setting_key"] and a["row_id"] != b["row_id"] and a["control_key"] != b["control_key"]
    assert [r.control_key for r in fp.rows] == [a["control_key"], b["control_key"]]
    (other,) = settings(starts={0: 0, 1: 200})
    assert other.rows[1].row_id != trial.rows[1][1].row_id  # another segment is another row


def test_an_error_row_carries_the_setting_and_no_numbers():
    trial, columns = planned()
    (_, r), _ = trial.rows
    row = error_row(columns[r.row_id], "workers did not start")
    assert row["status"] == "error" and row["regime"] == "int3" and row["tokens_scored"] == 0
    assert all(row[k] != row[k] for k in ("post_ttt_bpb", "damage"))  # NaN
    assert dataclasses.asdict(Measured("ok")).keys() <= row.keys()


def ran(chunks: list[tuple[float, float, int]], delta: float = 0.0, lr: float = 0.1, static_bpb: float = 1.0,
        **kw) -> TTTResult:
    """A TTT result whose chunks scored (nll, bytes, tokens) each, at a ttt_bpb of 1."""
    records = [ChunkRecord(k, t, t * (k + 1), n, b, 1.0, static_bpb, 1.0, lr, 0.0) for k, (n, b, t) in enumerate(chunks)]
    total = Score(sum(c[0] for c in chunks), sum(c[1] for c in chunks), sum(c[2] for c in chunks))
    return TTTResult(records, total, first_chunk_delta=delta, **kw)


def test_row_alarms_name_each_check_that_fails():
    static = {"chunks": [[70.0, 100.0, 50], [60.0, 110.0, 50]], "eval_val": [130.0, 210.0, 100]}
    clean = ran([(69.0, 100.0, 50), (58.0, 110.0, 50)])
    assert row_alarms(clean, static, 100, 210) == ""
    assert row_alarms(ran([(69.0, 100.0, 50), (58.0, 110.0, 50)], delta=1e-3), static, 100, 210) == "first_chunk"
    assert row_alarms(clean, static, 99, 210) == "targets"  # the segment holds 99 targets: one scored twice
    assert row_alarms(ran([(69.0, 100.0, 50), (58.0, 109.0, 50)]), static, 100, 209) == "targets"  # not the static bytes
    assert row_alarms(clean, static, 100, 211) == "bytes"  # the decoded text has a byte more
    assert row_alarms(ran([(69.0, 100.0, 50), (58.0, 110.0, 50)], lr=0.0), static, 100, 210) == ""
    assert row_alarms(ran([(69.0, 100.0, 50), (58.0, 110.0, 50)], lr=0.0, static_bpb=1.01), static, 100, 210) == "lr0"
    stopped = ran([(69.0, 100.0, 50)], delta=float("nan"), stopped=True)
    assert row_alarms(stopped, static, 100, 210) == "first_chunk"  # a partial row: only what it ran is checked
    measured = measure(clean, static, static, 100, 211)
    assert measured.status == "ok" and measured.alarms == "bytes" and measured.first_chunk_delta == 0.0
