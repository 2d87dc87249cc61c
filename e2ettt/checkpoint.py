"""Loading model weights: parameter-golf `state_dict`s and `.ptz` int8 artifacts.

Every failure is a `CheckpointError` naming the file and the tensor: a
missing or unexpected key, a shape that does not match the config, or a
vocabulary that does not match the tokenizer.
"""
from __future__ import annotations

import dataclasses
import io
import os
import pickle
import zlib
from pathlib import Path

import torch
from torch import Tensor

from e2ettt.model import GPT, GPTConfig
from e2ettt.quant import pg_int8


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or does not fit the model."""


def load_state_dict(path: str | os.PathLike) -> dict[str, Tensor]:
    """A float state_dict from a `.pt` state_dict or an `int8_clean_per_row_v1` `.ptz`."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint file does not exist")
    blob = path.read_bytes()
    try:
        if blob[:1] == b"\x78":  # zlib stream: the parameter-golf int8 artifact
            return pg_int8.dequantize_state_dict(pg_int8.unpack(blob))
        obj = torch.load(io.BytesIO(blob), map_location="cpu", weights_only=True)
    except (zlib.error, pickle.UnpicklingError, RuntimeError, ValueError, EOFError, KeyError, OSError) as exc:
        msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise CheckpointError(f"{path}: cannot load checkpoint ({msg})") from None
    if isinstance(obj, dict) and "model" in obj and isinstance(obj["model"], dict):
        obj = obj["model"]
    if not isinstance(obj, dict) or not all(isinstance(v, Tensor) for v in obj.values()):
        raise CheckpointError(f"{path}: expected a state_dict of tensors, got {type(obj).__name__}")
    return {k.removeprefix("_orig_mod.").removeprefix("module."): v for k, v in obj.items()}


def infer_config(state_dict: dict[str, Tensor], num_heads: int = 8, base: GPTConfig | None = None) -> GPTConfig:
    """GPTConfig from tensor shapes; `num_heads` is not recoverable from shapes."""
    base = base or GPTConfig()
    try:
        vocab, dim = state_dict["tok_emb.weight"].shape
        layers = 1 + max(int(k.split(".")[1]) for k in state_dict if k.startswith("blocks."))
        kv_dim = state_dict["blocks.0.attn.c_k.weight"].shape[0]
        hidden = state_dict["blocks.0.mlp.fc.weight"].shape[0]
        heads = state_dict["blocks.0.attn.q_gain"].shape[0]
    except (KeyError, ValueError) as exc:
        raise CheckpointError(f"state_dict is not a parameter-golf GPT (missing {exc})") from None
    heads = heads or num_heads
    return dataclasses.replace(
        base, vocab_size=vocab, num_layers=layers, model_dim=dim, num_heads=heads,
        num_kv_heads=kv_dim // (dim // heads), mlp_mult=hidden // dim,
        tie_embeddings="lm_head.weight" not in state_dict,
    )


def check_compatible(model: torch.nn.Module, state_dict: dict[str, Tensor], source: str) -> None:
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    if missing or unexpected:
        raise CheckpointError(f"{source}: keys do not match the model (missing {missing[:5]}, unexpected {unexpected[:5]})")
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
    cfg = cfg or infer_config(state_dict)
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
