"""SentencePiece tokenizers and the byte tables that turn NLL into bits per byte.

For a scored target y with previous token x (DESIGN.md, "The metric"):
    bytes(y) = base_bytes[y] + (has_leading_space[y] and not is_boundary[x])
base_bytes is the UTF-8 length of the piece without its leading "▁";
byte-fallback pieces count 1; control, unknown and unused pieces count 0
and are boundaries.
"""
from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import sentencepiece as spm

SPACE = "\u2581"


class TokenizerError(ValueError):
    """A tokenizer file that cannot be loaded or does not fit the model/data."""


@dataclass(frozen=True)
class ByteTables:
    """Per-token-id lookup tables (length >= vocab size) for byte counting."""

    base_bytes: np.ndarray  # (V,) int16
    has_leading_space: np.ndarray  # (V,) bool
    is_boundary: np.ndarray  # (V,) bool

    def count_bytes(self, prev: np.ndarray, target: np.ndarray) -> np.ndarray:
        """Bytes of each target token given its previous token (same shapes)."""
        lead = self.has_leading_space[target] & ~self.is_boundary[prev]
        return self.base_bytes[target].astype(np.int64) + lead


def load_tokenizer(path: str | os.PathLike) -> spm.SentencePieceProcessor:
    path = Path(path)
    if not path.is_file():
        raise TokenizerError(f"{path}: tokenizer model file does not exist")
    sp = spm.SentencePieceProcessor()
    try:
        sp.Load(str(path))
    except (OSError, RuntimeError) as exc:
        raise TokenizerError(f"{path}: not a SentencePiece model ({exc})") from None
    return sp


def build_byte_tables(sp: spm.SentencePieceProcessor, vocab_size: int | None = None) -> ByteTables:
    """Tables of size max(sp vocab, vocab_size); ids beyond the tokenizer are boundaries."""
    n = int(sp.vocab_size())
    size = max(n, vocab_size or 0)
    base = np.zeros(size, dtype=np.int16)
    lead = np.zeros(size, dtype=bool)
    boundary = np.ones(size, dtype=bool)
    for i in range(n):
        if sp.is_control(i) or sp.is_unknown(i) or sp.is_unused(i):
            continue
        boundary[i] = False
        if sp.is_byte(i):
            base[i] = 1
            continue
        piece = sp.id_to_piece(i)
        if piece.startswith(SPACE):
            lead[i] = True
            piece = piece[1:]
        base[i] = len(piece.encode("utf-8"))
    return ByteTables(base, lead, boundary)


def train_tokenizer(
    documents: Iterable[str], model_prefix: str | os.PathLike, vocab_size: int, num_threads: int = 2
) -> Path:
    """Train a byte-fallback BPE SentencePiece model (pad/bos/eos/unk = 0/1/2/3).

    Paragraphs are the training sentences; `max_sentence_length` is raised to
    the longest one so that no paragraph is silently skipped. Normalization
    is the identity so that byte counts describe the real text.
    """
    paragraphs = [p for doc in documents for p in doc.split("\n") if p.strip()]
    longest = max(len(p.encode("utf-8")) for p in paragraphs)
    spm.SentencePieceTrainer.Train(
        sentence_iterator=iter(paragraphs),
        model_prefix=str(model_prefix),
        model_type="bpe",
        vocab_size=vocab_size,
        byte_fallback=True,
        add_dummy_prefix=False,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        split_digits=True,
        character_coverage=0.9995,
        max_sentence_length=longest + 1,
        input_sentence_size=0,
        pad_id=0,
        bos_id=1,
        eos_id=2,
        unk_id=3,
        num_threads=num_threads,
        minloglevel=2,
    )
    return Path(f"{model_prefix}.model")
