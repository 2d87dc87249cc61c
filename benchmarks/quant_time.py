"""Quantization time of RTN, GPTQ and Hadamard+GPTQ on a 17M-parameter baseline GPT (CPU).

Random weights and synthetic calibration tokens: time does not depend on
the values. Calibration is included in the GPTQ times.

    python benchmarks/quant_time.py [--calib-tokens 16384]
    python benchmarks/quant_time.py --smoke     # seconds: the tests' tiny GPT, 2,048 calibration tokens; not recorded
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import SMOKE_MODEL, record

from e2ettt.model import GPT, GPTConfig, count_parameters
from e2ettt.quant.apply import quantize_model
from e2ettt.quant.regimes import QuantConfig, parse_regime


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--calib-tokens", type=int, help="GPTQ calibration tokens (default 16,384; --smoke: 2,048)")
    p.add_argument("--regimes", default="int4,pg-int8,gptq-int4,hadamard-int4,hadamard-gptq-int4")
    p.add_argument("--smoke", action="store_true", help="the tests' tiny GPT and 2,048 calibration tokens; print, do not record")
    args = p.parse_args()
    calib_tokens = args.calib_tokens or (2048 if args.smoke else 16384)
    torch.manual_seed(0)
    model = GPT(SMOKE_MODEL if args.smoke else GPTConfig())
    for block in model.blocks:  # parameter-golf zero-inits these; give them values
        torch.nn.init.normal_(block.attn.proj.weight, std=0.02)
        torch.nn.init.normal_(block.mlp.proj.weight, std=0.02)
    calib = torch.randint(0, 1024, (calib_tokens + 1,))
    cfg = (QuantConfig(calib_tokens=calib_tokens, calib_seq_len=256, min_numel=1024) if args.smoke  # tiny matrices: 4,096+
           else QuantConfig(calib_tokens=calib_tokens, calib_seq_len=1024))
    rows = []
    for name in args.regimes.split(","):
        t = time.perf_counter()
        _, report = quantize_model(model, parse_regime(name), cfg, calib)
        rows.append({"regime": name, "seconds": time.perf_counter() - t, "quantized params": report.quantized_params,
                     "artifact bytes (lzma)": report.artifact_bytes_lzma,
                     "calibration tokens": calib_tokens if "gptq" in name else 0})
    what = "tiny GPT" if args.smoke else "17M baseline GPT"
    record(f"Quantization time, {what} ({count_parameters(model):,} params), {torch.get_num_threads()} threads",
           rows, ["GPTQ: architecture-blind walk (forward hooks, one calibration pass per group of layers that "
                 "share an input, stopped after the group's last use), lazy blocks of 128 columns, act-order, damping 1%"],
           append=not args.smoke)


if __name__ == "__main__":
    main()
