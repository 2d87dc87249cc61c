"""The stored form of an RTN/GPTQ-quantized model, its reader, and what it costs on disk.

An artifact is a dict that `torch.save` writes and `torch.load(weights_only=True)`
reads back: for each quantized weight its b-bit codes packed densely
(`pack_codes`), its fp16 row scales, its grid size and shape, and the seed
of its Hadamard rotation if it has one; every other tensor as parameter-golf
stores passthrough tensors (control tensors fp32, other floats fp16).
`decode` turns an artifact into float32 weights; the quantizer builds the
model it evaluates by calling it, so the evaluated weights are the stored
ones bit for bit. Sizes: `torch.save`d, then zlib (level 9) and lzma (preset 9).
"""
from __future__ import annotations

import io
import lzma
import zlib

import numpy as np
import torch
from torch import Tensor

from e2ettt.quant.hadamard import Rotation
from e2ettt.quant.rtn import decode as decode_codes

FORMAT = "e2ettt_packed_v1"


def pack_codes(codes: Tensor, bits: int) -> bytes:
    """Unsigned codes in [0, 2^bits) as a dense stream of `bits`-bit fields, most significant bit first."""
    u = codes.detach().cpu().to(torch.uint8).numpy().ravel()
    fields = np.unpackbits(u[:, None], axis=1)[:, 8 - bits :]  # (n, bits)
    return np.packbits(fields).tobytes()  # packbits reads (n, bits) row by row


def unpack_codes(blob: bytes, bits: int, count: int) -> Tensor:
    fields = np.unpackbits(np.frombuffer(blob, np.uint8))[: count * bits].reshape(count, bits)
    return torch.from_numpy((fields @ (1 << np.arange(bits - 1, -1, -1))).astype(np.uint8))


def entry(codes: Tensor, scales: Tensor, bits: int, levels: int, rotation_seed: int | None) -> dict:
    """One quantized weight as stored."""
    return {"codes": torch.frombuffer(bytearray(pack_codes(codes, bits)), dtype=torch.uint8), "bits": bits,
            "levels": levels, "shape": list(codes.shape), "scales": scales.detach().cpu().to(torch.float16),
            "rotation_seed": -1 if rotation_seed is None else rotation_seed}


def decode_entry(e: dict) -> Tensor:
    """The float32 weight an entry stands for: (u - c) * s, un-rotated as (WR)Rᵀ when it was rotated."""
    rows, cols = e["shape"]
    codes = unpack_codes(e["codes"].numpy().tobytes(), e["bits"], rows * cols).view(rows, cols)
    W = decode_codes(codes, e["scales"].float(), e["levels"])
    if e["rotation_seed"] >= 0:
        W = Rotation(cols, e["rotation_seed"]).inverse(W.double()).float()
    return W


def decode(artifact: dict) -> dict[str, Tensor]:
    """Every tensor of an artifact as the float32 weights a model loads."""
    if artifact.get("format") != FORMAT:
        raise ValueError(f"artifact format {artifact.get('format')!r} is not {FORMAT!r}")
    out = {name: decode_entry(e) for name, e in artifact["quantized"].items()}
    out.update({name: t.float() if t.is_floating_point() else t for name, t in artifact["passthrough"].items()})
    return out


def compressed_sizes(obj: dict) -> dict[str, int]:
    buf = io.BytesIO()
    torch.save(obj, buf)
    raw = buf.getvalue()
    return {"raw": len(raw), "zlib": len(zlib.compress(raw, 9)), "lzma": len(lzma.compress(raw, preset=9))}
