"""GPTQ: Frantar, Ashkboos, Hoefler, Alistarh, "GPTQ: Accurate Post-Training
Quantization for Generative Pre-trained Transformers" (2022), Algorithm 1.

Columns are quantized one at a time in (optionally act-order) sequence; the
rounding error of column j, scaled by the inverse Hessian, is spread onto the
columns not yet quantized, so that the layer proxy loss
tr((W - Q) H (W - Q)ᵀ) with H = 2XᵀX/n stays small. Lazy batches of
`block` columns, damping `damp` × mean diag(H), Cholesky of H⁻¹. The grid
and the decoding are RTN's (`rtn.encode`/`rtn.decode`, fp16 row scales), so
the error fed back is the error of the stored weights.
Pure: W and H are not modified.
"""
from __future__ import annotations

import torch
from torch import Tensor

from e2ettt.quant.rtn import Quantized, centre, decode, row_scales


def proxy_loss(W: Tensor, Q: Tensor, H: Tensor) -> float:
    """tr((W - Q) H (W - Q)ᵀ), the layer's output error on the calibration inputs."""
    E = (W - Q).double()
    return float(torch.einsum("ij,jk,ik->", E, H.double(), E))


def gptq(W: Tensor, H: Tensor, levels: int, block: int = 128, damp: float = 0.01,
         act_order: bool = True, clip_q: float = 1.0) -> Quantized:
    W = W.detach().clone().float()  # (rows, cols)
    H = H.detach().clone().float()  # (cols, cols)
    cols = W.shape[1]
    dead = torch.diag(H) == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    scales = row_scales(W, levels, clip_q)
    c = centre(levels)
    perm = torch.argsort(torch.diag(H), descending=True) if act_order else torch.arange(cols, device=W.device)
    W, H = W[:, perm], H[perm][:, perm]
    H += damp * torch.mean(torch.diag(H)) * torch.eye(cols, device=W.device)
    Hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    codes = torch.zeros_like(W)
    for i1 in range(0, cols, block):
        i2 = min(i1 + block, cols)
        W1 = W[:, i1:i2].clone()
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            w, d = W1[:, i], Hinv1[i, i]
            u = torch.clamp(torch.round(w / scales + c), 0, levels - 1)
            codes[:, i1 + i] = u
            err = (w - (u - c) * scales) / d
            W1[:, i:] -= err[:, None] * Hinv1[i, i:][None, :]
            Err1[:, i] = err
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]
    codes = codes[:, torch.argsort(perm)]
    return Quantized(decode(codes, scales, levels), codes.to(torch.uint8), scales)
