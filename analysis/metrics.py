"""The questions a sweep answers, each a function from the stored tables to a DataFrame.

Nothing here recomputes a metric the sweep stored; it aggregates them.
Spread over seeds: mean, sample std, and a 95% Student-t interval
(mean ± t(0.975, n−1) · std / √n), with n reported beside it.
"""
from __future__ import annotations

import math

import numpy as np
import pandas as pd

from analysis.tables import SETTINGS

# two-sided 95% Student-t quantiles t(0.975, df), df = 1..30; the normal 1.96 beyond
T975 = [12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
        2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042]


def t975(df: int) -> float:
    return T975[df - 1] if 1 <= df <= len(T975) else 1.96


def spread(values: pd.Series, prefix: str) -> pd.Series:
    v = values.dropna()
    n = len(v)
    mean = v.mean() if n else math.nan
    std = v.std(ddof=1) if n > 1 else math.nan
    half = t975(n - 1) * std / math.sqrt(n) if n > 1 else math.nan
    return pd.Series({f"{prefix}_mean": mean, f"{prefix}_std": std, f"{prefix}_ci_low": mean - half,
                      f"{prefix}_ci_high": mean + half, "n_seeds": n})


def ok(trials: pd.DataFrame) -> pd.DataFrame:
    return trials[trials["status"] == "ok"]


def damage_by_regime(trials: pd.DataFrame) -> pd.DataFrame:
    """Damage (post-quant − pre-quant bpb) per regime next to its artifact bytes."""
    cols = ["regime", "bits", "damage", "pre_quant_bpb", "post_quant_bpb", "artifact_bytes"]
    df = trials[[c for c in cols if c in trials]]
    out = df.groupby("regime", sort=False).agg(
        {c: "mean" for c in df.columns if c not in ("regime",)}).reset_index()
    return out.sort_values("damage").reset_index(drop=True)


def with_healing(trials: pd.DataFrame) -> pd.DataFrame:
    """Adds fp_post_ttt_bpb and healing_frac = 1 − (post_ttt − post_ttt(fp, same settings, same seed)) / damage."""
    keys = [k for k in SETTINGS + ["seed"] if k in trials]
    fp = ok(trials)[ok(trials)["regime"] == "fp"][keys + ["post_ttt_bpb"]].rename(columns={"post_ttt_bpb": "fp_post_ttt_bpb"})
    out = trials.merge(fp.drop_duplicates(keys), on=keys, how="left")
    valid = (out["regime"] != "fp") & (out["damage"] > 0) & (out["status"] == "ok")
    out["healing_frac"] = (1 - (out["post_ttt_bpb"] - out["fp_post_ttt_bpb"]) / out["damage"]).where(valid)
    return out


def recovery_by_setting(trials: pd.DataFrame) -> pd.DataFrame:
    """Recovery, recovery fraction and healing fraction per regime × setting, with spread over seeds."""
    df = with_healing(ok(trials))
    keys = ["regime"] + [k for k in SETTINGS if k in df]
    rows = []
    for key, g in df.groupby(keys, sort=True):
        row = dict(zip(keys, key if isinstance(key, tuple) else (key,)))
        row["damage"] = g["damage"].mean()
        row["post_ttt_bpb"] = g["post_ttt_bpb"].mean()
        row.update(spread(g["recovery"], "recovery").to_dict())
        row.update(spread(g["recovery_frac"], "recovery_frac").drop("n_seeds").to_dict())
        row.update(spread(g["healing_frac"], "healing_frac").drop("n_seeds").to_dict())
        rows.append(row)
    return pd.DataFrame(rows)


def best_setting(trials: pd.DataFrame) -> pd.DataFrame:
    """Best mean post-TTT bpb per regime, and how flat the optimum is.

    flatness = (second best − best) post-TTT bpb: near 0 means a neighbouring
    setting does as well and the choice matters little.
    """
    rec = recovery_by_setting(trials)
    rows = []
    for regime, g in rec.groupby("regime"):
        g = g.sort_values("post_ttt_bpb")
        best = g.iloc[0]
        second = g.iloc[1]["post_ttt_bpb"] if len(g) > 1 else math.nan
        row = {"regime": regime, **{k: best[k] for k in SETTINGS if k in g}, "post_ttt_bpb": best["post_ttt_bpb"],
               "recovery_mean": best["recovery_mean"], "healing_frac_mean": best["healing_frac_mean"],
               "flatness": second - best["post_ttt_bpb"], "settings_tried": len(g)}
        rows.append(row)
    return pd.DataFrame(rows)


def running_static_bpb(curve: pd.DataFrame) -> np.ndarray:
    """Running static bpb of one trial's curve (sorted by chunk): per-chunk bpb weighted by bytes
    (by tokens for tables written before curves stored bytes)."""
    if "bytes" in curve and curve["bytes"].notna().all():
        w = curve["bytes"].to_numpy(dtype=float)
    else:
        w = np.diff(np.concatenate([[0], curve["tokens_seen"].to_numpy(dtype=float)]))
    return np.cumsum(curve["static_bpb"].to_numpy() * w) / np.cumsum(w)


def tokens_to_heal(trials: pd.DataFrame, curves: pd.DataFrame, within: float = 0.01) -> pd.DataFrame:
    """Tokens of TTT until a trial's running bpb is within `within` of the fp model's static bpb.

    The fp reference is the running static bpb of the same chunks (pre-quant
    curve) from the fp trial with the same settings; NaN when never reached.
    """
    t = ok(trials)
    keys = [k for k in SETTINGS + ["seed"] if k in t]
    fp_ids = t[t["regime"] == "fp"][keys + ["trial_id"]].rename(columns={"trial_id": "fp_trial"})
    pairs = t[t["regime"] != "fp"][keys + ["trial_id", "regime"]].merge(fp_ids, on=keys)
    rows = []
    for _, p in pairs.iterrows():
        c = curves[curves["trial_id"] == p["trial_id"]].sort_values("chunk")
        f = curves[curves["trial_id"] == p["fp_trial"]].sort_values("chunk")
        if c.empty or f.empty or len(c) != len(f):
            continue
        fp_running = running_static_bpb(f)
        hit = np.flatnonzero(c["running_ttt_bpb"].to_numpy() <= fp_running + within)
        rows.append({**{k: p[k] for k in keys}, "regime": p["regime"], "within": within,
                     "tokens_to_heal": float(c["tokens_seen"].iloc[hit[0]]) if hit.size else math.nan,
                     "tokens_total": float(c["tokens_seen"].iloc[-1])})
    return pd.DataFrame(rows)


def sanity_flags(trials: pd.DataFrame, min_seeds: int = 3, tol: float = 1e-5) -> pd.DataFrame:
    """One row per problem: broken first chunk, divergence, errors, too few seeds, recovery above 1."""
    flags = []
    for _, r in trials.iterrows():
        where = f"{r['regime']} lr={r['inner_lr']:g} chunk={r['chunk_tokens']} seed={r['seed']}"
        if r["status"] == "ok" and abs(r["first_chunk_delta"]) > tol:
            flags.append({"trial": where, "flag": "first_chunk_delta",
                          "detail": f"chunk 0 TTT vs static differs by {r['first_chunk_delta']:.2e} bpb: broken pipeline"})
        if r["status"] == "diverged":
            flags.append({"trial": where, "flag": "diverged", "detail": f"at chunk {r.get('diverged_chunk', '?')}"})
        if r["status"] == "error":
            flags.append({"trial": where, "flag": "error", "detail": str(r.get("error", ""))[:200]})
        if r["status"] == "ok" and r["recovery_frac"] > 1:
            flags.append({"trial": where, "flag": "recovery_frac>1",
                          "detail": f"{r['recovery_frac']:.2f}: TTT beat the pre-quant model; part of it is adaptation"})
    seeds = ok(trials).groupby(["regime"] + [k for k in SETTINGS if k in trials])["seed"].nunique()
    for key, n in seeds.items():
        if n < min_seeds:
            flags.append({"trial": " ".join(map(str, key if isinstance(key, tuple) else (key,))), "flag": "few_seeds",
                          "detail": f"{n} seed(s); intervals need at least {min_seeds}"})
    return pd.DataFrame(flags, columns=["trial", "flag", "detail"])


def headline(trials: pd.DataFrame) -> pd.DataFrame:
    """Recovery fraction vs damage across regimes at each regime's best setting (the headline plot's points)."""
    best = best_setting(trials)
    rec = recovery_by_setting(trials)
    keys = ["regime"] + [k for k in SETTINGS if k in rec]
    return best[keys].merge(rec, on=keys)[["regime", "damage", "recovery_frac_mean", "recovery_frac_ci_low",
                                           "recovery_frac_ci_high", "healing_frac_mean", "n_seeds"]]
