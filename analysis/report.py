"""report.md and report.html for a run, the console summary, and the key table in the field's terms.

bpb to 4 decimals; bytes as integers against parameter-golf's 16,000,000-byte
cap; every column defined under the table that shows it.
"""
from __future__ import annotations

import html
import math
from pathlib import Path

import pandas as pd

from analysis import families, metrics, plots
from analysis.runs import Run

GOLF_CAP_BYTES = 16_000_000
EVAL_BUDGET_SECONDS = 600
COLUMNS = {
    "family": "kind of damage: structured (a wrong decode of rotated weights), unstructured (noise), the quantizer, or "
              "own (your own artifact, --artifact)",
    "damage": "post-quant − pre-quant bpb (static, same windows as the TTT scores), mean ± 95% t-interval over the "
              "same seeds as the other columns of the row",
    "artifact bytes": f"packed, lzma-compressed quantized model (parameter-golf's cap: {GOLF_CAP_BYTES:,} bytes, code included)",
    "lr, chunk": "the chosen setting's inner learning rate and chunk size (tokens)",
    "n": "seeds the numbers are taken over (distinct validation segments)",
    "post-TTT": "bpb of score-first TTT over the same positions",
    "recovery": "post-quant − post-TTT bpb, mean ± 95% t-interval half-width over seeds; the best setting is the one "
                "with the largest mean recovery on the selection seeds",
    "recovered": "mean recovery / mean damage (a ratio of means, delta-method 95% interval)",
    "fp gain": "what TTT gains on the unquantized model at its own best setting on the same windows (0: no setting "
               "helps it): plain adaptation, no damage to repair",
    "healing": "1 − mean(post-TTT − post-TTT of fp at its best setting, same seeds) / mean(damage): the part of the "
               "damage repaired beyond plain adaptation (ratio of means, delta-method 95% interval)",
    "TTT s": "seconds of TTT per seed's segment, on the trial's ranks",
    "tokens/s": "TTT tokens per second on the trial's ranks (scoring and adapting)",
    "full stream s": "projected seconds of the same TTT over the whole validation stream at that rate, same hardware "
                     f"(parameter-golf allows {EVAL_BUDGET_SECONDS} s on 8×H100)",
    "gap to next": "how much less the next eligible setting recovered (bpb): near 0, the choice matters little",
    "lost seeds": "seeds of the setting that did not finish, and why",
}


def missing(v) -> bool:
    """None or NaN: a cell the table shows as "—"."""
    return v is None or (isinstance(v, float) and math.isnan(v))


def bpb(v) -> str:
    return "—" if missing(v) else f"{v:.4f}"


def with_ci(mean, low, high, digits: int = 4) -> str:
    if missing(mean):
        return "—"
    if missing(low):
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ± {(high - low) / 2:.{digits}f}"


def count(v) -> str:
    return "—" if missing(v) else f"{int(round(v)):,}"


def signed(v) -> str:
    return "—" if missing(v) else f"{v:+.4f}"


def share(v) -> str:
    return "—" if missing(v) else f"{v:.0%}"


def formatted(df: pd.DataFrame, how: dict) -> pd.DataFrame:
    """`df` with the columns named in `how` turned into text by their formatter."""
    out = df.copy()
    for col, fmt in how.items():
        if col in out:
            out[col] = out[col].map(fmt).astype(object)
    return out


def seconds(v) -> str:
    if missing(v):
        return "—"
    return f"{v:,.0f}" if v >= 100 else f"{v:.1f}"


def key_table(trials: pd.DataFrame) -> pd.DataFrame:
    """Per regime (sorted by damage) at its chosen setting: damage, size, recovery and healing with intervals, cost;
    every number of a row over the same reported seeds."""
    best = metrics.best_setting(trials).set_index("regime")
    rows = []
    for _, d in metrics.damage_by_regime(trials).iterrows():
        b = best.loc[d["regime"]] if d["regime"] in best.index else pd.Series(dtype=object)
        chosen = "setting_key" in b and isinstance(b.get("setting_key"), str)
        fp = d["regime"] == "fp"
        rows.append({
            "regime": d["regime"], "family": b.get("family", metrics.family_of(d["regime"])) if chosen else
            metrics.family_of(d["regime"]),
            "damage": with_ci(b["damage_mean"], b["damage_ci_low"], b["damage_ci_high"]) if chosen else
            with_ci(d["damage_mean"], d["damage_ci_low"], d["damage_ci_high"]),
            "artifact bytes": count(d["artifact_bytes"]),
            "lr": f"{b['inner_lr']:g}" if chosen else "—", "chunk": f"{int(b['chunk_tokens'])}" if chosen else "—",
            "n": int(b["n_seeds"]) if chosen else 0, "post-TTT": bpb(b.get("post_ttt_bpb")) if chosen else "—",
            "recovery": with_ci(b.get("recovery_mean"), b.get("recovery_ci_low"), b.get("recovery_ci_high")) if chosen else "—",
            "recovered": with_ci(b.get("recovery_frac_mean"), b.get("recovery_frac_ci_low"), b.get("recovery_frac_ci_high"), 2)
            if chosen and not fp else "—",
            "fp gain": bpb(b.get("fp_gain")) if chosen and not fp else "—",
            "healing": with_ci(b.get("healing_frac_mean"), b.get("healing_frac_ci_low"), b.get("healing_frac_ci_high"), 2)
            if chosen and not fp else "—",
            "TTT s": seconds(b.get("ttt_seconds")) if chosen else "—",
            "tokens/s": count(b.get("tokens_per_second")) if chosen else "—",
            "full stream s": seconds(b.get("projected_full_seconds")) if chosen else "—",
            "gap to next": bpb(b.get("runner_up_gap")) if chosen else b.get("note", "—"),
        })
    return pd.DataFrame(rows)


def protocol_table(trials: pd.DataFrame) -> pd.DataFrame:
    """`families.by_protocol`, formatted: bpb with its 95% bootstrap interval."""
    t = families.by_protocol(trials)
    if t.empty:
        return t

    def interval(c) -> str:
        return "—" if c.n == 0 else f"{c.mean:+.4f}" if missing(c.low) else f"{c.mean:+.4f} [{c.low:+.4f}, {c.high:+.4f}]"

    return formatted(t, {"lr": lambda v: f"{v:g}", "damage": bpb, "recovery": interval, "fp gain": bpb,
                         "healing": interval})


def selection_note(trials: pd.DataFrame) -> str:
    best = metrics.best_setting(trials)
    return best["chosen_on"].iloc[0] if len(best) else ""


def settings_table(trials: pd.DataFrame) -> pd.DataFrame:
    """Every setting with its interval and what is wrong with it (the chosen ones among them)."""
    rec = metrics.by_setting(trials)
    if rec.empty:
        return rec
    order = metrics.damage_by_regime(trials)["regime"].tolist()
    rec = rec.assign(_r=rec["regime"].map({r: i for i, r in enumerate(order)})).sort_values(["_r", "inner_lr", "chunk_tokens"])
    shown = [c for c in metrics.settings_shown(trials) if c not in ("inner_lr", "chunk_tokens")]
    rows = []
    for _, s in rec.iterrows():
        flags = [f for f in ("hurts", "healing_out_of_range", "identical_seeds", "no_control") if s[f]]
        flags += [f"alarms: {s['alarms']}"] if s["alarms"] else []
        rows.append({"regime": s["regime"], "lr": f"{s['inner_lr']:g}", "chunk": int(s["chunk_tokens"]),
                     **{c: s[c] for c in shown}, "n": f"{s['n_seeds']}/{s['seeds_run']}",
                     "post-TTT": bpb(s["post_ttt_bpb"]),
                     "recovery": with_ci(s["recovery_mean"], s["recovery_ci_low"], s["recovery_ci_high"]),
                     "healing": with_ci(s["healing_frac_mean"], s["healing_frac_ci_low"], s["healing_frac_ci_high"], 2)
                     if s["regime"] != "fp" else "—",
                     "TTT s": seconds(s["ttt_seconds"]), "lost seeds": s["lost_seeds"] or "", "flags": ", ".join(flags)})
    return pd.DataFrame(rows)


def trial_summary(trials: pd.DataFrame) -> pd.DataFrame:
    """What the sweep prints at the end: one line per setting, by damage, then lr and chunk."""
    return settings_table(trials)


def caveats(run: Run) -> list[str]:
    t = run.trials
    notes = []
    if not (metrics.ok(t)["regime"] == "fp").any():
        notes.append("No finished fp control: healing cannot be separated from plain adaptation, "
                     "so no healing fraction is reported.")
    seeds = metrics.ok(t)["seed"].nunique()
    if seeds < metrics.MIN_SEEDS:
        notes.append(f"Only {seeds} seed(s): intervals over seeds are not available "
                     f"(they need at least {metrics.MIN_SEEDS} for a useful 95% interval).")
    caps = set(t["max_tokens"].dropna()) if "max_tokens" in t else set()
    if caps and caps != {0}:
        sizes = ", ".join(f"{int(c):,}" for c in sorted(caps))
        notes.append(f"Each row evaluated a capped segment of the validation stream ({sizes} tokens): numbers describe "
                     "those segments, not the whole stream.")
    bad = t["status"].value_counts().drop("ok", errors="ignore")
    if len(bad):
        notes.append("Rows that did not finish normally (" + ", ".join(f"{n} {s}" for s, n in bad.items())
                     + ") are excluded from means; their settings list the lost seeds and are never chosen as best.")
    notes.append("Healing is measured against the unquantized model at its own best TTT setting on the same windows and "
                 "segments (or without TTT where no setting helps it): a setting at which TTT hurts fp cannot pass the "
                 "damage TTT does to fp off as healing.")
    return notes


def _md(df: pd.DataFrame) -> str:
    """A GitHub-flavoured Markdown table."""
    if df.empty:
        return "_none_\n"
    rows = [" | ".join(map(str, df.columns)), " | ".join("---" for _ in df.columns)]
    rows += [" | ".join(str(v).replace("|", "\\|").replace("\n", " ") for v in r) for r in df.itertuples(index=False)]
    return "\n".join(f"| {r} |" for r in rows) + "\n"


def legend(columns) -> list[str]:
    return [f"- **{k}**: {v}" for k, v in COLUMNS.items() if k in columns or (k == "lr, chunk" and "lr" in columns)]


def markdown_key_table(run: Run) -> str:
    """The key table as it goes into a README or a PR: table, selection note, column legend."""
    table = key_table(run.trials)
    return "\n".join([_md(table), f"Best setting per regime {selection_note(run.trials)}.", "", *legend(table.columns)]) + "\n"


def write_report(run: Run) -> Path:
    figs = run.dir / "figures"
    pngs = [p for p in (plots.recovery_vs_damage(run.trials, figs, run.name),
                        plots.healing_curves(run.trials, run.curves, figs, run.name),
                        plots.healing_heatmaps(run.trials, figs, run.name)) if p is not None]
    damage = metrics.damage_by_regime(run.trials)
    damage_view = pd.DataFrame({"regime": damage["regime"], "bits": damage["bits"],
                                "artifact bytes": damage["artifact_bytes"].map(count),
                                "of 16 MB cap": damage["artifact_bytes"].map(lambda b: f"{b / GOLF_CAP_BYTES:.1%}" if b else "—"),
                                "pre-quant": damage["pre_quant_bpb"].map(bpb), "post-quant": damage["post_quant_bpb"].map(bpb),
                                "damage": [with_ci(*v) for v in
                                           damage[["damage_mean", "damage_ci_low", "damage_ci_high"]].to_numpy()],
                                "segments": damage["n_segments"]})
    told = families.findings(run.trials, run.curves)
    sections = [
        ("Key table: each regime at its chosen setting", key_table(run.trials)),
        ("Damage per regime (every segment)", damage_view),
        ("Every setting (n: finished seeds / seeds run)", settings_table(run.trials)),
        ("Tokens to heal by damage family (median over the chosen setting's seeds)",
         formatted(families.tokens_to_heal_by_family(run.trials, run.curves),
                   {"damage": bpb, "tokens to recover half": count, "tokens to within 0.01 of fp": count,
                    "tokens per row": count})),
        ("Protocols: each at its own best lr (reported seeds; healing = recovery − the protocol's fp gain)",
         protocol_table(run.trials)),
        ("Repair or tracking: persistence on the held-out slice (reported seeds)",
         formatted(families.persistence(run.trials),
                   {c: signed for c in ("in-stream recovery", "persistent recovery", "persistent after re-quantization")}
                   | {"share surviving re-quantization": share})),
        ("Sanity flags", metrics.sanity_flags(run.trials)),
    ]
    meta = run.manifest
    lines = [f"# e2ettt report: {run.name}", ""]
    if meta:
        lines.append(f"git {meta.get('git_sha', '?')}, torch {meta.get('versions', {}).get('torch', '?')}, "
                     f"ray {meta.get('versions', {}).get('ray', '?')}, {len(run.trials)} rows.")
        lines.append("")
    for note in caveats(run):
        lines.append(f"> {note}")
    lines.append("")
    for png in pngs:
        lines += [f"![{png.stem}](figures/{png.name})", ""]
    lines += ["## What this run says about size and structure of the damage", ""]
    lines += [f"{text}\n" for text in told]
    for title, df in sections:
        lines += [f"## {title}", "", _md(df)]
        if title.startswith("Key table"):
            lines += [f"Best setting per regime {selection_note(run.trials)}.", "", *legend(df.columns), ""]
    (run.dir / "report.md").write_text("\n".join(lines))
    body = [f"<h1>e2ettt report: {html.escape(run.name)}</h1>"]
    body += [f"<blockquote>{html.escape(n)}</blockquote>" for n in caveats(run)]
    body += [f"<p>{html.escape(t)}</p>" for t in told]
    body += [f'<img src="figures/{p.name}" style="max-width:100%">' for p in pngs]
    for title, df in sections:
        body += [f"<h2>{html.escape(title)}</h2>", df.to_html(index=False, na_rep="—")]
    (run.dir / "report.html").write_text("<!doctype html><meta charset=utf-8><title>e2ettt report</title>"
                                         "<style>body{font-family:sans-serif;max-width:80em;margin:auto}"
                                         "table{border-collapse:collapse}td,th{padding:2px 6px;border:1px solid #ccc}</style>"
                                         + "\n".join(body))
    return run.dir / "report.md"
