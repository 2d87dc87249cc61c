"""Planted bugs: each classic TTT, bits-per-byte, quantization and analysis mistake, put into a copy of the source
one at a time, must be caught by a named test or a row alarm.

    python benchmarks/mutants.py [--quick] [--only NAME ...] [--append BENCHMARKS.md] [--list]
    python benchmarks/mutants.py --smoke     # every mutant still applies and names tests that exist; one run end to end

A mutant is a few exact source replacements (each `old` text must occur exactly once in its file, so a mutant
cannot silently stop applying when the code moves), the mistake it stands for, the tests expected to kill it
(the fastest first) and the row alarms expected to fire.

The harness copies the repository's source into a temporary directory and runs every named test on the unchanged
copy (they must pass) and its rows (they must raise no alarm). Then, for each mutant, it applies the edits to a
fresh copy and runs its tests there with `pytest -x`, the copy first on PYTHONPATH and as the working directory,
so that the copy is what is imported, not the installed package (checked before anything runs). For mutants that
name row alarms it also runs the rows: the tiny demo's fp model (pretrained for seconds) through
`worker.run_trial_on_rank` at one rank, as a sweep's trial runs them but without Ray, at lr 0, on sliding windows
and in bf16, and reads their `alarms` column. A mutant survives only if every test passes and no alarm fires; an
equivalent mutant (no observable change) is listed with the reason, not run.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
COPIED = ("e2ettt", "analysis", "sweeps", "tests", "benchmarks", "pyproject.toml", "README.md", "cluster.yaml")
PYTEST = ("-m", "pytest", "-q", "-p", "no:cacheprovider", "-o", "addopts=-ra")
SMOKE_TEST = "tests/test_worker.py::test_rows_of_every_windowing_raise_no_alarm_and_lr_0_gives_the_static_numbers"


@dataclass(frozen=True)
class Edit:
    path: str  # relative to the repository root
    old: str  # occurs exactly once in the file
    new: str


@dataclass(frozen=True)
class Mutant:
    name: str
    area: str
    mistake: str  # the real-world mistake it stands for
    edits: tuple[Edit, ...]
    tests: tuple[str, ...]  # pytest node ids expected to kill it, the fastest first
    alarms: tuple[str, ...] = ()  # row alarms expected to fire on the rows (`row_smoke`)
    equivalent: str = ""  # why no check can see it; such a mutant is listed, not run


def m(name: str, area: str, mistake: str, edits: list[tuple[str, str, str]], tests: list[str],
      alarms: tuple[str, ...] = (), equivalent: str = "") -> Mutant:
    return Mutant(name, area, mistake, tuple(Edit(*e) for e in edits), tuple(tests), alarms, equivalent)


TTT, BPB, QUANT, ANALYSIS, MODEL = "TTT", "static curve / bpb", "quantization", "sweep / analysis", "model"
REF_FORWARD = ("tests/test_reference_forward.py::test_gpt_computes_parameter_golfs_function_on_weights_where_every_part_"
               "matters[tied-gqa-odd]")
UNFUSED = ("e2ettt/ttt.py", "        fused = (cfg.fuse_score and not last",
           "        fused = False and (cfg.fuse_score and not last")
T = "tests/test_ttt.py::"
MUTANTS = [
    m("adapt_before_score", TTT, "adapt on chunk k before scoring it: the steps after chunk k-1 train on chunk k",
      [UNFUSED, ("e2ettt/ttt.py", "            bad = adapt_(model, opt, params, tokens, train, cfg, lr, cfg.epochs, fused)\n",
                 "            ahead = plan_windows(spans[k + 1].a, spans[k + 1].b, cfg.context, cfg.stride or None)\n"
                 "            bad = adapt_(model, opt, params, tokens, ahead, cfg, lr, cfg.epochs, fused)\n")],
      [T + "test_each_chunk_is_scored_with_the_weights_adapted_on_the_chunks_before_it_only"]),
    m("score_with_next_weights", TTT, "score chunk k with θ_{k+1}: the chunk's adaptation runs before its score",
      [UNFUSED, ("e2ettt/ttt.py", "        else:\n            nll_sum, byte_sum, _ = window_sums(",
                 "        else:\n"
                 "            for _ in range(0 if last else cfg.epochs):\n"
                 "                opt.param_groups[0][\"lr\"] = lr_at(cfg, k, len(spans))\n"
                 "                opt.zero_grad(set_to_none=True)\n"
                 "                backward_share_(model, tokens, mine, cfg)\n"
                 "                finish_step_(params, b - a, cfg)\n"
                 "                opt.step()\n"
                 "            nll_sum, byte_sum, _ = window_sums("),
                ("e2ettt/ttt.py", "    for epoch in range(epochs):\n", "    for epoch in range(0):\n")],
      [T + "test_ttt_changes_scores_and_first_chunk_equals_static"], alarms=("first_chunk",)),
    m("window_sees_its_target", TTT, "a window that includes its own target: inputs shifted onto the targets",
      [("e2ettt/evaluate.py", "    return xy[:, :-1], xy[:, 1:], mask\n", "    return xy[:, 1:], xy[:, 1:], mask\n")],
      ["tests/test_evaluate.py::test_every_target_is_scored_from_the_tokens_before_it_only"]),
    m("chunk_boundary_scored_twice", TTT, "off-by-one chunk boundary: the last target of chunk k scored again in k+1",
      [("e2ettt/evaluate.py", "    return [(a, min(a + chunk_tokens, end)) for a in range(first, end, chunk_tokens)]\n",
        "    return [(a, min(a + chunk_tokens + 1, end)) for a in range(first, end, chunk_tokens)]\n")],
      [T + "test_ttt_changes_scores_and_first_chunk_equals_static"], alarms=("bytes", "targets")),
    m("chunk_boundary_skipped", TTT, "off-by-one chunk boundary: the last target of each chunk never scored",
      [("e2ettt/evaluate.py", "    return [(a, min(a + chunk_tokens, end)) for a in range(first, end, chunk_tokens)]\n",
        "    return [(a, min(a + chunk_tokens - 1, end)) for a in range(first, end, chunk_tokens)]\n")],
      [T + "test_ttt_changes_scores_and_first_chunk_equals_static"], alarms=("bytes", "targets")),
    m("grad_mean_over_ranks", TTT, "gradients averaged by rank count instead of the global target count",
      [("e2ettt/ttt.py", "        torch.where(mask, nll, 0.0).sum().backward()\n",
        "        (torch.where(mask, nll, 0.0).sum() / max(1, sum(w.scored for w in windows))).backward()\n"),
       ("e2ettt/ttt.py", "            p.grad.div_(global_count)\n", "            p.grad.div_(1)\n"),
       ("e2ettt/ttt.py", "    all_reduce_sum_(flat).div_(global_count)\n", "    all_reduce_sum_(flat).div_(world()[1])\n")],
      [T + "test_world_size_one_and_two_agree_and_ranks_hold_identical_weights"]),
    m("rank_skips_all_reduce", TTT, "no all-reduce on one rank: rank 1 steps with its own gradient, ranks drift",
      [("e2ettt/ttt.py", "    all_reduce_sum_(flat).div_(global_count)\n",
        "    reduced = all_reduce_sum_(flat.clone()).div_(global_count)\n"
        "    flat = reduced if world()[0] != 1 else flat.div_(global_count)\n")],
      [T + "test_world_size_one_and_two_agree_and_ranks_hold_identical_weights"]),
    m("optimizer_reset_per_chunk", TTT, "optimizer state (momentum) reset at every chunk instead of carried",
      [("e2ettt/ttt.py", "            bad = adapt_(model, opt, params, tokens, train, cfg, lr, cfg.epochs, fused)\n",
        "            opt = make_optimizer(cfg, params, grad_stats)\n"
        "            bad = adapt_(model, opt, params, tokens, train, cfg, lr, cfg.epochs, fused)\n")],
      [T + "test_the_loop_matches_score_first_ttt_written_plainly"]),
    m("cosine_off_by_one", TTT, "the lr schedule over chunks off by one (cosine never reaches 0)",
      [("e2ettt/ttt.py", "math.cos(math.pi * k / (num_chunks - 1))", "math.cos(math.pi * k / num_chunks)")],
      [T + "test_the_loop_matches_score_first_ttt_written_plainly"]),
    m("divergence_never_detected", TTT, "divergence never detected (non-finite loss or gradient, or past the margin)",
      [("e2ettt/ttt.py", "        diverged = not math.isfinite(score.nll) or (\n"
                         "            static is not None and cfg.diverge_bpb > 0 and result.total.bpb - static_run.bpb"
                         " > cfg.diverge_bpb)\n",
        "        diverged = False\n"),
       ("e2ettt/ttt.py", "            diverged = bool(bad)  #", "            diverged = False  #")],
      [T + "test_a_run_that_blows_up_is_diverged_where_it_does"]),
    m("first_chunk_delta_wired_to_0", TTT, "the broken-pipeline check wired to 0 (first_chunk_delta never measured)",
      [("e2ettt/ttt.py", "            result.first_chunk_delta = score.bpb - static_bpb\n",
        "            result.first_chunk_delta = 0.0\n")],
      [T + "test_first_chunk_delta_is_chunk_0_against_the_static_curve_it_is_given"]),
    m("unfused_score", TTT, "chunk k scored by a separate forward instead of its first epoch's",
      [UNFUSED], [T + "test_ttt_changes_scores_and_first_chunk_equals_static"],
      equivalent="the same θ_k, windows and batching: every number is the same (pinned by "
                 "test_ttt_changes_scores_and_first_chunk_equals_static); only the cost changes"),
    m("static_on_other_windows", BPB, "static curve on other windows than the TTT scores (the sliding stride ignored)",
      [("e2ettt/evaluate.py", "plan_windows(a, b, context, stride, floor), tables,",
        "plan_windows(a, b, context, None, floor), tables,")],
      [T + "test_lr_zero_reproduces_static_eval_chunk_by_chunk[True]", SMOKE_TEST], alarms=("first_chunk", "lr0")),
    m("static_without_earlier_chunks", BPB, "static curve without the context TTT takes from earlier chunks (each chunk"
      " scored on its own)",
      [("e2ettt/evaluate.py", "score_windows(model, tokens, plan_windows(a, b, context, stride, floor), tables,",
        "score_windows(model, tokens[a - 1 :], plan_windows(1, b - a + 1, context, stride, 0), tables,")],
      [T + "test_lr_zero_reproduces_static_eval_chunk_by_chunk[True]"], alarms=("first_chunk", "lr0")),
    m("static_in_another_dtype", BPB, "static curve in fp32 while TTT scores in bf16",
      [("e2ettt/artifacts.py", "        dtype = DTYPES[w.dtype]\n", "        dtype = None\n")],
      [SMOKE_TEST], alarms=("first_chunk",)),
    m("leading_space_dropped", BPB, "bytes counted without the leading-space byte (byte tables)",
      [("e2ettt/tokenizer.py", "            lead[i] = True\n", "            lead[i] = False\n")],
      ["tests/test_tokenizer.py::test_byte_table_rules"], alarms=("bytes",)),
    m("leading_space_dropped_on_device", BPB, "bytes counted without the leading-space byte (scoring on the device)",
      [("e2ettt/evaluate.py", "        return self.base_bytes[target] + lead.to(torch.float64)\n",
        "        return self.base_bytes[target] + 0 * lead.to(torch.float64)\n")],
      ["tests/test_evaluate.py::test_every_target_is_scored_from_the_tokens_before_it_only"], alarms=("bytes",)),
    m("byte_fallback_zero_bytes", BPB, "byte-fallback tokens counted as 0 bytes",
      [("e2ettt/tokenizer.py", "            base[i] = 1\n", "            base[i] = 0\n")],
      ["tests/test_tokenizer.py::test_byte_table_rules"]),
    m("bos_scored_as_text", BPB, "BOS scored as a target of text: the control piece <s> counted as 3 bytes, no boundary",
      [("e2ettt/tokenizer.py", "        if sp.is_control(i) or sp.is_unknown(i) or sp.is_unused(i):\n",
        "        if sp.is_unknown(i) or sp.is_unused(i):\n")],
      ["tests/test_tokenizer.py::test_byte_table_rules"]),
    m("scales_fp32_evaluated", QUANT, "evaluated weights not what the artifact decodes to (fp32 scales, fp16 stored)",
      [("e2ettt/quant/rtn.py", "    return (clip / centre(levels)).clamp_min(FP16_TINY).half().float()\n",
        "    return (clip / centre(levels)).clamp_min(FP16_TINY)\n"),
       ("e2ettt/quant/apply.py", "        right = artifact.decode_entry(e).to(W.device)  #",
        "        right = (q.Q if seed is None else artifact.decode_entry(e)).to(W.device)  #")],
      ["tests/test_quant.py::test_rtn_uses_all_2_to_the_b_levels_within_half_a_step_with_fp16_scales[4]",
       "tests/test_quant.py::test_the_evaluated_weights_are_what_the_stored_artifact_decodes_to[int3]"]),
    m("gptq_calibrates_on_validation", QUANT, "GPTQ calibrating on validation tokens",
      [("e2ettt/artifacts.py", "data.spread_sequences(inputs.data, \"train\",", "data.spread_sequences(inputs.data, \"val\",")],
      ["tests/test_quant.py::test_gptq_calibrates_on_the_train_split_never_on_validation"]),
    m("hadamard_on_weights_only", QUANT, "Hadamard rotation applied to the weights only (activations never rotated)",
      [("e2ettt/quant/artifact.py", "        W = Rotation(cols, e[\"rotation_seed\"]).inverse(W.double()).float()\n",
        "        W = W.float()\n")],
      ["tests/test_quant.py::test_a_rotated_regime_evaluates_weights_as_near_the_originals_as_without_rotation"]),
    m("embedding_left_float", QUANT, "the embedding left unquantized while reported quantized (embed_bits ignored)",
      [("e2ettt/quant/apply.py", "        if is_embedding and not cfg.embed_bits:\n", "        if is_embedding:\n")],
      ["tests/test_quant.py::test_the_embedding_is_stored_as_codes_at_embed_bits_unless_kept_float"]),
    m("control_key_without_seed", ANALYSIS, "the fp control matched without the seed (the sweep's control key)",
      [("e2ettt/plan.py", "control_key=config_hash({**base, **at}, 16)", "control_key=config_hash({**base, \"ttt\": d}, 16)")],
      ["tests/test_rows.py::test_rows_of_one_setting_differ_only_in_seed_and_segment_and_match_their_control"]),
    m("fp_reference_without_seed", ANALYSIS, "the fp control matched without the seed (analysis: fp's first seed for all)",
      [("analysis/metrics.py", "    out = trials.merge(fp_reference(trials), on=[\"window_key\", \"seed\"], how=\"left\")\n",
        "    out = trials.merge(fp_reference(trials).drop_duplicates(\"window_key\").drop(columns=\"seed\"), on=\"window_key\","
        " how=\"left\")\n")],
      ["tests/test_analysis.py::test_recovery_spread_and_healing_fraction_against_the_control"]),
    m("fp_reference_without_chunk", ANALYSIS, "the fp control matched without the chunk size",
      [("analysis/runs.py", "WINDOW_SETTINGS = [c for c in MATCH_SETTINGS if c not in TTT_SETTINGS]",
        "WINDOW_SETTINGS = [c for c in MATCH_SETTINGS if c not in TTT_SETTINGS + [\"chunk_tokens\"]]")],
      ["tests/test_analysis.py::test_a_regime_is_matched_to_fp_on_its_own_chunk_size"]),
    m("report_on_selection_seeds", ANALYSIS, "selection and report on the same seeds while the table says otherwise",
      [("analysis/metrics.py", "by_setting(trials, report).set_index(\"setting_key\")",
        "by_setting(trials, select).set_index(\"setting_key\")")],
      ["tests/test_analysis.py::test_the_best_setting_is_chosen_on_some_seeds_and_reported_on_the_others"]),
    m("stopped_row_in_means", ANALYSIS, "a stopped row counted in means",
      [("analysis/metrics.py", "        done = g[g[\"status\"] == \"ok\"]\n        paired",
        "        done = g[g[\"status\"].isin([\"ok\", \"stopped\"])]\n        paired")],
      ["tests/test_analysis.py::test_a_stopped_seed_is_left_out_of_means_and_named"]),
    m("resume_reruns_finished_rows", ANALYSIS, "a resumed sweep rerunning finished rows (ok rows not counted as done)",
      [("e2ettt/tables.py", "        done = {\"ok\", \"diverged\"} |", "        done = {\"diverged\"} |")],
      ["tests/test_tables.py::test_the_newest_row_of_a_trial_wins_and_errors_are_retried"]),
    m("two_writers_lose_a_row", ANALYSIS, "two writers losing a row: parts named by the second they were written in",
      [("e2ettt/tables.py", "        name = f\"part-{row['row_id']}-{stamp}-{os.getpid()}.parquet\"\n",
        "        name = f\"part-{stamp // 10**9}.parquet\"\n")],
      ["tests/test_tables.py::test_concurrent_writers_keep_every_row_and_compaction_keeps_them_too"]),
    m("reset_skips_a_document", TTT, "per-document TTT that forgets to reset at a document (the second one carries "
      "the first's adapters)",
      [("e2ettt/ttt.py", "        if by_document and span.opens and k > 0:", "        if by_document and span.opens and k > 0 "
        "and sum(s.opens for s in spans[:k]) != 1:")],
      ["tests/test_protocols.py::test_each_recipe_matches_a_loop_written_plainly[doc-lora]"]),
    m("phase_trains_on_unscored_documents", TTT, "a global phase that trains on documents not scored yet",
      [("e2ettt/ttt.py", "global_pass_(model, tokens, phase_from, b, cfg, params)",
        "global_pass_(model, tokens, phase_from, spans[-1].b, cfg, params)")],
      ["tests/test_protocols.py::test_no_score_depends_on_a_later_token_in_any_recipe[phased]"]),
    m("dyneval_decays_toward_zero", TTT, "dynamic evaluation's decay toward zero instead of toward the starting weights",
      [("e2ettt/ttt.py", "pull = st[\"decay\"] * (st[\"start\"] - p)", "pull = st[\"decay\"] * (0 - p)")],
      ["tests/test_protocols.py::test_each_recipe_matches_a_loop_written_plainly[dyneval]"]),
    m("softcap_dropped", MODEL, "the output layer's logit soft cap left out (a different function under the same names)",
      [("e2ettt/model.py", "        return c * torch.tanh(logits / c)", "        return logits")], [REF_FORWARD]),
    m("q_gain_dropped", MODEL, "attention's per-head q_gain never applied",
      [("e2ettt/model.py", "        q = q * self.q_gain.to(q.dtype)[None, :, None, None]\n", "")], [REF_FORWARD]),
    m("resid_mix_ignores_x0", MODEL, "resid_mix mixing the stream with itself instead of with the embedding output",
      [("e2ettt/model.py", "mix[1][None, None] * x0", "mix[1][None, None] * x")], [REF_FORWARD]),
    m("skip_weights_dropped", MODEL, "U-Net skips added without their per-channel weights",
      [("e2ettt/model.py", "x = x + self.skip_weights[j].to(x.dtype)[None, None] * skips.pop()", "x = x + skips.pop()")],
      [REF_FORWARD]),
    m("untied_head_ignored", MODEL, "the output layer always the embedding, an untied lm_head never used",
      [("e2ettt/model.py", "weight = self.tok_emb.weight if self.lm_head is None else self.lm_head.weight",
        "weight = self.tok_emb.weight")], [REF_FORWARD.replace("tied-gqa-odd", "untied-mha")]),
    m("lora_starts_away_from_zero", TTT, "LoRA's B initialised nonzero: the adapters change the model before any step",
      [("e2ettt/adapt.py", "        self.B = nn.Parameter(torch.zeros(out_features, rank))",
        "        self.B = nn.Parameter(torch.full((out_features, rank), 1e-3))")],
      [T + "test_lr_zero_leaves_scores_and_weights_as_they_were_for_every_adapted_choice[sgd-lora:4]"]),
    m("recovered_as_mean_of_ratios", ANALYSIS, "recovered and healing as the mean of per-seed ratios, not the ratio of "
      "means the README defines",
      [("analysis/metrics.py", "    r = mx / my\n", "    r = float((pair[\"x\"] / pair[\"y\"]).mean())\n")],
      ["tests/test_analysis.py::test_the_key_table_by_the_readmes_formulas_on_damage_that_varies_by_seed"]),
    m("judged_on_the_clock", ANALYSIS, "early stopping judged at whatever report the clock sends (statuses that depend "
      "on the machine's speed)",
      [("e2ettt/driver/stopping.py", "    if p.checkpoint and p.seed_fraction >= rule.min_fraction",
        "    if p.seed_fraction >= rule.min_fraction")],
      ["tests/test_stopping.py::test_verdicts_are_taken_at_checkpoints_of_the_text_never_at_reports_of_the_clock"]),
]
SMOKE = "hadamard_on_weights_only"  # what --smoke runs end to end: killed in seconds, no rows to run
# one per area, each killed in seconds; the bpb one also shows a row alarm
QUICK = ("first_chunk_delta_wired_to_0", "leading_space_dropped_on_device", "hadamard_on_weights_only",
         "report_on_selection_seeds", "softcap_dropped")


def check_edits(root: Path, mutants: list[Mutant]) -> None:
    """Every `old` text occurs exactly once in its file under `root`: a mutant that no longer applies is an error."""
    for mutant in mutants:
        for e in mutant.edits:
            count = (root / e.path).read_text().count(e.old)
            if count != 1:
                raise ValueError(f"mutant {mutant.name}: its old text occurs {count} times in {e.path}, not once")


def check_tests(root: Path, mutants: list[Mutant]) -> None:
    """Every test a mutant names is defined in its file under `root`: a renamed test is an error."""
    for mutant in mutants:
        for node in mutant.tests:
            path, name = node.split("::")
            file = root / path
            if not file.is_file() or not re.search(rf"^def {re.escape(name.split('[')[0])}\(", file.read_text(), re.M):
                raise ValueError(f"mutant {mutant.name}: no test {node}")


def copy_source(dest: Path, source: Path = REPO) -> Path:
    """The source, tests and settings of `source` (no caches, runs or virtual environment) under `dest`."""
    skip = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info", ".pytest_cache")
    for name in COPIED:
        src = source / name
        if src.is_dir():
            shutil.copytree(src, dest / name, ignore=skip)
        elif src.exists():
            shutil.copy2(src, dest / name)
    return dest


def apply(root: Path, mutant: Mutant) -> None:
    for e in mutant.edits:
        path = root / e.path
        text = path.read_text()
        if text.count(e.old) != 1:
            raise ValueError(f"mutant {mutant.name}: its old text does not occur exactly once in {e.path}")
        path.write_text(text.replace(e.old, e.new))


def in_copy(root: Path, args: list[str], timeout: float) -> subprocess.CompletedProcess:
    """Python in the copy: its directory first on PYTHONPATH and as the working directory."""
    env = {**os.environ, "PYTHONPATH": str(root), "PYTHONDONTWRITEBYTECODE": "1"}
    return subprocess.run([sys.executable, *args], cwd=root, env=env, capture_output=True, text=True, timeout=timeout)


def check_imports_copy(root: Path) -> None:
    """The copy, not the installed package, is what a run in it imports."""
    code = "import e2ettt, analysis, tests; print(e2ettt.__file__, analysis.__file__, tests.__file__)"
    done = in_copy(root, ["-c", code], 120)
    files = done.stdout.split()
    if done.returncode or len(files) != 3 or not all(Path(f).resolve().is_relative_to(root.resolve()) for f in files):
        raise RuntimeError(f"a run in {root} imports {files or done.stderr[-500:]}, not the copy")


@dataclass
class Outcome:
    mutant: Mutant
    killed_by: list[str] = field(default_factory=list)  # failing tests, then fired alarms
    seconds: float = 0.0
    error: str = ""

    @property
    def killed(self) -> bool:
        return bool(self.killed_by)


def run_tests(root: Path, tests: list[str], stop_first: bool = True, timeout: float = 900) -> tuple[list[str], str]:
    """(failing test node ids, error): pytest on `tests` in the copy."""
    done = in_copy(root, [*PYTEST, *(["-x"] if stop_first else []), *tests], timeout)
    failed = re.findall(r"^(?:FAILED|ERROR) (\S+)", done.stdout, re.M)
    if done.returncode in (0, 1) or failed:
        return failed, ""
    return failed, f"pytest exit {done.returncode}: {(done.stdout + done.stderr).strip()[-600:]}"


def row_smoke(root: Path, cache: Path, timeout: float = 900) -> tuple[set[str], str]:
    """(the alarms the rows raised, error): the rows run in the copy (see `smoke_main`)."""
    done = in_copy(root, [str(Path("benchmarks") / "mutants.py"), "--row-smoke", str(cache)], timeout)
    lines = done.stdout.strip().splitlines()
    if done.returncode or not lines:
        return set(), f"the rows failed: {(done.stdout + done.stderr).strip()[-600:]}"
    return {a for _, _, alarms in json.loads(lines[-1]) for a in alarms.split(",") if a}, ""


def smoke_main(cache: str) -> None:
    """In a copy: the tiny demo's rows through the worker (tests/test_worker.py's `windowing_rows`), one JSON line of
    (windowing, seed, alarms)."""
    from e2ettt.demo import build_demo
    from tests.conftest import TINY_DEMO
    from tests.test_worker import windowing_rows

    rows = windowing_rows(build_demo(TINY_DEMO, cache, log=lambda *a: None))
    print(json.dumps([(name, seed, m.alarms) for name, seed, m in rows]))


def run_mutant(mutant: Mutant, source: Path, work: Path, cache: Path) -> Outcome:
    """Apply `mutant` to a fresh copy of `source` under `work`, run its tests (and the rows, if it names alarms)."""
    out = Outcome(mutant)
    if mutant.equivalent:
        return out
    t0 = time.perf_counter()
    root = copy_source(work / mutant.name, source)
    try:
        apply(root, mutant)
        failed, out.error = run_tests(root, list(mutant.tests))
        out.killed_by = failed
        if mutant.alarms and not out.error:
            fired, out.error = row_smoke(root, cache)
            out.killed_by += [f"alarm {a}" for a in sorted(fired)]
    finally:
        out.seconds = time.perf_counter() - t0
        shutil.rmtree(root, ignore_errors=True)
    return out


def baseline(mutants: list[Mutant], source: Path, work: Path, cache: Path) -> float:
    """The named tests on an unchanged copy of `source` (must pass) and its rows (must raise no alarm); the seconds
    taken."""
    t0 = time.perf_counter()
    root = copy_source(work / "clean", source)
    check_imports_copy(root)
    tests = list(dict.fromkeys(t for x in mutants if not x.equivalent for t in x.tests))
    failed, error = run_tests(root, tests, stop_first=False)
    if failed or error:
        raise RuntimeError(f"the unchanged source fails {failed or error}: no kill would mean anything")
    if any(x.alarms and not x.equivalent for x in mutants):
        fired, error = row_smoke(root, cache)
        if fired or error:
            raise RuntimeError(error or f"the unchanged source raises row alarms {sorted(fired)}")
    shutil.rmtree(root, ignore_errors=True)
    return time.perf_counter() - t0


def table(outcomes: list[Outcome]) -> str:
    lines = ["| mutant | area | mistake it stands for | killed by | s |", "|---|---|---|---|---|"]
    for o in outcomes:
        if o.mutant.equivalent:
            verdict = f"equivalent: {o.mutant.equivalent}"
        elif o.error:
            verdict = "ERROR " + " ".join(o.error.split()).replace("|", "/")[:300]
        elif o.killed:
            verdict = ", ".join(f"`{k.split('::')[-1]}`" if "::" in k else k for k in o.killed_by)
            missing = [a for a in o.mutant.alarms if f"alarm {a}" not in o.killed_by]
            verdict += f" (expected alarm {', '.join(missing)} did not fire)" if missing else ""
        else:
            verdict = "**SURVIVED**"
        seconds = "—" if o.mutant.equivalent else f"{o.seconds:.0f}"
        lines.append(f"| {o.mutant.name} | {o.mutant.area} | {o.mutant.mistake} | {verdict} | {seconds} |")
    return "\n".join(lines)


def load() -> str:
    return " ".join(f"{v:.1f}" for v in os.getloadavg())


def append(path: Path, title: str, body: str, notes: list[str]) -> None:
    sys.path.insert(0, str(REPO / "benchmarks"))
    from _common import machine

    command = "python " + " ".join([os.path.relpath(sys.argv[0], REPO)] + sys.argv[1:])
    block = [f"\n## {title}\n", f"- date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}",
             f"- machine: {machine()}", f"- command: `{command}`", "", body, ""] + [f"- {n}" for n in notes]
    with open(path, "a") as f:
        f.write("\n".join(block) + "\n")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help=f"one mutant per area: {', '.join(QUICK)}")
    p.add_argument("--only", nargs="+", metavar="NAME", help="these mutants only")
    p.add_argument("--append", metavar="FILE", help="append the table, machine, command and date to FILE")
    p.add_argument("--list", action="store_true", help="list the mutants and exit")
    p.add_argument("--smoke", action="store_true", help="check that every mutant applies and names tests that exist, then "
                   f"run one ({SMOKE}, or --only's) end to end; never appends")
    p.add_argument("--row-smoke", metavar="CACHE", help=argparse.SUPPRESS)  # run inside a copy by the harness
    args = p.parse_args(argv)
    if args.row_smoke:
        smoke_main(args.row_smoke)
        return 0
    if args.smoke and args.append:
        p.error("--smoke never appends: drop --append")
    only = args.only or ([SMOKE] if args.smoke else None)
    chosen = [x for x in MUTANTS if (not args.quick or x.name in QUICK) and (not only or x.name in only)]
    unknown = set(args.only or ()) - {x.name for x in MUTANTS}
    if unknown or not chosen:
        p.error(f"no such mutant: {', '.join(sorted(unknown))}" if unknown else "no mutant selected")
    check_edits(REPO, MUTANTS)
    if args.smoke:
        check_tests(REPO, MUTANTS)
        print(f"all {len(MUTANTS)} mutants: every edit applies exactly once, every named test exists", flush=True)
    if args.list:
        for x in chosen:
            print(f"{x.name:<34} {x.area:<20} {x.mistake}")
        return 0
    t0, load_before = time.perf_counter(), load()
    with tempfile.TemporaryDirectory(prefix="e2ettt-mutants-") as tmp:
        work, cache = Path(tmp), Path(tmp) / "demo-cache"
        source = copy_source(work / "source")  # one snapshot: the baseline and every mutant start from the same code
        seconds = baseline(chosen, source, work, cache)
        print(f"unchanged source: every named test passes, the rows raise no alarm ({seconds:.0f} s)", flush=True)
        outcomes = []
        for x in chosen:
            outcomes.append(run_mutant(x, source, work, cache))
            o = outcomes[-1]
            state = "equivalent" if x.equivalent else "ERROR" if o.error else "killed" if o.killed else "SURVIVED"
            print(f"  {x.name:<34} {state:<10} {', '.join(o.killed_by)} {o.seconds:.0f} s", flush=True)
    wall = time.perf_counter() - t0
    body = table(outcomes)
    run = [o for o in outcomes if not o.mutant.equivalent]
    killed = sum(o.killed and not o.error for o in run)
    notes = [f"{killed} of {len(run)} mutants killed, {len(outcomes) - len(run)} listed as equivalent; wall {wall:.0f} s "
             f"(baseline {seconds:.0f} s: the named tests on the unchanged source, and its rows without alarms)",
             f"load average (1, 5, 15 min) {load_before} at the start, {load()} at the end, on "
             f"{os.cpu_count()} logical CPUs shared with other work",
             "killed by: the first test that failed (pytest -x), then each row alarm that fired on the rows "
             f"(`{SMOKE_TEST.split('::')[-1]}`'s trial run in the mutated copy)"]
    print(body)
    for n in notes:
        print(f"- {n}")
    if args.append:
        append(Path(args.append), f"Mutants: planted bugs and the checks that catch them ({'quick' if args.quick else 'all'})",
               body, notes)
    return 0 if killed == len(run) else 1


if __name__ == "__main__":
    sys.exit(main())
