"""The main job through real Ray: smoke grid, faults, resume, bad input (the cluster path: test_cluster.py)."""
import dataclasses
import json
from pathlib import Path

import pandas as pd
import pytest
import yaml

from sweeps import healing_grid

REPO = Path(__file__).resolve().parent.parent


def real_run_args(demo, out, *extra):
    """The 'real checkpoint' path, pointed at the tiny demo's files, on a local Ray of 2 CPUs whatever the machine
    has (the trials a local Ray holds at once, and so the packing, follow from its CPUs)."""
    return ["--checkpoint", str(demo.checkpoint), "--data", str(demo.data_dir), "--tokenizer", str(demo.tokenizer),
            "--out", str(out), "--set", "quant.min_numel=1024", "--max-tokens", "1024", "--context", "128",
            "--chunks", "256", "--lrs", "0.03", "--local-cpus", "2", *extra]


@pytest.mark.parametrize("args, message", [
    (["--regimes", "fp,int9"], "unknown quantization regime 'int9'"),
    (["--lrs", "0.1,nan"], "grid.inner_lrs: nan is not a finite learning rate"),
    (["--seeds", "0,1,0"], "grid.seeds: 0 given more than once"),
    (["--set", "ttt.optimiser=sgd"], "unknown setting 'ttt.optimiser'"),
    (["--chunks", "abc"], "--chunks: cannot read 'abc'"),
    (["--set", "ttt.optimizer=lion"], "ttt.optimizer must be one of sgd, adamw"),
    (["--workers", "0"], "workers must be >= 1, got 0"),
    (["--workers", "-1"], "workers must be >= 1, got -1"),
    (["--gpus-per-trial", "-2"], "gpus_per_trial must be in 0..64"),
    (["--set", "scheduler=hyperband"], "scheduler must be fifo or asha"),
    (["--set", "faults={bad"], "--set 'faults={bad': cannot read the value"),
    (["--set", 'faults={"int3": {"explode": 1}}'], "faults: unknown fault(s) ['explode']"),
])
@pytest.mark.usefixtures("own_ray")
def test_bad_flags_fail_before_ray(args, message, capsys):
    import ray

    assert healing_grid.main(args) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1
    assert not ray.is_initialized()


def test_on_gpus_the_dtype_defaults_to_the_records_bf16_and_a_given_dtype_wins():
    def dtype(*argv):
        return healing_grid.build_config(healing_grid.parse_args(list(argv))).ttt.dtype

    assert dtype() == "fp32"
    assert dtype("--gpus-per-trial", "1") == "bf16"
    assert dtype("--gpus-per-trial", "8", "--set", "ttt.dtype=fp32") == "fp32"


def test_every_flag_says_what_its_setting_s_own_comment_says_and_the_regime_help_is_the_grammar(capsys):
    """A setting is described once, by the comment on its field's line: the flags' help is read from there, and
    the valid regimes and optimizers from where they are defined."""
    import dataclasses as dc

    from e2ettt.config import ConfigError, field_help
    from e2ettt.plan import SweepConfig
    from e2ettt.quant.regimes import FORMS
    from e2ettt.ttt import OPTIMIZERS

    with pytest.raises(SystemExit):
        healing_grid.parse_args(["--help"])
    def flat(text):  # argparse wraps lines at spaces and after hyphens
        return "".join(text.split())

    shown = flat(capsys.readouterr().out)
    for key in [k for _, k in healing_grid.LIST_FLAGS.values()] + list(healing_grid.SCALAR_FLAGS.values()):
        assert flat(field_help(SweepConfig(), key)) in shown, key
    assert flat(FORMS) in shown and "noise-X" in shown and "-mismatch" in shown
    assert flat(", ".join(OPTIMIZERS)) in shown
    assert field_help(SweepConfig(), "ttt.max_tokens").startswith("scored validation tokens")

    @dc.dataclass(frozen=True)
    class Undocumented:
        said: int = 1  # what it is
        unsaid: int = 2

    assert field_help(Undocumented(), "said") == "what it is"
    with pytest.raises(ConfigError, match="unsaid: Undocumented.unsaid has no comment"):
        field_help(Undocumented(), "unsaid")


def test_paths_with_a_tilde_and_the_default_out_do_not_depend_on_a_shell_or_the_working_directory(
        tmp_path, tiny_inputs, monkeypatch):
    """A Ray job's command line reaches the head without a shell that would expand `~`, and runs in whatever
    directory `ray start` ran from: the sweep expands `~` itself and puts runs/ beside its own recipe."""
    import shutil

    from e2ettt.source import SourceConfig, resolve
    from e2ettt.storage import Store

    home = tmp_path / "home"
    (home / "golf").mkdir(parents=True)
    shutil.copy(tiny_inputs.checkpoint, home / "golf" / "final_model.pt")
    shutil.copy(tiny_inputs.tokenizer, home / "golf" / "tok.model")
    shutil.copytree(tiny_inputs.data_dir, home / "golf" / "data")
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(tmp_path)
    inputs = resolve(SourceConfig(checkpoint="~/golf/final_model.pt", data="~/golf/data", tokenizer="~/golf/tok.model"))
    assert (inputs.checkpoint, inputs.data, inputs.tokenizer) == (
        str(home / "golf" / "final_model.pt"), str(home / "golf" / "data"), str(home / "golf" / "tok.model"))
    assert Store("~/runs").root == str(home / "runs")
    assert healing_grid.build_config(healing_grid.parse_args([])).out == str(REPO / "runs")
    assert healing_grid.build_config(healing_grid.parse_args(["--out", "elsewhere"])).out == "elsewhere"


@pytest.mark.usefixtures("own_ray")
def test_bad_grid_file_and_bad_data_fail_before_ray(tmp_path, tiny_inputs, capsys):
    import ray

    bad = tmp_path / "grid.yaml"
    bad.write_text("grid:\n  regimes: [fp, int3\n")
    assert healing_grid.main(["--grid", str(bad)]) == 2
    assert "grid.yaml: not valid YAML/JSON" in capsys.readouterr().err
    bad.write_text(yaml.safe_dump({"grid": {"chunks": [256]}, "ttt": {"epochs": -1}}))
    assert healing_grid.main(["--grid", str(bad)]) == 2
    assert "ttt.epochs must be >= 0" in capsys.readouterr().err
    assert healing_grid.main(real_run_args(tiny_inputs, tmp_path, "--chunks", "5000")) == 2
    assert "chunk_tokens=5000 is larger than the 1024 target tokens" in capsys.readouterr().err
    assert healing_grid.main(real_run_args(tiny_inputs, tmp_path, "--max-tokens", "0", "--seeds", "0,1")) == 2
    err = capsys.readouterr().err.strip()
    assert "ttt.seed=1 without a token cap" in err and len(err.splitlines()) == 1  # seeds that would be the same trial
    assert healing_grid.main(real_run_args(tiny_inputs, tmp_path, "--seeds", ",".join(map(str, range(40))))) == 2
    assert "non-overlapping segments" in capsys.readouterr().err
    assert not ray.is_initialized()


@pytest.mark.usefixtures("own_ray")
def test_a_dry_run_prints_the_plan_and_starts_nothing(tmp_path, tiny_inputs, capsys):
    import ray

    args = real_run_args(tiny_inputs, tmp_path, "--regimes", "fp,int3,int4", "--lrs", "0.01,0.03", "--seeds", "0,1",
                         "--name", "plan", "--dry-run")
    assert healing_grid.main(args) == 0
    out = capsys.readouterr().out
    assert "= 12 rows (0 already in" in out
    assert "dry run: nothing started. 6 settings to run (12 rows) in 1 trial(s) of 2 CPU ranks, 1,024 tokens per row" in out
    assert "6 settings in 1 trial(s), 12,288 TTT tokens" in out and "0 settings from measured rates, 6 from the FLOP" in out
    assert "+ 1 trial start-up(s) of 20 s (assumed, not measured on this device yet)" in out
    assert "wall time at 1 trial(s) at once" in out
    assert not ray.is_initialized() and not list((tmp_path / "plan" / "trials.parquet").glob("part-*"))


def test_an_fp_control_stays_protected_on_a_resumed_sweep_whose_regime_rows_are_done(tmp_path, tiny_inputs):
    from e2ettt.driver.stopping import SettingProgress, StopBoard, board_args
    from e2ettt.plan import open_sweep
    from e2ettt.source import resolve

    cfg = healing_grid.build_config(healing_grid.parse_args(real_run_args(tiny_inputs, tmp_path, "--regimes", "fp,int3",
                                                                          "--seeds", "0,1")))
    inputs = resolve(cfg.source)
    first = open_sweep(cfg, inputs)
    assert [s.regime for s in first.settings] == ["fp", "int3"]
    for s in first.settings:
        if s.regime == "int3":  # a first run finished every regime row, not the controls
            for r in s.rows:
                first.tables.append({"row_id": r.row_id, "regime": "int3", "seed": r.seed, "status": "ok"}, [])
    again = open_sweep(cfg, inputs)
    assert [s.regime for s in again.settings] == ["fp"] and len(again.todo) == 2
    board = StopBoard(*board_args(again))
    (setting,) = again.settings
    hurting = SettingProgress(setting.setting_key, "fp", 0, 900, 0.9, -0.5, checkpoint=True)
    assert board.post(hurting) == "" and board.post(dataclasses.replace(hurting, diverged=True)) == ""
    alone = healing_grid.build_config(healing_grid.parse_args(real_run_args(tiny_inputs, tmp_path / "alone", "--regimes", "fp")))
    fp_only = open_sweep(alone, inputs)  # no regime rows to match: fp is not a control, and may be stopped
    assert StopBoard(*board_args(fp_only)).post(dataclasses.replace(hurting, setting_key=fp_only.settings[0].setting_key))


@pytest.mark.slow
@pytest.mark.usefixtures("shared_ray")
def test_smoke_grid_faults_and_resume(tmp_path, tiny_demo, capsys):
    marker = tmp_path / "killed-once"
    injected = {"int3": {"kill_once_marker": str(marker), "kill_rank": 1, "kill_chunk": 1},
                "int4": {"raise": "injected failure"}}
    args = real_run_args(tiny_demo, tmp_path, "--smoke", "--regimes", "fp,int3,int4", "--name", "faults",
                         "--set", f"faults={json.dumps(injected)}")
    assert healing_grid.main(args) == 0
    run = tmp_path / "faults"
    trials = pd.read_parquet(run / "trials.parquet").set_index("regime")
    assert marker.exists()  # a worker of the int3 trial really died ...
    assert trials.loc["int3", "status"] == "ok"  # ... and the retried worker group finished it
    assert trials.loc["int4", "status"] == "error" and "injected failure" in trials.loc["int4", "error"]
    assert trials.loc["fp", "status"] == "ok" and trials.loc["fp", "world_size"] == 2
    assert trials.loc["fp", "first_chunk_delta"] == pytest.approx(0, abs=1e-6)
    assert trials.loc["int3", "damage"] > 0
    curves = pd.read_parquet(run / "curves.parquet")
    assert set(curves["row_id"]) == set(trials.loc[["fp", "int3"], "row_id"])
    assert len(curves[curves["row_id"] == trials.loc["fp", "row_id"]]) == 4  # 1024 tokens / 256
    manifest = json.loads((run / "manifest.json").read_text())
    assert set(trials["row_id"]) <= set(manifest["configs"]) and manifest["versions"]["torch"]
    before = trials["finished_at"].to_dict()

    capsys.readouterr()
    assert healing_grid.main(args + ["--lrs", "0.03,0.001"]) == 0  # resume with one more lr
    out = capsys.readouterr().out
    assert "= 6 rows (2 already in" in out
    again = pd.read_parquet(run / "trials.parquet")
    assert len(again) == 6
    kept = again[(again["inner_lr"] == 0.03) & again["regime"].isin(["fp", "int3"])].set_index("regime")
    assert kept["finished_at"].to_dict() == {k: before[k] for k in ("fp", "int3")}  # not rerun
    assert (again[again["regime"] == "int4"]["status"] == "error").all()  # errors are retried, still failing


@pytest.mark.slow
@pytest.mark.usefixtures("shared_ray")
def test_a_hurting_setting_is_stopped_early_and_the_others_in_its_trial_are_untouched(tmp_path, tiny_demo, capsys):
    """lr 1.5 makes TTT hurt without diverging; the stop board ends that setting a quarter into its first seed, and
    the trial goes on with its other settings."""
    from e2ettt.cli import main as cli_main

    args = real_run_args(tiny_demo, tmp_path, "--smoke", "--regimes", "fp,int3", "--lrs", "0.03,1.5", "--chunks", "128",
                         "--max-tokens", "2048", "--set", "report_seconds=0.001", "--name", "stopping")
    assert healing_grid.main(args) == 0
    out = capsys.readouterr().out
    assert "4 setting(s) to run in 1 trial(s)" in out and "stopped at" in out
    run = tmp_path / "stopping"
    rows = pd.read_parquet(run / "trials.parquet").set_index(["regime", "inner_lr"]).sort_index()
    hurt = rows.loc[("int3", 1.5)]
    assert hurt["status"] == "stopped" and "TTT hurting" in hurt["error"] and 0 < hurt["tokens_scored"] < 2048
    assert rows.loc[("fp", 1.5), "status"] == "ok"  # hurting too, but the control of int3 at lr 1.5: never stopped
    curves = pd.read_parquet(run / "curves.parquet")
    partial = curves[curves["row_id"] == hurt["row_id"]].sort_values("chunk")
    assert list(partial["chunk"]) == list(range(len(partial)))  # streamed chunks arrive in order, none missing
    assert partial["tokens_seen"].iloc[-1] == hurt["tokens_scored"]  # the curve ends where the setting stopped
    for regime in ("fp", "int3"):
        assert rows.loc[(regime, 0.03), "status"] == "ok"
        full = curves[curves["row_id"] == rows.loc[(regime, 0.03), "row_id"]]
        assert sorted(full["chunk"]) == list(range(16))
    # int3 at lr 0.03 ran after its stopped neighbour in the same trial: the numbers of a run of its own, without Ray
    assert cli_main(["ttt", "--checkpoint", str(tiny_demo.checkpoint), "--data", str(tiny_demo.data_dir), "--tokenizer",
                     str(tiny_demo.tokenizer), "--regime", "int3", "--lr", "0.03", "--workers", "2", "--threads", "1",
                     "--set", "quant.min_numel=1024", "--set", "ttt.max_tokens=2048", "--set", "ttt.chunk_tokens=128",
                     "--set", "ttt.context=128"]) == 0
    alone = float(capsys.readouterr().out.split("post-TTT ")[1].split()[0])
    assert rows.loc[("int3", 0.03), "post_ttt_bpb"] == pytest.approx(alone, abs=5e-5)  # printed to 4 decimals
    assert healing_grid.main(args) == 0  # a rerun does not rerun stopped settings ...
    assert "= 4 rows (4 already in" in capsys.readouterr().out
    assert healing_grid.main(args + ["--set", "rerun_stopped=true", "--set", "stop_threshold=0"]) == 0
    again = pd.read_parquet(run / "trials.parquet").set_index(["regime", "inner_lr"])
    assert again.loc[("int3", 1.5), "status"] == "ok" and again.loc[("int3", 1.5), "recovery"] < -0.02  # ... unless asked
    assert again.loc[("int3", 0.03), "finished_at"] == rows.loc[("int3", 0.03), "finished_at"]  # and only those


@pytest.mark.slow
@pytest.mark.usefixtures("shared_ray")
def test_asha_runs_a_small_grid_to_the_end_and_keeps_the_settings_it_cuts_as_stopped_rows(tmp_path, tiny_demo, capsys):
    """2 regimes × 3 lrs with --scheduler asha (and no hurting-rule, so only the rungs cut): every report carries
    the running recovery the rungs compare, the sweep ends, the int3 settings that reach a rung below its
    cutoff are kept as stopped rows, and no fp control is cut."""
    args = real_run_args(tiny_demo, tmp_path, "--smoke", "--regimes", "fp,int3", "--lrs", "0.01,0.1,3", "--chunks", "128",
                         "--max-tokens", "2048", "--scheduler", "asha", "--stop-threshold", "0",
                         "--set", "report_seconds=0.001", "--name", "asha")
    assert healing_grid.main(args) == 0
    rows = pd.read_parquet(tmp_path / "asha" / "trials.parquet")
    assert len(rows) == 6
    cut = rows[rows["error"].str.startswith("ASHA")]
    assert len(cut) >= 1, rows[["regime", "inner_lr", "status", "error"]]
    assert set(cut["status"]) == {"stopped"} and set(cut["regime"]) == {"int3"}
    assert set(rows.loc[rows["regime"] == "fp", "status"]) <= {"ok", "diverged"}
    assert (cut["tokens_scored"] < 2048).all()


@pytest.mark.slow
@pytest.mark.usefixtures("shared_ray")
def test_ttt_that_breaks_the_demo_model_stops_the_same_seeds_whatever_the_clock(tmp_path):
    """The embedded demo, lr 3 at chunk 2048 (TTT wrecks a good model), three seeds of four chunks: reports every
    0.01 s or every 60 s, the first seed is judged at its judging point (chunk 1, half its tokens) and the setting
    ends there: the same statuses, tokens and curves either way."""
    runs = {}
    for every in (0.01, 60):
        assert healing_grid.main(["--smoke", "--regimes", "fp", "--lrs", "3", "--chunks", "2048", "--max-tokens", "8192",
                                  "--seeds", "0,1,2", "--out", str(tmp_path), "--name", f"every-{every}",
                                  "--set", f"report_seconds={every}"]) == 0
        runs[every] = pd.read_parquet(tmp_path / f"every-{every}" / "trials.parquet").set_index("seed").sort_index()
    fast, slow = runs[0.01], runs[60]
    assert list(fast["status"]) == list(slow["status"]), (fast[["status", "error"]], slow[["status", "error"]])
    assert fast.loc[0, "status"] in ("stopped", "diverged") and list(fast.loc[[1, 2], "status"]) == ["stopped"] * 2
    assert list(fast["tokens_scored"]) == list(slow["tokens_scored"]) and fast.loc[0, "tokens_scored"] <= 6144
    assert list(fast.loc[[1, 2], "tokens_scored"]) == [0, 0] and fast.loc[0, "error"] == slow.loc[0, "error"]
    assert fast.loc[0, "pre_quant_bpb"] < 2.0 and fast.loc[0, "first_chunk_delta"] == pytest.approx(0, abs=1e-6)


@pytest.mark.slow
@pytest.mark.usefixtures("shared_ray")
def test_two_sweeps_into_one_run_directory_at_once_keep_every_row(tmp_path, tiny_demo):
    """Two processes, each a sweep of its own joining the session's Ray, write one run directory at once."""
    import subprocess
    import sys

    import ray

    procs = []
    for lr in ("0.01", "0.03"):
        args = real_run_args(tiny_demo, tmp_path, "--smoke", "--name", "shared", "--lrs", lr,
                             "--address", ray.get_runtime_context().gcs_address)
        procs.append(subprocess.Popen([sys.executable, str(REPO / "sweeps" / "healing_grid.py"), *args],
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    outs = [p.communicate(timeout=600)[0] for p in procs]
    for p, out in zip(procs, outs):
        assert p.returncode == 0, out[-2000:]
        assert "done: 2 of 2 rows written" in out
    rows = pd.read_parquet(tmp_path / "shared" / "trials.parquet")
    assert len(rows) == 4 and rows["row_id"].is_unique
    assert sorted(rows["inner_lr"]) == [0.01, 0.01, 0.03, 0.03]
    manifest = json.loads((tmp_path / "shared" / "manifest.json").read_text())
    assert set(rows["row_id"]) <= set(manifest["configs"]) and len(manifest["runs"]) == 2  # neither run's record lost


@pytest.mark.slow
@pytest.mark.usefixtures("shared_ray")
def test_a_model_that_is_not_the_baseline_goes_through_quantize_and_the_sweep(tmp_path, tiny_demo, capsys):
    """The README's worked example: LoopLM (recurrent core, U-Net skip, tied head) via --model-fn."""
    import torch

    from e2ettt import data
    from e2ettt.cli import main as cli_main
    from e2ettt.examples.loop_lm import LoopConfig, pretrain, save

    tokens = torch.as_tensor(data.load_tokens(tiny_demo.data_dir, "train"))
    ckpt = tmp_path / "loop_lm.pt"
    save(pretrain(tokens, LoopConfig(vocab_size=1024, dim=64, heads=4), steps=30, seq_len=64, batch=8), str(ckpt))
    files = ["--checkpoint", str(ckpt), "--model-fn", "e2ettt.examples.loop_lm:build", "--data", str(tiny_demo.data_dir),
             "--tokenizer", str(tiny_demo.tokenizer)]
    capsys.readouterr()
    assert cli_main(["quantize", *files, "--regimes", "fp,int4,gptq-int4,hadamard-gptq-int4", "--set", "quant.min_numel=1024",
                     "--set", "quant.calib_tokens=2048", "--set", "quant.calib_seq_len=64", "--set", "ttt.max_tokens=2048",
                     "--set", "ttt.context=128"]) == 0
    out = capsys.readouterr().out
    assert all(r in out for r in ("gptq-int4", "hadamard-gptq-int4"))
    args = [*files, "--out", str(tmp_path), "--name", "loop", "--smoke", "--regimes", "fp,gptq-int4,hadamard-gptq-int4",
            "--set", "quant.min_numel=1024", "--set", "quant.calib_seq_len=64", "--max-tokens", "1024", "--context", "128"]
    assert healing_grid.main(args) == 0
    rows = pd.read_parquet(tmp_path / "loop" / "trials.parquet").set_index("regime")
    assert list(rows.loc[["fp", "gptq-int4", "hadamard-gptq-int4"], "status"]) == ["ok", "ok", "ok"]
    assert rows.loc["gptq-int4", "artifact_bytes"] < rows.loc["fp", "artifact_bytes"] / 3  # really quantized
    assert rows.loc["gptq-int4", "post_quant_bpb"] != rows.loc["fp", "post_quant_bpb"]
    assert abs(rows.loc["fp", "first_chunk_delta"]) < 1e-6
    report = json.loads((tmp_path / "loop" / "manifest.json").read_text())["regimes"]["gptq-int4"]
    assert any("embed.weight" in n for n in report["notes"])  # the tied weight, quantized once, said so
