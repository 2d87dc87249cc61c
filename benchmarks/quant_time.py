"""Quantization time of RTN, GPTQ and Hadamard+GPTQ on a 17M-parameter baseline GPT (CPU).

Random weights and synthetic calibration tokens: time does not depend on
the values. Calibration is included in the GPTQ times.

    python benchmarks/quant_time.py [--calib-tokens 16384]
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import record

from e2ettt.model import GPT, GPTConfig, count_parameters
from e2ettt.quant.apply import quantize_model
from e2ettt.quant.regimes import QuantConfig, parse_regime


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--calib-tokens", type=int, default=16384)
    p.add_argument("--regimes", default="int4,pg-int8,gptq-int4,hadamard-int4,hadamard-gptq-int4")
    args = p.parse_args()
    torch.manual_seed(0)
    model = GPT(GPTConfig())
    for block in model.blocks:  # parameter-golf zero-inits these; give them values
        torch.nn.init.normal_(block.attn.proj.weight, std=0.02)
        torch.nn.init.normal_(block.mlp.proj.weight, std=0.02)
    calib = torch.randint(0, 1024, (args.calib_tokens + 1,))
    cfg = QuantConfig(calib_tokens=args.calib_tokens, calib_seq_len=1024)
    rows = []
    for name in args.regimes.split(","):
        t = time.perf_counter()
        _, report = quantize_model(model, parse_regime(name), cfg, calib)
        rows.append({"regime": name, "seconds": time.perf_counter() - t, "quantized params": report.quantized_params,
                     "artifact bytes (lzma)": report.artifact_bytes_lzma,
                     "calibration tokens": args.calib_tokens if "gptq" in name else 0})
    record(f"Quantization time, 17M baseline GPT ({count_parameters(model):,} params), {torch.get_num_threads()} threads",
           rows, ["GPTQ: architecture-blind walk (forward hooks, one calibration pass per group of layers that "
                 "share an input, stopped after the group's last use), lazy blocks of 128 columns, act-order, damping 1%"])


if __name__ == "__main__":
    main()
