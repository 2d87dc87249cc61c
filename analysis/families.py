"""Does recoverability track the size of the damage or its structure? The damage ladder, read off the tables.

Each regime, at its best setting (`metrics.best_setting`), is a point:
damage, recovery and the fraction of the damage recovered, with
intervals over the reported seeds, in its family (`family` column: the
structured SpinQuant-failure class, unstructured noise, the quantizers).
`matched` pairs regimes of two families whose damages agree within 25%
and compares what they recovered; `findings` turns those comparisons into
sentences that say only what the intervals allow. `EXTERNAL` holds the
public points this instrument exists to check: other models, their own
numbers.
"""
from __future__ import annotations

import math

import numpy as np
import pandas as pd

from analysis import metrics

# Public results, drawn beside ours as labelled references (other models, other pipelines).
# damage and recovery in bpb; recovery_frac = recovery / damage.
EXTERNAL = [
    {"label": "PR #1837 (SpinQuant+GPTQ, E2E TTT)", "damage": 6.47968 - 1.07125, "recovery": 6.47968 - 1.07063},
    {"label": "PR #1818 (GPTQ int6, sliding TTT, 3 seeds)", "damage": 3.46203 - 1.10090, "recovery": 3.46203 - 2.76634},
]
# PR #1341 reports TTT gains without the damage they were taken at: drawn as gains, not points.
EXTERNAL_GAINS = [
    {"label": "PR #1341: SGD TTT on RTN int6", "low": 0.0165, "high": 0.0165},
    {"label": "PR #1341: SGD TTT on GPTQ int6 (4 configs)", "low": -0.030, "high": 0.0001},
]
FAMILY_ORDER = ["structured", "unstructured", "rtn", "gptq", "hadamard-rtn", "hadamard-gptq", "pg-int8", "own"]
MATCH = 0.25  # damages within 25% of each other count as matched


def points(trials: pd.DataFrame) -> pd.DataFrame:
    """One row per damaged regime at its best setting: family, damage, recovery and fractions with intervals."""
    best = metrics.best_setting(trials)
    if best.empty or "setting_key" not in best:
        return pd.DataFrame()
    best = best[best["setting_key"].notna() & (best["regime"] != "fp")].copy()
    if "family" not in best:
        best["family"] = best["regime"].map(metrics.family_of)
    return best.sort_values("damage_mean").reset_index(drop=True)


def _diff(a: pd.Series, b: pd.Series, col: str) -> tuple[float, float]:
    """a − b of a column's means, with a 95% half-width from the two intervals combined (independent seeds' sets)."""
    d = a[f"{col}_mean"] - b[f"{col}_mean"]
    ha = (a[f"{col}_ci_high"] - a[f"{col}_ci_low"]) / 2
    hb = (b[f"{col}_ci_high"] - b[f"{col}_ci_low"]) / 2
    return float(d), float(math.hypot(ha, hb))


def matched(pts: pd.DataFrame, first: list[str], second: list[str]) -> pd.DataFrame:
    """Pairs of regimes, one of a family in `first`, one in `second`, whose damages agree within 25%; for each, the
    difference of their recovery fractions and healing with a 95% half-width."""
    rows = []
    a_side, b_side = pts[pts["family"].isin(first)], pts[pts["family"].isin(second)]
    for _, a in a_side.iterrows():
        if b_side.empty:
            break
        b = b_side.iloc[(np.log(b_side["damage_mean"].clip(lower=1e-9)) - math.log(max(a["damage_mean"], 1e-9))).abs().argmin()]
        if not (a["damage_mean"] > 0 and b["damage_mean"] > 0
                and abs(a["damage_mean"] - b["damage_mean"]) <= MATCH * max(a["damage_mean"], b["damage_mean"])):
            continue
        frac, frac_hw = _diff(a, b, "recovery_frac")
        heal, heal_hw = _diff(a, b, "healing_frac")
        rows.append({"first": a["regime"], "second": b["regime"], "damage_first": a["damage_mean"],
                     "damage_second": b["damage_mean"], "frac_first": a["recovery_frac_mean"],
                     "frac_second": b["recovery_frac_mean"], "frac_diff": frac, "frac_hw": frac_hw,
                     "heal_diff": heal, "heal_hw": heal_hw})
    return pd.DataFrame(rows)


def _verdict(diff: float, hw: float) -> int:
    """+1 / −1 when the interval excludes 0 on that side, 0 when it does not (or is unknown)."""
    if math.isnan(diff) or math.isnan(hw):
        return 0
    return 1 if diff - hw > 0 else -1 if diff + hw < 0 else 0


def _pair_text(r: pd.Series) -> str:
    return (f"{r['first']} ({r['damage_first']:.3g} bpb) recovered {r['frac_first']:.0%} and {r['second']} "
            f"({r['damage_second']:.3g} bpb) {r['frac_second']:.0%} of their damage (difference {r['frac_diff']:+.2f} "
            f"± {r['frac_hw']:.2f})")


def findings(trials: pd.DataFrame) -> list[str]:
    """Sentences on size vs structure and on GPTQ vs RTN (#1341), each saying only what its intervals allow."""
    pts = points(trials)
    if pts.empty:
        return ["No damaged regime has a best setting: nothing to compare."]
    out = []
    pairs = matched(pts, ["structured"], ["unstructured"])
    if pairs.empty:
        out.append("Size or structure: no structured and unstructured regimes of matched damage (within 25%) in this "
                   "run, so structure cannot be told from size here.")
    else:
        signs = [_verdict(d, h) for d, h in zip(pairs["frac_diff"], pairs["frac_hw"])]
        if all(s > 0 for s in signs) or all(s < 0 for s in signs):
            word = "more" if signs[0] > 0 else "less"
            where = (f"at every one of the {len(pairs)} matched damage levels" if len(pairs) > 1
                     else "at the one matched damage level")
            verdict = (f"{where}, structured damage (a wrong decode of "
                       f"rotated weights) recovered {word} of its damage than unstructured noise of the same size, "
                       "beyond the 95% intervals: recoverability depends on how the model was damaged, not only on how much")
        elif not any(signs):
            verdict = (f"at none of the {len(pairs)} matched damage levels does the recovered fraction of structured and "
                       "unstructured damage differ beyond the 95% intervals: on this run, what can be recovered follows the "
                       "size of the damage, not its structure")
        else:
            def at(sign: int) -> str:
                sizes = [f"{d:.3g}" for d, s in zip(pairs["damage_first"], signs) if s == sign]
                return f"at {', '.join(sizes)} bpb" if sizes else "at no size"

            verdict = (f"structured damage (a wrong decode of rotated weights) recovered more of its damage than "
                       f"unstructured noise of the same size {at(1)}, less {at(-1)}, and as much within the 95% "
                       f"intervals {at(0)}: structure matters at some sizes of the damage only")
        out.append("Size or structure: " + verdict + ". " + "; ".join(_pair_text(r) for _, r in pairs.iterrows()) + ".")
        for fam in ("structured", "unstructured"):
            f = pts[pts["family"] == fam]
            if len(f) >= 2:
                lo, hi = f.iloc[0], f.iloc[-1]
                s = _verdict(*_diff(hi, lo, "recovery_frac"))
                trend = {1: "grows with", -1: "falls with", 0: "does not change beyond the intervals with"}[s]
                out.append(f"Within the {fam} family the recovered fraction {trend} the damage: "
                           f"{lo['recovery_frac_mean']:.0%} at {lo['damage_mean']:.3g} bpb, "
                           f"{hi['recovery_frac_mean']:.0%} at {hi['damage_mean']:.3g} bpb.")
    gptq = matched(pts, ["gptq", "hadamard-gptq"], ["rtn"])
    if gptq.empty:
        out.append("GPTQ vs RTN (#1341): no GPTQ and RTN regimes of matched damage (within 25%) in this run.")
    else:
        texts = []
        for _, r in gptq.iterrows():
            s = _verdict(r["heal_diff"], r["heal_hw"])
            word = {1: "healed more than", -1: "healed less than", 0: "healed as much as (within the intervals)"}[s]
            texts.append(f"{r['first']} ({r['damage_first']:.3g} bpb) {word} {r['second']} ({r['damage_second']:.3g} bpb): "
                         f"healing difference {r['heal_diff']:+.2f} ± {r['heal_hw']:.2f}")
        out.append("GPTQ vs RTN at matched damage (#1341 says SGD TTT undoes GPTQ's structure): " + "; ".join(texts) + ".")
    return out


def flattened(trials: pd.DataFrame, curves: pd.DataFrame, min_damage: float = 0.5, tail: float = 0.25) -> pd.DataFrame:
    """For each regime with at least `min_damage` at its best setting: the share of its final running gain (static −
    TTT running bpb) gained in the last `tail` of the tokens, median over seeds. Near 0: the curve had flattened."""
    pts = points(trials)
    rows = []
    for _, p in pts[pts["damage_mean"] >= min_damage].iterrows():
        shares = []
        for rid in metrics.ok(trials).loc[metrics.ok(trials)["setting_key"] == p["setting_key"], "row_id"]:
            c = curves[curves["row_id"] == rid].sort_values("chunk")
            if len(c) < 4:
                continue
            gain = metrics.running_static_bpb(c) - c["running_ttt_bpb"].to_numpy()
            at = int(np.searchsorted(c["tokens_seen"].to_numpy(), (1 - tail) * c["tokens_seen"].iloc[-1]))
            if gain[-1] > 0:
                shares.append((gain[-1] - gain[min(at, len(gain) - 1)]) / gain[-1])
        if shares:
            share = float(np.median(shares))
            rows.append({"regime": p["regime"], "damage": p["damage_mean"], "tail_share": share,
                         "flattened": share < 0.1})
    return pd.DataFrame(rows)


def tokens_to_heal_by_family(trials: pd.DataFrame, curves: pd.DataFrame) -> pd.DataFrame:
    """Per regime at its best setting, by family: median tokens of TTT until half of the damage is recovered (the
    running gain over the static curve reaches half the running damage), and until the running bpb is within 0.01
    of the fp model's static bpb."""
    pts = points(trials)
    heal = metrics.tokens_to_heal(trials, curves)
    rows = []
    for _, p in pts.iterrows():
        half, total = [], []
        for _, r in metrics.ok(trials)[metrics.ok(trials)["setting_key"] == p["setting_key"]].iterrows():
            c = curves[curves["row_id"] == r["row_id"]].sort_values("chunk")
            if c.empty:
                continue
            gain = metrics.running_static_bpb(c) - c["running_ttt_bpb"].to_numpy()
            hit = np.flatnonzero(gain >= 0.5 * r["damage"])
            half.append(float(c["tokens_seen"].iloc[hit[0]]) if hit.size else math.nan)
            total.append(float(c["tokens_seen"].iloc[-1]))
        near = heal[(heal["regime"] == p["regime"]) & (heal["inner_lr"] == p["inner_lr"])
                    & (heal["chunk_tokens"] == p["chunk_tokens"])]["tokens_to_heal"] if len(heal) else pd.Series(dtype=float)
        rows.append({"family": p["family"], "regime": p["regime"], "damage": p["damage_mean"],
                     "tokens to recover half": float(np.nanmedian(half)) if half and not np.isnan(half).all() else math.nan,
                     "runs reaching half": f"{int(np.sum(~np.isnan(half)))}/{len(half)}",
                     "tokens to within 0.01 of fp": float(near.median()) if len(near) and near.notna().any() else math.nan,
                     "tokens per row": float(np.median(total)) if total else math.nan})
    order = {f: i for i, f in enumerate(FAMILY_ORDER)}
    df = pd.DataFrame(rows)
    return df.assign(_o=df["family"].map(order)).sort_values(["_o", "damage"]).drop(columns="_o") if len(df) else df
