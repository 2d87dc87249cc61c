"""Reading model weights as parameter-golf records ship them: whatever the container, whatever the format.

A weights file is a *payload* (what `torch.save` wrote) inside a
*container*, both detected by content, never by file name:

- containers: plain `torch.save`, zlib (parameter-golf's `.int8.ptz`), lzma
  or xz, Brotli (the records' `.int6.ptz`, quality 11); after
  decompression, a `BSHF` header marks the records' byte shuffle (the
  bytes of each 2-byte word grouped by position), which is undone;
- payloads: a plain state dict (or one under "model" / "state_dict");
  parameter-golf's `int8_clean_per_row_v1`; the int6 per-row format of
  the #1493 lineage, `{"w": tensors, "m": {name: how}}` with
  `name.q` int8 codes and `name.scale` fp16 per-row scales ("gptq (intN)"),
  fp16 passthrough tensors, and the #1851 additions (low-rank error terms
  "+lqer" / "+lqer_asym", "gate_int8_row"); and e2ettt's own packed codes.

`read_weights(path)` returns the tensors (quantized ones decoded, in
float32 or, for int8_clean_per_row_v1, their recorded dtype) and a
one-line description of what it read; a file that is none of these is one
`CheckpointError` naming the file and every format tried. Every
`torch.load` is `weights_only=True`.
"""
from __future__ import annotations

import dataclasses
import io
import lzma
import os
import pickle
import re
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from e2ettt.model import GPT, GPTConfig
from e2ettt.quant import artifact, pg_int8

SHUFFLE_MAGIC = b"BSHF"
CONTAINERS = "torch.save, zlib, lzma/xz, Brotli (each with or without the records' BSHF byte shuffle)"
PAYLOADS = "a state dict, int8_clean_per_row_v1, the int6 per-row {'w','m'} format of the #1493 lineage, e2ettt_packed_v1"


class CheckpointError(ValueError):
    """A weights file that cannot be read or does not fit the model."""


@dataclass(frozen=True)
class Weights:
    state: dict[str, Tensor]  # as the file stores them (parameter-golf's int8 restores each original dtype)
    format: str  # what was read, e.g. "int6_per_row (#1493 lineage) in Brotli, byte-shuffled"
    dtypes: dict[str, torch.dtype]  # each tensor's dtype as the file holds it (parameter-golf keeps tok_emb in bf16)


def byte_shuffle(data: bytes, stride: int = 2) -> bytes:
    """The records' byte shuffle: BSHF, the stride, then byte k of every `stride`-byte word, for k = 0, 1, ..."""
    src = np.frombuffer(data, dtype=np.uint8)
    return SHUFFLE_MAGIC + bytes([stride]) + b"".join(src[k::stride].tobytes() for k in range(stride))


def byte_unshuffle(data: bytes) -> bytes:
    stride = data[4]
    payload = np.frombuffer(data, dtype=np.uint8, offset=5)
    n = payload.size
    out = np.empty(n, dtype=np.uint8)
    at = 0
    for k in range(max(stride, 1)):
        count = (n - k + stride - 1) // stride if stride > 1 else n
        out[k :: max(stride, 1)] = payload[at : at + count]
        at += count
    return out.tobytes()


def _torch_payload(blob: bytes) -> bool:
    return blob[:4] == b"PK\x03\x04" or blob[:1] == b"\x80"  # zip (torch.save's default) or a legacy pickle


def _decompressors():
    def brotli(blob: bytes) -> bytes:
        import brotli as _brotli

        return _brotli.decompress(blob)

    return [("zlib", lambda b: b[:1] == b"\x78", zlib.decompress),
            ("lzma", lambda b: b[:6] == b"\xfd7zXZ\x00" or b[:1] == b"\x5d", lzma.decompress),
            ("Brotli", lambda b: True, brotli)]  # Brotli has no magic number: tried last


def open_container(blob: bytes, path: Path) -> tuple[bytes, str]:
    """The torch.save bytes inside `blob`, and the name of the container."""
    if _torch_payload(blob):
        return blob, "torch.save"
    tried = []
    for name, looks, decompress in _decompressors():
        if not looks(blob):
            continue
        try:
            raw = decompress(blob)
        except Exception as exc:  # zlib.error, lzma.LZMAError, brotli.error: all one story for the user
            tried.append(f"{name}: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}")
            continue
        shuffled = raw[:4] == SHUFFLE_MAGIC and len(raw) >= 5
        raw = byte_unshuffle(raw) if shuffled else raw
        if _torch_payload(raw):
            return raw, name + (", byte-shuffled" if shuffled else "")
        tried.append(f"{name}: decompressed, but not torch.save bytes")
    raise CheckpointError(f"{path}: not a weights file e2ettt can read ({'; '.join(tried) or 'no container matched'}); "
                          f"containers tried: {CONTAINERS}")


def read_weights(path: str | os.PathLike) -> Weights:
    """The tensors a weights file holds, quantized ones decoded, and what it was."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint file does not exist")
    raw, container = open_container(path.read_bytes(), path)
    try:
        obj = torch.load(io.BytesIO(raw), map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, ValueError, EOFError, KeyError, OSError) as exc:
        msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise CheckpointError(f"{path}: cannot load the {container} payload with weights_only=True ({msg})") from None
    state, payload = decode_payload(obj, path)
    state = {k.removeprefix("_orig_mod.").removeprefix("module."): v for k, v in state.items()}
    return Weights(state, f"{payload} in {container}", {k: v.dtype for k, v in state.items()})


def decode_payload(obj, path: Path) -> tuple[dict[str, Tensor], str]:
    if isinstance(obj, dict) and obj.get("__quant_format__") == pg_int8.FORMAT:
        return pg_int8.dequantize_state_dict(obj), pg_int8.FORMAT
    if isinstance(obj, dict) and obj.get("format") == artifact.FORMAT:
        return artifact.decode(obj), artifact.FORMAT
    if isinstance(obj, dict) and set(obj) == {"w", "m"} and isinstance(obj["m"], dict):
        return decode_int6_per_row(obj["w"], obj["m"], path), "int6_per_row (#1493 lineage)"
    for key in ("model", "state_dict"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    if isinstance(obj, dict) and obj and all(isinstance(v, Tensor) for v in obj.values()):
        return obj, "state dict"
    keys = sorted(obj)[:6] if isinstance(obj, dict) else type(obj).__name__
    raise CheckpointError(f"{path}: holds {keys}, none of the formats e2ettt reads ({PAYLOADS})")


_GPTQ = re.compile(r"^gptq \(int(\d+)\)(\+lqer_asym|\+lqer)?$")


def decode_int6_per_row(w: dict[str, Tensor], meta: dict[str, str], path: Path) -> dict[str, Tensor]:
    """The records' mixed per-row artifact as float32 weights: q · scale[row] (+ A·B, the low-rank error term)."""
    out = {}
    for name, how in meta.items():
        if "passthrough" in how:
            out[name] = w[name].float() if w[name].is_floating_point() else w[name]
        elif how == "gate_int8_row":
            out[name] = w[name + ".gq"].float() * w[name + ".gs"].float()[:, None]
        elif m := _GPTQ.match(how):
            q, s = w[name + ".q"], w[name + ".scale"]
            W = q.float() * (s.float().view(q.shape[0], *[1] * (q.ndim - 1)) if s.ndim else float(s))
            if m[2] == "+lqer_asym":
                qB, sB = w[name + ".lqB_a"], w[name + ".lqBs_a"]
                A = w[name + ".lqA_a"].float() * float(w[name + ".lqAs_a"])
                B = (qB.reshape(sB.numel(), -1).float() * sB.float()[:, None]).reshape(qB.shape)
                W = W + A @ B
            elif m[2] == "+lqer":
                A = w[name + ".lqA"].float() * w[name + ".lqAs"].float()[:, None]
                B = w[name + ".lqB"].float() * w[name + ".lqBs"].float()[:, None]
                W = W + A @ B
            out[name] = W
        else:
            raise CheckpointError(f"{path}: tensor {name} is stored as {how!r}, which the int6 per-row reader does not "
                                  "know (give --artifact-fn to decode it)")
    return out


def load_state_dict(path: str | os.PathLike) -> dict[str, Tensor]:
    """A float state dict from any weights file `read_weights` reads."""
    return read_weights(path).state


NOT_BASELINE = "a model of another architecture needs --model-fn (README: Your record)"


def infer_config(state_dict: dict[str, Tensor], num_heads: int = 8, base: GPTConfig | None = None,
                 source: str = "state_dict") -> GPTConfig:
    """GPTConfig from tensor shapes; `num_heads` is not recoverable from shapes."""
    base = base or GPTConfig()
    try:
        vocab, dim = state_dict["tok_emb.weight"].shape
        layers = 1 + max(int(k.split(".")[1]) for k in state_dict if k.startswith("blocks."))
        kv_dim = state_dict["blocks.0.attn.c_k.weight"].shape[0]
        hidden = state_dict["blocks.0.mlp.fc.weight"].shape[0]
        heads = state_dict["blocks.0.attn.q_gain"].shape[0]
    except (KeyError, ValueError) as exc:
        raise CheckpointError(f"{source}: not the parameter-golf baseline GPT (no {exc}); {NOT_BASELINE}") from None
    heads = heads or num_heads
    return dataclasses.replace(
        base, vocab_size=vocab, num_layers=layers, model_dim=dim, num_heads=heads,
        num_kv_heads=kv_dim // (dim // heads), mlp_mult=hidden // dim,
        tie_embeddings="lm_head.weight" not in state_dict,
    )


def check_compatible(model: torch.nn.Module, state_dict: dict[str, Tensor], source: str) -> None:
    """Every key and shape of `state_dict` fits `model`, or one line saying which do not."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    if missing or unexpected:
        raise CheckpointError(f"{source}: keys do not fit {type(model).__name__} (missing {missing[:5]}, unexpected "
                              f"{unexpected[:5]}{', ...' if len(missing) > 5 or len(unexpected) > 5 else ''})"
                              + (f"; {NOT_BASELINE}" if isinstance(model, GPT) else ""))
    for name, t in expected.items():
        if tuple(state_dict[name].shape) != tuple(t.shape):
            raise CheckpointError(
                f"{source}: {name} has shape {tuple(state_dict[name].shape)}, the model config expects {tuple(t.shape)}"
            )


def load_model(path: str | os.PathLike, cfg: GPTConfig | None = None, vocab_size: int | None = None) -> GPT:
    """Build the baseline GPT and load `path` strictly, in float32.

    Without `cfg` the sizes are inferred from the tensors. With `vocab_size`
    (the tokenizer's), a checkpoint with another vocabulary is rejected.
    """
    state_dict = load_state_dict(path)
    cfg = cfg or infer_config(state_dict, source=str(path))
    if vocab_size is not None and cfg.vocab_size != vocab_size:
        raise CheckpointError(
            f"{path}: the checkpoint's vocabulary is {cfg.vocab_size} (tok_emb.weight rows) but the tokenizer has "
            f"{vocab_size} pieces; tokenizer and checkpoint do not belong together"
        )
    model = GPT(cfg)
    check_compatible(model, state_dict, str(path))
    model.load_state_dict({k: v.float() for k, v in state_dict.items()}, strict=True)
    return model


def save_state_dict(model: torch.nn.Module, path: str | os.PathLike) -> Path:
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    torch.save({k: v.detach().cpu() for k, v in model.state_dict().items()}, tmp)
    os.replace(tmp, path)
    return path
