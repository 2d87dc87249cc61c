"""The GPU path in one command (under 5 minutes on one H100): numbers for BENCHMARKS.md, with the card named.

    python benchmarks/gpu_check.py

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
Without CUDA it stops with one line.
"""
from __future__ import annotations

import copy
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import REPO, matmul_rate, record
from ttt_throughput import forward_flops_per_token, timed

GOLF_VAL_TOKENS = 62_021_632


def ttt_throughput(dtype: str, tokens: torch.Tensor, tables, cfg) -> tuple[float, float, int]:
    from e2ettt.model import GPT
    from e2ettt.ttt import TTTConfig, run_ttt

    torch.manual_seed(0)
    model = GPT(cfg).cuda()
    chunk = (tokens.numel() - 1) // 4
    ttt = TTTConfig(chunk_tokens=chunk, context=1024, inner_lr=1e-3, epochs=1, micro_batch=16, dtype=dtype, diverge_bpb=1e9)
    run_ttt(copy.deepcopy(model), tokens[: chunk + 1025], tables, ttt)  # warm-up
    torch.cuda.reset_peak_memory_stats()
    seconds = timed(lambda: run_ttt(copy.deepcopy(model), tokens, tables, ttt), "cuda")
    fwd = forward_flops_per_token(cfg, 1024)
    trained = 3 / 4
    flops = fwd * (1 + 3 * trained - trained) * (tokens.numel() - 1)  # fused scoring: one forward less per trained token
    return (tokens.numel() - 1) / seconds, flops / seconds, torch.cuda.max_memory_allocated()


def first_chunk_delta(dtype: str, tables, cfg) -> float:
    from e2ettt.evaluate import chunk_spans, static_curve
    from e2ettt.model import GPT
    from e2ettt.ttt import TTTConfig, run_ttt

    torch.manual_seed(1)
    model = GPT(cfg).cuda().eval()
    tokens = torch.randint(4, cfg.vocab_size, (8193,), device="cuda")
    ttt = TTTConfig(chunk_tokens=2048, context=1024, inner_lr=1e-3, dtype=dtype, diverge_bpb=1e9)
    with torch.no_grad():
        static = static_curve(model, tokens, chunk_spans(8192, 2048), 1024, None, tables, ttt.micro_batch, ttt.autocast_dtype)
    return run_ttt(copy.deepcopy(model), tokens, tables, ttt, static).first_chunk_delta


def sweep_trial() -> dict:
    from e2ettt.demo import DemoConfig, build_demo
    from e2ettt.model import GPTConfig
    from sweeps import healing_grid

    work = Path(tempfile.mkdtemp(prefix="e2ettt-gpu-check-"))
    demo = build_demo(DemoConfig(max_documents=40, val_every=5, steps=80, batch_seqs=16, seq_len=128,
                                 model=GPTConfig(vocab_size=1024, num_layers=2, model_dim=128, num_heads=4, num_kv_heads=2)),
                      work / "cache", log=lambda *a: None)
    args = ["--smoke", "--gpus-per-trial", "1", "--checkpoint", str(demo.checkpoint), "--data", str(demo.data_dir),
            "--tokenizer", str(demo.tokenizer), "--out", str(work), "--name", "gpu", "--set", "quant.min_numel=1024",
            "--max-tokens", "2048", "--context", "128", "--set", "ttt.dtype=bf16"]
    t0 = time.perf_counter()
    code = healing_grid.main(args)
    import pandas as pd

    rows = pd.read_parquet(work / "gpu" / "trials.parquet")
    return {"exit": code, "seconds": time.perf_counter() - t0, "rows": rows}


def main() -> int:
    if not torch.cuda.is_available():
        print("gpu_check: no CUDA device here (torch.cuda.is_available() is False); run it on a machine with an NVIDIA GPU",
              file=sys.stderr)
        return 2
    from e2ettt.evaluate import DeviceTables
    from e2ettt.model import GPTConfig
    from e2ettt.tokenizer import ByteTables

    sys.path.insert(0, str(REPO))
    torch.backends.cuda.matmul.allow_tf32 = False
    card = torch.cuda.get_device_name(0)
    rate32 = matmul_rate(8192, torch.float32, "cuda")
    rate16 = matmul_rate(8192, torch.bfloat16, "cuda")
    cfg = GPTConfig()
    tables = DeviceTables.from_tables(ByteTables(np.ones(1024, np.int16), np.zeros(1024, bool), np.zeros(1024, bool)), "cuda")
    tokens = torch.randint(4, cfg.vocab_size, (4 * 16384 + 1,), device="cuda")
    rows = []
    for dtype, rate in (("fp32", rate32), ("bf16", rate16)):
        tps, flops, peak = ttt_throughput(dtype, tokens, tables, cfg)
        rows.append({"what": f"TTT 17M {dtype}", "tokens/s": tps, "TFLOP/s executed": flops / 1e12,
                     "of matmul rate": flops / rate, "peak GPU GiB": peak / 2**30,
                     "first_chunk_delta": first_chunk_delta(dtype, tables, cfg)})
        print(rows[-1], flush=True)
    trial = sweep_trial()
    r = trial["rows"]
    rows.append({"what": "sweep trial, 1 GPU (TorchTrainer use_gpu, NCCL W=1), bf16",
                 "tokens/s": float(r["tokens_per_second"].median()),
                 "TFLOP/s executed": "-", "of matmul rate": "-", "peak GPU GiB": "-",
                 "first_chunk_delta": float(r["first_chunk_delta"].abs().max())})
    per_gpu = rows[1]["tokens/s"]
    projected = GOLF_VAL_TOKENS * 3 / (8 * per_gpu)  # 3 epochs: fwd+bwd dominate; scoring fused into the first
    record(f"GPU check: {card}", rows, [
        f"matmul rate: fp32 {rate32 / 1e12:.1f} TFLOP/s (TF32 off), bf16 {rate16 / 1e12:.1f} TFLOP/s (8192³)",
        f"sweep trial: exit {trial['exit']}, {trial['seconds']:.0f} s, statuses {sorted(set(r['status']))}, "
        f"devices {sorted(set(r['device']))}, {sorted(set(r['device_name']))}",
        f"projection: 3-epoch chunked TTT over {GOLF_VAL_TOKENS:,} tokens on 8 GPUs at the measured 1-epoch bf16 rate "
        f"({per_gpu:,.0f} tokens/s per GPU) ≈ 3 × {GOLF_VAL_TOKENS:,} / (8 × {per_gpu:,.0f}) = {projected:.0f} s "
        f"(budget 600 s; target 60 s)",
    ])
    return 0 if trial["exit"] == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
