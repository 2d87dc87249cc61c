"""Static evaluation in bits per byte, and the windows every score is made of.

Target position t is token t predicted from the tokens before it. A window
`(start, stop, scored)` feeds tokens[start:stop] to the model and scores the
last `scored` of its targets tokens[start+1:stop+1]. `plan_windows` cuts a
span of targets into blocks of `stride` and gives each block the `context`
tokens that end just before its last target; stride == context is
parameter-golf's non-overlapping `eval_val`, a smaller stride is sliding.

Sums are float64 and are reduced as sums (never as means):
    bpb = sum(nll_nats) / (ln 2 * sum(bytes)).
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from e2ettt.tokenizer import ByteTables


class Window(NamedTuple):
    start: int  # first input token
    stop: int  # one past the last input token; targets are tokens[start+1 : stop+1]
    scored: int  # the last `scored` targets count


@dataclass(frozen=True)
class DeviceTables:
    """ByteTables as tensors on the scoring device; with `stream_bytes` (a dataset's byte sidecar, aligned with the
    token stream being scored), each target's bytes are the sidecar's instead (the records' rule for CaseOps data)."""

    base_bytes: Tensor
    has_leading_space: Tensor
    is_boundary: Tensor
    stream_bytes: Tensor | None = None  # (N,) bytes of token t as a target, for the stream `tokens` being scored

    @classmethod
    def from_tables(cls, tables: ByteTables, device: torch.device | str = "cpu") -> DeviceTables:
        return cls(
            torch.as_tensor(tables.base_bytes, dtype=torch.float64, device=device),
            torch.as_tensor(tables.has_leading_space, dtype=torch.bool, device=device),
            torch.as_tensor(tables.is_boundary, dtype=torch.bool, device=device),
        )

    def for_stream(self, stream_bytes: np.ndarray | None) -> DeviceTables:
        """These tables for one token stream: its sidecar bytes (sliced exactly as the stream), or the tables alone."""
        if stream_bytes is None:
            return self
        return dataclasses.replace(self, stream_bytes=torch.as_tensor(np.asarray(stream_bytes), dtype=torch.float64,
                                                                      device=self.base_bytes.device))

    def count_bytes(self, prev: Tensor, target: Tensor, group: Sequence[Window] | None = None) -> Tensor:
        """Bytes of each target (B, L): the sidecar's at the group's target positions, else from the pieces."""
        if self.stream_bytes is not None and group is not None:
            return _rows(self.stream_bytes, group)[:, 1:]
        lead = self.has_leading_space[target] & ~self.is_boundary[prev]
        return self.base_bytes[target] + lead.to(torch.float64)


@dataclass(frozen=True)
class Score:
    """Summed NLL (nats), bytes and target count of some scored positions."""

    nll: float
    bytes: float
    tokens: int

    @property
    def bpb(self) -> float:
        return self.nll / (math.log(2) * self.bytes) if self.bytes else float("nan")

    def __add__(self, other: Score) -> Score:
        return Score(self.nll + other.nll, self.bytes + other.bytes, self.tokens + other.tokens)


class Span(NamedTuple):
    """A chunk: target positions [a, b); its windows read no token before `floor` (a document's BOS); `opens`: the
    first chunk of a document (per-document TTT starts again from the starting weights there)."""

    a: int
    b: int
    floor: int = 0
    opens: bool = False


def plan_windows(first: int, end: int, context: int, stride: int | None = None, floor: int = 0) -> list[Window]:
    """Windows scoring targets [first, end) in blocks of `stride` (default: context), none reading before `floor`."""
    stride = stride or context
    if first < 1:
        raise ValueError("target positions start at 1 (token 0 has no predecessor)")
    if not 0 < stride <= context:
        raise ValueError(f"stride must be in (0, context={context}], got {stride}")
    windows = []
    for a in range(first, end, stride):
        b = min(a + stride, end)
        windows.append(Window(max(floor, b - 1 - context), b - 1, b - a))
    return windows


def document_spans(ids: np.ndarray, first: int, end: int, chunk_tokens: int, bos: int = 1) -> list[Span]:
    """Targets [first, end) cut into documents, and each document into chunks of `chunk_tokens`: a document's
    targets run from the token after its BOS to the next BOS (predicting the next document's start, as the records
    count it); the stream's first document may have begun before `first`. Windows read back to the document's BOS,
    never into the document before."""
    if chunk_tokens <= 0:
        raise ValueError(f"chunk_tokens must be positive, got {chunk_tokens}")
    ids = np.asarray(ids)
    before = np.flatnonzero(ids[:first] == bos)
    floor = int(before[-1]) if before.size else 0
    starts = [first] + [int(p) + 1 for p in np.flatnonzero(ids[first : end - 1] == bos) + first if int(p) + 1 > first]
    out = []
    for i, s in enumerate(starts):
        e = starts[i + 1] if i + 1 < len(starts) else end
        doc_floor = floor if i == 0 else s - 1
        out += [Span(a, min(a + chunk_tokens, e), doc_floor, a == s) for a in range(s, e, chunk_tokens)]
    return out


def plan_spans(ids, first: int, num_targets: int, chunk_tokens: int, by_document: bool) -> list[Span]:
    """The chunks a row is scored (and adapted) in: fixed chunks of the stream, or chunks inside each document."""
    if not by_document:
        return [Span(a, b) for a, b in chunk_spans(num_targets, chunk_tokens, first)]
    chunk_spans(num_targets, chunk_tokens, first)  # the same check: a chunk larger than the stream
    host = ids.cpu().numpy() if isinstance(ids, Tensor) else np.asarray(ids)
    return document_spans(host, first, first + num_targets, chunk_tokens)


def chunk_spans(num_targets: int, chunk_tokens: int, first: int = 1) -> list[tuple[int, int]]:
    """Target spans [a, b) of `chunk_tokens` each over the `num_targets` targets from position `first`."""
    if chunk_tokens <= 0:
        raise ValueError(f"chunk_tokens must be positive, got {chunk_tokens}")
    if chunk_tokens > num_targets:
        raise ValueError(
            f"chunk_tokens={chunk_tokens} is larger than the {num_targets} target tokens of the validation stream"
        )
    end = first + num_targets
    return [(a, min(a + chunk_tokens, end)) for a in range(first, end, chunk_tokens)]


def micro_batches(windows: Sequence[Window], size: int) -> Iterator[list[Window]]:
    """Consecutive windows grouped by equal length, at most `size` per group."""
    group: list[Window] = []
    for w in windows:
        if group and (len(group) == size or (w.stop - w.start) != (group[0].stop - group[0].start)):
            yield group
            group = []
        group.append(w)
    if group:
        yield group


def autocast(device: torch.device, dtype: torch.dtype | None):
    if dtype is None or dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def _rows(stream: Tensor, group: Sequence[Window]) -> Tensor:
    """stream[start : stop + 1] of each window (B, L + 1): evenly spaced windows as one strided view."""
    L = group[0].stop - group[0].start
    starts = [w.start for w in group]
    step = starts[1] - starts[0] if len(starts) > 1 else 1
    if step > 0 and all(b - a == step for a, b in zip(starts, starts[1:])):
        return stream[starts[0] : starts[0] + (len(group) - 1) * step + L + 1].unfold(0, L + 1, step)  # (B, L+1) view
    return torch.stack([stream[w.start : w.stop + 1] for w in group])


def batch_tensors(tokens: Tensor, group: Sequence[Window]) -> tuple[Tensor, Tensor, Tensor]:
    """Inputs (B, L), targets (B, L) and the scored mask (B, L) of a group of equal-length windows.

    Built from host-side window metadata only: evenly spaced windows are one strided view of the
    token stream, masks come from comparisons with Python integers, so nothing waits for the device.
    """
    L = group[0].stop - group[0].start
    xy = _rows(tokens, group)
    pos = torch.arange(L, device=tokens.device)
    scored = {w.scored for w in group}
    if len(scored) == 1:
        mask = (pos >= L - scored.pop()).expand(len(group), L)
    else:
        mask = torch.stack([pos >= L - w.scored for w in group])
    return xy[:, :-1], xy[:, 1:], mask


def token_nll(model: nn.Module, x: Tensor, y: Tensor, dtype: torch.dtype | None = None) -> Tensor:
    """Per-position NLL in nats (B, L), float32."""
    with autocast(x.device, dtype):
        logits = model(x)  # (B, L, V)
    return F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), reduction="none").view_as(y)


def masked_sums(nll: Tensor, x: Tensor, y: Tensor, mask: Tensor, tables: DeviceTables,
                group: Sequence[Window] | None = None) -> tuple[Tensor, Tensor]:
    """Float64 sums of NLL and bytes over the scored positions of `group`'s batch, on the device (no host sync)."""
    nll_sum = torch.where(mask, nll.detach().double(), 0.0).sum()
    byte_sum = torch.where(mask, tables.count_bytes(x, y, group), 0.0).sum()
    return nll_sum, byte_sum


@torch.no_grad()
def window_sums(
    model: nn.Module,
    tokens: Tensor,
    windows: Sequence[Window],
    tables: DeviceTables,
    micro_batch: int = 16,
    dtype: torch.dtype | None = None,
) -> tuple[Tensor, Tensor, int]:
    """Summed NLL and bytes (device float64 scalars) and the target count (host) of `windows`."""
    nll = torch.zeros((), dtype=torch.float64, device=tokens.device)
    nbytes = torch.zeros((), dtype=torch.float64, device=tokens.device)
    for group in micro_batches(windows, micro_batch):
        x, y, mask = batch_tensors(tokens, group)
        a, b = masked_sums(token_nll(model, x, y, dtype), x, y, mask, tables, group)
        nll += a
        nbytes += b
    return nll, nbytes, sum(w.scored for w in windows)


def score_windows(
    model: nn.Module,
    tokens: Tensor,
    windows: Sequence[Window],
    tables: DeviceTables,
    micro_batch: int = 16,
    dtype: torch.dtype | None = None,
) -> Score:
    """Sum of NLL, bytes and count over the scored targets of `windows`."""
    nll, nbytes, count = window_sums(model, tokens, windows, tables, micro_batch, dtype)
    return Score(float(nll), float(nbytes), count)


def static_curve(
    model: nn.Module,
    tokens: Tensor,
    spans: Sequence[tuple[int, int] | Span],
    context: int,
    stride: int | None,
    tables: DeviceTables,
    micro_batch: int = 16,
    dtype: torch.dtype | None = None,
) -> list[Score]:
    """Per-chunk static scores, batched exactly as the TTT loop scores at one rank."""
    out = []
    for span in spans:
        a, b, floor, _ = Span(*span)
        out.append(score_windows(model, tokens, plan_windows(a, b, context, stride, floor), tables, micro_batch, dtype))
    return out


def eval_val(
    model: nn.Module, tokens: Tensor, seq_len: int, tables: DeviceTables, micro_batch: int = 16,
    dtype: torch.dtype | None = None,
) -> Score:
    """parameter-golf `eval_val`: non-overlapping windows of seq_len over the truncated stream."""
    usable = ((tokens.numel() - 1) // seq_len) * seq_len
    return score_windows(model, tokens, plan_windows(1, usable + 1, seq_len), tables, micro_batch, dtype)


def as_tensor(tokens: np.ndarray, device: torch.device | str = "cpu") -> Tensor:
    return torch.as_tensor(np.asarray(tokens, dtype=np.int64), device=device)
