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
    masked_sums,
    micro_batches,
    plan_spans,
    plan_windows,
    token_nll,
    window_sums,
)

DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
OPTIMIZERS = ("sgd", "adamw", "dyneval")


@dataclass(frozen=True)
class TTTConfig:
    chunk_tokens: int = 1024  # target positions per chunk (48 in the seed, 32K in the records)
    context: int = 256  # tokens each position may see (earlier chunks included)
    stride: int = 0  # targets per window; 0 = context (non-overlapping), less = sliding
    optimizer: str = "sgd"  # sgd (with momentum) | adamw | dyneval (RMS-normalised steps, decay toward the start)
    inner_lr: float = 1e-3  # inner learning rate at chunk 0
    schedule: str = "constant"  # constant | cosine (over chunks, to 0 at the last)
    momentum: float = 0.9  # SGD momentum; AdamW beta1
    weight_decay: float = 0.0  # decoupled for AdamW, L2 for SGD
    decay_to_start: float = 0.0  # dyneval's λ: each step pulls the weights back toward their starting values
    epochs: int = 1  # passes over each chunk after scoring it
    train_windows: str = "scored"  # what a chunk is adapted on: scored (its scoring windows) | sequences (context-long)
    reset: str = "never"  # never | document: adapted weights and optimizer state start again at each document (BOS)
    phase_docs: int = 0  # with reset=document: after every N documents scored, one global SGD pass over them; 0 = none
    phase_lr: float = 1e-3  # ... its learning rate (SGD, momentum 0.9, cosine over the pass)
    step_windows: int = 0  # windows per optimizer step; 0 = the whole chunk in one step
    micro_batch: int = 16  # windows per forward on one rank (memory, not maths)
    grad_clip: float = 1.0  # global grad-norm clip; 0 = off
    params: str = "all"  # all | norms | lora:R
    max_tokens: int = 0  # scored validation tokens (a sweep's: per row); 0 = the whole stream
    heldout_tokens: int = 2048  # under a cap: the stream's last N targets, in no segment, where persistence is measured
    seed: int = 0  # picks the stream segment under a cap, and LoRA init
    dtype: str = "fp32"  # fp32 | bf16 autocast
    fuse_score: bool = True  # score chunk k from its first epoch's forward (same θ_k, same windows); saves a forward
    diverge_bpb: float = 1.0  # diverged: running TTT bpb above the running static bpb of the same chunks by this; 0 = never
    checksum_every: int = 1  # compare a weight checksum across ranks every N chunks; 0 = never
    stats_tokens: int = 16_384  # dyneval: train-split tokens its mean squared gradients are measured on
    recipe: str = ""  # the protocol preset these settings came from (--ttt-recipe), "" = none; recorded in every row

    def validate(self) -> None:
        checks = [
            (self.chunk_tokens > 0, f"ttt.chunk_tokens must be positive, got {self.chunk_tokens}"),
            (self.context > 0, f"ttt.context must be positive, got {self.context}"),
            (0 <= self.stride <= self.context, f"ttt.stride must be in [0, context={self.context}], got {self.stride}"),
            (self.optimizer in OPTIMIZERS, f"ttt.optimizer must be one of {', '.join(OPTIMIZERS)}, got {self.optimizer!r}"),
            (self.train_windows in ("scored", "sequences"),
             f"ttt.train_windows must be scored or sequences, got {self.train_windows!r}"),
            (self.reset in ("never", "document"), f"ttt.reset must be never or document, got {self.reset!r}"),
            (self.phase_docs >= 0 and (self.phase_docs == 0 or self.reset == "document"),
             f"ttt.phase_docs={self.phase_docs} needs ttt.reset=document (phases come between documents)"),
            (self.phase_lr >= 0, f"ttt.phase_lr must be >= 0, got {self.phase_lr}"),
            (self.decay_to_start >= 0, f"ttt.decay_to_start must be >= 0, got {self.decay_to_start}"),
            (self.stats_tokens > 0, f"ttt.stats_tokens must be positive, got {self.stats_tokens}"),
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
    signal: float = 0.0  # the callers' `signal` values of this chunk, summed over ranks (worker.ChunkSignal)


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
    trained_targets: int = 0  # targets the adaptation took a loss on, over all epochs and chunks
    trained_positions: int = 0  # ... positions its forward passes ran over (its cost)

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


class DynEval(torch.optim.Optimizer):
    """Dynamic evaluation's update (Krause et al. 2018, 2019): a gradient step normalised by the root of the mean
    squared gradient MS that the starting weights have on training data, then a pull back toward the starting
    weights θ₀ at a rate proportional to each weight's RMS (normalised to mean 1), at most all the way:

        θ ← θ − η · g / (√MS + ε) + min(1, λ · √MS / mean(√MS)) ⊙ (θ₀ − θ_prev)
    """

    EPS = 1e-8

    def __init__(self, params: Sequence[Tensor], lr: float, decay: float, ms: Sequence[Tensor]):
        params = list(params)
        super().__init__(params, {"lr": lr})
        rms = [m.sqrt() for m in ms]
        mean = torch.cat([r.flatten() for r in rms]).mean().clamp_min(self.EPS)
        for p, r in zip(params, rms):
            self.state[p].update(start=p.detach().clone(), denom=r + self.EPS, decay=(decay * r / mean).clamp(max=1.0))

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                st = self.state[p]
                pull = st["decay"] * (st["start"] - p)
                p.addcdiv_(p.grad, st["denom"], value=-group["lr"])
                p.add_(pull)


def make_optimizer(cfg: TTTConfig, params: Sequence[Tensor], stats: Sequence[Tensor] | None = None
                   ) -> torch.optim.Optimizer:
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.inner_lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "dyneval":
        if stats is None:
            raise ValueError("ttt.optimizer=dyneval needs the mean squared gradients of the train split (gradient_stats)")
        return DynEval(params, cfg.inner_lr, cfg.decay_to_start, stats)
    return torch.optim.AdamW(params, lr=cfg.inner_lr, betas=(cfg.momentum, 0.999), weight_decay=cfg.weight_decay)


def gradient_stats(model: nn.Module, params: Sequence[Tensor], sequences: Tensor, dtype: torch.dtype | None = None
                   ) -> list[Tensor]:
    """Dynamic evaluation's MS: the mean over train sequences (n, L) of the squared gradient of each sequence's mean
    NLL, at the current weights; summed over ranks when each holds a share of the sequences."""
    sums = [torch.zeros_like(p) for p in params]
    for row in sequences:
        for p in params:
            p.grad = None
        x, y = row[None, :-1], row[None, 1:]
        token_nll(model, x, y, dtype).mean().backward()
        for acc, p in zip(sums, params):
            if p.grad is not None:
                acc.add_(p.grad.square())
    count = torch.tensor([float(len(sequences))], dtype=torch.float64, device=sequences.device)
    flat = all_reduce_sum_(torch.cat([a.flatten() for a in sums]))
    n = float(all_reduce_sum_(count))
    for p in params:
        p.grad = None
    out, at = [], 0
    for a in sums:
        out.append(flat[at : at + a.numel()].view_as(a) / max(n, 1.0))
        at += a.numel()
    return out


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


def adapt_(model: nn.Module, opt: torch.optim.Optimizer, params: Sequence[Tensor], tokens: Tensor,
           windows: Sequence[Window], cfg: TTTConfig, lr: float, epochs: int, fused_first: bool = False) -> Tensor:
    """`epochs` passes over `windows` in steps of `cfg.step_windows` (0: all at once), in lockstep over the ranks;
    with `fused_first`, the first step's gradients are already accumulated (the scoring forward's). Returns whether
    any step's gradient norm was not finite (a device tensor: the caller decides when to wait for it)."""
    rank, world_size = world()
    for group in opt.param_groups:
        group["lr"] = lr
    bad = torch.zeros((), dtype=torch.bool, device=tokens.device)
    step_size = cfg.step_windows or len(windows)
    for epoch in range(epochs):
        for s in range(0, len(windows), step_size):
            step = windows[s : s + step_size]
            if not (fused_first and epoch == 0 and s == 0):
                opt.zero_grad(set_to_none=True)
                backward_share_(model, tokens, share(step, [w.scored for w in step], rank, world_size), cfg)
            bad |= ~torch.isfinite(finish_step_(params, sum(w.scored for w in step), cfg))
            opt.step()
    return bad


PHASE_STEP_WINDOWS = 32  # sequences per step of a global pass, as the records batch them


def global_pass_(model: nn.Module, tokens: Tensor, first: int, end: int, cfg: TTTConfig, adapted: Sequence[Tensor]) -> Tensor:
    """A phase (#1695): one epoch of SGD (momentum 0.9, cosine lr from `cfg.phase_lr` over its steps) on every weight
    that per-document TTT does not adapt, over the already scored targets [first, end) as context-long sequences,
    in lockstep. Returns whether a gradient norm was not finite."""
    rank, world_size = world()
    mine = {id(p) for p in adapted}
    base = [p for p in model.parameters() if id(p) not in mine and p.is_floating_point()] or list(adapted)
    frozen = [p.requires_grad for p in base]
    for p in base:
        p.requires_grad_(True)
    opt = torch.optim.SGD(base, lr=cfg.phase_lr, momentum=0.9)
    windows = plan_windows(first, end, cfg.context, cfg.context)
    steps = list(range(0, len(windows), PHASE_STEP_WINDOWS))
    bad = torch.zeros((), dtype=torch.bool, device=tokens.device)
    for i, s in enumerate(steps):
        for group in opt.param_groups:
            group["lr"] = cfg.phase_lr * 0.5 * (1 + math.cos(math.pi * i / max(1, len(steps) - 1)))
        step = windows[s : s + PHASE_STEP_WINDOWS]
        opt.zero_grad(set_to_none=True)
        backward_share_(model, tokens, share(step, [w.scored for w in step], rank, world_size), cfg)
        bad |= ~torch.isfinite(finish_step_(base, sum(w.scored for w in step), cfg))
        opt.step()
    for p, f in zip(base, frozen):
        p.requires_grad_(f)
        p.grad = None
    return bad


def run_ttt(
    model: nn.Module,
    tokens: Tensor,
    tables: DeviceTables,
    cfg: TTTConfig,
    static: Sequence[Score] | None = None,
    on_chunk: Callable[[ChunkRecord], bool | None] | None = None,
    signal: Callable[[], float] | None = None,
    prefix: int = 0,
    grad_stats: Sequence[Tensor] | None = None,
) -> TTTResult:
    """Score-first TTT of `model` (adapted in place) over the targets of `tokens` after its first `prefix` tokens.

    `tokens` is the stream to evaluate (apply any cap before calling); its
    first `prefix` tokens are context only (earlier text of the stream,
    never scored). Its targets are cut into chunks (`evaluate.plan_spans`):
    of the stream, or, with `reset=document`, inside each document, whose
    first chunk starts again from the starting weights and optimizer state
    (and whose windows read nothing of the document before). Each chunk is
    scored, then (unless it ends the stream, or its document) adapted on:
    its scoring windows, or (`train_windows=sequences`) its targets as
    non-overlapping context-long sequences. With `phase_docs`, every N
    documents scored are followed by a global SGD pass over them.
    `static`, if given, is the per-chunk static score of the
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
    `grad_stats`: dynamic evaluation's mean squared gradients (`gradient_stats`), for `optimizer=dyneval`.
    """
    cfg.validate()
    rank, world_size = world()
    params = select_params(model, cfg.params, cfg.seed)
    opt = make_optimizer(cfg, params, grad_stats)
    by_document = cfg.reset == "document"
    spans = plan_spans(tokens, prefix + 1, tokens.numel() - 1 - prefix, cfg.chunk_tokens, by_document)
    if static is not None and len(static) != len(spans):
        raise ValueError(f"static curve has {len(static)} chunks, the stream has {len(spans)}")
    start = [p.detach().clone() for p in params] if by_document else None
    result = TTTResult(world_size=world_size)
    static_run = Score(0.0, 0.0, 0)
    docs_done, phase_from = 0, spans[0].a
    model.eval()
    t0 = time.perf_counter()
    for k, span in enumerate(spans):
        a, b = span.a, span.b
        if by_document and span.opens and k > 0:  # a new document: the starting weights, a fresh optimizer
            with torch.no_grad():
                for p, p0 in zip(params, start):
                    p.copy_(p0)
            opt = make_optimizer(cfg, params, grad_stats)
        windows = plan_windows(a, b, cfg.context, cfg.stride or None, span.floor)
        train = windows if cfg.train_windows == "scored" else plan_windows(a, b, cfg.context, cfg.context, span.floor)
        mine = share(windows, [w.scored for w in windows], rank, world_size)
        ends_doc = by_document and (k + 1 == len(spans) or spans[k + 1].opens)
        last = k == len(spans) - 1 or ends_doc  # nothing after it learns from an update on it
        # Fused: the first step of chunk k's first epoch is over exactly its scoring windows, with θ_k: its forward is the score.
        fused = (cfg.fuse_score and not last and cfg.epochs > 0 and train is windows
                 and (cfg.step_windows or len(windows)) >= len(windows))
        t_chunk = time.perf_counter()
        if fused:
            opt.zero_grad(set_to_none=True)
            nll_sum, byte_sum = backward_share_(model, tokens, mine, cfg, tables)
        else:
            nll_sum, byte_sum, _ = window_sums(model, tokens, mine, tables, cfg.micro_batch, cfg.autocast_dtype)
        local = torch.stack([nll_sum, byte_sum, torch.tensor(float(signal()) if signal else 0.0, dtype=torch.float64,
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
            result.trained_targets += cfg.epochs * sum(w.scored for w in train)
            result.trained_positions += cfg.epochs * sum(w.stop - w.start for w in train)
            bad = adapt_(model, opt, params, tokens, train, cfg, lr, cfg.epochs, fused)
            diverged = bool(bad)  # host read 2 of 2: a non-finite gradient norm in any step of this chunk
            if not diverged and cfg.checksum_every and (k + 1) % cfg.checksum_every == 0:
                assert_same_weights(params, f"after chunk {k}")
        elif fused:
            opt.zero_grad(set_to_none=True)
        if not diverged and ends_doc and cfg.phase_docs and k + 1 < len(spans):
            docs_done += 1
            if docs_done % cfg.phase_docs == 0:  # a phase: every scored document since the last one, globally
                with torch.no_grad():  # from the starting adapters (LoRA: the plain model), as the next document starts
                    for p, p0 in zip(params, start):
                        p.copy_(p0)
                diverged = bool(global_pass_(model, tokens, phase_from, b, cfg, params))
                phase_from = b
                start = [p.detach().clone() for p in params]  # all weights adapted: the pass moved the start
                opt = make_optimizer(cfg, params, grad_stats)
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
        if stop and k + 1 < len(spans):
            result.stopped = True
            break
    result.seconds = time.perf_counter() - t0
    return result
