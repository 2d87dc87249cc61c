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
from e2ettt.config import ConfigError, field_help, override, set_items, settings_file, split_list, with_device_defaults
from e2ettt.demo import DEMO_SETTINGS
from e2ettt.driver.orchestrate import run
from e2ettt.plan import SweepConfig
from e2ettt.provenance import code_root
from e2ettt.quant.regimes import FORMS, RegimeError
from e2ettt.recipes import describe, recipe_updates
from e2ettt.ttt import OPTIMIZERS

HERE = Path(__file__).resolve().parent  # the grid presets (ladder.yaml, capacity.yaml) live beside this recipe
RUNS = HERE.parent / "runs"  # where run directories go unless --out says otherwise
SMOKE = {"grid.regimes": ("fp", "int3"), "grid.inner_lrs": (0.03,), "grid.chunks": (256,), "grid.seeds": (0,),
         "ttt.max_tokens": 2048, "name": "smoke"}

# flag -> (type, dotted key) and flag -> dotted key; help texts are the fields' own comments (config.field_help),
# defaults are read off SweepConfig
LIST_FLAGS = {
    "regimes": (str, "grid.regimes"),
    "inner_lrs": (float, "grid.inner_lrs"),
    "chunks": (int, "grid.chunks"),
    "seeds": (int, "grid.seeds"),
    "epochs": (int, "grid.epochs"),
    "optimizers": (str, "grid.optimizers"),
    "params": (str, "grid.params"),
}
CHOICES = {"regimes": FORMS, "optimizers": ", ".join(OPTIMIZERS)}  # valid values, from where they are defined
SCALAR_FLAGS = {
    "checkpoint": "source.checkpoint", "data": "source.data", "tokenizer": "source.tokenizer",
    "model_fn": "source.model_fn", "model_output": "source.model_output", "artifact_fn": "source.artifact_fn",
    "cache_dir": "source.cache_dir", "workers": "workers", "cpus_per_worker": "cpus_per_worker",
    "gpus_per_trial": "gpus_per_trial", "max_tokens": "ttt.max_tokens", "context": "ttt.context", "out": "out",
    "name": "name", "storage": "storage", "address": "address", "max_concurrent": "max_concurrent",
    "cluster_config": "cluster_config", "start_timeout": "start_timeout", "max_worker_failures": "max_worker_failures",
    "settings_per_trial": "settings_per_trial", "scheduler": "scheduler", "stop_threshold": "stop_threshold",
    "local_cpus": "local_cpus",
}
SWITCHES = ("dry_run", "verbose", "dashboard", "rerun_stopped")  # on/off settings of SweepConfig


def _help(key: str) -> str:
    return field_help(SweepConfig(), key)


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
    for switch in SWITCHES:
        p.add_argument(f"--{switch.replace('_', '-')}", action="store_true", help=_help(switch))
    for flag, (_, key) in LIST_FLAGS.items():
        names = [f"--{flag.replace('_', '-')}"] + (["--lrs"] if flag == "inner_lrs" else [])
        choices = f": {CHOICES[flag]}" if flag in CHOICES else ""
        p.add_argument(*names, dest=flag, metavar="LIST",
                       help=f"comma-separated {_help(key)}{choices} (default: {_default(key)})")
    for flag, key in SCALAR_FLAGS.items():
        default = (" (default: runs/ of this repository, wherever the command runs from)" if flag == "out" else
                   f" (default: {_default(key)!r})")
        p.add_argument(f"--{flag.replace('_', '-')}", help=f"{_help(key)}{default}")
    p.add_argument("--artifact", action="append", default=[], metavar="NAME=PATH",
                   help=f"{_help('source.artifacts')} (repeatable; added to --regimes; default: none)")
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
    for switch in SWITCHES:
        if getattr(args, switch):
            updates[switch] = True
    for flag, (kind, key) in LIST_FLAGS.items():
        if getattr(args, flag) is not None:
            updates[key] = split_list(getattr(args, flag), kind, flag.replace("_", "-"))
    for flag, key in SCALAR_FLAGS.items():
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
