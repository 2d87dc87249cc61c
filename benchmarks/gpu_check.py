"""The GPU path in one command (under 5 minutes on one H100): numbers for BENCHMARKS.md, with the card named.

    python benchmarks/gpu_check.py
    python benchmarks/gpu_check.py --smoke     # the same at tiny sizes, not recorded (without CUDA: see below)

Measures, on the first CUDA device:
  1. the card's dense matmul rate in fp32 (TF32 off, as the TTT loop runs) and bf16;
  2. score-first TTT throughput on the 17M parameter-golf baseline (random weights, synthetic
     tokens, 4 chunks of 16,384 tokens, context 1024, 1 epoch) in fp32 and bf16 autocast, as
     executed FLOP/s against that rate (target: bf16 at >= 40% of the bf16 matmul rate);
  3. first_chunk_delta on CUDA: chunk 0 scored by the TTT loop against the static curve computed
     the way the sweep's prep tasks compute it (same device, same dtype);
  4. peak GPU memory of the bf16 TTT run;
  5. a one-GPU trial through the real sweep code: `healing_grid --smoke --gpus-per-trial 1`
     (a TorchTrainer with use_gpu, NCCL at W=1) on a small demo built here;
  6. the projection of 3-epoch chunked TTT over parameter-golf's 62,021,632 validation tokens on
     8 such GPUs, from the measured bf16 rate.
Every config and size is built before it looks for CUDA, so a wrong one fails on any machine. Without
CUDA it then stops with one line; with --smoke it runs 1-3 on the CPU instead, says that CUDA was not
checked, and exits 0.
"""
from __future__ import annotations

import argparse
import copy
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import REPO, SMOKE_MODEL, matmul_rate, record
from ttt_throughput import forward_flops_per_token, timed

from e2ettt.demo import DemoConfig
from e2ettt.model import GPTConfig
from e2ettt.ttt import TTTConfig

sys.path.insert(0, str(REPO))
GOLF_VAL_TOKENS = 62_021_632
DTYPES = ("fp32", "bf16")


@dataclass(frozen=True)
class Plan:
    """Every size and config the check runs."""
    label: str  # the model, as the table names it
    matmul: int  # n of the n×n×n matmuls
    model: GPTConfig
    tokens: int  # targets of the throughput runs: 4 chunks
    throughput: dict[str, TTTConfig]  # by dtype
    delta_tokens: int  # targets of the first_chunk_delta runs
    delta: dict[str, TTTConfig]  # by dtype
    demo: DemoConfig  # the sweep trial's inputs, built here
    max_tokens: int  # the sweep trial's validation tokens per row


def plan(smoke: bool) -> Plan:
    """The check's configs (validated, and the sweep trial's command line parsed into its SweepConfig)."""
    from sweeps import healing_grid

    context, chunk, delta_chunk = (64, 256, 128) if smoke else (1024, 16384, 2048)
    demo_model = SMOKE_MODEL if smoke else GPTConfig(vocab_size=1024, num_layers=2, model_dim=128, num_heads=4,
                                                      num_kv_heads=2)
    p = Plan(label="tiny" if smoke else "17M", matmul=512 if smoke else 8192, model=SMOKE_MODEL if smoke else GPTConfig(),
             tokens=4 * chunk,
             throughput={d: TTTConfig(chunk_tokens=chunk, context=context, inner_lr=1e-3, epochs=1, micro_batch=16, dtype=d,
                                      diverge_bpb=1e9) for d in DTYPES},
             delta_tokens=4 * delta_chunk,
             delta={d: TTTConfig(chunk_tokens=delta_chunk, context=context, inner_lr=1e-3, dtype=d, diverge_bpb=1e9)
                    for d in DTYPES},
             demo=DemoConfig(max_documents=30 if smoke else 40, val_every=5, steps=20 if smoke else 80, batch_seqs=16,
                             seq_len=128, model=demo_model),
             max_tokens=1024 if smoke else 2048)
    for cfg in (p.model, *p.throughput.values(), *p.delta.values(), p.demo):
        cfg.validate()
    placeholder = Path(tempfile.gettempdir()) / "e2ettt-gpu-check-plan"
    healing_grid.build_config(healing_grid.parse_args(sweep_args(p, placeholder / "final_model.pt", placeholder,
                                                                 placeholder / "tokenizer.model", placeholder)))
    return p


def sweep_args(p: Plan, checkpoint: Path, data: Path, tokenizer: Path, out: Path) -> list[str]:
    return ["--smoke", "--gpus-per-trial", "1", "--checkpoint", str(checkpoint), "--data", str(data),
            "--tokenizer", str(tokenizer), "--out", str(out), "--name", "gpu", "--set", "quant.min_numel=1024",
            "--max-tokens", str(p.max_tokens), "--context", "128", "--set", "ttt.dtype=bf16"]


def ttt_throughput(cfg: GPTConfig, tokens: torch.Tensor, tables, ttt: TTTConfig, device: str) -> tuple[float, float, int]:
    from e2ettt.model import GPT
    from e2ettt.ttt import run_ttt

    torch.manual_seed(0)
    model = GPT(cfg).to(device)
    run_ttt(copy.deepcopy(model), tokens[: ttt.chunk_tokens + ttt.context + 1], tables, ttt)  # warm-up
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    seconds = timed(lambda: run_ttt(copy.deepcopy(model), tokens, tables, ttt), device)
    fwd = forward_flops_per_token(cfg, ttt.context)
    trained = 3 / 4
    flops = fwd * (1 + 3 * trained - trained) * (tokens.numel() - 1)  # fused scoring: one forward less per trained token
    peak = torch.cuda.max_memory_allocated() if device == "cuda" else 0
    return (tokens.numel() - 1) / seconds, flops / seconds, peak


def first_chunk_delta(cfg: GPTConfig, n: int, tables, ttt: TTTConfig, device: str) -> float:
    from e2ettt.evaluate import chunk_spans, static_curve
    from e2ettt.model import GPT
    from e2ettt.ttt import run_ttt

    torch.manual_seed(1)
    model = GPT(cfg).to(device).eval()
    tokens = torch.randint(4, cfg.vocab_size, (n + 1,), device=device)
    with torch.no_grad():
        static = static_curve(model, tokens, chunk_spans(n, ttt.chunk_tokens), ttt.context, None, tables, ttt.micro_batch,
                              ttt.autocast_dtype)
    return run_ttt(copy.deepcopy(model), tokens, tables, ttt, static).first_chunk_delta


def sweep_trial(p: Plan) -> dict:
    from e2ettt.demo import build_demo
    from sweeps import healing_grid

    work = Path(tempfile.mkdtemp(prefix="e2ettt-gpu-check-"))
    demo = build_demo(p.demo, work / "cache", log=lambda *a: None)
    t0 = time.perf_counter()
    code = healing_grid.main(sweep_args(p, demo.checkpoint, demo.data_dir, demo.tokenizer, work))
    import pandas as pd

    rows = pd.read_parquet(work / "gpu" / "trials.parquet")
    return {"exit": code, "seconds": time.perf_counter() - t0, "rows": rows}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true",
                        help="tiny sizes, not recorded; without CUDA, the TTT parts on the CPU (exit 0, CUDA not checked)")
    args = parser.parse_args(argv)
    p = plan(args.smoke)
    cuda = torch.cuda.is_available()
    if not cuda and not args.smoke:
        print("gpu_check: no CUDA device here (torch.cuda.is_available() is False); run it on a machine with an NVIDIA GPU",
              file=sys.stderr)
        return 2
    from e2ettt.evaluate import DeviceTables
    from e2ettt.tokenizer import ByteTables

    device = "cuda" if cuda else "cpu"
    torch.backends.cuda.matmul.allow_tf32 = False
    card = torch.cuda.get_device_name(0) if cuda else "none (CPU, CUDA not checked)"
    rate32 = matmul_rate(p.matmul, torch.float32, device)
    rate16 = matmul_rate(p.matmul, torch.bfloat16, device)
    tables = DeviceTables.from_tables(ByteTables(np.ones(1024, np.int16), np.zeros(1024, bool), np.zeros(1024, bool)), device)
    tokens = torch.randint(4, p.model.vocab_size, (p.tokens + 1,), device=device)
    rows = []
    for dtype, rate in (("fp32", rate32), ("bf16", rate16)):
        tps, flops, peak = ttt_throughput(p.model, tokens, tables, p.throughput[dtype], device)
        rows.append({"what": f"TTT {p.label} {dtype}", "tokens/s": tps, "TFLOP/s executed": flops / 1e12,
                     "of matmul rate": flops / rate, "peak GPU GiB": peak / 2**30 if cuda else "-",
                     "first_chunk_delta": first_chunk_delta(p.model, p.delta_tokens, tables, p.delta[dtype], device)})
        print(rows[-1], flush=True)
    notes = [f"matmul rate: fp32 {rate32 / 1e12:.1f} TFLOP/s (TF32 off), bf16 {rate16 / 1e12:.1f} TFLOP/s ({p.matmul}³)"]
    trial = None
    if cuda:
        trial = sweep_trial(p)
        r = trial["rows"]
        rows.append({"what": "sweep trial, 1 GPU (TorchTrainer use_gpu, NCCL W=1), bf16",
                     "tokens/s": float(r["tokens_per_second"].median()),
                     "TFLOP/s executed": "-", "of matmul rate": "-", "peak GPU GiB": "-",
                     "first_chunk_delta": float(r["first_chunk_delta"].abs().max())})
        notes.append(f"sweep trial: exit {trial['exit']}, {trial['seconds']:.0f} s, statuses {sorted(set(r['status']))}, "
                     f"devices {sorted(set(r['device']))}, {sorted(set(r['device_name']))}")
    else:
        notes.append("sweep trial: not run (it needs a GPU); its command line was parsed into its config")
    per_gpu = rows[1]["tokens/s"]
    projected = GOLF_VAL_TOKENS * 3 / (8 * per_gpu)  # 3 epochs: fwd+bwd dominate; scoring fused into the first
    notes.append(f"projection: 3-epoch chunked TTT over {GOLF_VAL_TOKENS:,} tokens on 8 GPUs at the measured 1-epoch bf16 "
                 f"rate ({per_gpu:,.0f} tokens/s per GPU) ≈ 3 × {GOLF_VAL_TOKENS:,} / (8 × {per_gpu:,.0f}) = {projected:.0f} s "
                 f"(budget 600 s; target 60 s)")
    record(f"GPU check: {card}", rows, notes, append=not args.smoke)
    if not cuda:
        print("gpu_check --smoke: CUDA not checked (no CUDA device here); every config was built and the TTT parts ran "
              "on the CPU at tiny size")
        return 0
    return 0 if trial["exit"] == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
