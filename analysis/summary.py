"""The table a sweep prints when it ends: one line per trial, grouped by regime."""
from __future__ import annotations

import pandas as pd

COLUMNS = {"regime": "regime", "inner_lr": "lr", "chunk_tokens": "chunk", "seed": "seed",
           "pre_quant_bpb": "pre-quant", "post_quant_bpb": "post-quant", "damage": "damage",
           "post_ttt_bpb": "post-TTT", "recovery": "recovery", "recovery_frac": "rec.frac",
           "healing_frac": "healing", "status": "status"}


def add_healing(trials: pd.DataFrame) -> pd.DataFrame:
    """healing_frac = 1 - (post_ttt(regime) - post_ttt(fp, same TTT settings)) / damage."""
    keys = [k for k in ("inner_lr", "chunk_tokens", "epochs", "optimizer", "params", "seed") if k in trials]
    fp = trials[(trials["regime"] == "fp") & (trials["status"] == "ok")][keys + ["post_ttt_bpb"]]
    fp = fp.rename(columns={"post_ttt_bpb": "fp_post_ttt_bpb"})
    out = trials.merge(fp, on=keys, how="left")
    gap = out["post_ttt_bpb"] - out["fp_post_ttt_bpb"]
    out["healing_frac"] = (1 - gap / out["damage"]).where((out["regime"] != "fp") & (out["damage"] > 0))
    return out


def summary_table(trials: pd.DataFrame) -> pd.DataFrame:
    df = add_healing(trials) if "post_ttt_bpb" in trials else trials.copy()
    df = df.sort_values([c for c in ("regime", "chunk_tokens", "inner_lr", "seed") if c in df])
    df = df[[c for c in COLUMNS if c in df]].rename(columns=COLUMNS)
    return df.round({"pre-quant": 4, "post-quant": 4, "damage": 4, "post-TTT": 4, "recovery": 4,
                     "rec.frac": 3, "healing": 3})
