"""Lockstep scaling: the same TTT run on W=1 (2 threads) and W=2 (1 thread each), gloo.

Reports tokens/s, the fraction of each rank's time spent in collectives
(gradient, score and checksum all-reduces, timed around the calls), and the
targets each rank processed (the seed's redundant lockstep had every rank
process every token; here each rank's share halves as W doubles).

    python benchmarks/lockstep_scaling.py [--tokens 16384] [--model demo|17m|tiny]
    python benchmarks/lockstep_scaling.py --smoke     # seconds: --model tiny --tokens 1024; not recorded
"""
from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import SMOKE_MODEL, record

import e2ettt.distributed as D
from e2ettt import ttt
from e2ettt.evaluate import DeviceTables
from e2ettt.launch import run_local
from e2ettt.model import GPT, GPTConfig
from e2ettt.tokenizer import ByteTables


def rank_run(model, tokens, tables, cfg, threads: int) -> dict:
    torch.set_num_threads(threads)
    spent = {"collective": 0.0, "targets": 0}

    def timed(fn):
        def wrapper(*a, **k):
            t = time.perf_counter()
            out = fn(*a, **k)
            spent["collective"] += time.perf_counter() - t
            return out
        return wrapper

    ttt.all_reduce_sum_ = timed(D.all_reduce_sum_)
    ttt.assert_same_weights = timed(D.assert_same_weights)
    share = D.share

    def counting_share(items, weights, rank, world_size):
        out = share(items, weights, rank, world_size)
        spent["targets"] += sum(w.scored for w in out)
        return out

    ttt.share = counting_share
    t = time.perf_counter()
    result = ttt.run_ttt(model, tokens, tables, cfg)
    wall = time.perf_counter() - t
    rank, world = D.world()
    mine = torch.tensor([spent["collective"] / wall, float(spent["targets"])], dtype=torch.float64)
    gathered = [torch.zeros_like(mine) for _ in range(world)]
    if world > 1:
        torch.distributed.all_gather(gathered, mine)
    else:
        gathered = [mine]
    return {"wall": wall, "tokens": result.total.tokens, "bpb": result.bpb, "per_rank": [g.tolist() for g in gathered]}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--tokens", type=int, help="validation tokens (default 16,384; --smoke: 1,024)")
    p.add_argument("--model", choices=["demo", "17m", "tiny"], help="default demo; --smoke: tiny (the tests' GPT)")
    p.add_argument("--smoke", action="store_true", help="the tiny model on 1,024 tokens; print, do not record")
    args = p.parse_args()
    args.tokens = args.tokens or (1024 if args.smoke else 16384)
    args.model = args.model or ("tiny" if args.smoke else "demo")
    models = {"demo": (GPTConfig(vocab_size=1024, num_layers=4, model_dim=128, num_heads=4, num_kv_heads=2), 256),
              "17m": (GPTConfig(), 1024), "tiny": (SMOKE_MODEL, 64)}
    cfg_m, T = models[args.model]
    torch.manual_seed(0)
    model = GPT(cfg_m)
    tokens = torch.randint(4, 1024, (args.tokens + 1,))
    tables = DeviceTables.from_tables(ByteTables(np.ones(1024, np.int16), np.zeros(1024, bool), np.zeros(1024, bool)))
    cfg = ttt.TTTConfig(chunk_tokens=4 * T, context=T, inner_lr=1e-3, micro_batch=2, diverge_bpb=1e9)
    rows = []
    base = None
    for world, threads in ((1, 2), (2, 1)):
        out = run_local(rank_run, (copy.deepcopy(model), tokens, tables, cfg, threads), world)
        tps = out["tokens"] / out["wall"]
        base = base or tps
        rows.append({"W": world, "threads/rank": threads, "tokens/s": tps, "vs W=1": tps / base,
                     "collective share (max rank)": max(r[0] for r in out["per_rank"]),
                     "targets per rank": " / ".join(f"{int(r[1]):,}" for r in out["per_rank"]), "bpb": out["bpb"]})
    record(f"Lockstep scaling ({args.model}, {args.tokens:,} tokens, chunk {4 * T}, gloo on one machine)", rows,
           ["targets per rank counts scored + trained targets (1 epoch): they halve from W=1 to W=2"], append=not args.smoke)


if __name__ == "__main__":
    main()
