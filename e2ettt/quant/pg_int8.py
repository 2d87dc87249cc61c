"""parameter-golf's `int8_clean_per_row_v1` artifact, bit for bit.

quantize_state_dict -> torch.save -> zlib level 9 is `final_model.int8.ptz`;
dequantize_state_dict inverts it. Float tensors with at most 65,536
elements pass through (control tensors in fp32, the rest in fp16); 2-D
tensors get per-row int8 with a 0.9999984-quantile clip and fp16 scales;
other tensors a single fp32 scale.
"""
from __future__ import annotations

import io
import zlib

import torch
from torch import Tensor

from e2ettt.quant.regimes import CONTROL_PATTERNS

FORMAT = "int8_clean_per_row_v1"
KEEP_FLOAT_MAX_NUMEL = 65_536
CLIP_Q = 99.99984 / 100.0


def quantize_tensor(t: Tensor) -> tuple[Tensor, Tensor]:
    """int8 codes and scales of one float tensor (per row when 2-D)."""
    t32 = t.float()
    if t32.ndim == 2:
        clip = torch.quantile(t32.abs(), CLIP_Q, dim=1) if t32.numel() else torch.empty(t32.shape[0])
        clipped = torch.maximum(torch.minimum(t32, clip[:, None]), -clip[:, None])
        scale = (clip / 127.0).clamp_min(1.0 / 127.0)
        q = torch.clamp(torch.round(clipped / scale[:, None]), -127, 127).to(torch.int8).contiguous()
        return q, scale.to(torch.float16).contiguous()
    clip_val = float(torch.quantile(t32.abs().flatten(), CLIP_Q).item()) if t32.numel() else 0.0
    scale = torch.tensor(clip_val / 127.0 if clip_val > 0 else 1.0, dtype=torch.float32)
    q = torch.clamp(torch.round(torch.clamp(t32, -clip_val, clip_val) / scale), -127, 127).to(torch.int8)
    return q.contiguous(), scale


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def quantize_state_dict(state_dict: dict[str, Tensor]) -> dict:
    """The artifact object that parameter-golf saves (before torch.save + zlib)."""
    obj: dict = {"__quant_format__": FORMAT, "quantized": {}, "scales": {}, "dtypes": {},
                 "passthrough": {}, "qmeta": {}, "passthrough_orig_dtypes": {}}
    for name, tensor in state_dict.items():
        t = tensor.detach().to("cpu").contiguous()
        if not t.is_floating_point():
            obj["passthrough"][name] = t
        elif t.numel() <= KEEP_FLOAT_MAX_NUMEL:
            if any(p in name for p in CONTROL_PATTERNS):
                obj["passthrough"][name] = t.float().contiguous()
            elif t.dtype in (torch.float32, torch.bfloat16):
                obj["passthrough_orig_dtypes"][name] = _dtype_name(t.dtype)
                obj["passthrough"][name] = t.to(torch.float16).contiguous()
            else:
                obj["passthrough"][name] = t
        else:
            q, s = quantize_tensor(t)
            if s.ndim > 0:
                obj["qmeta"][name] = {"scheme": "per_row", "axis": 0}
            obj["quantized"][name] = q
            obj["scales"][name] = s
            obj["dtypes"][name] = _dtype_name(t.dtype)
    return obj


def dequantize_state_dict(obj: dict) -> dict[str, Tensor]:
    if obj.get("__quant_format__") != FORMAT:
        raise ValueError(f"artifact format {obj.get('__quant_format__')!r} is not {FORMAT!r}")
    out: dict[str, Tensor] = {}
    qmeta = obj.get("qmeta", {})
    for name, q in obj["quantized"].items():
        dtype = getattr(torch, obj["dtypes"][name])
        s = obj["scales"][name]
        if qmeta.get(name, {}).get("scheme") == "per_row" or s.ndim > 0:
            s = s.to(torch.float32).view(q.shape[0], *([1] * (q.ndim - 1)))
            out[name] = (q.float() * s).to(dtype).contiguous()
        else:
            out[name] = (q.float() * float(s.item())).to(dtype).contiguous()
    orig = obj.get("passthrough_orig_dtypes", {})
    for name, t in obj["passthrough"].items():
        t = t.detach().to("cpu").contiguous()
        out[name] = t.to(getattr(torch, orig[name])).contiguous() if name in orig else t
    return out


def pack(obj: dict) -> bytes:
    """torch.save + zlib level 9: the bytes of `final_model.int8.ptz`."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    return zlib.compress(buf.getvalue(), level=9)


def unpack(blob: bytes) -> dict:
    return torch.load(io.BytesIO(zlib.decompress(blob)), map_location="cpu", weights_only=True)


def round_trip(state_dict: dict[str, Tensor]) -> tuple[dict[str, Tensor], int]:
    """Quantize, pack, unpack, dequantize; return the weights and the artifact bytes."""
    blob = pack(quantize_state_dict(state_dict))
    return dequantize_state_dict(unpack(blob)), len(blob)
