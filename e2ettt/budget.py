"""What evaluation-time TTT costs: projections per row, and a sweep's plan before it spends anything.

parameter-golf gives evaluation 600 s on 8×H100. A row's
`projected_full_seconds` is its measured tokens/s carried over the whole
validation stream on the same hardware (same ranks, same device), which is
what decides whether a setting fits that budget.

Before a sweep runs, `plan_cost` estimates each trial's time from a
measured rate where one exists (earlier rows of the same inputs, device
and ranks) and otherwise from a stated FLOP model: per scored-and-adapted
token, 2N FLOPs to score (none extra when the first epoch's forward scores
it) and 6N per epoch of adaptation, N the model's matrix parameters, at an
assumed 40% of the device's dense peak.
"""
from __future__ import annotations

from dataclasses import dataclass

EVAL_BUDGET_SECONDS = 600.0  # parameter-golf: evaluation time allowed on 8×H100
MFU = 0.4  # assumed share of peak for the FLOP model (stated in every plan)
PEAK_FLOPS = {  # dense peak per device, FLOP/s: H100 SXM bf16 989 TFLOP/s; fp32 without TF32 67 TFLOP/s
    ("cuda", "bf16"): 989e12, ("cuda", "fp16"): 989e12, ("cuda", "fp32"): 67e12,
    ("cpu", "bf16"): 50e9, ("cpu", "fp16"): 50e9, ("cpu", "fp32"): 50e9,
}
STARTUP_SECONDS = 20.0  # a trial's worker-group start-up, as measured on this project's CPU machines


def projected_full_seconds(stream_tokens: int, tokens_per_second: float) -> float:
    """Seconds to run the same TTT over the whole validation stream at the measured rate."""
    return stream_tokens / tokens_per_second if tokens_per_second and tokens_per_second > 0 else float("nan")


def ttt_flops_per_token(matrix_params: int, epochs: int, fuse_score: bool) -> float:
    score = 0.0 if (fuse_score and epochs > 0) else 2.0 * matrix_params  # fused: the first epoch's forward scores
    return score + 6.0 * matrix_params * epochs


@dataclass
class TrialCost:
    label: str
    tokens: int  # TTT tokens of the trial (all its seeds)
    seconds: float  # projected wall time, start-up included
    source: str  # "measured" or "FLOP model"


def trial_cost(label: str, tokens: int, ranks: int, device: str, dtype: str, matrix_params: int, epochs: int,
               fuse_score: bool, measured_tps: float | None) -> TrialCost:
    if measured_tps:
        return TrialCost(label, tokens, STARTUP_SECONDS + tokens / measured_tps, "measured")
    rate = ranks * MFU * PEAK_FLOPS[(device, dtype)] / ttt_flops_per_token(matrix_params, epochs, fuse_score)
    return TrialCost(label, tokens, STARTUP_SECONDS + tokens / rate, "FLOP model")


def plan_lines(costs: list[TrialCost], ranks: int, device: str, concurrency: int | None, gpus_per_node: int,
               usd_per_node_hour: float) -> list[str]:
    """The plan a user reads before spending: trials, tokens, time, GPU-hours and cost."""
    total_s = sum(c.seconds for c in costs)
    lines = [f"  {len(costs)} trials, {sum(c.tokens for c in costs):,} TTT tokens; projected trial time "
             f"{total_s / 3600:.2f} h in all ({sum(c.source == 'measured' for c in costs)} from measured rates, "
             f"{sum(c.source != 'measured' for c in costs)} from the FLOP model at {MFU:.0%} of peak)"]
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
