"""The questions a sweep answers, each a function from the stored tables to a DataFrame.

Nothing here recomputes a metric the sweep stored; it aggregates them.
- A regime row's control is the fp row with the same `control_key` (every
  setting, seed and segment, all but the regime): its curve is the static
  reference of tokens-to-heal.
- Seeds are replicates of one setting (`setting_key`). A mean over seeds
  has a 95% Student-t interval (mean ± t(0.975, n−1)·s/√n, scipy.stats)
  over the distinct seeds whose rows finished `ok`. Fractions of the damage
  (recovery fraction, healing) are ratios of means over those seeds, with a
  delta-method interval, not means of per-seed ratios (one small damage
  would dominate). Rows that diverged, were stopped or failed are excluded
  from means; the setting lists which seeds were lost and why.
- Healing is 1 − mean(post-TTT − post-TTT of fp) / mean(damage), where fp
  is the unquantized model at its own best TTT setting on the same
  windows and segment (or without TTT where no setting helps it): the part
  of the damage TTT repairs beyond what it gains on a model with nothing
  to repair. Against fp at the regime's own setting, a setting where TTT
  hurts fp would count the damage TTT does to fp as healing.
- The best setting of a regime is the eligible one with the largest mean
  recovery (post-quant − post-TTT, both over the same windows, so that a
  chunking that scores with more context gains nothing from it) on some
  seeds, reported on the others when there are at least 4 (selection seeds:
  the lower half); with fewer, on the same seeds, and the table says so. A
  setting whose TTT hurts (recovery ≤ 0), whose healing is outside
  [−1, 2], with a seed that did not finish, or with a row alarm (a row's
  own check failed: the pipeline is broken), is never chosen.
"""
from __future__ import annotations

import math

import numpy as np
import pandas as pd
from scipy import stats

from analysis.runs import DISPLAY_SETTINGS, with_keys
from e2ettt.quant.regimes import RegimeError, parse_regime

HEALING_RANGE = (-1.0, 2.0)  # outside it a healing fraction is an artefact of tiny damage, not a finding
MIN_SEEDS = 3


def t975(df: int) -> float:
    """Two-sided 95% Student-t quantile t(0.975, df)."""
    return float(stats.t.ppf(0.975, df)) if df >= 1 else math.nan


def spread(values: pd.Series, prefix: str) -> dict:
    v = values.dropna()
    n = len(v)
    mean = float(v.mean()) if n else math.nan
    std = float(v.std(ddof=1)) if n > 1 else math.nan
    half = t975(n - 1) * std / math.sqrt(n) if n > 1 else math.nan
    return {f"{prefix}_mean": mean, f"{prefix}_std": std, f"{prefix}_ci_low": mean - half, f"{prefix}_ci_high": mean + half}


def ratio(x: pd.Series, y: pd.Series, prefix: str, complement: bool = False) -> dict:
    """mean(x) / mean(y) over paired values (1 − that with `complement`), with a delta-method 95% interval
    (t quantile, n − 1)."""
    pair = pd.DataFrame({"x": x, "y": y}).dropna()
    n = len(pair)
    if n == 0 or pair["y"].mean() == 0:
        return {f"{prefix}_mean": math.nan, f"{prefix}_ci_low": math.nan, f"{prefix}_ci_high": math.nan}
    mx, my = pair["x"].mean(), pair["y"].mean()
    r = mx / my
    half = math.nan
    if n > 1:
        cov = np.cov(pair["x"], pair["y"], ddof=1)
        var = (cov[0, 0] - 2 * r * cov[0, 1] + r * r * cov[1, 1]) / (n * my * my)
        half = t975(n - 1) * math.sqrt(max(var, 0.0))
    mean = 1 - r if complement else r
    return {f"{prefix}_mean": mean, f"{prefix}_ci_low": mean - half, f"{prefix}_ci_high": mean + half}


def ok(trials: pd.DataFrame) -> pd.DataFrame:
    return trials[trials["status"] == "ok"]


def settings_shown(trials: pd.DataFrame) -> list[str]:
    """The setting columns a reader needs to tell settings apart: lr and chunk always, others when they vary."""
    always = ["inner_lr", "chunk_tokens"]
    return always + [c for c in DISPLAY_SETTINGS if c in trials and c not in always and trials[c].nunique(dropna=False) > 1]


def fp_reference(trials: pd.DataFrame) -> pd.DataFrame:
    """The unquantized model's best TTT on each window group and seed: (window key, seed) -> its post-TTT bpb.

    A window group is every setting but what TTT does (inner lr, optimizer, epochs, adapted parameters, ...):
    the same inputs, segment, chunking, context and ranks. fp's best setting in it is the one with the largest
    mean recovery on the selection seeds; when none helps, no TTT (the static bpb) is the reference."""
    fp = ok(trials)[ok(trials)["regime"] == "fp"]
    if fp.empty:
        return pd.DataFrame(columns=["window_key", "seed", "fp_post_ttt_bpb"])
    select = seed_split(trials)[0]
    rows = []
    for wkey, g in fp.groupby("window_key", sort=False):
        on = g[g["seed"].isin(select)].groupby("setting_key")["recovery"].agg(["mean", "count"])
        on = on[on["count"] == on["count"].max()]
        best = on["mean"].idxmax() if len(on) else None
        for seed, s in g.groupby("seed"):
            chosen = s[s["setting_key"] == best]
            if best is None or on.loc[best, "mean"] <= 0:
                post = float(s["pre_quant_bpb"].iloc[0])  # no TTT: fp's own static bpb
            else:
                post = float(chosen["post_ttt_bpb"].iloc[0]) if len(chosen) else math.nan
            rows.append({"window_key": wkey, "seed": seed, "fp_post_ttt_bpb": post})
    return pd.DataFrame(rows)


def with_healing(trials: pd.DataFrame) -> pd.DataFrame:
    """Adds fp_post_ttt_bpb (fp at its own best setting on the same windows and seed: `fp_reference`), has_control
    and healing_frac = 1 − (post_ttt − fp_post_ttt_bpb) / damage per row. Rows straight from a table (not through
    `load_run`) get their keys here."""
    if "window_key" not in trials:
        trials = with_keys(trials)
    out = trials.merge(fp_reference(trials), on=["window_key", "seed"], how="left")
    out["fp_post_ttt_bpb"] = out["fp_post_ttt_bpb"].astype(float)  # no finished fp row: an all-NaN object column
    out["has_control"] = out["fp_post_ttt_bpb"].notna() | (out["regime"] == "fp")
    valid = (out["regime"] != "fp") & (out["damage"] > 0) & (out["status"] == "ok") & out["fp_post_ttt_bpb"].notna()
    out["healing_frac"] = (1 - (out["post_ttt_bpb"] - out["fp_post_ttt_bpb"]) / out["damage"]).where(valid)
    return out


def _identical(g: pd.DataFrame) -> bool:
    done = g[g["status"] == "ok"]
    return done["seed"].nunique() > 1 and done[["post_quant_bpb", "post_ttt_bpb"]].round(12).drop_duplicates().shape[0] == 1


def alarm_names(values) -> str:
    """The row alarms among `values` of the alarms column, e.g. "bytes, first_chunk" (rows of tables written before
    rows carried alarms have none)."""
    return ", ".join(sorted({a for v in values if isinstance(v, str) for a in v.split(",") if a}))


def seed_list(seeds) -> str:
    """Seeds as runs of consecutive numbers: "1-4, 7, 9-20"."""
    seeds, parts = sorted({int(s) for s in seeds}), []
    for s in seeds:
        if parts and s == parts[-1][1] + 1:
            parts[-1][1] = s
        else:
            parts.append([s, s])
    return ", ".join(f"{a}" if a == b else f"{a}, {b}" if b == a + 1 else f"{a}-{b}" for a, b in parts)


def lost_seeds(g: pd.DataFrame) -> str:
    """Which seeds of a setting did not finish, and why: "3 diverged (chunk 5); 4-9 stopped"."""
    bad = g[g["status"] != "ok"].sort_values("seed")
    parts = []
    for status, rows in bad.groupby("status", sort=False):
        seeds = seed_list(rows["seed"])
        why = f" (chunk {int(rows['diverged_chunk'].iloc[0])})" if status == "diverged" and "diverged_chunk" in rows else ""
        parts.append(f"{seeds} {status}{why if len(rows) == 1 else ''}")
    return "; ".join(parts)


def by_setting(trials: pd.DataFrame, seeds: list | None = None) -> pd.DataFrame:
    """One row per regime × setting: damage, recovery and healing over seeds, cost, and what is wrong with it."""
    df = with_healing(trials)
    if seeds is not None:
        df = df[df["seed"].isin(seeds)]
    shown = settings_shown(trials)
    rows = []
    for key, g in df.groupby("setting_key", sort=False):
        done = g[g["status"] == "ok"]
        paired = done[done["fp_post_ttt_bpb"].notna()]
        row = {"setting_key": key, "regime": g["regime"].iloc[0], **{c: g[c].iloc[0] for c in shown},
               "family": g["family"].iloc[0] if "family" in g else family_of(g["regime"].iloc[0]),
               "n_seeds": int(done["seed"].nunique()), "seeds_run": int(g["seed"].nunique()),
               "not_ok": ", ".join(f"{s} {n}" for s, n in g.loc[g["status"] != "ok", "status"].value_counts().items()),
               "lost_seeds": lost_seeds(g),
               "post_ttt_bpb": float(done["post_ttt_bpb"].mean()) if len(done) else math.nan}
        row.update(spread(g.loc[g["damage"].notna() & g["seed"].isin(done["seed"]), "damage"], "damage"))
        row.update(spread(done["recovery"], "recovery"))
        row.update(ratio(done["recovery"], done["damage"], "recovery_frac"))
        row["fp_gain"] = float((paired["pre_quant_bpb"] - paired["fp_post_ttt_bpb"]).mean()) if len(paired) else math.nan
        row.update(ratio(paired["post_ttt_bpb"] - paired["fp_post_ttt_bpb"], paired["damage"], "healing_frac", complement=True)
                   if row["regime"] != "fp" and len(paired) else
                   {"healing_frac_mean": math.nan, "healing_frac_ci_low": math.nan, "healing_frac_ci_high": math.nan})
        for col in ("ttt_seconds", "tokens_per_second", "projected_full_seconds"):
            row[col] = float(done[col].mean()) if col in done and len(done) else math.nan
        row["no_control"] = row["regime"] != "fp" and not bool(done["has_control"].all()) if len(done) else False
        row["identical_seeds"] = _identical(g)
        row["hurts"] = bool(row["recovery_mean"] <= 0) if len(done) else False
        h = row["healing_frac_mean"]
        row["healing_out_of_range"] = bool(not math.isnan(h) and not HEALING_RANGE[0] <= h <= HEALING_RANGE[1])
        row["alarms"] = alarm_names(g["alarms"]) if "alarms" in g else ""
        row["eligible"] = bool(len(done) and not row["not_ok"] and not row["hurts"] and not row["healing_out_of_range"]
                               and not row["identical_seeds"] and not row["alarms"])
        rows.append(row)
    return pd.DataFrame(rows)


def family_of(regime: str) -> str:
    """The damage family of a regime by the sweep's own rule (`Regime.family`), for a table without the column; a
    name that is no built-in regime is the user's own artifact."""
    try:
        return parse_regime(regime).family
    except RegimeError:
        return "own"


def seed_split(trials: pd.DataFrame) -> tuple[list, list]:
    """(selection seeds, reported seeds): halves when there are at least 4 seeds, else the same seeds."""
    seeds = sorted(trials["seed"].dropna().unique().tolist())
    if len(seeds) >= 4:
        return seeds[: len(seeds) // 2], seeds[len(seeds) // 2 :]
    return seeds, seeds


def _seed_text(seeds: list) -> str:
    return ",".join(str(int(s)) for s in seeds)


def best_setting(trials: pd.DataFrame) -> pd.DataFrame:
    """Per regime: the best eligible setting (largest mean recovery) on the selection seeds, with its numbers on
    the reported seeds. `runner_up_gap` is how much less the next eligible setting recovered on the selection
    seeds: near 0, the choice hardly matters."""
    select, report = seed_split(trials)
    chosen_on = (f"chosen on seeds {_seed_text(select)}, reported on seeds {_seed_text(report)}" if select != report else
                 f"chosen and reported on the same seeds {_seed_text(select)} (fewer than 4 seeds: the interval is optimistic)")
    sel, rep = by_setting(trials, select), by_setting(trials, report).set_index("setting_key")
    shown = settings_shown(trials)
    rows = []
    for regime, g in sel.groupby("regime", sort=False):
        good = g[g["eligible"]].sort_values("recovery_mean", ascending=False)
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
        row["runner_up_gap"] = float(best["recovery_mean"] - good.iloc[1]["recovery_mean"]) if len(good) > 1 else math.nan
        lrs = sorted(g["inner_lr"].unique())
        row["lr_at_edge"] = bool(len(lrs) > 1 and best["inner_lr"] in (lrs[0], lrs[-1]))
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
    flags, lost = [], {}
    for _, r in trials.iterrows():
        where = f"{r['regime']} lr={r['inner_lr']:g} chunk={r['chunk_tokens']} seed={r['seed']}"
        if r["status"] == "ok" and abs(r["first_chunk_delta"]) > tol:
            flags.append({"what": where, "flag": "first_chunk_delta",
                          "detail": f"chunk 0 TTT vs static differs by {r['first_chunk_delta']:.2e} bpb: broken pipeline"})
        if r["status"] in ("diverged", "stopped", "error"):
            detail = {"diverged": f"at chunk {r.get('diverged_chunk', '?')}", "stopped": str(r.get("error", "")),
                      "error": str(r.get("error", ""))[:200]}[r["status"]]
            setting = f"{r['regime']} lr={r['inner_lr']:g} chunk={r['chunk_tokens']}"
            lost.setdefault((setting, r["status"], detail), []).append(r["seed"])  # one line per setting and reason
        if alarm_names([r.get("alarms")]):
            flags.append({"what": where, "flag": "alarms", "detail": f"row alarms {alarm_names([r.get('alarms')])}: the "
                          "pipeline that wrote this row is broken (README: row alarms); never chosen as best"})
        if r["status"] == "ok" and r["recovery_frac"] > 1:
            flags.append({"what": where, "flag": "recovery_frac>1",
                          "detail": f"{r['recovery_frac']:.2f}: TTT beat the pre-quant model; part of it is adaptation"})
    for (setting, status, detail), seeds in lost.items():
        what = f"{setting} seed={seeds[0]}" if len(seeds) == 1 else f"{setting} seeds {seed_list(seeds)}"
        flags.append({"what": what, "flag": status, "detail": detail})
    settings = by_setting(trials)
    for flag, text in (("hurts", "TTT made the model worse (mean recovery <= 0); never chosen as best"),
                       ("healing_out_of_range", f"healing fraction outside {list(HEALING_RANGE)}; never chosen as best"),
                       ("identical_seeds", "every seed gave identical numbers: the seeds are not replicates"),
                       ("no_control", "no fp row with the same settings: left out of healing fractions")):
        for _, s in settings[settings[flag]].iterrows():
            flags.append({"what": f"{s['regime']} lr={s['inner_lr']:g} chunk={s['chunk_tokens']}", "flag": flag, "detail": text})
    best = best_setting(trials)
    for _, b in best[best.get("lr_at_edge", pd.Series(False, index=best.index)).fillna(False).astype(bool)].iterrows():
        flags.append({"what": f"{b['regime']} lr={b['inner_lr']:g}", "flag": "lr_at_edge",
                      "detail": "the best inner lr is the smallest or largest tried: the optimum may lie beyond the grid"})
    few = settings[settings["n_seeds"] < MIN_SEEDS]
    if len(few):
        flags.append({"what": f"{len(few)} of {len(settings)} settings", "flag": "few_seeds",
                      "detail": f"fewer than {MIN_SEEDS} finished seeds: no useful 95% interval"})
    return pd.DataFrame(flags, columns=["what", "flag", "detail"])
