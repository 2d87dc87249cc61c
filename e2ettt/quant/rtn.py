"""Round-to-nearest on a uniform grid symmetric about zero, one fp16 scale per row.

A grid of n levels (n = 2^b for b-bit codes; 3 for ternary) has centre
c = (n − 1)/2. Row r gets scale s_r = clip_r / c, rounded to fp16 because
the artifact stores it so; codes are u = clamp(round(w / s_r + c), 0, n − 1)
(unsigned, b bits each) and decode to Q = (u − c) · s_r in float32. With n
even (every intN) the levels are ±0.5s, ±1.5s, …: int2 is a true 4-level
code {±s/2, ±3s/2}; ternary {−s, 0, s} takes 3 of the 4 values 2 bits hold.
Entries inside the clip are within s_r/2 of their level. `decode` is the
one place codes turn into weights: the quantizers, the model that is
evaluated and adapted, and the stored artifact's reader all go through it,
so what is evaluated is exactly what is stored.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

FP16_TINY = 2.0**-24  # smallest positive fp16 (subnormal): a row of zeros still gets a valid scale


@dataclass(frozen=True)
class Quantized:
    Q: Tensor  # decoded weights, float32, same shape as W
    codes: Tensor  # uint8 codes in [0, levels - 1]
    scales: Tensor  # (rows,) float32 values exactly representable in fp16 (the stored scales)


def centre(levels: int) -> float:
    return (levels - 1) / 2


def row_scales(W: Tensor, levels: int, clip_q: float = 1.0) -> Tensor:
    """Per-row scales clip / centre, rounded to fp16 (as stored) and returned as float32."""
    absw = W.float().abs()
    clip = absw.amax(dim=1) if clip_q >= 1.0 else torch.quantile(absw, clip_q, dim=1)
    return (clip / centre(levels)).clamp_min(FP16_TINY).half().float()


def encode(W: Tensor, scales: Tensor, levels: int) -> Tensor:
    """Codes u = clamp(round(w / s + c), 0, n - 1) as float (exact small integers)."""
    return torch.clamp(torch.round(W.float() / scales[:, None] + centre(levels)), 0, levels - 1)


def decode(codes: Tensor, scales: Tensor, levels: int) -> Tensor:
    """Q = (u - c) * s, float32: the weights that codes and stored scales stand for."""
    return (codes.float() - centre(levels)) * scales.float()[:, None]


def quantize_with_scales(W: Tensor, scales: Tensor, levels: int) -> Quantized:
    codes = encode(W, scales, levels)
    return Quantized(decode(codes, scales, levels), codes.to(torch.uint8), scales)


def rtn(W: Tensor, levels: int, clip_q: float = 1.0) -> Quantized:
    """Quantize a 2-D weight (rows = output channels) onto `levels` levels per row."""
    return quantize_with_scales(W, row_scales(W, levels, clip_q), levels)
