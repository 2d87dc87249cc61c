"""Plots of a run (matplotlib, Agg): each function writes PNG and SVG and returns the PNG path (None if no data)."""
from __future__ import annotations

from pathlib import Path

import matplotlib
import matplotlib.ticker

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the Agg backend)
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from analysis import families, metrics  # noqa: E402

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
    """Each damaged regime at its best setting, coloured by damage family, on a log damage axis. Left: the absolute
    recovery in bpb (with fp's own TTT gain at the same settings, and PR #1341's reported gains as bands). Right:
    recovery and healing as fractions of the damage. Public results of other models are labelled stars."""
    best = families.points(trials)
    if best.empty:
        return None
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.6))
    colours = {f: f"C{i}" for i, f in enumerate(families.FAMILY_ORDER)}
    for fam, g in best.groupby("family", sort=False):
        c = colours.get(fam, "C9")
        left.errorbar(g["damage_mean"], g["recovery_mean"], yerr=_bars(g, "recovery"), xerr=_bars(g, "damage"), fmt="o",
                      color=c, capsize=3, label=fam)
        right.errorbar(g["damage_mean"], g["recovery_frac_mean"], yerr=_bars(g, "recovery_frac"), fmt="o", color=c,
                       capsize=3, label=f"{fam}: recovered")
        right.errorbar(g["damage_mean"], g["healing_frac_mean"], yerr=_bars(g, "healing_frac"), fmt="x", color=c,
                       capsize=3, alpha=0.7, label=f"{fam}: healed beyond fp's gain")
    left.scatter(best["damage_mean"], best["fp_gain"], marker="_", s=200, color="k", label="fp's own gain at its best setting")
    for ref in families.EXTERNAL:
        for ax, y in ((left, ref["recovery"]), (right, ref["recovery"] / ref["damage"])):
            ax.scatter([ref["damage"]], [y], marker="*", s=160, color="k", zorder=5)
            ax.annotate(ref["label"], (ref["damage"], y), fontsize=7, xytext=(-6, 8), textcoords="offset points", ha="right")
    for i, band in enumerate(families.EXTERNAL_GAINS):
        left.axhspan(band["low"] - 0.0005, band["high"] + 0.0005, color=f"C{7 + i}", alpha=0.25, label=band["label"])
    lo = min(best["damage_mean"].min(), *(r["damage"] for r in families.EXTERNAL)) * 0.7
    hi = max(best["damage_mean"].max(), *(r["damage"] for r in families.EXTERNAL)) * 1.4
    xs = np.geomspace(lo, hi, 50)
    left.plot(xs, xs, ls=":", color="grey", lw=1, label="recovery = damage")
    left.set_yscale("symlog", linthresh=0.01)
    left.set_ylabel("recovery: post-quant − post-TTT bpb (symlog)")
    right.axhline(1.0, color="grey", lw=0.8, ls="--")
    right.axhline(0.0, color="grey", lw=0.8)
    right.set_ylabel("fraction of the damage")
    low, high = right.get_ylim()
    if low < -0.5 or high > 1.5:  # tiny damages have wide fraction intervals: keep the scale of the ones that say something
        right.set_ylim(max(low, -0.5), min(high, 1.5))
        right.text(0.01, 0.01, "intervals clipped at -0.5 and 1.5", transform=right.transAxes, fontsize=7, color="grey")
    for ax in (left, right):
        ax.set_xscale("log")
        ax.set_xlim(lo, hi)
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.xaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
        ax.set_xlabel("damage: post-quant − pre-quant bpb (log)")
        ax.grid(alpha=0.3)
        for _, r in best.iterrows():
            y = r["recovery_mean"] if ax is left else r["recovery_frac_mean"]
            ax.annotate(r["regime"], (r["damage_mean"], y), fontsize=6, xytext=(4, -9), textcoords="offset points")
    left.legend(fontsize=6, loc="upper left")
    right.legend(fontsize=6, loc="best")
    n = int(best["n_seeds"].min())
    caption = f"bars: 95% intervals over {n}+ seeds" if _bars(best, "recovery") is not None else "one seed: no error bars"
    fig.suptitle(f"{run}: each damaged regime at its best setting, by damage family ({caption}); stars: other models, "
                 "their own numbers", fontsize=9)
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
    regimes = list(dict.fromkeys(rec.sort_values("damage_mean")["regime"]))
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
