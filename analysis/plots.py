"""Plots of a run (matplotlib, Agg): each function writes PNG and SVG and returns the PNG path."""
from __future__ import annotations

from pathlib import Path

import matplotlib
import matplotlib.ticker

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from analysis import metrics


def _save(fig, out: Path, stem: str) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    for ext in ("png", "svg"):
        fig.savefig(out / f"{stem}.{ext}", dpi=120)
    plt.close(fig)
    return out / f"{stem}.png"


def healing_curves(trials: pd.DataFrame, curves: pd.DataFrame, out: Path, run: str) -> Path | None:
    """Per regime: running TTT bpb vs running static bpb over tokens seen, at its best setting, with fp."""
    best = metrics.best_setting(trials)
    if best.empty or curves.empty:
        return None
    regimes = list(best["regime"])
    fig, axes = plt.subplots(1, len(regimes), figsize=(4.2 * len(regimes), 3.6), sharey=True, squeeze=False)
    ok = metrics.ok(trials)
    keys = [k for k in metrics.SETTINGS if k in best]
    for ax, (_, b) in zip(axes[0], best.iterrows()):
        sel = ok[(ok["regime"] == b["regime"]) & np.logical_and.reduce([ok[k] == b[k] for k in keys])]
        tid = sel.sort_values("seed")["trial_id"].iloc[0]
        c = curves[curves["trial_id"] == tid].sort_values("chunk")
        ax.plot(c["tokens_seen"], c["running_ttt_bpb"], label="score-first TTT")
        ax.plot(c["tokens_seen"], metrics.running_static_bpb(c), "--", label="static (no TTT)")
        fp = ok[(ok["regime"] == "fp") & np.logical_and.reduce([ok[k] == b[k] for k in keys])]
        if not fp.empty and b["regime"] != "fp":
            f = curves[curves["trial_id"] == fp.sort_values("seed")["trial_id"].iloc[0]].sort_values("chunk")
            ax.plot(f["tokens_seen"], metrics.running_static_bpb(f), ":", color="k", label="fp static")
        ax.set_title(f"{b['regime']} (lr {b['inner_lr']:g}, chunk {b['chunk_tokens']})", fontsize=9)
        ax.set_xlabel("validation tokens seen")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("running bits per byte")
    axes[0][-1].legend(fontsize=8)
    fig.suptitle(f"{run}: healing curves at each regime's best setting", fontsize=10)
    return _save(fig, out, "healing_curves")


def recovery_vs_damage(trials: pd.DataFrame, out: Path, run: str) -> Path | None:
    h = metrics.headline(trials)
    h = h[h["regime"] != "fp"]
    if h.empty:
        return None
    fig, ax = plt.subplots(figsize=(5.5, 4))
    lo = (h["recovery_frac_mean"] - h["recovery_frac_ci_low"]).fillna(0)
    hi = (h["recovery_frac_ci_high"] - h["recovery_frac_mean"]).fillna(0)
    ax.errorbar(h["damage"], h["recovery_frac_mean"], yerr=[lo, hi], fmt="o", capsize=3, label="recovery fraction")
    ax.scatter(h["damage"], h["healing_frac_mean"], marker="x", color="C3", label="healing fraction (minus fp's TTT gain)")
    for _, r in h.iterrows():
        ax.annotate(r["regime"], (r["damage"], r["recovery_frac_mean"]), fontsize=8, xytext=(4, 4), textcoords="offset points")
    ax.set_xscale("log")
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.xaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
    ax.axhline(1.0, color="grey", lw=0.8, ls="--")
    ax.set_xlabel("quantization damage (post-quant − pre-quant bpb, log scale)")
    ax.set_ylabel("fraction of the damage repaired")
    ax.set_title(f"{run}\nrecovery vs damage (best setting per regime; bars: 95% CI over seeds)", fontsize=9)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return _save(fig, out, "recovery_vs_damage")


def healing_heatmaps(trials: pd.DataFrame, out: Path, run: str) -> Path | None:
    rec = metrics.recovery_by_setting(trials)
    rec = rec[rec["regime"] != "fp"]
    if rec.empty:
        return None
    regimes = sorted(rec["regime"].unique())
    fig, axes = plt.subplots(1, len(regimes), figsize=(3.8 * len(regimes), 3.4), squeeze=False)
    for ax, regime in zip(axes[0], regimes):
        grid = rec[rec["regime"] == regime].pivot_table(index="chunk_tokens", columns="inner_lr", values="healing_frac_mean")
        im = ax.imshow(grid.to_numpy(), cmap="RdYlGn", vmin=-1, vmax=1, aspect="auto")
        ax.set_xticks(range(grid.shape[1]), [f"{v:g}" for v in grid.columns])
        ax.set_yticks(range(grid.shape[0]), [str(v) for v in grid.index])
        for (i, j), v in np.ndenumerate(grid.to_numpy()):
            ax.text(j, i, "—" if np.isnan(v) else f"{v:.2f}", ha="center", va="center", fontsize=8)
        ax.set_xlabel("inner learning rate")
        ax.set_ylabel("chunk tokens")
        ax.set_title(regime, fontsize=9)
    fig.colorbar(im, ax=axes[0].tolist(), shrink=0.8, label="healing fraction")
    fig.suptitle(f"{run}: healing fraction by lr × chunk (— = diverged or no fp control)", fontsize=10)
    fig.subplots_adjust(top=0.8)
    out.mkdir(parents=True, exist_ok=True)
    for ext in ("png", "svg"):
        fig.savefig(out / f"healing_heatmaps.{ext}", dpi=120, bbox_inches="tight")
    plt.close(fig)
    return out / "healing_heatmaps.png"
