"""Artifact size: what a quantized model costs on disk after packing and compression.

Integer codes are bit-packed at their width (offset to unsigned), scales
are fp16, passthrough tensors are stored as parameter-golf stores them
(control tensors fp32, other floats fp16). The packed object is
`torch.save`d and compressed with zlib (level 9) and lzma (preset 9); both
sizes are reported.
"""
from __future__ import annotations

import io
import lzma
import zlib

import numpy as np
import torch
from torch import Tensor


def pack_codes(codes: Tensor, bits: int) -> bytes:
    """Codes in [-(2^(b-1)-1), 2^(b-1)-1] as a dense stream of b-bit unsigned fields."""
    u = (codes.to(torch.int16) + (2 ** (bits - 1) - 1)).numpy().astype(np.uint8).reshape(-1)
    fields = np.unpackbits(u[:, None], axis=1)[:, 8 - bits :]  # (n, bits), MSB first
    return np.packbits(fields.reshape(-1)).tobytes()


def compressed_sizes(obj: dict) -> dict[str, int]:
    buf = io.BytesIO()
    torch.save(obj, buf)
    raw = buf.getvalue()
    return {"raw": len(raw), "zlib": len(zlib.compress(raw, 9)), "lzma": len(lzma.compress(raw, preset=9))}
