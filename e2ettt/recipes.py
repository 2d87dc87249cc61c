"""TTT protocols of the records and the literature, by name: each a preset of settings, and where it comes from.

`--ttt-recipe NAME` applies a recipe's settings before the user's own
flags and `--set`s (which override it), and every row records the name in
its `recipe` column. The settings are the source's as published; sizes that
depend on the model and data (the context, and on the demo the chunk of a
32K-token recipe) are the user's to set. Facts from the sources named; the
code that runs them is e2ettt's own.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Recipe:
    source: str
    summary: str
    ttt: dict  # TTTConfig fields
    grid: dict  # Grid axes (chunk sizes, inner learning rates)


RECIPES: dict[str, Recipe] = {
    "stream": Recipe(
        "e2ettt's own default", "score a chunk of the stream, then one SGD step on the windows it scored",
        {"optimizer": "sgd", "momentum": 0.9, "grad_clip": 1.0, "epochs": 1, "schedule": "constant",
         "train_windows": "scored", "reset": "never", "params": "all"}, {}),
    "chunked-sgd": Recipe(
        "parameter-golf #549, #1413, #1493 (legal score-first TTT)",
        "32K-token chunks scored with sliding windows (stride 64), then 3 epochs of SGD on the chunk's targets as "
        "non-overlapping sequences, cosine lr over chunks",
        {"optimizer": "sgd", "momentum": 0.9, "grad_clip": 1.0, "epochs": 3, "schedule": "cosine", "stride": 64,
         "train_windows": "sequences", "reset": "never", "params": "all"},
        {"chunks": (32768,), "inner_lrs": (0.005,)}),
    "doc-lora": Recipe(
        "parameter-golf #1530, #1851 (per-document LoRA TTT)",
        "rank-96 LoRA on every matrix, reset at each document, 48-token chunks inside it, one AdamW step (beta1 0, "
        "weight decay 1.0) per chunk",
        {"optimizer": "adamw", "momentum": 0.0, "weight_decay": 1.0, "grad_clip": 0.0, "epochs": 1,
         "schedule": "constant", "train_windows": "scored", "reset": "document", "params": "lora:96"},
        {"chunks": (48,), "inner_lrs": (1e-4,)}),
    "phased": Recipe(
        "parameter-golf #1626, #1695 (phased global SGD)",
        "doc-lora, and after every 667 documents scored a global SGD pass (lr 1e-3, momentum 0.9, cosine) over them",
        {"optimizer": "adamw", "momentum": 0.0, "weight_decay": 1.0, "grad_clip": 1.0, "epochs": 1,
         "schedule": "constant", "train_windows": "scored", "reset": "document", "params": "lora:96",
         "phase_docs": 667, "phase_lr": 1e-3},
        {"chunks": (48,), "inner_lrs": (1e-4,)}),
    "dyneval": Recipe(
        "Krause et al. 2019, Dynamic Evaluation of Transformer Language Models",
        "128-token segments, each scored then one RMS-normalised gradient step (mean squared gradients from the train "
        "split) with a decay toward the starting weights",
        {"optimizer": "dyneval", "decay_to_start": 0.01, "grad_clip": 0.0, "epochs": 1, "schedule": "constant",
         "train_windows": "scored", "reset": "never", "params": "all"},
        {"chunks": (128,), "inner_lrs": (1e-5,)}),
    "e2e": Recipe(
        "parameter-golf #1837 (the seed: full-model E2E TTT)",
        "full-model SGD (momentum 0.9, clip 1.0), one step per 48-token chunk inside each document, lr 5e-6",
        {"optimizer": "sgd", "momentum": 0.9, "grad_clip": 1.0, "epochs": 1, "schedule": "constant",
         "train_windows": "scored", "reset": "document", "params": "all"},
        {"chunks": (48,), "inner_lrs": (5e-6,)}),
}


def recipe_updates(name: str) -> dict:
    """The dotted-key settings of recipe `name` (ttt.recipe included), or one line naming the recipes."""
    if name not in RECIPES:
        raise ValueError(f"--ttt-recipe {name!r}: not a recipe; one of {', '.join(RECIPES)}")
    r = RECIPES[name]
    return {"ttt.recipe": name, **{f"ttt.{k}": v for k, v in r.ttt.items()}, **{f"grid.{k}": v for k, v in r.grid.items()}}


def describe() -> str:
    """One line per recipe, for --help and the README."""
    return "; ".join(f"{name}: {r.summary} ({r.source})" for name, r in RECIPES.items())
