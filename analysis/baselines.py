"""How good a language model is, next to the tables anyone can count: uniform, unigram and bigram bits per byte.

Counted on the train split, scored on the validation stream with the
bytes rule every bpb here uses (`e2ettt.tokenizer.ByteTables`), so a model's
validation bpb can be set beside them: a model barely below the bigram
table has learnt little more than which token follows which.

- uniform: log2(V) bits per target;
- unigram: p(y) = (c(y) + 1) / (N + V) (add-one);
- bigram: p(y | x) = (c(x, y) + p_uni(y)) / (c(x) + 1), interpolated
  toward the unigram table with one pseudo-count.

Every target of the stream counts (position 1 on), BOS included with its
0 bytes, as parameter-golf's metric counts them. Pure numpy: no torch.
"""
from __future__ import annotations

import math
import os

import numpy as np

from e2ettt import data
from e2ettt.tokenizer import build_byte_tables, load_tokenizer


def ngram_baselines(data_dir: str | os.PathLike, tokenizer: str | os.PathLike) -> dict:
    """uniform, unigram and bigram bpb of the validation stream (tables counted on the train split)."""
    sp = load_tokenizer(tokenizer)
    V = int(sp.vocab_size())
    train = data.load_tokens(data_dir, "train", V)
    val = data.load_tokens(data_dir, "val", V)
    tables = build_byte_tables(sp, V)
    prev, target = val[:-1], val[1:]
    nbytes = float(tables.count_bytes(prev, target).sum())
    sidecar = data.load_sidecar(data_dir, "val")
    if sidecar is not None:
        nbytes = float(sidecar[1:].sum())
    uni_counts = np.bincount(train, minlength=V).astype(np.float64)
    p_uni = (uni_counts + 1) / (uni_counts.sum() + V)
    pairs = np.bincount(train[:-1] * V + train[1:], minlength=V * V).astype(np.float64).reshape(V, V)
    p_bi = (pairs[prev, target] + p_uni[target]) / (pairs.sum(axis=1)[prev] + 1)

    def bpb(nats: float) -> float:
        return nats / (math.log(2) * nbytes)

    return {"uniform_bpb": bpb(target.size * math.log(V)), "unigram_bpb": bpb(-np.log(p_uni[target]).sum()),
            "bigram_bpb": bpb(-np.log(p_bi).sum()), "targets": int(target.size), "bytes": nbytes,
            "train_tokens": int(train.size)}
