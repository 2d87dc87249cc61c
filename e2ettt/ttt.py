"""Score-first test-time training over a token stream, in lockstep over W ranks.

For chunk k = 0, 1, ... of `chunk_tokens` target positions (DESIGN.md):
  1. score every target of chunk k with the current weights θ_k (each with
     up to `context` preceding tokens, earlier chunks serving as context);
  2. unless k is last, adapt on chunk k's targets only: `epochs` passes,
     each of one or more optimizer steps, giving θ_{k+1}.
The score of chunk k therefore never depends on a token after chunk k.

Lockstep: a chunk's windows are fixed by the chunk alone; each step's
windows are split into W contiguous near-equal shares; every rank sums the
NLL of its share, gradients are all-reduced as sums and divided by the
step's global target count, so all ranks take the identical step and the
result does not depend on W beyond float rounding. A weight checksum is
compared across ranks every `checksum_every` chunks. At W = 1 no collective
is called.

The host waits for the device twice per chunk, whatever the number of
micro-batches: once to read the chunk's score (with the caller's `signal`,
all-reduced in the same vector, so every rank takes the same decision from
it), once to read whether any step's gradient norm was not finite. Target
and byte counts come from the windows, on the host; sums are masked, never
gathered by boolean indexing.
"""
from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from e2ettt.adapt import parse_spec, select_params
from e2ettt.distributed import all_reduce_sum_, assert_same_weights, share, world
from e2ettt.evaluate import (
    DeviceTables,
    Score,
    Window,
    batch_tensors,
    chunk_spans,
    masked_sums,
    micro_batches,
    plan_windows,
    token_nll,
    window_sums,
)

DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class TTTConfig:
    chunk_tokens: int = 1024  # target positions per chunk (48 in the seed, 32K in the records)
    context: int = 256  # tokens each position may see (earlier chunks included)
    stride: int = 0  # targets per window; 0 = context (non-overlapping), less = sliding
    optimizer: str = "sgd"  # sgd (with momentum) | adamw
    inner_lr: float = 1e-3  # inner learning rate at chunk 0
    schedule: str = "constant"  # constant | cosine (over chunks, to 0 at the last)
    momentum: float = 0.9  # SGD momentum; AdamW beta1
    weight_decay: float = 0.0  # decoupled for AdamW, L2 for SGD
    epochs: int = 1  # passes over each chunk after scoring it
    step_windows: int = 0  # windows per optimizer step; 0 = the whole chunk in one step
    micro_batch: int = 16  # windows per forward on one rank (memory, not maths)
    grad_clip: float = 1.0  # global grad-norm clip; 0 = off
    params: str = "all"  # all | norms | lora:R
    max_tokens: int = 0  # cap on scored target tokens; 0 = the whole stream
    heldout_tokens: int = 0  # under a cap: the stream's last N targets, in no segment, where persistence is measured
    seed: int = 0  # picks the stream segment under a cap, and LoRA init
    dtype: str = "fp32"  # fp32 | bf16 autocast
    fuse_score: bool = True  # score chunk k from its first epoch's forward (same θ_k, same windows); saves a forward
    diverge_bpb: float = 1.0  # diverged: running TTT bpb above the running static bpb of the same chunks by this; 0 = never
    checksum_every: int = 1  # compare a weight checksum across ranks every N chunks; 0 = never

    def validate(self) -> None:
        checks = [
            (self.chunk_tokens > 0, f"ttt.chunk_tokens must be positive, got {self.chunk_tokens}"),
            (self.context > 0, f"ttt.context must be positive, got {self.context}"),
            (0 <= self.stride <= self.context, f"ttt.stride must be in [0, context={self.context}], got {self.stride}"),
            (self.optimizer in ("sgd", "adamw"), f"ttt.optimizer must be sgd or adamw, got {self.optimizer!r}"),
            (self.schedule in ("constant", "cosine"), f"ttt.schedule must be constant or cosine, got {self.schedule!r}"),
            (self.inner_lr >= 0 and math.isfinite(self.inner_lr),
             f"ttt.inner_lr must be a finite number >= 0, got {self.inner_lr}"),
            (self.epochs >= 0, f"ttt.epochs must be >= 0, got {self.epochs}"),
            (self.step_windows >= 0, f"ttt.step_windows must be >= 0, got {self.step_windows}"),
            (self.micro_batch > 0, f"ttt.micro_batch must be positive, got {self.micro_batch}"),
            (self.grad_clip >= 0, f"ttt.grad_clip must be >= 0, got {self.grad_clip}"),
            (self.max_tokens >= 0, f"ttt.max_tokens must be >= 0, got {self.max_tokens}"),
            (self.heldout_tokens >= 0, f"ttt.heldout_tokens must be >= 0, got {self.heldout_tokens}"),
            (self.dtype in DTYPES, f"ttt.dtype must be one of {sorted(DTYPES)}, got {self.dtype!r}"),
            (self.checksum_every >= 0, f"ttt.checksum_every must be >= 0, got {self.checksum_every}"),
            (self.diverge_bpb >= 0, f"ttt.diverge_bpb must be >= 0, got {self.diverge_bpb}"),
        ]
        for ok, msg in checks:
            if not ok:
                raise ValueError(msg)
        try:
            parse_spec(self.params)
        except ValueError as exc:
            raise ValueError(f"ttt.params: {exc}") from None

    @property
    def autocast_dtype(self) -> torch.dtype | None:
        return DTYPES[self.dtype]


@dataclass
class ChunkRecord:
    chunk: int
    tokens: int  # targets scored in this chunk
    tokens_seen: int  # targets scored up to and including this chunk
    nll: float
    bytes: float
    ttt_bpb: float  # this chunk, scored before adapting on it
    static_bpb: float  # same chunk and windows, starting weights (nan if not given)
    running_ttt_bpb: float
    inner_lr: float  # inner lr of the adaptation that followed (0 after the last chunk)
    adapt_seconds: float
    signal: float = 0.0  # the callers' `signal` values of this chunk, summed over ranks


@dataclass
class TTTResult:
    chunks: list[ChunkRecord] = field(default_factory=list)
    total: Score = Score(0.0, 0.0, 0)
    diverged: bool = False
    diverged_chunk: int = -1
    stopped: bool = False  # the caller's on_chunk asked to end after `chunks[-1]` (early stopping)
    first_chunk_delta: float = float("nan")  # ttt_bpb(chunk 0) - static_bpb(chunk 0); must be 0
    seconds: float = 0.0
    world_size: int = 1

    @property
    def bpb(self) -> float:
        return self.total.bpb

    @property
    def tokens_per_second(self) -> float:
        return self.total.tokens / self.seconds if self.seconds else float("nan")


def lr_at(cfg: TTTConfig, k: int, num_chunks: int) -> float:
    if cfg.schedule == "cosine" and num_chunks > 1:
        return cfg.inner_lr * 0.5 * (1 + math.cos(math.pi * k / (num_chunks - 1)))
    return cfg.inner_lr


def make_optimizer(cfg: TTTConfig, params: Sequence[Tensor]) -> torch.optim.Optimizer:
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.inner_lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(params, lr=cfg.inner_lr, betas=(cfg.momentum, 0.999), weight_decay=cfg.weight_decay)


def sync_gradients_(params: Sequence[Tensor], global_count: int) -> None:
    """Sum gradients over ranks in one flat all-reduce, then divide by the step's target count."""
    if world()[1] == 1:  # nothing to reduce: scale in place, no flat copy
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            p.grad.div_(global_count)
        return
    flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).flatten() for p in params])
    all_reduce_sum_(flat).div_(global_count)
    offset = 0
    for p in params:
        n = p.numel()
        p.grad = flat[offset : offset + n].view_as(p).clone()
        offset += n


def backward_share_(
    model: nn.Module, tokens: Tensor, windows: Sequence[Window], cfg: TTTConfig, tables: DeviceTables | None = None,
) -> tuple[Tensor, Tensor] | None:
    """Accumulate gradients of this rank's windows' summed NLL; with `tables`, also return their device sums."""
    nll_sum = torch.zeros((), dtype=torch.float64, device=tokens.device)
    byte_sum = torch.zeros((), dtype=torch.float64, device=tokens.device)
    for group in micro_batches(windows, cfg.micro_batch):
        x, y, mask = batch_tensors(tokens, group)
        nll = token_nll(model, x, y, cfg.autocast_dtype)
        if tables is not None:
            a, b = masked_sums(nll, x, y, mask, tables, group)
            nll_sum += a
            byte_sum += b
        torch.where(mask, nll, 0.0).sum().backward()
    return (nll_sum, byte_sum) if tables is not None else None


def finish_step_(params: Sequence[Tensor], global_count: int, cfg: TTTConfig) -> Tensor:
    """Sum gradients over ranks, divide by the step's target count, clip; return the global grad norm (on device)."""
    sync_gradients_(params, global_count)
    if cfg.grad_clip > 0:
        return torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
    return torch.linalg.vector_norm(torch.stack(torch._foreach_norm([p.grad for p in params])))


def run_ttt(
    model: nn.Module,
    tokens: Tensor,
    tables: DeviceTables,
    cfg: TTTConfig,
    static: Sequence[Score] | None = None,
    on_chunk: Callable[[ChunkRecord], bool | None] | None = None,
    signal: Callable[[], float] | None = None,
    prefix: int = 0,
) -> TTTResult:
    """Score-first TTT of `model` (adapted in place) over the targets of `tokens` after its first `prefix` tokens.

    `tokens` is the stream to evaluate (apply any cap before calling); its
    first `prefix` tokens are context only (earlier text of the stream,
    never scored). `static`, if given, is the per-chunk static score of the
    same windows with the starting weights, for the curves, first_chunk_delta
    and divergence: a run diverges when a loss or gradient is not finite, or
    when its running bpb exceeds the static running bpb of the same chunks by
    more than `diverge_bpb` (TTT broke the model; a model that is bad before
    any update is measured, never called diverged). The
    model stays in eval mode throughout (no dropout), so the scored function
    and the adapted one are the same. `signal()`, called once per chunk on
    every rank, is summed over ranks with the chunk's score and handed back
    in the chunk's record: a decision every rank takes together (when to
    report progress, whether to stop) at no extra collective. `on_chunk`
    returning True ends the run after that chunk (`result.stopped`); every
    rank must return the same, which a decision read off `signal` ensures.
    """
    cfg.validate()
    rank, world_size = world()
    params = select_params(model, cfg.params, cfg.seed)
    opt = make_optimizer(cfg, params)
    spans = chunk_spans(tokens.numel() - 1 - prefix, cfg.chunk_tokens, first=prefix + 1)
    if static is not None and len(static) != len(spans):
        raise ValueError(f"static curve has {len(static)} chunks, the stream has {len(spans)}")
    result = TTTResult(world_size=world_size)
    static_run = Score(0.0, 0.0, 0)
    model.eval()
    t0 = time.perf_counter()
    for k, (a, b) in enumerate(spans):
        windows = plan_windows(a, b, cfg.context, cfg.stride or None)
        mine = share(windows, [w.scored for w in windows], rank, world_size)
        last = k == len(spans) - 1
        step_size = cfg.step_windows or len(windows)
        # Fused: chunk k's first epoch is one step over all its windows with θ_k, so its forward is the score.
        fused = cfg.fuse_score and not last and cfg.epochs > 0 and step_size >= len(windows)
        t_chunk = time.perf_counter()
        if fused:
            opt.zero_grad(set_to_none=True)
            nll_sum, byte_sum = backward_share_(model, tokens, mine, cfg, tables)
        else:
            nll_sum, byte_sum, _ = window_sums(model, tokens, mine, tables, cfg.micro_batch, cfg.autocast_dtype)
        local = torch.stack([nll_sum, byte_sum, torch.tensor(signal() if signal else 0.0, dtype=torch.float64,
                                                                  device=tokens.device)])
        nll, nbytes, signalled = (float(v) for v in all_reduce_sum_(local).cpu())  # host read 1 of 2
        score = Score(nll, nbytes, b - a)
        result.total = result.total + score
        static_bpb = static[k].bpb if static is not None else float("nan")
        if static is not None:
            static_run = static_run + static[k]
        if k == 0:
            result.first_chunk_delta = score.bpb - static_bpb
        lr = 0.0 if last else lr_at(cfg, k, len(spans))
        diverged = not math.isfinite(score.nll) or (
            static is not None and cfg.diverge_bpb > 0 and result.total.bpb - static_run.bpb > cfg.diverge_bpb)
        if not diverged and not last:
            for group in opt.param_groups:
                group["lr"] = lr
            bad = torch.zeros((), dtype=torch.bool, device=tokens.device)
            for epoch in range(cfg.epochs):
                for s in range(0, len(windows), step_size):
                    step = windows[s : s + step_size]
                    if not (fused and epoch == 0):
                        opt.zero_grad(set_to_none=True)
                        backward_share_(model, tokens, share(step, [w.scored for w in step], rank, world_size), cfg)
                    bad |= ~torch.isfinite(finish_step_(params, sum(w.scored for w in step), cfg))
                    opt.step()
            diverged = bool(bad)  # host read 2 of 2: a non-finite gradient norm in any step of this chunk
            if not diverged and cfg.checksum_every and (k + 1) % cfg.checksum_every == 0:
                assert_same_weights(params, f"after chunk {k}")
        record = ChunkRecord(
            chunk=k, tokens=score.tokens, tokens_seen=result.total.tokens, nll=score.nll, bytes=score.bytes,
            ttt_bpb=score.bpb, static_bpb=static_bpb, running_ttt_bpb=result.total.bpb, inner_lr=lr,
            adapt_seconds=time.perf_counter() - t_chunk, signal=signalled,
        )
        result.chunks.append(record)
        stop = on_chunk(record) if on_chunk is not None else False
        if diverged:
            result.diverged, result.diverged_chunk = True, k
            break
        if stop and not last:
            result.stopped = True
            break
    result.seconds = time.perf_counter() - t0
    return result
