import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from analysis import metrics
from analysis.__main__ import main as analysis_main
from analysis.tables import RunError, load_run

REPO = Path(__file__).resolve().parent.parent


def trial(regime, seed, lr=0.01, chunk=256, pre=1.70, post=1.74, ttt=1.72, status="ok", delta=0.0, tid=None):
    return {"trial_id": tid or f"{regime}-{lr}-{chunk}-{seed}", "regime": regime, "bits": 3, "inner_lr": lr,
            "chunk_tokens": chunk, "epochs": 1, "optimizer": "sgd", "params": "all", "seed": seed,
            "pre_quant_bpb": pre, "post_quant_bpb": post, "post_ttt_bpb": ttt, "damage": post - pre,
            "recovery": post - ttt, "recovery_frac": (post - ttt) / (post - pre) if post != pre else float("nan"),
            "first_chunk_delta": delta, "diverged": status == "diverged", "diverged_chunk": 3 if status == "diverged" else -1,
            "status": status, "error": "", "artifact_bytes": 1000, "max_tokens": 4096}


@pytest.fixture
def trials():
    rows = [trial("fp", s, post=1.70, ttt=1.69 - 0.001 * s) for s in range(3)]
    rows += [trial("int3", s, post=1.74, ttt=1.73 - 0.01 * s) for s in range(3)]  # recoveries 0.01, 0.02, 0.03
    return pd.DataFrame(rows)


def test_recovery_spread_and_healing_fraction(trials):
    rec = metrics.recovery_by_setting(trials).set_index("regime")
    r = rec.loc["int3"]
    assert r["n_seeds"] == 3
    assert r["recovery_mean"] == pytest.approx(0.02)
    assert r["recovery_std"] == pytest.approx(0.01)
    half = 4.303 * 0.01 / 3**0.5
    assert (r["recovery_ci_low"], r["recovery_ci_high"]) == pytest.approx((0.02 - half, 0.02 + half))
    assert r["recovery_frac_mean"] == pytest.approx(0.5)
    # healing per seed: 1 - ((1.73 - .01 s) - (1.69 - .001 s)) / 0.04 = 1 - (0.04 - 0.009 s)/0.04
    expected = [1 - (0.04 - 0.009 * s) / 0.04 for s in range(3)]
    assert r["healing_frac_mean"] == pytest.approx(sum(expected) / 3)
    assert pd.isna(rec.loc["fp", "healing_frac_mean"])


def test_damage_best_setting_and_flatness(trials):
    more = pd.DataFrame([trial("int3", s, lr=0.1, ttt=1.735) for s in range(3)]
                        + [trial("fp", s, lr=0.1, post=1.70, ttt=1.695) for s in range(3)])
    t = pd.concat([trials, more], ignore_index=True)
    dmg = metrics.damage_by_regime(t).set_index("regime")
    assert dmg.loc["int3", "damage"] == pytest.approx(0.04) and dmg.loc["fp", "damage"] == pytest.approx(0)
    best = metrics.best_setting(t).set_index("regime")
    assert best.loc["int3", "inner_lr"] == 0.01
    assert best.loc["int3", "flatness"] == pytest.approx(1.735 - 1.72)
    assert best.loc["int3", "settings_tried"] == 2


def test_sanity_flags(trials):
    bad = pd.concat([trials, pd.DataFrame([
        trial("int4", 0, delta=0.3, tid="broken"), trial("int2", 0, status="diverged", tid="div"),
        trial("int5", 0, post=1.71, ttt=1.65, tid="over")])], ignore_index=True)
    flags = metrics.sanity_flags(bad)
    kinds = flags.groupby("flag")["trial"].apply(list).to_dict()
    assert kinds["first_chunk_delta"] == ["int4 lr=0.01 chunk=256 seed=0"]
    assert kinds["diverged"] == ["int2 lr=0.01 chunk=256 seed=0"]
    assert any("int5" in t for t in kinds["recovery_frac>1"])
    assert any(t.startswith("int4") for t in kinds["few_seeds"]) and not any(t.startswith("int3") for t in kinds["few_seeds"])


def test_tokens_to_heal():
    t = pd.DataFrame([trial("fp", 0, post=1.70, ttt=1.69, tid="f"), trial("int3", 0, tid="q")])
    curves = pd.DataFrame(
        [{"trial_id": "f", "chunk": k, "tokens_seen": 100 * (k + 1), "static_bpb": 1.70, "ttt_bpb": 1.69,
          "running_ttt_bpb": 1.69} for k in range(4)]
        + [{"trial_id": "q", "chunk": k, "tokens_seen": 100 * (k + 1), "static_bpb": 1.74, "ttt_bpb": 1.70,
            "running_ttt_bpb": r} for k, r in enumerate([1.74, 1.73, 1.715, 1.705])])
    out = metrics.tokens_to_heal(t, curves, within=0.02)
    assert out["tokens_to_heal"].tolist() == [300.0]
    assert metrics.tokens_to_heal(t, curves, within=0.001)["tokens_to_heal"].isna().all()


def _write_run(tmp_path, trials, with_curves=True):
    run = tmp_path / "myrun"
    run.mkdir()
    trials.to_parquet(run / "trials.parquet")
    if with_curves:
        rows = [{"trial_id": tid, "chunk": k, "tokens_seen": 256 * (k + 1), "static_bpb": 1.7 + 0.01 * k,
                 "ttt_bpb": 1.7, "running_ttt_bpb": 1.7 - 0.001 * k, "lr": 0.01}
                for tid in trials["trial_id"] for k in range(4)]
        pd.DataFrame(rows).to_parquet(run / "curves.parquet")
    return run


def test_report_and_plots_are_written(tmp_path, trials, capsys):
    run = _write_run(tmp_path, trials)
    assert analysis_main([str(run)]) == 0
    out = capsys.readouterr().out
    assert "int3" in out and "report:" in out
    md = (run / "report.md").read_text()
    assert "## Sanity flags" in md and "![recovery_vs_damage](figures/recovery_vs_damage.png)" in md
    assert "capped segment" in md
    for stem in ("recovery_vs_damage", "healing_curves", "healing_heatmaps"):
        for ext in ("png", "svg"):
            assert (run / "figures" / f"{stem}.{ext}").stat().st_size > 1000
    assert "<table" in (run / "report.html").read_text()


def test_report_says_what_it_cannot_conclude_without_fp(tmp_path, trials):
    run = _write_run(tmp_path, trials[trials["regime"] != "fp"].iloc[:1])
    analysis_main([str(run)])
    md = (run / "report.md").read_text()
    assert "No finished fp control" in md and "Only 1 seed(s)" in md


def test_missing_or_malformed_tables_are_clear(tmp_path, trials, capsys):
    with pytest.raises(RunError, match="trials.parquet: table not found"):
        load_run(tmp_path)
    run = tmp_path / "bad"
    run.mkdir()
    (run / "trials.parquet").write_text("not parquet")
    assert analysis_main([str(run)]) == 2
    assert "trials.parquet: not a readable Parquet table" in capsys.readouterr().err
    trials.drop(columns=["damage"]).to_parquet(run / "trials.parquet")
    with pytest.raises(RunError, match=r"missing columns \['damage'\]"):
        load_run(run)


def test_analysis_never_imports_torch():
    code = "import sys; import analysis.report, analysis.__main__; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True)


def test_running_static_bpb_weights_chunks_by_bytes():
    curve = pd.DataFrame({"chunk": [0, 1], "tokens_seen": [100, 200], "static_bpb": [1.0, 2.0], "bytes": [100.0, 300.0]})
    assert metrics.running_static_bpb(curve).tolist() == [1.0, 1.75]
    assert metrics.running_static_bpb(curve.drop(columns="bytes")).tolist() == [1.0, 1.5]  # older tables: by tokens
