"""Seeded orthogonal rotations for QuaRot-style quantization (Ashkboos et al.
2024, "QuaRot"; parameter-golf's "SpinQuant V1").

For a linear layer y = x Wᵀ and an orthogonal R, y = (x R)(W R)ᵀ: quantize
W R instead of W, rotate activations at run time. R = diag(s) H / √n with
H the Walsh–Hadamard matrix (n a power of two; O(n log n) by `fwht`) and s
seeded random signs; other widths use a seeded random orthogonal matrix.
The GPTQ Hessian of the rotated weight is Rᵀ H R.

This architecture's per-channel parameters (resid_mix, attn/mlp scales,
skip weights) and weightless RMS-norms do not commute with a rotation of
the residual stream, and relu² does not commute with a rotation of the MLP
hidden space; the input-side rotation used here needs neither, so every
linear layer can be rotated exactly and nothing else is touched.
"""
from __future__ import annotations

import torch
from torch import Tensor


def fwht(x: Tensor) -> Tensor:
    """Unnormalized fast Walsh–Hadamard transform over the last dim (a power of two)."""
    n = x.shape[-1]
    if n & (n - 1):
        raise ValueError(f"fwht needs a power-of-two width, got {n}")
    shape = x.shape
    h = 1
    y = x.reshape(-1, n)
    while h < n:
        y = y.view(-1, n // (2 * h), 2, h)
        y = torch.stack((y[:, :, 0] + y[:, :, 1], y[:, :, 0] - y[:, :, 1]), dim=2)
        h *= 2
    return y.reshape(shape)


class Rotation:
    """x -> x R for one width, seeded; `inverse` applies Rᵀ."""

    def __init__(self, n: int, seed: int):
        g = torch.Generator().manual_seed(seed)
        self.n = n
        self.hadamard = n & (n - 1) == 0
        if self.hadamard:
            self.signs = torch.randint(0, 2, (n,), generator=g).double() * 2 - 1
        else:
            q, r = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
            self.matrix = q * torch.sign(torch.diagonal(r))[None, :]

    def apply(self, x: Tensor) -> Tensor:
        if self.hadamard:
            return fwht(x * self.signs.to(x)) / self.n**0.5
        return x @ self.matrix.to(x)

    def inverse(self, y: Tensor) -> Tensor:
        if self.hadamard:
            return fwht(y) / self.n**0.5 * self.signs.to(y)
        return y @ self.matrix.to(y).T

    def conjugate(self, H: Tensor) -> Tensor:
        """Rᵀ H R."""
        return self.apply(self.apply(H).T).T
