"""The Parquet tables: every setting is a column, parts are never lost, the newest row of a trial wins."""
import dataclasses
import multiprocessing as mp

import pandas as pd
import pytest

from e2ettt.quant.regimes import QuantConfig
from e2ettt.tables import QUANT_COLUMNS, TRIAL_SCHEMA, TTT_COLUMNS, RunTables, TableError
from e2ettt.ttt import TTTConfig


def test_every_ttt_and_quant_setting_is_a_column():
    assert {f.name for f in dataclasses.fields(TTTConfig)} == {name for name, _ in TTT_COLUMNS}
    assert {f"quant_{f.name}" for f in dataclasses.fields(QuantConfig)} == {name for name, _ in QUANT_COLUMNS}
    for key in ("row_id", "setting_key", "control_key", "trial_key", "input_fingerprint", "device", "node_id", "git_sha",
                "versions"):
        assert key in TRIAL_SCHEMA.names


def row(tid: str, status: str = "ok", value: float = 1.0) -> dict:
    return {"row_id": tid, "regime": "int3", "status": status, "post_ttt_bpb": value, "seed": 0}


def _writer(run_dir: str, who: int, n: int) -> None:
    tables = RunTables(run_dir)
    for i in range(n):
        tables.append(row(f"w{who}-{i}"), [{"chunk": 0, "tokens_seen": 10, "ttt_bpb": 1.0}])


def test_concurrent_writers_keep_every_row_and_compaction_keeps_them_too(tmp_path):
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_writer, args=(str(tmp_path), w, 40)) for w in range(3)]
    for p in procs:
        p.start()
    RunTables(tmp_path).compact()  # compaction racing the writers loses nothing either
    for p in procs:
        p.join()
    tables = RunTables(tmp_path)
    assert len(tables.trials) == 120 and tables.trials["row_id"].is_unique
    tables.compact()
    assert len(list((tmp_path / "trials.parquet").glob("part-*"))) == 1
    assert len(pd.read_parquet(tmp_path / "trials.parquet")) == 120  # plain pandas reads the dataset back
    assert set(pd.read_parquet(tmp_path / "curves.parquet")["row_id"]) == set(tables.trials["row_id"])


def test_the_newest_row_of_a_trial_wins_and_errors_are_retried(tmp_path):
    tables = RunTables(tmp_path)
    tables.append(row("a", "error", float("nan")), [])
    assert tables.finished_ids() == set()
    tables.append(row("a", "ok", 1.5), [{"chunk": 0, "tokens_seen": 1, "ttt_bpb": 1.5}])
    tables.append(row("b", "stopped", 2.0), [])
    t = tables.trials.set_index("row_id")
    assert len(t) == 2 and t.loc["a", "status"] == "ok" and t.loc["a", "post_ttt_bpb"] == 1.5
    assert tables.finished_ids() == {"a", "b"} and tables.finished_ids(rerun_stopped=True) == {"a"}


def test_a_part_with_fewer_columns_merges_with_the_others_and_bad_rows_are_refused(tmp_path):
    tables = RunTables(tmp_path)
    tables.append(row("new"), [])
    sparse = {"row_id": "sparse", "regime": "fp", "status": "ok"}  # no seed: a null in an integer column
    pd.DataFrame([sparse]).to_parquet(tmp_path / "trials.parquet" / "part-sparse.parquet")
    assert set(tables.trials["row_id"]) == {"sparse", "new"}
    tables.compact()  # parts with missing columns and nulls in integer columns merge into one
    assert set(pd.read_parquet(tmp_path / "trials.parquet")["row_id"]) == {"sparse", "new"}
    with pytest.raises(TableError, match=r"columns \['no_such_column'\] are not in the table schema"):
        tables.append({**row("x"), "no_such_column": 1}, [])
