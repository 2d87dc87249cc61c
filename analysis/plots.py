"""Plots of a run (matplotlib, Agg): each function writes PNG and SVG and returns the PNG path (None if no data)."""
from __future__ import annotations

from pathlib import Path

import matplotlib
import matplotlib.ticker

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the Agg backend)
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from analysis import metrics  # noqa: E402

plt.rcParams["svg.fonttype"] = "none"  # text stays text in SVGs: searchable, smaller


def _save(fig, out: Path, stem: str) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    for ext in ("png", "svg"):
        fig.savefig(out / f"{stem}.{ext}", dpi=120, bbox_inches="tight")
    plt.close(fig)
    return out / f"{stem}.png"


def _bars(df: pd.DataFrame, prefix: str):
    """Error bar extents from a CI, or None when no row has one (fewer than 2 seeds)."""
    lo, hi = df[f"{prefix}_ci_low"], df[f"{prefix}_ci_high"]
    if lo.isna().all():
        return None
    return [(df[f"{prefix}_mean"] - lo).fillna(0).clip(lower=0), (hi - df[f"{prefix}_mean"]).fillna(0).clip(lower=0)]


def recovery_vs_damage(trials: pd.DataFrame, out: Path, run: str) -> Path | None:
    """Left: the absolute gain in bpb, with fp's own TTT gain at the same settings. Right: the fractions."""
    best = metrics.best_setting(trials)
    best = best[(best["regime"] != "fp") & best.get("recovery_mean", pd.Series(dtype=float)).notna()] if len(best) else best
    if best.empty or "recovery_mean" not in best:
        return None
    dmg = metrics.damage_by_regime(trials).set_index("regime")["damage_mean"]
    best = best.assign(damage_x=best["regime"].map(dmg)).sort_values("damage_x")
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    bars = _bars(best, "recovery")
    left.errorbar(best["damage_x"], best["recovery_mean"], yerr=bars, fmt="o", capsize=3, label="recovery (static − TTT bpb)")
    left.scatter(best["damage_x"], best["fp_gain"], marker="_", s=300, color="k", label="fp's own TTT gain, same settings")
    xs = np.geomspace(best["damage_x"].min() * 0.8, best["damage_x"].max() * 1.25, 50)
    left.plot(xs, xs, ls=":", color="grey", lw=1, label="recovery = damage (all repaired)")
    left.set_ylabel("bits per byte")
    right.errorbar(best["damage_x"], best["recovery_frac_mean"], yerr=_bars(best, "recovery_frac"), fmt="o", capsize=3,
                   label="recovery fraction")
    right.errorbar(best["damage_x"], best["healing_frac_mean"], yerr=_bars(best, "healing_frac"), fmt="x", capsize=3,
                   color="C3", label="healing fraction (beyond fp's gain)")
    right.axhline(1.0, color="grey", lw=0.8, ls="--")
    right.axhline(0.0, color="grey", lw=0.8)
    right.set_ylabel("fraction of the damage")
    for ax in (left, right):
        ax.set_xscale("log")
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.xaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
        ax.set_xlabel("damage: post-quant − pre-quant bpb (log)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        for _, r in best.iterrows():
            y = r["recovery_mean"] if ax is left else r["recovery_frac_mean"]
            ax.annotate(r["regime"], (r["damage_x"], y), fontsize=8, xytext=(4, 4), textcoords="offset points")
    n = int(best["n_seeds"].min())
    caption = f"bars: 95% CI over {n}+ seeds" if bars is not None else "one seed per point: no error bars"
    fig.suptitle(f"{run}: each regime at its best setting ({caption})", fontsize=10)
    return _save(fig, out, "recovery_vs_damage")


def healing_curves(trials: pd.DataFrame, curves: pd.DataFrame, out: Path, run: str) -> Path | None:
    """Per regime at its best setting: running recovery (static − TTT bpb) over tokens, its fp control's own gain
    beside it; each panel on its own axis, so small gaps are not flattened by a large one."""
    best = metrics.best_setting(trials)
    if best.empty or curves.empty or "setting_key" not in best:
        return None
    best = best[best["setting_key"].notna()]
    pairs = metrics.control_pairs(trials)
    fp_rows = metrics.ok(trials)[metrics.ok(trials)["regime"] == "fp"]
    panels = []
    for _, b in best.iterrows():
        rows = metrics.ok(trials)[metrics.ok(trials)["setting_key"] == b["setting_key"]].sort_values("seed")
        if rows.empty:
            continue
        r = rows.iloc[0]
        fp_id = pairs.loc[pairs["row_id"] == r["row_id"], "fp_row"]
        panels.append((b, r, fp_id.iloc[0] if len(fp_id) else (r["row_id"] if b["regime"] == "fp" else None)))
    if not panels:
        return None
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.6), squeeze=False)
    for ax, (b, r, fp_id) in zip(axes[0], panels):
        c = curves[curves["row_id"] == r["row_id"]].sort_values("chunk")
        ax.plot(c["tokens_seen"], metrics.running_static_bpb(c) - c["running_ttt_bpb"], label=f"{b['regime']}: static − TTT")
        if fp_id is not None and b["regime"] != "fp" and fp_id in set(fp_rows["row_id"]):
            f = curves[curves["row_id"] == fp_id].sort_values("chunk")
            ax.plot(f["tokens_seen"], metrics.running_static_bpb(f) - f["running_ttt_bpb"], "--", color="k",
                    label="fp: static − TTT (plain adaptation)")
        ax.axhline(0, color="grey", lw=0.8)
        ax.set_title(f"{b['regime']} (lr {b['inner_lr']:g}, chunk {b['chunk_tokens']}, seed {int(r['seed'])})", fontsize=9)
        ax.set_xlabel("validation tokens seen")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    axes[0][0].set_ylabel("running gain over static (bpb)")
    fig.suptitle(f"{run}: healing curves at each regime's best setting (own axis per panel)", fontsize=10)
    return _save(fig, out, "healing_curves")


def healing_heatmaps(trials: pd.DataFrame, out: Path, run: str) -> Path | None:
    """Healing fraction by lr × chunk per regime; cells that hurt, diverged or fall outside [−1, 2] are grey and
    labelled, the chosen setting is outlined."""
    rec = metrics.by_setting(trials)
    rec = rec[rec["regime"] != "fp"]
    if rec.empty:
        return None
    best = metrics.best_setting(trials).set_index("regime")
    regimes = list(dict.fromkeys(rec.sort_values("damage")["regime"]))
    fig, axes = plt.subplots(1, len(regimes), figsize=(3.6 * len(regimes) + 1.2, 3.4), squeeze=False)
    cmap = matplotlib.colormaps["RdYlGn"].with_extremes(bad="#d9d9d9")
    im = None
    for ax, regime in zip(axes[0], regimes):
        g = rec[rec["regime"] == regime]
        lrs, chunks = sorted(g["inner_lr"].unique()), sorted(g["chunk_tokens"].unique())
        grid = np.full((len(chunks), len(lrs)), np.nan)
        for _, s in g.iterrows():
            i, j = chunks.index(s["chunk_tokens"]), lrs.index(s["inner_lr"])
            label = f"{s['healing_frac_mean']:.2f}"
            if s["not_ok"]:
                label = s["not_ok"].split(" ")[0]
            elif s["hurts"]:
                label = f"hurts\n{s['recovery_mean']:+.3f}"
            elif s["healing_out_of_range"]:
                label = f"{s['healing_frac_mean']:.1f}\n(outlier)"
            else:
                grid[i, j] = s["healing_frac_mean"]
            ax.text(j, i, label, ha="center", va="center", fontsize=7)
            if regime in best.index and best.loc[regime].get("setting_key") == s["setting_key"]:
                ax.add_patch(plt.Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, lw=2, ec="k"))
        im = ax.imshow(np.ma.masked_invalid(grid), cmap=cmap, vmin=-1, vmax=1, aspect="auto")
        ax.set_xticks(range(len(lrs)), [f"{v:g}" for v in lrs], fontsize=8)
        ax.set_yticks(range(len(chunks)), [str(v) for v in chunks], fontsize=8)
        ax.set_xlabel("inner learning rate", fontsize=8)
        ax.set_title(regime, fontsize=9)
    axes[0][0].set_ylabel("chunk tokens", fontsize=8)
    fig.subplots_adjust(right=0.86, wspace=0.35, top=0.8)
    fig.colorbar(im, cax=fig.add_axes([0.89, 0.15, 0.015, 0.6]), label="healing fraction")
    fig.suptitle(f"{run}: healing fraction by lr × chunk (outlined: chosen; grey: not eligible)", fontsize=10)
    return _save(fig, out, "healing_heatmaps")
