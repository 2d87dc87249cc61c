"""TTT throughput of the engine against a naive loop and the machine's matmul rate.

For the demo model and a parameter-golf-baseline-sized model (17M parameters,
random weights, synthetic tokens), in fp32 and bf16 autocast, in one run:
  engine  : e2ettt.ttt.run_ttt (chunk k scored from its first epoch's forward, then adapted)
  naive   : the same protocol written plainly: score with no_grad, then train on the chunk
  limit   : a large matmul timed in the same run; executed FLOP/s / that rate
FLOPs counted from the model: forward = 2 · (matrix parameters incl. the
tied head) + causal attention 2 · 2 · d · (T+1)/2 per layer; backward = 2 × forward.
The naive loop executes (1 + 3 · epochs) forwards per trained token, the engine one fewer.

    python benchmarks/ttt_throughput.py [--tokens 8192] [--device cpu|cuda]
    python benchmarks/ttt_throughput.py --smoke     # seconds: the tests' tiny GPT, 1,024 tokens, 256³ matmuls; not recorded
"""
from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import numpy as np
from _common import SMOKE_MODEL, matmul_rate, record

from e2ettt.evaluate import DeviceTables
from e2ettt.model import GPT, GPTConfig
from e2ettt.tokenizer import ByteTables
from e2ettt.ttt import TTTConfig, run_ttt


def forward_flops_per_token(cfg: GPTConfig, T: int) -> float:
    d, L = cfg.model_dim, cfg.num_layers
    kv = cfg.num_kv_heads * d // cfg.num_heads
    matrix = L * (2 * d * d + 2 * d * kv + 2 * cfg.mlp_mult * d * d) + cfg.vocab_size * d
    return 2 * matrix + L * 4 * d * (T + 1) / 2


def naive_ttt(model, tokens, chunk: int, T: int, lr: float, epochs: int, dtype) -> float:
    """Score chunk with no_grad, then train on it: the plain loop a benchmark should beat."""
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    n = (tokens.numel() - 1) // T * T
    x_all, y_all = tokens[:n].view(-1, T), tokens[1 : n + 1].view(-1, T)
    per_chunk = max(1, chunk // T)
    last = (x_all.shape[0] - 1) // per_chunk * per_chunk  # the last chunk is scored, not trained on
    total = 0.0
    ctx = torch.autocast(tokens.device.type, dtype=dtype) if dtype else torch.autocast(tokens.device.type, enabled=False)
    for i in range(0, x_all.shape[0], per_chunk):
        x, y = x_all[i : i + per_chunk], y_all[i : i + per_chunk]
        with torch.no_grad(), ctx:
            total += float(F.cross_entropy(model(x).float().flatten(0, 1), y.flatten(), reduction="sum"))
        for _ in range(epochs if i < last else 0):
            with ctx:
                loss = F.cross_entropy(model(x).float().flatten(0, 1), y.flatten())
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
    return total


def timed(fn, device: str) -> float:
    if device == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    fn()
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--tokens", type=int, help="tokens per run, in 4 chunks (default 8,192; --smoke: 1,024)")
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--smoke", action="store_true", help="the tests' tiny GPT, 1,024 tokens, small matmuls; print, do not record")
    args = p.parse_args()
    args.tokens = args.tokens or (1024 if args.smoke else 8192)
    dev = args.device
    models = {
        "demo-592K (T=256)": (GPTConfig(vocab_size=1024, num_layers=4, model_dim=128, num_heads=4, num_kv_heads=2), 256),
        "baseline-17M (T=1024)": (GPTConfig(), 1024),
    }
    if args.smoke:
        models = {"tiny-2L-64d (T=64)": (SMOKE_MODEL, 64)}
    n = 256 if args.smoke else 2048
    rate32 = matmul_rate(n, torch.float32, dev)
    rate16 = matmul_rate(min(n, 512) if dev == "cpu" else n, torch.bfloat16, dev, repeat=2)
    skip16 = rate16 < rate32 and not args.smoke  # no figure worth recording; a smoke run still runs the bf16 code
    tables = DeviceTables.from_tables(ByteTables(np.ones(1024, np.int16), np.zeros(1024, bool), np.zeros(1024, bool)), dev)
    rows = []
    for name, (cfg, T) in models.items():
        torch.manual_seed(0)
        model = GPT(cfg).to(dev)
        tokens = torch.randint(4, cfg.vocab_size, (args.tokens + 1,), device=dev)
        chunk = args.tokens // 4  # four chunks: three adapted, the last only scored
        fwd = forward_flops_per_token(cfg, T)
        trained = (args.tokens - chunk) / args.tokens  # share of tokens that are also trained on
        naive_per_tok = fwd * (1 + 3 * args.epochs * trained)  # separate score forward + fwd/bwd per epoch
        engine_per_tok = fwd * (1 + 3 * args.epochs * trained - trained)  # fused: the first epoch's forward scores
        for dtype_name, dtype, rate in (("fp32", None, rate32), ("bf16", torch.bfloat16, rate16)):
            ttt_cfg = TTTConfig(chunk_tokens=chunk, context=T, inner_lr=1e-3, epochs=args.epochs, micro_batch=16,
                                dtype=dtype_name, diverge_bpb=1e9)
            ttt_cfg.validate()
            if dtype is not None and skip16:
                rows.append({"model": name, "dtype": dtype_name, "engine tok/s": "skipped", "naive tok/s": "skipped",
                             "engine/naive": "-", "engine GFLOP/s": "-", "of matmul rate": "-", "naive of matmul rate": "-"})
                continue
            m = copy.deepcopy(model)
            run_ttt(m, tokens[: chunk + T + 1], tables, ttt_cfg)  # warm-up: one adapted chunk, one scored window
            t_engine = timed(lambda m=model, x=tokens, c=ttt_cfg: run_ttt(copy.deepcopy(m), x, tables, c), dev)
            t_naive = timed(lambda m=model, x=tokens, c=chunk, t=T, d=dtype: naive_ttt(copy.deepcopy(m), x, c, t, 1e-3,
                                                                                        args.epochs, d), dev)
            tps = args.tokens / t_engine
            rows.append({"model": name, "dtype": dtype_name, "engine tok/s": tps, "naive tok/s": args.tokens / t_naive,
                         "engine/naive": t_naive / t_engine, "engine GFLOP/s": tps * engine_per_tok / 1e9,
                         "of matmul rate": tps * engine_per_tok / rate,
                         "naive of matmul rate": args.tokens / t_naive * naive_per_tok / rate})
            print(rows[-1], flush=True)
    record(f"TTT throughput ({dev}, {args.tokens:,} tokens in 4 chunks, {args.epochs} epoch)", rows, [
        f"measured matmul rate: fp32 {rate32 / 1e9:.1f} GFLOP/s ({n}³), bf16 {rate16 / 1e9:.1f} GFLOP/s"
        + (f" ({min(n, 512)}³): this CPU has no native bf16 matmul, so bf16 TTT is skipped" if skip16 else ""),
        "FLOPs are those each loop executes: forward 2·(matrix params incl. tied head) + causal attention per token; "
        "fwd+bwd = 3 forwards; the naive loop scores with a separate forward, the engine scores from the first "
        "epoch's forward (fuse_score), so it executes one forward less per trained token",
    ], append=not args.smoke)


if __name__ == "__main__":
    main()
