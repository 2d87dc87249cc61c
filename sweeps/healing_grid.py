#!/usr/bin/env python
"""healing_grid: how much quantization damage can score-first TTT repair?

A Ray Tune grid over quant regime × inner lr × chunk tokens (× epochs,
optimizer, adapted parameters), each trial one Ray Train TorchTrainer whose
W workers run score-first TTT in lockstep (gloo on CPU, NCCL on GPU) over
each seed's segment of the validation stream in turn. Each regime is
quantized once and its static curves computed once, as Ray tasks on the
trials' kind of device; trials receive them as Ray objects.

    python sweeps/healing_grid.py                 # embedded demo, default grid, local Ray
    python sweeps/healing_grid.py --smoke         # a minute: fp + int3, one lr, one chunk size
    python sweeps/healing_grid.py --checkpoint final_model.pt --data DIR \\
        --tokenizer fineweb_1024_bpe.model --gpus-per-trial 8 --address auto --storage s3://bucket/runs

Writes runs/<name>/trials.parquet, curves.parquet (Parquet datasets) and
manifest.json; rerunning the same command skips finished rows (a changed
grid runs only new cells).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from analysis.report import trial_summary
from e2ettt.config import ConfigError, override, set_items, settings_file, split_list, with_device_defaults
from e2ettt.demo import DEMO_SETTINGS
from e2ettt.orchestrate import run
from e2ettt.provenance import code_root
from e2ettt.quant.regimes import RegimeError
from e2ettt.recipes import describe, recipe_updates
from e2ettt.sweep import SweepConfig

HERE = Path(__file__).resolve().parent  # the grid presets (ladder.yaml, capacity.yaml) live beside this recipe
RUNS = HERE.parent / "runs"  # where run directories go unless --out says otherwise
SMOKE = {"grid.regimes": ("fp", "int3"), "grid.inner_lrs": (0.03,), "grid.chunks": (256,), "grid.seeds": (0,),
         "ttt.max_tokens": 2048, "name": "smoke"}

# flag -> (type, dotted key, help); defaults are read off SweepConfig
LIST_FLAGS = {
    "regimes": (str, "grid.regimes", "quantization regimes: fp, pg-int8, intN, gptq-intN, hadamard-intN, hadamard-gptq-intN"),
    "inner_lrs": (float, "grid.inner_lrs", "inner learning rates"),
    "chunks": (int, "grid.chunks", "chunk sizes in target tokens"),
    "seeds": (int, "grid.seeds", "segments of the validation stream (distinct, non-overlapping; need --max-tokens)"),
    "epochs": (int, "grid.epochs", "passes over each chunk after scoring it"),
    "optimizers": (str, "grid.optimizers", "inner optimizers: sgd, adamw"),
    "params": (str, "grid.params", "adapted parameters: all, norms, lora:R"),
}
SCALAR_FLAGS = {
    "checkpoint": ("source.checkpoint", "parameter-golf final_model.pt or .int8.ptz (empty: the embedded demo)"),
    "data": ("source.data", "directory with *_train_*.bin and *_val_*.bin shards"),
    "tokenizer": ("source.tokenizer", "SentencePiece .model matching the checkpoint's vocabulary"),
    "model_fn": ("source.model_fn", "module:function or path/file.py:function building the model from the checkpoint path"),
    "model_output": ("source.model_output", "what the model's forward returns: logits, method:NAME (model.NAME(ids) gives"
                     " logits), tuple:K"),
    "artifact_fn": ("source.artifact_fn", "module:function or file.py:function decoding an --artifact path to a state"
                    " dict (empty: the built-in formats)"),
    "cache_dir": ("source.cache_dir", "demo cache (empty: $E2ETTT_CACHE or ~/.cache/e2ettt)"),
    "workers": ("workers", "ranks per trial on CPU"),
    "cpus_per_worker": ("cpus_per_worker", "CPU threads per rank and per preparation task"),
    "gpus_per_trial": ("gpus_per_trial", "N ranks with one GPU each (NCCL); 0 = CPU"),
    "max_tokens": ("ttt.max_tokens", "validation tokens per row (0 = the whole stream; demo 2,048)"),
    "context": ("ttt.context", "tokens of context per scored position"),
    "out": ("out", "parent directory of run directories on this machine (default: runs/ of this repository, wherever the"
            " command runs from)"),
    "name": ("name", "run name: tables go to OUT/NAME/"),
    "storage": ("storage", "path or URI (s3://, gs://, ...) for Tune/Train state and copies of artifacts and tables"
                " (empty: OUT)"),
    "address": ("address", "Ray address; 'auto' joins this machine's cluster (empty: start a local Ray)"),
    "max_concurrent": ("max_concurrent", "trials in flight (0: what the cluster holds at its largest)"),
    "cluster_config": ("cluster_config", "autoscaler config to size concurrency from"
                       " (empty: ~/ray_bootstrap_config.yaml when joining)"),
    "start_timeout": ("start_timeout", "seconds a trial may wait for its workers (0: 120 locally, 1800 on a cluster)"),
    "max_worker_failures": ("max_worker_failures", "restarts of a trial's worker group after a killed worker or lost node"),
    "settings_per_trial": ("settings_per_trial", "settings one trial runs in turn, sharing its start-up"
                           " (0: as many as keep every trial slot busy; 1: a trial per setting)"),
    "scheduler": ("scheduler", "fifo, or asha: also cut settings by running recovery at rungs of tokens seen"),
    "stop_threshold": ("stop_threshold", "end a setting whose running recovery is below -this bpb (TTT hurting); 0 = never"),
    "local_cpus": ("local_cpus", "logical CPUs of the local Ray (0: the machine's cores)"),
}


def _default(key: str) -> Any:
    value: Any = SweepConfig()
    for part in key.split("."):
        value = getattr(value, part)
    return ",".join(map(str, value)) if isinstance(value, tuple) else value


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--grid", help="YAML or JSON file of settings (dotted keys or nested), applied before flags; or a "
                   f"preset in sweeps/: {', '.join(sorted(x.stem for x in HERE.glob('*.yaml')))}")
    p.add_argument("--smoke", action="store_true", help="minimal grid: fp + int3, lr 0.03, chunk 256, 2,048 tokens")
    p.add_argument("--ttt-recipe", metavar="NAME", help=f"a TTT protocol by name, applied before flags: {describe()}")
    p.add_argument("--dry-run", action="store_true", help="print the plan (trials, tokens, time, GPU-hours, cost) and exit")
    p.add_argument("--verbose", action="store_true", help="let Ray and Tune print their own status output (default: quiet)")
    p.add_argument("--dashboard", action="store_true", help="start Ray's dashboard and export live per-trial metrics to it")
    p.add_argument("--rerun-stopped", action="store_true", help="rerun rows the stopper ended (default: they count as done)")
    for flag, (_, key, text) in LIST_FLAGS.items():
        names = [f"--{flag.replace('_', '-')}"] + (["--lrs"] if flag == "inner_lrs" else [])
        p.add_argument(*names, dest=flag, metavar="LIST", help=f"comma-separated {text} (default: {_default(key)})")
    for flag, (key, text) in SCALAR_FLAGS.items():
        default = "" if flag == "out" else f" (default: {_default(key)!r})"
        p.add_argument(f"--{flag.replace('_', '-')}", help=f"{text}{default}")
    p.add_argument("--artifact", action="append", default=[], metavar="NAME=PATH",
                   help="your own quantized file, run as regime NAME beside the others (repeatable; added to --regimes; "
                   "default: none)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="any setting by dotted key, e.g. --set ttt.optimizer=adamw --set quant.calib_tokens=32768")
    return p.parse_args(argv)


def build_config(args: argparse.Namespace) -> SweepConfig:
    """Defaults, demo settings, smoke preset, grid file, flags, --set: later wins."""
    grid = HERE / f"{args.grid}.yaml" if args.grid and (HERE / f"{args.grid}.yaml").is_file() else args.grid
    updates: dict[str, Any] = settings_file(grid) if grid else {}
    if args.smoke:
        updates = {**SMOKE, **updates}
    if args.ttt_recipe:
        updates.update(recipe_updates(args.ttt_recipe))
    for switch in ("dry_run", "verbose", "dashboard", "rerun_stopped"):
        if getattr(args, switch):
            updates[switch] = True
    for flag, (kind, key, _) in LIST_FLAGS.items():
        if getattr(args, flag) is not None:
            updates[key] = split_list(getattr(args, flag), kind, flag.replace("_", "-"))
    for flag, (key, _) in SCALAR_FLAGS.items():
        if getattr(args, flag) is not None:
            updates[key] = getattr(args, flag)
    if args.artifact:
        updates["source.artifacts"] = tuple(args.artifact)
    updates.update(set_items(args.set))
    own = [str(a).partition("=")[0] for a in updates.get("source.artifacts", ())]
    if own:  # each artifact is a regime of the grid, whether --regimes names it or not
        regimes = tuple(updates.get("grid.regimes", SweepConfig().grid.regimes))
        updates["grid.regimes"] = regimes + tuple(n for n in own if n not in regimes)
    updates.setdefault("out", str(RUNS))  # not the working directory: a cluster job's is the home of whoever ran `ray start`
    if not updates.get("source.checkpoint"):
        updates = {**DEMO_SETTINGS, **updates}
    updates = with_device_defaults(updates, bool(updates.get("gpus_per_trial", SweepConfig().gpus_per_trial)))
    try:
        return override(SweepConfig(), updates)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None


def log(msg: str) -> None:
    print(msg, flush=True)


def main(argv: list[str] | None = None) -> int:
    try:
        cfg = build_config(parse_args(argv))
        outcome = run(cfg, log=log, code_dir=code_root())
    except (ConfigError, RegimeError, ValueError, OSError) as exc:
        print(f"healing_grid: error: {exc}", file=sys.stderr)
        return 2
    if outcome.dry_run:
        return 0
    from e2ettt.tables import RunTables

    trials = RunTables(outcome.run_dir).trials
    rows = trials[trials["row_id"].isin(outcome.row_ids)]
    if not rows.empty:
        log("\nper setting (n: finished seeds / seeds run; recovery and healing: mean ± 95% interval over seeds):\n"
            + trial_summary(rows).to_string(index=False))
    ran = rows[rows["row_id"].isin(outcome.todo)]
    interrupted = outcome.interrupted or len(ran) < len(outcome.todo)
    log(f"\n{'stopped early' if interrupted else 'done'}: {len(ran)} of {len(outcome.todo)} rows written in "
        f"{outcome.wall_seconds:.0f} s wall ({ran['ttt_seconds'].sum() if len(ran) else 0:.0f} s of it inside TTT); "
        f"tables in {outcome.run_dir}")
    if interrupted:
        log("rerun the same command to run the remaining trials (finished rows are skipped)")
    log(f"next: python -m analysis {outcome.run_dir}    (report.md, figures, the key table)")
    if cfg.ttt.max_tokens:
        log(f"note: each row evaluated {cfg.ttt.max_tokens:,} validation tokens (ttt.max_tokens); "
            "numbers describe those segments, not the whole validation stream")
    return 130 if interrupted else 0


if __name__ == "__main__":
    sys.exit(main())
