"""SentencePiece tokenizers and the byte tables that turn NLL into bits per byte.

For a scored target y with previous token x (DESIGN.md, "The metric"):
    bytes(y) = base_bytes[y] + (has_leading_space[y] and not is_boundary[x])
base_bytes is the UTF-8 length of the piece without its leading "▁";
byte-fallback pieces count 1; control, unknown and unused pieces count 0
and are boundaries.
"""
from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
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


def decoded_bytes(sp: spm.SentencePieceProcessor, tokens: Sequence[int], first: int) -> int:
    """UTF-8 bytes of the text that the targets tokens[first:] add, read off SentencePiece's decoder (not the byte
    tables: a check on them).

    Text is decoded a document at a time (a control, unknown or unused piece ends one); in the document where the
    targets begin, the bytes of its text before them are taken off. A character that byte-fallback pieces spell
    across the first target, or that the stream cuts off at its start or its end, is counted one byte per piece.
    """
    ids = np.asarray(tokens, dtype=np.int64)
    vocab = int(sp.vocab_size())
    size = max(vocab, int(ids.max()) + 1 if ids.size else 0)
    boundary = np.ones(size, dtype=bool)  # ids beyond the tokenizer too
    byte = np.full(size, -1)  # the byte a byte-fallback piece stands for ("<0xE2>"), else -1
    for i in range(vocab):
        boundary[i] = sp.is_control(i) or sp.is_unknown(i) or sp.is_unused(i)
        byte[i] = int(sp.id_to_piece(i)[3:5], 16) if sp.is_byte(i) else -1
    continues = (byte >= 0x80) & (byte < 0xC0)  # a UTF-8 continuation byte (10xxxxxx)

    def text(a: int, b: int) -> int:
        return len(sp.decode(ids[a:b].tolist()).encode("utf-8")) if b > a else 0

    start = 0
    while start < ids.size and continues[ids[start]]:
        start += 1  # the stream begins inside a character: its pieces count one byte each
    end = ids.size
    k = end - 1
    while k > start and continues[ids[k]]:
        k -= 1
    lead = byte[ids[k]] if ids.size else -1
    length = 2 if 0xC0 <= lead < 0xE0 else 3 if 0xE0 <= lead < 0xF0 else 4 if lead >= 0xF0 else 1
    if end - k < length:  # the last character is cut off: its pieces count one byte each
        end = k
    total = ids.size - max(end, first) + max(0, start - first)
    a = start
    for b in [*np.flatnonzero(boundary[ids[:end]]).tolist(), end]:
        if b > first:  # the document [a, b) holds targets
            c = min(max(a, first), b)
            while a < c and continues[ids[c]]:
                c -= 1  # the character the first target continues starts at c
            total += text(a, b) - text(a, c) - (max(a, first) - c)
        a = b + 1
    return total


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
