"""What evaluation-time TTT costs: projections per row, and a sweep's plan before it spends anything.

parameter-golf gives evaluation 600 s on 8×H100. A row's
`projected_full_seconds` is its measured tokens/s carried over the whole
validation stream on the same hardware (same ranks, same device), plus the
start-up its trial paid, which is what decides whether a setting fits that
budget.

Before a sweep runs, `setting_cost` estimates each setting's TTT time from
a measured rate where one exists (earlier rows of the same inputs, device,
ranks and protocol) and otherwise from a stated FLOP model: per scored
target, 2N FLOPs per position its window runs to score it (context/stride
of them; none extra when the first epoch's forward scores it) and 6N per
epoch per position the adaptation runs (the scoring windows again, or one
per target when it trains on sequences), N the model's matrix parameters,
at an assumed 40% of the device's dense peak. `plan_lines` adds each trial's
start-up: the median measured on the same device and ranks, or an assumed
figure that the plan names as such.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

EVAL_BUDGET_SECONDS = 600.0  # parameter-golf: evaluation time allowed on 8×H100
MFU = 0.4  # assumed share of peak for the FLOP model (stated in every plan)
PEAK_FLOPS = {  # dense peak per device, FLOP/s: H100 SXM bf16 989 TFLOP/s; fp32 without TF32 67 TFLOP/s
    ("cuda", "bf16"): 989e12, ("cuda", "fp16"): 989e12, ("cuda", "fp32"): 67e12,
    ("cpu", "bf16"): 50e9, ("cpu", "fp16"): 50e9, ("cpu", "fp32"): 50e9,
}
ASSUMED_STARTUP_SECONDS = 20.0  # a trial's start-up when no row of this device and rank count measured one


def projected_full_seconds(stream_tokens: int, tokens_per_second: float, startup_seconds: float = 0.0) -> float:
    """Seconds to run the same TTT over the whole validation stream at the measured rate, its trial's start-up
    included."""
    if not tokens_per_second or tokens_per_second <= 0:
        return math.nan
    return stream_tokens / tokens_per_second + (0.0 if math.isnan(startup_seconds) else startup_seconds)


def ttt_flops_per_token(matrix_params: int, epochs: int, fuse_score: bool, context: int = 1, stride: int = 1,
                        sequences: bool = False) -> float:
    """FLOPs per scored target: a window of `context` inputs scores `stride` targets (context/stride positions run
    per target), and the adaptation runs each epoch over the scoring windows (the same again) or, with
    `sequences`, over the targets as context-long sequences (one position per target)."""
    per_window = context / max(1, stride)
    fused = fuse_score and epochs > 0 and (not sequences or stride >= context)
    score = 0.0 if fused else 2.0 * matrix_params * per_window  # fused: the first epoch's forward scores
    return score + 6.0 * matrix_params * epochs * (1.0 if sequences else per_window)


@dataclass
class SettingCost:
    label: str
    tokens: int  # TTT tokens of the setting (all its seeds)
    seconds: float  # projected TTT time
    source: str  # "measured" or "FLOP model"


def setting_cost(label: str, tokens: int, ranks: int, device: str, dtype: str, matrix_params: int, epochs: int,
                 fuse_score: bool, measured_tps: float | None, context: int = 1, stride: int = 1,
                 sequences: bool = False) -> SettingCost:
    if measured_tps:
        return SettingCost(label, tokens, tokens / measured_tps, "measured")
    flops = ttt_flops_per_token(matrix_params, epochs, fuse_score, context, stride, sequences)
    rate = ranks * MFU * PEAK_FLOPS[(device, dtype)] / flops
    return SettingCost(label, tokens, tokens / rate, "FLOP model")


def plan_lines(costs: list[SettingCost], trials: int, startup: float | None, ranks: int, device: str,
               concurrency: int | None, gpus_per_node: int, usd_per_node_hour: float) -> list[str]:
    """The plan a user reads before spending: settings, trials, tokens, time with start-up, GPU-hours and cost.
    `startup`: a trial's measured start-up on this device and rank count (None: assumed)."""
    ttt_s = sum(c.seconds for c in costs)
    per_trial = startup if startup is not None else ASSUMED_STARTUP_SECONDS
    total_s = ttt_s + trials * per_trial
    source = "measured" if startup is not None else "assumed, not measured on this device yet"
    lines = [f"  {len(costs)} settings in {trials} trial(s), {sum(c.tokens for c in costs):,} TTT tokens: "
             f"{ttt_s / 3600:.2f} h of TTT ({sum(c.source == 'measured' for c in costs)} settings from measured rates, "
             f"{sum(c.source != 'measured' for c in costs)} from the FLOP model at {MFU:.0%} of peak) + {trials} trial "
             f"start-up(s) of {per_trial:.0f} s ({source}) = {total_s / 3600:.2f} h"]
    if concurrency:
        lines.append(f"  wall time at {concurrency} trial(s) at once: about {total_s / concurrency / 3600:.2f} h")
    if device == "cuda":
        gpu_hours = total_s * ranks / 3600
        lines.append(f"  GPU-hours: {gpu_hours:.2f} ({gpu_hours / gpus_per_node:.2f} node-hours of {gpus_per_node} GPUs)")
        if usd_per_node_hour:
            cost = gpu_hours / gpus_per_node * usd_per_node_hour
            lines.append(f"  on-demand cost at ${usd_per_node_hour:.2f}/node-hour: ${cost:,.0f}")
        else:
            lines.append("  cost: give --set usd_per_node_hour=PRICE (your on-demand price for the node type)")
    return lines
