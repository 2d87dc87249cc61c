"""parameter-golf token shards: read, write, validate; the validation stream.

A shard is a header of 256 little-endian int32 (magic 20240520, version 1,
token count, then zeros) followed by `count` uint16 tokens. Reading
memory-maps the file; every check failure is a `ShardError` naming the file.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

MAGIC = 20240520
VERSION = 1
HEADER_INTS = 256
HEADER_BYTES = HEADER_INTS * 4
BOS_ID = 1


class ShardError(ValueError):
    """A token shard that is missing, truncated or not in the expected format."""


def write_shard(path: str | os.PathLike, tokens: np.ndarray) -> Path:
    """Write `tokens` (values < 65536) atomically as a shard; return the path."""
    path = Path(path)
    tokens = np.asarray(tokens)
    if tokens.size and (tokens.min() < 0 or tokens.max() > 0xFFFF):
        raise ValueError(f"{path}: token ids must fit in uint16, got range [{tokens.min()}, {tokens.max()}]")
    header = np.zeros(HEADER_INTS, dtype="<i4")
    header[:3] = (MAGIC, VERSION, tokens.size)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(header.tobytes())
        f.write(tokens.astype("<u2").tobytes())
    os.replace(tmp, path)
    return path


def read_shard(path: str | os.PathLike) -> np.ndarray:
    """Memory-map a shard's tokens (read-only uint16 array) after validating it."""
    path = Path(path)
    if not path.is_file():
        raise ShardError(f"{path}: no such shard file")
    size = path.stat().st_size
    if size < HEADER_BYTES:
        raise ShardError(f"{path}: {size} bytes is shorter than the {HEADER_BYTES}-byte header")
    header = np.fromfile(path, dtype="<i4", count=HEADER_INTS)
    magic, version, count = (int(v) for v in header[:3])
    if magic != MAGIC:
        raise ShardError(f"{path}: bad magic {magic} (expected {MAGIC}); not a parameter-golf token shard")
    if version != VERSION:
        raise ShardError(f"{path}: unsupported shard version {version} (expected {VERSION})")
    if count < 0:
        raise ShardError(f"{path}: negative token count {count} in header")
    expected = HEADER_BYTES + 2 * count
    if size != expected:
        raise ShardError(
            f"{path}: file is {size} bytes but the header's token count {count} implies {expected} "
            f"(truncated or trailing bytes)"
        )
    if count == 0:
        return np.zeros(0, dtype=np.uint16)
    return np.memmap(path, dtype="<u2", mode="r", offset=HEADER_BYTES, shape=(count,))


def find_shards(data_dir: str | os.PathLike, split: str, required: bool = True) -> list[Path]:
    """Sorted token shards `*_{split}_*.bin` in `data_dir` (byte sidecars `*_{split}_bytes_*.bin` are not token
    shards: `find_sidecars`); an error if there are none and `required`."""
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise ShardError(f"{data_dir}: data directory does not exist")
    files = sorted(p for p in data_dir.glob(f"*_{split}_*.bin") if not _is_sidecar(p, split))
    if not files and required:
        raise ShardError(f"{data_dir}: no *_{split}_*.bin shards found")
    return files


def _is_sidecar(path: Path, split: str) -> bool:
    return f"_{split}_bytes_" in path.name


def find_sidecars(data_dir: str | os.PathLike, split: str) -> list[Path]:
    """The split's byte sidecars, one per token shard in the same order (`x_val_bytes_000000.bin` beside
    `x_val_000000.bin`: each entry the bytes of the token at that position, as CaseOps datasets store them), or
    none. A sidecar without its shard, or a shard without its sidecar when others have one, is an error."""
    data_dir = Path(data_dir)
    sidecars = sorted(p for p in data_dir.glob(f"*_{split}_bytes_*.bin"))
    if not sidecars:
        return []
    shards = find_shards(data_dir, split)
    partner = {p.name.replace(f"_{split}_bytes_", f"_{split}_"): p for p in sidecars}
    lonely = sorted(set(partner) - {p.name for p in shards})
    if lonely:
        raise ShardError(f"{data_dir}: byte sidecar {partner[lonely[0]].name} has no token shard {lonely[0]}")
    missing = [p.name for p in shards if p.name not in partner]
    if missing:
        raise ShardError(f"{data_dir}: token shard {missing[0]} has no byte sidecar beside it, though "
                         f"{sidecars[0].name} is one: give every {split} shard its sidecar, or none")
    return [partner[p.name] for p in shards]


def load_sidecar(data_dir: str | os.PathLike, split: str) -> np.ndarray | None:
    """The bytes of every token of the split (aligned with `load_tokens`), from its sidecars; None without any."""
    sidecars = find_sidecars(data_dir, split)
    if not sidecars:
        return None
    parts = []
    for side, shard in zip(sidecars, find_shards(data_dir, split)):
        counts = read_shard(side)
        if counts.size != read_shard(shard).size:
            raise ShardError(f"{side}: {counts.size} entries for the {read_shard(shard).size} tokens of {shard.name}")
        parts.append(np.asarray(counts, dtype=np.int64))
    return np.concatenate(parts)


def load_tokens(data_dir: str | os.PathLike, split: str, vocab_size: int | None = None, limit: int = 0) -> np.ndarray:
    """Concatenate a split's shards in sorted order into one int64 array (its first `limit` tokens if > 0,
    reading no shard beyond them: GPTQ calibration wants 16K tokens, not a whole train split).

    With `vocab_size`, a token id outside the vocabulary is a `ShardError`
    (it usually means the shards were made with another tokenizer).
    """
    parts, have = [], 0
    for path in find_shards(data_dir, split):
        if limit and have >= limit:
            break
        tokens = read_shard(path)[: limit - have if limit else None]
        have += tokens.size
        if vocab_size is not None and tokens.size and int(tokens.max()) >= vocab_size:
            raise ShardError(
                f"{path}: token id {int(tokens.max())} is outside the tokenizer's vocabulary of {vocab_size} "
                f"(shards made with another tokenizer?)"
            )
        parts.append(np.asarray(tokens, dtype=np.int64))
    return np.concatenate(parts)


def spread_sequences(data_dir: str | os.PathLike, split: str, count: int, seq_len: int,
                     vocab_size: int | None = None) -> np.ndarray:
    """`count` sequences of `seq_len` tokens at evenly spaced offsets across a whole split (every shard memory-mapped,
    only the sequences read), concatenated; fewer when the split is shorter."""
    shards = [read_shard(p) for p in find_shards(data_dir, split)]
    sizes = np.array([s.size for s in shards])
    ends = np.cumsum(sizes)
    total = int(ends[-1]) if len(ends) else 0
    count = min(count, total // seq_len)
    if count == 0:
        raise ShardError(f"{data_dir}: the {split} split holds {total} tokens, fewer than one sequence of {seq_len}")
    offsets = np.linspace(0, total - seq_len, count).round().astype(int).tolist()
    parts = []
    for at in offsets:
        i = int(np.searchsorted(ends, at, side="right"))
        local = at - (int(ends[i - 1]) if i else 0)
        piece = np.asarray(shards[i][local : local + seq_len], dtype=np.int64)
        while piece.size < seq_len:  # a sequence that runs into the next shard
            i += 1
            piece = np.concatenate([piece, np.asarray(shards[i][: seq_len - piece.size], dtype=np.int64)])
        parts.append(piece)
    out = np.concatenate(parts)
    if vocab_size is not None and int(out.max()) >= vocab_size:
        raise ShardError(f"{data_dir}: {split} token id {int(out.max())} is outside the tokenizer's vocabulary of "
                         f"{vocab_size} (shards made with another tokenizer?)")
    return out


def truncate_for_eval(tokens: np.ndarray, seq_len: int) -> np.ndarray:
    """parameter-golf's `load_validation_tokens` cut: ((N-1)//T)*T + 1 tokens."""
    usable = ((tokens.size - 1) // seq_len) * seq_len
    if usable <= 0:
        raise ShardError(f"validation stream of {tokens.size} tokens is shorter than one window of {seq_len}")
    return tokens[: usable + 1]


def segment_starts(tokens: np.ndarray, max_tokens: int, heldout: int = 0) -> list[int]:
    """Non-overlapping segments of `max_tokens` targets, in the order seeds take them.

    The stream's targets are cut into consecutive slots of `max_tokens`;
    seed 0 takes the first (the start of the stream, as parameter-golf
    evaluates it), seeds 1, 2, ... the others in a fixed shuffled order, so
    that a few seeds sample text from across the stream, inside documents as
    well as at their openings. A segment's first input token is its start;
    the tokens before it may serve as context (`segment`'s prefix), never as
    scored targets. The last `heldout` targets of the stream are in no slot
    (`heldout_span`).
    """
    slots = (tokens.size - 1 - heldout) // max_tokens
    rest = np.random.default_rng(0).permutation(max(0, slots - 1)) + 1
    return [0] + [int(i) * max_tokens for i in rest]


def segment_start(tokens: np.ndarray, max_tokens: int, seed: int = 0, heldout: int = 0) -> int:
    """Where seed `seed`'s segment starts; a seed that cannot mean other text is an error.

    No cap (0), or a cap that covers the stream: every seed would evaluate
    the same tokens, so only seed 0 is accepted. Under a cap, distinct
    seeds get distinct, non-overlapping segments (`segment_starts`).
    """
    if seed < 0:
        raise ValueError(f"ttt.seed must be >= 0, got {seed}")
    if covers_stream(tokens, max_tokens):
        if seed:
            raise ValueError(f"ttt.seed={seed} without a token cap smaller than the stream ({tokens.size - 1:,} targets): "
                             "every seed would evaluate the same tokens; set ttt.max_tokens (--max-tokens) or use seed 0")
        return 0
    starts = segment_starts(tokens, max_tokens, heldout)
    if seed >= len(starts):
        kept = f" besides its held-out last {heldout:,}" if heldout else ""
        raise ValueError(f"ttt.seed={seed}: the validation stream holds {len(starts)} non-overlapping segments of "
                         f"{max_tokens:,} tokens{kept}, so seeds 0..{len(starts) - 1} are available; lower ttt.max_tokens "
                         "or use fewer seeds")
    return starts[seed]


def heldout_span(tokens: np.ndarray, max_tokens: int, heldout: int) -> tuple[int, int] | None:
    """Target positions [first, end) of the held-out slice: the stream's last `heldout` targets, which no segment
    touches (the persistence of what TTT learnt is measured there). None without a cap (the whole stream is scored)
    or without a slice."""
    if heldout <= 0 or covers_stream(tokens, max_tokens):
        return None
    if heldout + max_tokens + 1 > tokens.size:
        raise ValueError(f"ttt.heldout_tokens={heldout:,} and ttt.max_tokens={max_tokens:,} do not both fit the "
                         f"validation stream of {tokens.size - 1:,} targets")
    return tokens.size - heldout, tokens.size


def covers_stream(tokens: np.ndarray, max_tokens: int) -> bool:
    """Whether a cap of `max_tokens` targets leaves the whole stream (no cap, or one at least as long)."""
    return max_tokens <= 0 or max_tokens + 1 >= tokens.size


def segment(tokens: np.ndarray, start: int, max_tokens: int, prefix: int = 0) -> np.ndarray:
    """The stream a row evaluates: `max_tokens` targets (+1 input token) from `start`, or all of it, after the
    `prefix` tokens before `start` (context only)."""
    if covers_stream(tokens, max_tokens):
        return tokens
    return tokens[start - prefix : start + max_tokens + 1]


def eval_segment(tokens: np.ndarray, max_tokens: int, seed: int = 0, heldout: int = 0) -> np.ndarray:
    """The stream seed `seed` evaluates under a cap (seeds that cannot mean other text are refused)."""
    return segment(tokens, segment_start(tokens, max_tokens, seed, heldout), max_tokens)
