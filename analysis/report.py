"""report.md and report.html for a run: the tables, the plots, and what cannot be concluded."""
from __future__ import annotations

import html
from pathlib import Path

import pandas as pd

from analysis import metrics, plots
from analysis.tables import Run


def key_table(trials: pd.DataFrame) -> pd.DataFrame:
    """Per regime at its best setting: damage, post-TTT, recovery and healing fractions."""
    best = metrics.best_setting(trials)
    dmg = metrics.damage_by_regime(trials)[["regime", "damage"] + [c for c in ("artifact_bytes",) if c in trials]]
    out = dmg.merge(best, on="regime", how="left")
    cols = ["regime", "damage", "artifact_bytes", "inner_lr", "chunk_tokens", "post_ttt_bpb", "recovery_mean",
            "healing_frac_mean", "flatness", "settings_tried"]
    return out[[c for c in cols if c in out]]


def caveats(run: Run) -> list[str]:
    t = run.trials
    notes = []
    if not (metrics.ok(t)["regime"] == "fp").any():
        notes.append("No finished fp control: healing cannot be separated from plain adaptation, "
                     "so no healing fraction is reported.")
    seeds = metrics.ok(t)["seed"].nunique()
    if seeds < 3:
        notes.append(f"Only {seeds} seed(s): intervals over seeds are not available "
                     "(they need at least 3 for a useful 95% CI).")
    caps = set(t["max_tokens"]) if "max_tokens" in t else set()
    if caps and caps != {0}:
        sizes = ", ".join(f"{c:,}" for c in sorted(caps))
        notes.append(f"Each trial evaluated a capped segment of the validation stream ({sizes} tokens): "
                     "numbers describe that segment.")
    if (t["status"] != "ok").any():
        bad = int((t["status"] != "ok").sum())
        notes.append(f"{bad} trial(s) did not finish normally (see sanity flags); they are excluded from means.")
    return notes


def _cell(v) -> str:
    if isinstance(v, float):
        return "—" if v != v else f"{v:.4g}"
    return str(v).replace("|", "\\|")


def _md(df: pd.DataFrame) -> str:
    """A GitHub-flavoured Markdown table (NaN shown as —)."""
    if df.empty:
        return "_none_\n"
    rows = [" | ".join(map(str, df.columns)), " | ".join("---" for _ in df.columns)]
    rows += [" | ".join(_cell(v) for v in r) for r in df.itertuples(index=False)]
    return "\n".join(f"| {r} |" for r in rows) + "\n"


SUMMARY_COLUMNS = {"regime": "regime", "inner_lr": "lr", "chunk_tokens": "chunk", "seed": "seed",
                   "pre_quant_bpb": "pre-quant", "post_quant_bpb": "post-quant", "damage": "damage",
                   "post_ttt_bpb": "post-TTT", "recovery": "recovery", "recovery_frac": "rec.frac",
                   "healing_frac": "healing", "status": "status"}


def trial_summary(trials: pd.DataFrame) -> pd.DataFrame:
    """One line per trial, sorted by regime, chunk and lr: what the sweep prints at the end."""
    df = metrics.with_healing(trials)
    df = df.sort_values([c for c in ("regime", "chunk_tokens", "inner_lr", "seed") if c in df])
    df = df[[c for c in SUMMARY_COLUMNS if c in df]].rename(columns=SUMMARY_COLUMNS)
    return df.round({"pre-quant": 4, "post-quant": 4, "damage": 4, "post-TTT": 4, "recovery": 4,
                     "rec.frac": 3, "healing": 3})


def write_report(run: Run) -> Path:
    figs = run.dir / "figures"
    pngs = [p for p in (plots.recovery_vs_damage(run.trials, figs, run.name),
                        plots.healing_curves(run.trials, run.curves, figs, run.name),
                        plots.healing_heatmaps(run.trials, figs, run.name)) if p is not None]
    sections = [
        ("Key table: each regime at its best setting", key_table(run.trials)),
        ("Damage per regime", metrics.damage_by_regime(run.trials)),
        ("Recovery and healing per setting (spread over seeds)", metrics.recovery_by_setting(run.trials)),
        ("Tokens to heal (running bpb within 0.01 of the fp model's static bpb)",
         metrics.tokens_to_heal(run.trials, run.curves)),
        ("Sanity flags", metrics.sanity_flags(run.trials)),
    ]
    meta = run.manifest
    lines = [f"# e2ettt report: {run.name}", ""]
    if meta:
        lines.append(f"git {meta.get('git_sha', '?')}, torch {meta.get('versions', {}).get('torch', '?')}, "
                     f"ray {meta.get('versions', {}).get('ray', '?')}, {len(run.trials)} trials.")
        lines.append("")
    lines += ["healing_frac = 1 − (post_ttt(regime) − post_ttt(fp, same settings and seed)) / damage: "
              "the part of the recovery that is not plain adaptation.", ""]
    for note in caveats(run):
        lines.append(f"> {note}")
    lines.append("")
    for png in pngs:
        lines += [f"![{png.stem}](figures/{png.name})", ""]
    for title, df in sections:
        lines += [f"## {title}", "", _md(df)]
    md = "\n".join(lines)
    (run.dir / "report.md").write_text(md)
    body = [f"<h1>e2ettt report: {html.escape(run.name)}</h1>"]
    body += [f"<blockquote>{html.escape(n)}</blockquote>" for n in caveats(run)]
    body += [f'<img src="figures/{p.name}" style="max-width:100%">' for p in pngs]
    for title, df in sections:
        body += [f"<h2>{html.escape(title)}</h2>", df.to_html(index=False, float_format=lambda v: f"{v:.4g}", na_rep="—")]
    (run.dir / "report.html").write_text("<!doctype html><meta charset=utf-8><title>e2ettt report</title>"
                                         "<style>body{font-family:sans-serif;max-width:70em;margin:auto}"
                                         "table{border-collapse:collapse}td,th{padding:2px 6px;border:1px solid #ccc}</style>"
                                         + "\n".join(body))
    return run.dir / "report.md"
