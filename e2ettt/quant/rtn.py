"""Round-to-nearest: symmetric per-row integer quantization.

For bits b, qmax = 2^(b-1) - 1; each row r gets scale_r = clip_r / qmax
with clip_r the row's max |w| (or a percentile of |w| when `clip_q` < 1),
codes q = clamp(round(w / scale_r), -qmax, qmax), and Q = q * scale_r.
Error bound: |w - Q| <= scale_r / 2 for every unclipped entry.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class Quantized:
    Q: Tensor  # dequantized weights, same shape and dtype float32 as W
    codes: Tensor  # int8 integer codes in [-qmax, qmax]
    scales: Tensor  # (rows,) float32 per-row scales


def qmax(bits: int) -> int:
    return 2 ** (bits - 1) - 1


def row_scales(W: Tensor, bits: int, clip_q: float = 1.0) -> Tensor:
    absw = W.float().abs()
    clip = absw.amax(dim=1) if clip_q >= 1.0 else torch.quantile(absw, clip_q, dim=1)
    return (clip / qmax(bits)).clamp_min(1e-12)


def quantize_with_scales(W: Tensor, scales: Tensor, bits: int) -> Quantized:
    m = qmax(bits)
    codes = torch.clamp(torch.round(W.float() / scales[:, None]), -m, m)
    return Quantized(codes * scales[:, None], codes.to(torch.int8), scales)


def rtn(W: Tensor, bits: int, clip_q: float = 1.0) -> Quantized:
    """Quantize a 2-D weight (rows = output channels) to `bits` per entry."""
    return quantize_with_scales(W, row_scales(W, bits, clip_q), bits)
