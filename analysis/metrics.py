"""The questions a sweep answers, each a function from the stored tables to a DataFrame.

Nothing here recomputes a metric the sweep stored; it aggregates them.
- A regime row's control is the fp row with the same `control_key` (every
  setting and the seed, all but the regime); a row without one is said to
  lack it and is left out of healing fractions.
- Seeds are replicates of one setting (`setting_key`): spread over seeds is
  mean, sample std and a 95% Student-t interval (mean ± t(0.975, n−1)·std/√n)
  over the distinct seeds whose rows finished `ok`. Rows that diverged, were
  stopped or failed are excluded from means and mark their setting.
- The best setting of a regime is chosen on some seeds and reported on the
  others when there are at least 4 (selection seeds: the lower half); with
  fewer, on the same seeds, and the table says so. A setting whose TTT hurts
  (recovery ≤ 0), whose healing fraction is outside [−1, 2], or with a seed
  that did not finish, is never chosen.
"""
from __future__ import annotations

import math

import numpy as np
import pandas as pd

from analysis.runs import DISPLAY_SETTINGS

# two-sided 95% Student-t quantiles t(0.975, df), df = 1..30; the normal 1.96 beyond
T975 = [12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
        2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042]
HEALING_RANGE = (-1.0, 2.0)  # outside it a healing fraction is an artefact of tiny damage, not a finding
MIN_SEEDS = 3


def t975(df: int) -> float:
    return T975[df - 1] if 1 <= df <= len(T975) else 1.96


def spread(values: pd.Series, prefix: str) -> dict:
    v = values.dropna()
    n = len(v)
    mean = float(v.mean()) if n else math.nan
    std = float(v.std(ddof=1)) if n > 1 else math.nan
    half = t975(n - 1) * std / math.sqrt(n) if n > 1 else math.nan
    return {f"{prefix}_mean": mean, f"{prefix}_std": std, f"{prefix}_ci_low": mean - half, f"{prefix}_ci_high": mean + half}


def ok(trials: pd.DataFrame) -> pd.DataFrame:
    return trials[trials["status"] == "ok"]


def settings_shown(trials: pd.DataFrame) -> list[str]:
    """The setting columns a reader needs to tell settings apart: lr and chunk always, others when they vary."""
    always = ["inner_lr", "chunk_tokens"]
    return always + [c for c in DISPLAY_SETTINGS if c in trials and c not in always and trials[c].nunique(dropna=False) > 1]


def with_healing(trials: pd.DataFrame) -> pd.DataFrame:
    """Adds fp_post_ttt_bpb, has_control and healing_frac = 1 − (post_ttt − post_ttt(fp control)) / damage."""
    fp = ok(trials)[ok(trials)["regime"] == "fp"][["control_key", "post_ttt_bpb"]]
    fp = fp.drop_duplicates("control_key").rename(columns={"post_ttt_bpb": "fp_post_ttt_bpb"})
    out = trials.merge(fp, on="control_key", how="left")
    out["has_control"] = out["fp_post_ttt_bpb"].notna() | (out["regime"] == "fp")
    valid = (out["regime"] != "fp") & (out["damage"] > 0) & (out["status"] == "ok") & out["fp_post_ttt_bpb"].notna()
    out["healing_frac"] = (1 - (out["post_ttt_bpb"] - out["fp_post_ttt_bpb"]) / out["damage"]).where(valid)
    return out


def _identical(g: pd.DataFrame) -> bool:
    done = g[g["status"] == "ok"]
    return done["seed"].nunique() > 1 and done[["post_quant_bpb", "post_ttt_bpb"]].round(12).drop_duplicates().shape[0] == 1


def by_setting(trials: pd.DataFrame, seeds: list | None = None) -> pd.DataFrame:
    """One row per regime × setting: spread over seeds of recovery and healing, cost, and what is wrong with it."""
    df = with_healing(trials)
    if seeds is not None:
        df = df[df["seed"].isin(seeds)]
    shown = settings_shown(trials)
    rows = []
    for key, g in df.groupby("setting_key", sort=False):
        done = g[g["status"] == "ok"]
        row = {"setting_key": key, "regime": g["regime"].iloc[0], **{c: g[c].iloc[0] for c in shown},
               "n_seeds": int(done["seed"].nunique()), "seeds_run": int(g["seed"].nunique()),
               "not_ok": ", ".join(f"{s} {n}" for s, n in g.loc[g["status"] != "ok", "status"].value_counts().items()),
               "damage": float(g["damage"].mean()), "post_ttt_bpb": float(done["post_ttt_bpb"].mean()) if len(done) else math.nan}
        row.update(spread(done["recovery"], "recovery"))
        row.update(spread(done["recovery_frac"], "recovery_frac"))
        row.update(spread(done["healing_frac"], "healing_frac"))
        row["fp_gain"] = float((done["fp_post_ttt_bpb"] - done["pre_quant_bpb"]).mul(-1).mean()) if len(done) else math.nan
        for col in ("ttt_seconds", "tokens_per_second", "projected_full_seconds"):
            row[col] = float(done[col].mean()) if col in done and len(done) else math.nan
        row["no_control"] = row["regime"] != "fp" and not bool(done["has_control"].all()) if len(done) else False
        row["identical_seeds"] = _identical(g)
        row["hurts"] = bool(row["recovery_mean"] <= 0) if len(done) else False
        h = row["healing_frac_mean"]
        row["healing_out_of_range"] = bool(not math.isnan(h) and not HEALING_RANGE[0] <= h <= HEALING_RANGE[1])
        row["eligible"] = bool(len(done) and not row["not_ok"] and not row["hurts"] and not row["healing_out_of_range"]
                               and not row["identical_seeds"])
        rows.append(row)
    return pd.DataFrame(rows)


def seed_split(trials: pd.DataFrame) -> tuple[list, list]:
    """(selection seeds, reported seeds): halves when there are at least 4 seeds, else the same seeds."""
    seeds = sorted(trials["seed"].dropna().unique().tolist())
    if len(seeds) >= 4:
        return seeds[: len(seeds) // 2], seeds[len(seeds) // 2 :]
    return seeds, seeds


def _seed_text(seeds: list) -> str:
    return ",".join(str(int(s)) for s in seeds)


def best_setting(trials: pd.DataFrame) -> pd.DataFrame:
    """Per regime: the best eligible setting (lowest mean post-TTT bpb) on the selection seeds, with its numbers
    on the reported seeds. `runner_up_gap` is how much worse (post-TTT bpb) the next eligible setting was on the
    selection seeds: near 0, the choice hardly matters."""
    select, report = seed_split(trials)
    chosen_on = (f"chosen on seeds {_seed_text(select)}, reported on seeds {_seed_text(report)}" if select != report else
                 f"chosen and reported on the same seeds {_seed_text(select)} (fewer than 4 seeds: the interval is optimistic)")
    sel, rep = by_setting(trials, select), by_setting(trials, report).set_index("setting_key")
    shown = settings_shown(trials)
    rows = []
    for regime, g in sel.groupby("regime", sort=False):
        good = g[g["eligible"]].sort_values("post_ttt_bpb")
        row = {"regime": regime, "settings_tried": len(g), "settings_eligible": len(good), "chosen_on": chosen_on}
        if good.empty:
            row["note"] = "no setting where TTT helps without a failed seed"
            rows.append(row)
            continue
        best = good.iloc[0]
        r = rep.loc[best["setting_key"]]
        row.update({c: best[c] for c in shown})
        row.update({k: r[k] for k in r.index if k not in shown and k not in ("regime", "eligible")})
        row["setting_key"] = best["setting_key"]
        row["runner_up_gap"] = float(good.iloc[1]["post_ttt_bpb"] - best["post_ttt_bpb"]) if len(good) > 1 else math.nan
        rows.append(row)
    return pd.DataFrame(rows)


def damage_by_regime(trials: pd.DataFrame) -> pd.DataFrame:
    """Damage (post-quant − pre-quant bpb) per regime with its spread over the evaluated segments, and artifact bytes."""
    rows = []
    first = trials.drop_duplicates(["regime", "seed", "max_tokens"] if "max_tokens" in trials else ["regime", "seed"])
    for regime, g in first.groupby("regime", sort=False):
        sizes = g["artifact_bytes"].dropna() if "artifact_bytes" in g else pd.Series(dtype=float)
        row = {"regime": regime, "bits": g["bits"].iloc[0] if "bits" in g else math.nan,
               "artifact_bytes": int(sizes.iloc[0]) if len(sizes) else None,
               "pre_quant_bpb": float(g["pre_quant_bpb"].mean()), "post_quant_bpb": float(g["post_quant_bpb"].mean()),
               "n_segments": int(g["seed"].nunique())}
        row.update(spread(g["damage"], "damage"))
        rows.append(row)
    return pd.DataFrame(rows).sort_values("damage_mean").reset_index(drop=True)


def running_static_bpb(curve: pd.DataFrame) -> np.ndarray:
    """Running static bpb of one trial's curve (sorted by chunk): per-chunk bpb weighted by bytes
    (by tokens for tables written before curves stored bytes)."""
    if "bytes" in curve and curve["bytes"].notna().all():
        w = curve["bytes"].to_numpy(dtype=float)
    else:
        w = np.diff(np.concatenate([[0], curve["tokens_seen"].to_numpy(dtype=float)]))
    return np.cumsum(curve["static_bpb"].to_numpy() * w) / np.cumsum(w)


def control_pairs(trials: pd.DataFrame) -> pd.DataFrame:
    """Each ok regime row with its fp control (same control key): regime row_id, fp row_id."""
    t = ok(trials)
    fp = t[t["regime"] == "fp"][["control_key", "row_id"]].drop_duplicates("control_key")
    return t[t["regime"] != "fp"].merge(fp.rename(columns={"row_id": "fp_row"}), on="control_key")


def tokens_to_heal(trials: pd.DataFrame, curves: pd.DataFrame, within: float = 0.01) -> pd.DataFrame:
    """Tokens of TTT until a row's running bpb is within `within` of its fp control's running static bpb
    (the unquantized model on the same chunks); NaN when never reached."""
    rows = []
    shown = settings_shown(trials)
    for _, p in control_pairs(trials).iterrows():
        c = curves[curves["row_id"] == p["row_id"]].sort_values("chunk")
        f = curves[curves["row_id"] == p["fp_row"]].sort_values("chunk")
        if c.empty or f.empty or len(c) != len(f):
            continue
        hit = np.flatnonzero(c["running_ttt_bpb"].to_numpy() <= running_static_bpb(f) + within)
        rows.append({"regime": p["regime"], **{k: p[k] for k in shown}, "seed": p["seed"], "within": within,
                     "tokens_to_heal": float(c["tokens_seen"].iloc[hit[0]]) if hit.size else math.nan,
                     "tokens_total": float(c["tokens_seen"].iloc[-1])})
    return pd.DataFrame(rows)


def sanity_flags(trials: pd.DataFrame, tol: float = 1e-5) -> pd.DataFrame:
    """One row per problem (a problem shared by many settings is one row that counts them)."""
    flags = []
    for _, r in trials.iterrows():
        where = f"{r['regime']} lr={r['inner_lr']:g} chunk={r['chunk_tokens']} seed={r['seed']}"
        if r["status"] == "ok" and abs(r["first_chunk_delta"]) > tol:
            flags.append({"what": where, "flag": "first_chunk_delta",
                          "detail": f"chunk 0 TTT vs static differs by {r['first_chunk_delta']:.2e} bpb: broken pipeline"})
        if r["status"] in ("diverged", "stopped", "error"):
            detail = {"diverged": f"at chunk {r.get('diverged_chunk', '?')}", "stopped": str(r.get("error", "")),
                      "error": str(r.get("error", ""))[:200]}[r["status"]]
            flags.append({"what": where, "flag": r["status"], "detail": detail})
        if r["status"] == "ok" and r["recovery_frac"] > 1:
            flags.append({"what": where, "flag": "recovery_frac>1",
                          "detail": f"{r['recovery_frac']:.2f}: TTT beat the pre-quant model; part of it is adaptation"})
    settings = by_setting(trials)
    for flag, text in (("hurts", "TTT made the model worse (mean recovery <= 0); never chosen as best"),
                       ("healing_out_of_range", f"healing fraction outside {list(HEALING_RANGE)}; never chosen as best"),
                       ("identical_seeds", "every seed gave identical numbers: the seeds are not replicates"),
                       ("no_control", "no fp row with the same settings: left out of healing fractions")):
        for _, s in settings[settings[flag]].iterrows():
            flags.append({"what": f"{s['regime']} lr={s['inner_lr']:g} chunk={s['chunk_tokens']}", "flag": flag, "detail": text})
    few = settings[settings["n_seeds"] < MIN_SEEDS]
    if len(few):
        flags.append({"what": f"{len(few)} of {len(settings)} settings", "flag": "few_seeds",
                      "detail": f"fewer than {MIN_SEEDS} finished seeds: no useful 95% interval"})
    return pd.DataFrame(flags, columns=["what", "flag", "detail"])
