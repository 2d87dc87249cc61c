"""Where a run's model, data and tokenizer come from, checked against each other.

Either the embedded demo (nothing given) or a parameter-golf checkpoint with
its shard directory and SentencePiece tokenizer; `model_fn`
("package.module:function") builds any other causal LM from the checkpoint
path. `resolve` turns settings into absolute paths once, in the driver
(`~` expanded); workers only read them.
"""
from __future__ import annotations

import hashlib
import importlib
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from torch import nn

from e2ettt import data
from e2ettt.checkpoint import CheckpointError, load_model, load_state_dict
from e2ettt.demo import DemoConfig, build_demo, default_cache_dir
from e2ettt.tokenizer import ByteTables, build_byte_tables, load_tokenizer


@dataclass(frozen=True)
class SourceConfig:
    checkpoint: str = ""  # final_model.pt (state_dict) or final_model.int8.ptz; empty = embedded demo
    data: str = ""  # directory with *_train_*.bin and *_val_*.bin shards
    tokenizer: str = ""  # SentencePiece .model matching the checkpoint's vocabulary
    model_fn: str = ""  # optional "module:function" mapping a checkpoint path to an nn.Module (ids -> logits)
    cache_dir: str = ""  # demo cache; empty = $E2ETTT_CACHE or ~/.cache/e2ettt
    demo: DemoConfig = field(default_factory=DemoConfig)  # the embedded demo's settings

    def validate(self) -> None:
        given = [bool(self.checkpoint), bool(self.data), bool(self.tokenizer)]
        if any(given) and not all(given):
            raise ValueError("source: --checkpoint, --data and --tokenizer go together (give all three, or none for the demo)")
        if self.model_fn and ":" not in self.model_fn:
            raise ValueError(f"source.model_fn must look like 'package.module:function', got {self.model_fn!r}")


@dataclass(frozen=True)
class Inputs:
    """Resolved, checked, absolute inputs of a run (JSON-able via `as_dict`)."""

    checkpoint: str
    data: str
    tokenizer: str
    model_fn: str
    vocab_size: int
    demo: dict | None = None

    def as_dict(self) -> dict:
        return dict(self.__dict__)


def resolve(cfg: SourceConfig, log=print) -> Inputs:
    cfg.validate()
    paths = ("checkpoint", "data", "tokenizer", "cache_dir")  # "~/golf/..." as a Ray job passes it: no shell expanded it
    cfg = replace(cfg, **{k: str(Path(getattr(cfg, k)).expanduser()) for k in paths if getattr(cfg, k)})
    if not cfg.checkpoint:
        assets = build_demo(cfg.demo, cfg.cache_dir or default_cache_dir(), log=log)
        info = {k: assets.info[k] for k in ("key", "parameters", "val_bpb", "train_tokens", "val_tokens")}
        return Inputs(str(assets.checkpoint), str(assets.data_dir), str(assets.tokenizer), "", assets.model.vocab_size, info)
    sp = load_tokenizer(cfg.tokenizer)
    vocab = int(sp.vocab_size())
    ckpt = Path(cfg.checkpoint).resolve()
    if cfg.model_fn:
        build_model(cfg.model_fn, str(ckpt))  # fail now, in the driver, if it cannot build
    else:
        sd = load_state_dict(ckpt)
        rows = sd["tok_emb.weight"].shape[0] if "tok_emb.weight" in sd else None
        if rows is None:
            raise CheckpointError(f"{ckpt}: no tok_emb.weight; not a parameter-golf GPT (use --model-fn)")
        if rows != vocab:
            raise CheckpointError(
                f"{ckpt}: tok_emb.weight has {rows} rows but tokenizer {cfg.tokenizer} has {vocab} pieces; "
                "tokenizer and checkpoint do not belong together"
            )
    data.find_shards(cfg.data, "val")
    return Inputs(str(ckpt), str(Path(cfg.data).resolve()), str(Path(cfg.tokenizer).resolve()), cfg.model_fn, vocab)


def fingerprint(inputs: Inputs) -> str:
    """A short hash of what the inputs hold (not where they are): the checkpoint, the tokenizer and the
    validation shards byte for byte, the train shards by name and size, and the model function.
    Rows and cached artifacts are keyed by it, so a changed file is never mistaken for the old one,
    and the same files at another path on another node are recognised."""
    h = hashlib.sha256(inputs.model_fn.encode())
    for path in [inputs.checkpoint, inputs.tokenizer, *data.find_shards(inputs.data, "val")]:
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 22), b""):
                h.update(block)
    for path in sorted(Path(inputs.data).glob("*_train_*.bin")):
        h.update(f"{path.name}:{path.stat().st_size}".encode())
    return h.hexdigest()[:16]


def build_model(model_fn: str, checkpoint: str) -> nn.Module:
    module_name, _, fn_name = model_fn.partition(":")
    try:
        fn: Callable[[str], nn.Module] = getattr(importlib.import_module(module_name), fn_name)
    except (ImportError, AttributeError) as exc:
        raise ValueError(f"--model-fn {model_fn!r}: cannot import ({exc})") from None
    model = fn(checkpoint)
    if not isinstance(model, nn.Module):
        raise ValueError(f"--model-fn {model_fn!r} returned {type(model).__name__}, not an nn.Module")
    return model


def load_source_model(inputs: Inputs) -> nn.Module:
    if inputs.model_fn:
        return build_model(inputs.model_fn, inputs.checkpoint).float().eval()
    return load_model(inputs.checkpoint, vocab_size=inputs.vocab_size).eval()


def source_dtypes(inputs: Inputs) -> dict[str, torch.dtype]:
    """The dtypes the checkpoint stores each tensor in (parameter-golf keeps tok_emb in bf16)."""
    if inputs.model_fn:
        return {k: v.dtype for k, v in build_model(inputs.model_fn, inputs.checkpoint).state_dict().items()}
    return {k: v.dtype for k, v in load_state_dict(inputs.checkpoint).items()}


def load_tables(inputs: Inputs) -> ByteTables:
    return build_byte_tables(load_tokenizer(inputs.tokenizer), inputs.vocab_size)


def load_split(inputs: Inputs, split: str, limit: int = 0) -> np.ndarray:
    return data.load_tokens(inputs.data, split, inputs.vocab_size, limit)


def set_threads(threads: int) -> None:
    if threads > 0:
        torch.set_num_threads(threads)
