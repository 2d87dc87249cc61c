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
from analysis.stats import ALPHA, Paired, holm, paired, smallest_holm_p

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
    best = best[best["setting_key"].notna() & (best["regime"] != "fp")].copy()  # by_setting gave each its family
    return best.sort_values("damage_mean").reset_index(drop=True)


def segment_values(trials: pd.DataFrame, setting_key: str, healed: pd.DataFrame | None = None) -> pd.DataFrame:
    """Per reported seed, the finished rows of one setting: damage, recovery, recovered fraction, healing, fp's gain
    on the same windows, and the persistence columns (held-out recovery, and after re-quantization). `healed`:
    `metrics.with_healing(trials)`, when the caller has it."""
    report = metrics.seed_split(trials)[1]
    df = metrics.with_healing(trials) if healed is None else healed
    g = df[(df["setting_key"] == setting_key) & (df["status"] == "ok") & df["seed"].isin(report)].drop_duplicates("seed")
    out = pd.DataFrame({"damage": g["damage"].to_numpy(), "recovery": g["recovery"].to_numpy(),
                        "recovery_frac": (g["recovery"] / g["damage"]).to_numpy(),
                        "healing_frac": g["healing_frac"].to_numpy(),
                        "fp_gain": (g["pre_quant_bpb"] - g["fp_post_ttt_bpb"]).to_numpy()}, index=g["seed"].to_numpy())
    for col in ("heldout_quant_bpb", "heldout_adapted_bpb", "heldout_requant_bpb"):
        out[col] = g[col].to_numpy() if col in g else math.nan
    out["healing"] = out["recovery"] - out["fp_gain"]  # repair beyond what fp gains on the same windows, in bpb
    out["persistent"] = out["heldout_quant_bpb"] - out["heldout_adapted_bpb"]
    out["requant_persistent"] = out["heldout_quant_bpb"] - out["heldout_requant_bpb"]
    return out


def _paired(trials: pd.DataFrame, what: str, a: str, b: str | None, column: str, other: str | None = None,
            healed: pd.DataFrame | None = None) -> Paired:
    """Per-seed differences of `column` between settings a and b (or `column` − `other` of setting a alone)."""
    va = segment_values(trials, a, healed)
    if b is None:
        return paired((va[column] - va[other]).to_numpy(), what)
    vb = segment_values(trials, b, healed)
    both = va.index.intersection(vb.index)
    return paired((va.loc[both, column] - vb.loc[both, column]).to_numpy(), what)


def matched(pts: pd.DataFrame, first: list[str], second: list[str]) -> pd.DataFrame:
    """Pairs of regimes, one of a family in `first`, one in `second`, whose damages agree within 25%."""
    rows = []
    a_side, b_side = pts[pts["family"].isin(first)], pts[pts["family"].isin(second)]
    for _, a in a_side.iterrows():
        if b_side.empty:
            break
        b = b_side.iloc[(np.log(b_side["damage_mean"].clip(lower=1e-9)) - math.log(max(a["damage_mean"], 1e-9))).abs().argmin()]
        if not (a["damage_mean"] > 0 and b["damage_mean"] > 0
                and abs(a["damage_mean"] - b["damage_mean"]) <= MATCH * max(a["damage_mean"], b["damage_mean"])):
            continue
        rows.append({"first": a["regime"], "second": b["regime"], "key_first": a["setting_key"],
                     "key_second": b["setting_key"], "damage_first": a["damage_mean"], "damage_second": b["damage_mean"],
                     "frac_first": a["recovery_frac_mean"], "frac_second": b["recovery_frac_mean"]})
    return pd.DataFrame(rows)


def choice_points(trials: pd.DataFrame, column: str) -> pd.DataFrame:
    """Per damaged regime and value of `column` (`params`: the adapted parameters; `recipe`: the TTT protocol), the
    best setting over the rest (largest mean recovery on the selection seeds): regime, column, setting_key, inner_lr.
    Empty unless the run tried at least two values of `column`."""
    if column not in trials or trials[column].fillna("").nunique() < 2:
        return pd.DataFrame()
    select = metrics.seed_split(trials)[0]
    sel = metrics.by_setting(trials, select)
    sel = sel[sel["eligible"] & (sel["regime"] != "fp")]
    if sel.empty or column not in sel:
        return pd.DataFrame()
    sel = sel.assign(**{column: sel[column].fillna("")})
    best = sel.sort_values("recovery_mean", ascending=False).drop_duplicates(["regime", column])
    return best[["regime", column, "setting_key", "inner_lr", "damage_mean"]].reset_index(drop=True)


def protocol_name(recipe) -> str:
    """A row's `recipe` as the report names it ("" or missing: the settings were given without a recipe)."""
    return recipe if isinstance(recipe, str) and recipe else "no recipe"


def by_protocol(trials: pd.DataFrame) -> pd.DataFrame:
    """Per damaged regime and protocol (`recipe`), at the protocol's own best lr: recovery, the protocol's fp gain on
    its own windows and the healing beyond it (bpb), means with bootstrap intervals over the reported seeds. Empty
    unless the run tried at least two protocols."""
    rows = []
    for _, c in choice_points(trials, "recipe").iterrows():
        v = segment_values(trials, c["setting_key"])
        rows.append({"regime": c["regime"], "protocol": protocol_name(c["recipe"]), "lr": c["inner_lr"],
                     "n": len(v), "damage": v["damage"].mean(), "recovery": paired(v["recovery"].to_numpy()),
                     "fp gain": v["fp_gain"].mean(), "healing": paired(v["healing"].to_numpy())})
    out = pd.DataFrame(rows)
    if out.empty:
        return out
    order = out.groupby("regime")["damage"].transform("mean")  # regimes by their damage, protocols together
    return out.assign(_order=order).sort_values(["_order", "regime", "protocol"]).drop(columns="_order").reset_index(drop=True)


def climbing(trials: pd.DataFrame, curves: pd.DataFrame, setting_key: str, tail: float = 0.25) -> np.ndarray:
    """Per reported seed of a setting: mean per-chunk gain (static − TTT bpb of the chunk) over the last quarter of
    its tokens minus that over the quarter before. Positive: the gain was still growing when the segment ended."""
    report = metrics.seed_split(trials)[1]
    rows = metrics.ok(trials)
    rows = rows[(rows["setting_key"] == setting_key) & rows["seed"].isin(report)]
    out = []
    for rid in rows["row_id"]:
        c = curves[curves["row_id"] == rid].sort_values("chunk")
        if len(c) < 4:
            continue
        gain = (c["static_bpb"] - c["ttt_bpb"]).to_numpy()
        seen = c["tokens_seen"].to_numpy() / c["tokens_seen"].iloc[-1]
        last, before = gain[seen > 1 - tail], gain[(seen > 1 - 2 * tail) & (seen <= 1 - tail)]
        if len(last) and len(before):
            out.append(float(last.mean() - before.mean()))
    return np.asarray(out)


def comparisons(trials: pd.DataFrame, curves: pd.DataFrame | None = None, min_damage: float = 0.5,
                kinds: tuple[str, ...] | None = None) -> dict[str, list]:
    """Every comparison a report makes (or those of `kinds`), on paired per-segment differences over the reported
    seeds, Holm-corrected together: kind -> [(context, Paired)]."""
    pts = points(trials)
    healed = metrics.with_healing(trials)
    found: dict[str, list] = {k: [] for k in ("structure", "trend", "gptq", "healing", "capacity", "protocol",
                                               "flattening", "persistence")}

    def want(kind: str) -> bool:
        return kinds is None or kind in kinds

    if not pts.empty:
        for _, r in (matched(pts, ["structured"], ["unstructured"]).iterrows() if want("structure") else []):
            found["structure"].append((r, _paired(trials, "structure", r["key_first"], r["key_second"], "recovery_frac",
                                                  healed=healed)))
        for fam in ("structured", "unstructured") if want("trend") else ():
            f = pts[pts["family"] == fam]
            if len(f) >= 2:
                lo, hi = f.iloc[0], f.iloc[-1]
                found["trend"].append(((fam, lo, hi), _paired(trials, "trend", hi["setting_key"], lo["setting_key"],
                                                              "recovery_frac", healed=healed)))
        for _, r in (matched(pts, ["gptq", "hadamard-gptq"], ["rtn"]).iterrows() if want("gptq") else []):
            found["gptq"].append((r, _paired(trials, "gptq", r["key_first"], r["key_second"], "healing_frac",
                                             healed=healed)))
        for _, p in pts.iterrows():
            if want("healing"):
                found["healing"].append((p, _paired(trials, "healing", p["setting_key"], None, "recovery", "fp_gain",
                                                    healed)))
            v = segment_values(trials, p["setting_key"], healed) if want("persistence") else None
            if v is not None and v["persistent"].notna().any():
                found["persistence"].append((p, paired(v["persistent"].dropna().to_numpy(), "persistence")))
        if curves is not None and not curves.empty and want("flattening"):
            for _, p in pts[pts["damage_mean"] >= min_damage].iterrows():
                found["flattening"].append((p, paired(climbing(trials, curves, p["setting_key"]), "flattening")))
    # capacity compares what each adapted-parameter choice recovers; protocols, what each heals beyond its own fp gain
    # (protocols score different windows, so their raw recoveries start from different static curves)
    for kind, column, value in (("capacity", "params", "recovery"), ("protocol", "recipe", "healing")):
        choice = choice_points(trials, column) if want(kind) else pd.DataFrame()
        for regime, g in (choice.groupby("regime", sort=False) if len(choice) else []):
            g = g.reset_index(drop=True)
            for i in range(len(g)):
                for j in range(i + 1, len(g)):
                    a, b = g.iloc[i], g.iloc[j]
                    found[kind].append(((regime, a, b), _paired(trials, kind, a["setting_key"], b["setting_key"], value,
                                                                healed=healed)))
    flat = [(k, i) for k, items in found.items() for i in range(len(items))]
    corrected = holm([found[k][i][1] for k, i in flat])
    for (k, i), c in zip(flat, corrected):
        found[k][i] = (found[k][i][0], c)
    return found


def findings(trials: pd.DataFrame, curves: pd.DataFrame | None = None) -> list[str]:
    """Sentences on size vs structure, GPTQ vs RTN (#1341), healing beyond plain adaptation, capacity, protocols,
    flattening and persistence, each worded by its Holm-corrected paired test over the reported seeds."""
    pts = points(trials)
    if pts.empty:
        return ["No damaged regime has a best setting: nothing to compare."]
    found = comparisons(trials, curves)
    n = sum(len(v) for v in found.values())
    out = [f"Every comparison below is a paired test over the reported seeds (per-segment differences: mean, 95% "
           f"bootstrap interval, sign-flip permutation p-value), Holm-corrected across the {n} comparisons of this "
           f"report at family-wise {ALPHA:g}."]
    sizes = [c.n for v in found.values() for _, c in v if c.n]
    if sizes and smallest_holm_p(min(sizes), n) >= ALPHA:
        out[0] += (f" With {min(sizes)} paired segments and {n} comparisons the smallest corrected p-value any "
                   f"comparison can reach is {smallest_holm_p(min(sizes), n):.3g}: no finding below can be called "
                   "significant, whatever the data; read the intervals, or run more seeds.")
    if not found["structure"]:
        out.append("Size or structure: no structured and unstructured regimes of matched damage (within 25%) in this "
                   "run, so structure cannot be told from size here.")
    else:
        parts, signs = [], []
        for r, c in found["structure"]:
            signs.append(c.sign)
            word = {1: "more", -1: "less", 0: "as much (no difference detected)"}[c.sign]
            parts.append(f"at {r['damage_first']:.3g} bpb {r['first']} recovered {r['frac_first']:.0%} and "
                         f"{r['second']} ({r['damage_second']:.3g} bpb) {r['frac_second']:.0%} of their damage: "
                         f"structured {word}, difference in recovered fraction {c.text()}")
        if all(s > 0 for s in signs) or all(s < 0 for s in signs):
            where = "every one of the matched damage levels" if len(signs) > 1 else "the matched damage level"
            head = (f"structured damage recovered {'more' if signs[0] > 0 else 'less'} of its damage than unstructured "
                    f"noise of the same size at {where}")
        elif not any(signs):
            head = ("at no matched damage level does the recovered fraction of structured and unstructured damage "
                    "differ after correction: on this run, what can be recovered follows the size of the damage")
        else:
            head = "structure matters at some sizes of the damage only"
        out.append("Size or structure: " + head + "; " + "; ".join(parts) + ".")
    for (fam, lo, hi), c in found["trend"]:
        trend = {1: "grows with", -1: "falls with", 0: "does not change detectably with"}[c.sign]
        out.append(f"Within the {fam} family the recovered fraction {trend} the damage: {lo['recovery_frac_mean']:.0%} "
                   f"at {lo['damage_mean']:.3g} bpb, {hi['recovery_frac_mean']:.0%} at {hi['damage_mean']:.3g} bpb "
                   f"(difference {c.text()}).")
    if not found["gptq"]:
        out.append("GPTQ vs RTN (#1341): no GPTQ and RTN regimes of matched damage (within 25%) in this run.")
    else:
        texts = []
        for r, c in found["gptq"]:
            word = {1: "healed more than", -1: "healed less than", 0: "healed as much as (no difference detected)"}[c.sign]
            texts.append(f"{r['first']} ({r['damage_first']:.3g} bpb) {word} {r['second']} ({r['damage_second']:.3g} bpb): "
                         f"healing difference {c.text()}")
        out.append("GPTQ vs RTN at matched damage (#1341 says SGD TTT undoes GPTQ's structure): " + "; ".join(texts) + ".")
    beyond = [f"{p['regime']} {'beyond' if c.sign > 0 else 'below' if c.sign < 0 else 'not detectably beyond'} "
              f"({c.text(4)} bpb)" for p, c in found["healing"]]
    if beyond:
        out.append("Healing beyond plain adaptation (recovery − fp's own gain on the same windows, per segment): "
                   + "; ".join(beyond) + ".")
    if found["capacity"]:
        texts = []
        for (regime, a, b), c in found["capacity"]:
            word = {1: "recovered more than", -1: "recovered less than", 0: "recovered as much as (no difference detected)"}
            texts.append(f"{regime}: {a['params']} {word[c.sign]} {b['params']} ({c.text(4)} bpb)")
        out.append("Capacity (each adapted-parameter choice at its own best lr): " + "; ".join(texts) + ".")
    if found["protocol"]:
        texts = []
        for (regime, a, b), c in found["protocol"]:
            word = {1: "healed more than", -1: "healed less than", 0: "healed as much as (no difference detected)"}
            texts.append(f"{regime}: {protocol_name(a['recipe'])} (lr {a['inner_lr']:g}) {word[c.sign]} "
                         f"{protocol_name(b['recipe'])} (lr {b['inner_lr']:g}) ({c.text(4)} bpb)")
        out.append("Protocols (each at its own best lr; healing: recovery − the same protocol's fp gain on its own "
                   "windows): " + "; ".join(texts) + ".")
    if found["flattening"]:
        texts = [f"{p['regime']} {'still climbing' if c.sign > 0 else 'flat'} (last quarter's per-chunk gain − the "
                 f"quarter before: {c.text(4)} bpb)" for p, c in found["flattening"]]
        out.append("Had the large-damage curves flattened? " + "; ".join(texts)
                   + ". A curve still climbing makes its recovered fraction a lower bound.")
    if found["persistence"]:
        texts = [f"{p['regime']} {'persists' if c.sign > 0 else 'reverses' if c.sign < 0 else 'does not detectably persist'}"
                 f" ({c.text(4)} bpb)" for p, c in found["persistence"]]
        out.append("Repair or tracking? Persistent recovery (held-out slice, static: post-quant − adapted weights): "
                   + "; ".join(texts) + ".")
    return out


def persistence(trials: pd.DataFrame) -> pd.DataFrame:
    """Per regime at its best setting, on the reported seeds: in-stream recovery beside persistent recovery on the
    held-out slice (quantized − adapted weights, static), fp's own persistent gain, and the share of the persistent
    repair that survives putting the adapted weights back on the regime's grid."""
    best = metrics.best_setting(trials)
    if best.empty or "setting_key" not in best:  # no regime has an eligible setting
        return pd.DataFrame()
    rows = []
    for _, b in best[best["setting_key"].notna()].iterrows():
        v = segment_values(trials, b["setting_key"])
        if v["persistent"].isna().all():
            continue
        kept = (v["requant_persistent"].mean() / v["persistent"].mean()  # a share of a repair there is (fp: no grid, NaN)
                if v["persistent"].mean() > 0 else math.nan)
        rows.append({"regime": b["regime"], "in-stream recovery": v["recovery"].mean(),
                     "persistent recovery": v["persistent"].mean(),
                     "persistent after re-quantization": v["requant_persistent"].mean(),
                     "share surviving re-quantization": kept, "n": int(v["persistent"].notna().sum())})
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
