"""Rows made as the sweep makes them (plans, artifacts, worker), without Ray."""
from e2ettt import artifacts
from e2ettt.launch import run_local
from e2ettt.plan import SweepConfig, make_trial, needs, open_sweep, plan_settings, segments
from e2ettt.quant.regimes import QuantConfig
from e2ettt.source import Inputs, fingerprint, load_split, resolve
from e2ettt.ttt import TTTConfig
from e2ettt.worker import run_trial_on_rank


def trial_rows(inputs: Inputs, regime: str, ttts: list[TTTConfig], seeds, quant: QuantConfig) -> list[tuple]:
    """(index of the row's TTT config in `ttts`, seed, measured columns) of every row of `regime` under each config
    at each seed; the configs share max_tokens, chunk_tokens and heldout_tokens."""
    first = ttts[0]
    starts = segments(load_split(inputs, "val"), first.max_tokens, seeds, [first.chunk_tokens], first.heldout_tokens)
    settings = plan_settings(fingerprint(inputs), regime, ttts, starts, quant, "cpu", 1)
    values, _ = artifacts.prepare_local(needs(settings, fingerprint(inputs), quant, "cpu", first.dtype), inputs, quant)
    index = {s.setting_key: i for i, s in enumerate(settings)}
    setting_of = {r.row_id: s.setting_key for s in settings for r in s.rows}
    rows = run_trial_on_rank(make_trial(settings, inputs, 1), values)
    return [(index[setting_of[row.row_id]], row.seed, m) for row, m, _ in rows]


def sweep_rows(cfg: SweepConfig) -> dict:
    """row_id -> measured columns of every row the sweep `cfg` would run (CPU), each trial on its planned number of
    ranks in a gloo group of this machine's processes (`launch`), with the artifacts made in this process."""
    inputs = resolve(cfg.source)
    sweep = open_sweep(cfg, inputs)
    values, _ = artifacts.prepare_local(sweep.needs, inputs, cfg.quant)
    out = {}
    for trial in sweep.trials:
        for row, measured, _ in run_local(run_trial_on_rank, (trial, values), trial.world_size):
            out[row.row_id] = measured
    return out
