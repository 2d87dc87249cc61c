"""The TTT protocols of the records and the literature (`e2ettt.recipes`), each against a plain loop written here.

The reference loop shares no code with e2ettt's TTT, windows or bytes: its own windows (a document's BOS as their
floor), its own byte counts from the tables' arrays, its own LoRA (W + B·A through `functional_call`), its own
dynamic-evaluation step, its own per-document resets and global phases. Per-chunk bpb must agree to 1e-6 of the bpb
at one rank (this random model scores about 10 bpb), and the engine's two ranks must agree with its one; lr 0 gives
the static curve for every protocol; no chunk's score depends on a later token; a document's first chunk does not
depend on the documents before it.
"""
import copy
import dataclasses
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call

from e2ettt import ttt
from e2ettt.evaluate import DeviceTables, plan_spans, static_curve
from e2ettt.launch import run_local
from e2ettt.recipes import RECIPES
from e2ettt.tokenizer import ByteTables
from e2ettt.ttt import TTTConfig, gradient_stats, run_ttt

BOS = 1


@pytest.fixture(scope="module")
def byte_tables():
    rng = np.random.default_rng(0)
    base = rng.integers(1, 4, 64).astype(np.int16)
    lead = rng.random(64) < 0.3
    boundary = np.zeros(64, bool)
    boundary[:4] = True
    base[:4] = 0
    return ByteTables(base, lead, boundary)


@pytest.fixture(scope="module")
def stream():
    """Five documents of 30 to 90 tokens, each opened by BOS (the first begins before the stream)."""
    g = torch.Generator().manual_seed(3)
    parts, lengths = [torch.randint(4, 64, (25,), generator=g)], [60, 35, 90, 45, 70]
    for n in lengths:
        parts += [torch.tensor([BOS]), torch.randint(4, 64, (n,), generator=g)]
    return torch.cat(parts)


@pytest.fixture(scope="module")
def train_seqs():
    return torch.randint(4, 64, (6, 33), generator=torch.Generator().manual_seed(9))


def config(name: str, **extra) -> TTTConfig:
    """Recipe `name` at the sizes of a 64-token-vocabulary model: its settings, a chunk and lr of this scale."""
    r = RECIPES[name]
    sizes = {"stream": (40, 0.05), "chunked-sgd": (100, 0.05), "doc-lora": (12, 0.02), "phased": (12, 0.02),
             "dyneval": (16, 2e-4), "e2e": (12, 0.05)}[name]
    ttt = {**r.ttt, "chunk_tokens": sizes[0], "inner_lr": sizes[1], "context": 32, "micro_batch": 1,
           "checksum_every": 1, "diverge_bpb": 0.0, "recipe": name}
    if name == "chunked-sgd":
        ttt["stride"] = 8
    if ttt.get("params", "").startswith("lora"):
        ttt["params"] = "lora:4"
    if name == "phased":
        ttt.update(phase_docs=2, phase_lr=0.01)
    if name == "dyneval":
        ttt["decay_to_start"] = 0.05
    return TTTConfig(**{**ttt, **extra})


# --- the plain loop ------------------------------------------------------------------------------------------------

def plain_spans(ids: list[int], chunk: int, by_document: bool) -> list[tuple[int, int, int, bool]]:
    """(a, b, floor, opens): targets 1.. in chunks; by document, a document's targets run from after its BOS to the
    next BOS, and its windows read from its BOS."""
    n = len(ids)
    if not by_document:
        return [(a, min(a + chunk, n), 0, False) for a in range(1, n, chunk)]
    bounds = [1] + [t + 1 for t in range(1, n - 1) if ids[t] == BOS]
    out = []
    for i, s in enumerate(bounds):
        e = bounds[i + 1] if i + 1 < len(bounds) else n
        floor = 0 if i == 0 else s - 1
        out += [(a, min(a + chunk, e), floor, a == s) for a in range(s, e, chunk)]
    return out


def plain_windows(a: int, b: int, context: int, stride: int, floor: int) -> list[tuple[int, int, int]]:
    """(input start, input stop, scored): blocks of `stride` targets, each read by the `context` tokens before it."""
    out = []
    t = a
    while t < b:
        e = min(t + stride, b)
        out.append((max(floor, e - 1 - context), e - 1, e - t))
        t = e
    return out


class Plain:
    """Score-first TTT written out, one window at a time."""

    phase_step = 32  # sequences per step of a phase, as the records batch them

    def __init__(self, model, cfg: TTTConfig, tables: ByteTables, train_seqs=None):
        self.model, self.cfg, self.t = model, cfg, tables
        self.names = [n for n, _ in model.named_parameters()]
        self.base = {n: p.detach().clone().requires_grad_(True) for n, p in model.named_parameters()}
        self.lora = cfg.params.startswith("lora")
        if self.lora:  # A uniform in ±1/sqrt(in) from the seed's generator, in module order; B zero
            g = torch.Generator().manual_seed(cfg.seed)
            self.a0 = {}
            for mname, m in model.named_modules():
                if isinstance(m, torch.nn.Linear):
                    out_f, in_f = m.weight.shape
                    A = torch.empty(int(cfg.params[5:]), in_f)
                    A.uniform_(-1 / math.sqrt(in_f), 1 / math.sqrt(in_f), generator=g)
                    self.a0[f"{mname}.weight"] = A
        self.train_seqs = train_seqs
        self.reset()

    def reset(self) -> None:
        if self.lora:
            self.A = {n: a.clone().requires_grad_(True) for n, a in self.a0.items()}
            self.B = {n: torch.zeros(self.base[n].shape[0], a.shape[0], requires_grad=True) for n, a in self.a0.items()}
            self.adapted = list(self.A.values()) + list(self.B.values())
        else:
            if hasattr(self, "start"):
                with torch.no_grad():
                    for n in self.names:
                        self.base[n].copy_(self.start[n])
            self.adapted = list(self.base.values())
        self.start = {n: p.detach().clone() for n, p in self.base.items()}
        cfg = self.cfg
        if cfg.optimizer == "sgd":
            self.opt = torch.optim.SGD(self.adapted, lr=cfg.inner_lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
        elif cfg.optimizer == "adamw":
            self.opt = torch.optim.AdamW(self.adapted, lr=cfg.inner_lr, betas=(cfg.momentum, 0.999),
                                         weight_decay=cfg.weight_decay)
        else:
            self.opt = None
            self.theta0 = [p.detach().clone() for p in self.adapted]

    def weights(self) -> dict:
        if not self.lora:
            return self.base
        return {n: self.base[n] + self.B[n] @ self.A[n] if n in self.A else self.base[n] for n in self.names}

    def nll(self, ids: torch.Tensor, w: tuple[int, int, int]) -> torch.Tensor:
        start, stop, scored = w
        logits = functional_call(self.model, self.weights(), (ids[start:stop][None],))[0, -scored:]
        return F.cross_entropy(logits.float(), ids[stop + 1 - scored : stop + 1], reduction="sum")

    def nbytes(self, ids: torch.Tensor, w: tuple[int, int, int]) -> int:
        start, stop, scored = w
        total = 0
        for t in range(stop + 1 - scored, stop + 1):
            y, x = int(ids[t]), int(ids[t - 1])
            total += int(self.t.base_bytes[y]) + int(self.t.has_leading_space[y] and not self.t.is_boundary[x])
        return total

    def step(self, ids, windows, lr: float, params=None, opt=None) -> None:
        params = params or self.adapted
        opt = opt or self.opt
        loss = sum(self.nll(ids, w) for w in windows) / sum(w[2] for w in windows)
        for p in params:
            p.grad = None
        loss.backward()
        if self.cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(params, self.cfg.grad_clip)
        if opt is not None:
            for group in opt.param_groups:
                group["lr"] = lr
            opt.step()
            return
        with torch.no_grad():  # dynamic evaluation, step by step as the paper writes it
            rms = [m.sqrt() for m in self.ms]
            mean = torch.cat([r.flatten() for r in rms]).mean()
            for p, g0, r in zip(params, self.theta0, rms):
                pull = torch.clamp(self.cfg.decay_to_start * r / mean, max=1.0) * (g0 - p)
                p.sub_(lr * p.grad / (r + 1e-8))
                p.add_(pull)

    def mean_squared_gradients(self) -> None:
        sums = [torch.zeros_like(p) for p in self.adapted]
        for row in self.train_seqs:
            for p in self.adapted:
                p.grad = None
            logits = functional_call(self.model, self.weights(), (row[None, :-1],))[0]
            F.cross_entropy(logits.float(), row[1:]).backward()
            for s, p in zip(sums, self.adapted):
                s.add_(p.grad.square())
        self.ms = [s / len(self.train_seqs) for s in sums]

    def run(self, ids: torch.Tensor) -> list[float]:
        cfg = self.cfg
        if cfg.optimizer == "dyneval":
            self.mean_squared_gradients()
        spans = plain_spans(ids.tolist(), cfg.chunk_tokens, cfg.reset == "document")
        out, docs, phase_from = [], 0, 1
        for k, (a, b, floor, opens) in enumerate(spans):
            if cfg.reset == "document" and opens and k:
                self.reset()
            windows = plain_windows(a, b, cfg.context, cfg.stride or cfg.context, floor)
            with torch.no_grad():
                nats, nbytes = sum(self.nll(ids, w).double() for w in windows).item(), sum(self.nbytes(ids, w) for w in windows)
                out.append(nats / (math.log(2) * nbytes) if nbytes else math.nan)  # a chunk of one BOS: no bytes
            ends_doc = cfg.reset == "document" and (k + 1 == len(spans) or spans[k + 1][3])
            if k + 1 < len(spans) and not ends_doc:
                train = windows if cfg.train_windows == "scored" else plain_windows(a, b, cfg.context, cfg.context, floor)
                lr = cfg.inner_lr * (0.5 * (1 + math.cos(math.pi * k / (len(spans) - 1))) if cfg.schedule == "cosine" else 1)
                for _ in range(cfg.epochs):
                    self.step(ids, train, lr)
            if ends_doc and cfg.phase_docs and k + 1 < len(spans):
                docs += 1
                if docs % cfg.phase_docs == 0:
                    self.reset()  # the phase starts from the starting adapters
                    base = list(self.base.values())
                    sgd = torch.optim.SGD(base, lr=cfg.phase_lr, momentum=0.9)
                    seqs = plain_windows(phase_from, b, cfg.context, cfg.context, 0)
                    steps = list(range(0, len(seqs), self.phase_step))
                    for i, s in enumerate(steps):
                        lr = cfg.phase_lr * 0.5 * (1 + math.cos(math.pi * i / max(1, len(steps) - 1)))
                        self.step(ids, seqs[s : s + self.phase_step], lr, params=base, opt=sgd)
                    phase_from = b
                    if not self.lora:  # every weight is adapted: the pass moved the start the next document resets to
                        self.start = {n: p.detach().clone() for n, p in self.base.items()}
                    self.reset()
        return out


# --- the checks ----------------------------------------------------------------------------------------------------

def engine(model, ids, cfg, tables: ByteTables, train_seqs=None, static=None):
    stats = None
    if cfg.optimizer == "dyneval":
        from e2ettt.adapt import select_params

        probe = copy.deepcopy(model)
        stats = gradient_stats(probe, select_params(probe, cfg.params, cfg.seed), train_seqs)
    return run_ttt(model, ids, DeviceTables.from_tables(tables), cfg, static, grad_stats=stats)


@pytest.mark.parametrize("name", list(RECIPES))
def test_each_recipe_matches_a_loop_written_plainly(name, random_gpt, stream, byte_tables, train_seqs):
    cfg = config(name)
    got = [c.ttt_bpb for c in engine(copy.deepcopy(random_gpt), stream, cfg, byte_tables, train_seqs).chunks]
    want = Plain(copy.deepcopy(random_gpt), cfg, byte_tables, train_seqs).run(stream)
    assert len(got) == len(want)
    assert got == pytest.approx(want, abs=0, rel=1e-6, nan_ok=True)  # float32 rounding: 2e-7 of the bpb
    frozen = Plain(copy.deepcopy(random_gpt), dataclasses.replace(cfg, inner_lr=0.0, phase_lr=0.0), byte_tables,
                   train_seqs).run(stream)
    assert np.nanmax(np.abs(np.subtract(got, frozen))) > 1e-4  # the protocol adapts: the comparison can fail


@pytest.mark.parametrize("name", list(RECIPES))
def test_lr_0_is_the_static_curve_for_every_recipe(name, random_gpt, stream, byte_tables, train_seqs):
    cfg = config(name, inner_lr=0.0, phase_lr=0.0)
    tables = DeviceTables.from_tables(byte_tables)
    spans = plan_spans(stream, 1, stream.numel() - 1, cfg.chunk_tokens, cfg.reset == "document")
    static = static_curve(random_gpt, stream, spans, cfg.context, cfg.stride or None, tables, 1)
    result = engine(copy.deepcopy(random_gpt), stream, cfg, byte_tables, train_seqs, static)
    assert [c.ttt_bpb for c in result.chunks] == pytest.approx([s.bpb for s in static], abs=0, rel=0, nan_ok=True)


def ranks_ttt(model, ids, cfg, tables, train_seqs):
    result = engine(model, ids, cfg, tables, train_seqs)
    return [c.ttt_bpb for c in result.chunks]


@pytest.mark.parametrize("name", list(RECIPES))
def test_two_ranks_agree_with_one_for_every_recipe(name, random_gpt, stream, byte_tables, train_seqs):
    cfg = config(name, micro_batch=2)
    one = ranks_ttt(copy.deepcopy(random_gpt), stream, cfg, byte_tables, train_seqs)
    two = run_local(ranks_ttt, (copy.deepcopy(random_gpt), stream, cfg, byte_tables, train_seqs), 2)
    assert two == pytest.approx(one, abs=1e-5, rel=0, nan_ok=True)


@pytest.mark.parametrize("name", list(RECIPES))
def test_no_score_depends_on_a_later_token_in_any_recipe(name, random_gpt, stream, byte_tables, train_seqs):
    cfg = config(name)
    base = engine(copy.deepcopy(random_gpt), stream, cfg, byte_tables, train_seqs).chunks
    spans = plan_spans(stream, 1, stream.numel() - 1, cfg.chunk_tokens, cfg.reset == "document")
    k = len(spans) // 2
    changed = stream.clone()
    changed[spans[k].b + 1 :] = torch.randint(4, 64, (changed.numel() - spans[k].b - 1,),
                                              generator=torch.Generator().manual_seed(5))
    after = engine(copy.deepcopy(random_gpt), changed, cfg, byte_tables, train_seqs).chunks
    assert [c.nll for c in after[: k + 1]] == [c.nll for c in base[: k + 1]]


def test_per_document_lora_scores_a_documents_first_chunk_as_if_it_were_alone(random_gpt, stream, byte_tables):
    cfg = config("doc-lora")
    spans = plan_spans(stream, 1, stream.numel() - 1, cfg.chunk_tokens, True)
    third = [i for i, s in enumerate(spans) if s.opens][2]  # the third document's first chunk
    changed = stream.clone()
    earlier = changed[1 : spans[third].floor]  # every token of the documents before, their BOS kept
    noise = torch.randint(4, 64, earlier.shape, generator=torch.Generator().manual_seed(6))
    changed[1 : spans[third].floor] = torch.where(earlier == BOS, earlier, noise)
    a = engine(copy.deepcopy(random_gpt), stream, cfg, byte_tables).chunks
    b = engine(copy.deepcopy(random_gpt), changed, cfg, byte_tables).chunks
    assert a[third].nll == b[third].nll  # the first chunk of a document: nothing before it counts
    assert a[third - 1].nll != b[third - 1].nll  # the perturbation reached the document before


def test_sequences_train_on_each_target_once_per_epoch_and_score_as_scored_windows(random_gpt, stream, byte_tables):
    """chunked-sgd at stride 8: scored windows are 32 tokens for 8 targets; training on sequences runs each target
    once per epoch at a quarter of the positions, and the scores at lr 0 are those of scored-window training."""
    seq = config("chunked-sgd")
    scored = dataclasses.replace(seq, train_windows="scored")
    a = engine(copy.deepcopy(random_gpt), stream, seq, byte_tables)
    b = engine(copy.deepcopy(random_gpt), stream, scored, byte_tables)
    adapted = sum(c.tokens for c in a.chunks[:-1])  # every chunk but the last is adapted on
    assert a.trained_targets == b.trained_targets == seq.epochs * adapted
    assert a.trained_positions < b.trained_positions / 3  # sequences: about one position per target
    zero = [engine(copy.deepcopy(random_gpt), stream, dataclasses.replace(c, inner_lr=0.0), byte_tables).chunks
            for c in (seq, scored)]
    assert [c.nll for c in zero[0]] == [c.nll for c in zero[1]]
    assert a.chunks[0].nll == b.chunks[0].nll and a.chunks[1].nll != b.chunks[1].nll


@pytest.mark.parametrize("params, per_step", [("lora:4", 1), ("all", 1), ("lora:4", 2)])
def test_a_phase_of_several_steps_matches_the_plain_loop(params, per_step, random_gpt, stream, byte_tables, monkeypatch):
    """One sequence per step, so that a phase takes several steps (momentum and its cosine matter), adapting LoRA
    between phases or every weight (then the phase trains them all, and moves the start the next document resets to).
    At two sequences a step the first phase (3 sequences) takes two steps: its cosine goes from phase_lr to 0 at once."""
    monkeypatch.setattr(ttt, "PHASE_STEP_WINDOWS", per_step)
    cfg = config("phased", params=params, inner_lr=0.0 if params == "all" else 0.02, phase_lr=0.05)
    got = [c.ttt_bpb for c in engine(copy.deepcopy(random_gpt), stream, cfg, byte_tables).chunks]
    plain = Plain(copy.deepcopy(random_gpt), cfg, byte_tables)
    plain.phase_step = per_step
    want = plain.run(stream)
    assert got == pytest.approx(want, abs=0, rel=1e-6, nan_ok=True)
    one_step = Plain(copy.deepcopy(random_gpt), cfg, byte_tables).run(stream)  # each phase in a single step
    assert np.nanmax(np.abs(np.subtract(got, one_step))) > 1e-3  # the steps matter: the comparison can fail


@pytest.mark.parametrize("phase_docs", [0, 2])
def test_dynamic_evaluation_by_document_matches_the_plain_loop(phase_docs, random_gpt, stream, byte_tables, train_seqs):
    """Each document starts from the starting weights (after a phase: the weights it left) with a fresh optimizer
    that keeps the train-split statistics."""
    cfg = config("dyneval", reset="document", phase_docs=phase_docs, phase_lr=0.01)
    got = engine(copy.deepcopy(random_gpt), stream, cfg, byte_tables, train_seqs).chunks
    want = Plain(copy.deepcopy(random_gpt), cfg, byte_tables, train_seqs).run(stream)
    rel = 1e-5 if phase_docs else 1e-6  # float32 rounding carried through the phases' steps: 5e-6 of an 18-bpb chunk
    assert [c.ttt_bpb for c in got] == pytest.approx(want, abs=0, rel=rel, nan_ok=True)


def test_sequences_inside_documents_match_the_plain_loop(random_gpt, stream, byte_tables):
    """Training on context-long sequences by document: the sequences read nothing before the document's BOS."""
    cfg = config("doc-lora", train_windows="sequences", chunk_tokens=40)
    got = [c.ttt_bpb for c in engine(copy.deepcopy(random_gpt), stream, cfg, byte_tables).chunks]
    want = Plain(copy.deepcopy(random_gpt), cfg, byte_tables).run(stream)
    assert got == pytest.approx(want, abs=0, rel=1e-6, nan_ok=True)


def test_a_phase_that_blows_up_ends_the_run_at_the_chunk_it_follows(random_gpt, stream, byte_tables, monkeypatch):
    monkeypatch.setattr(ttt, "PHASE_STEP_WINDOWS", 1)  # several steps: the second one's gradient is not finite
    cfg = config("phased", phase_lr=1e30, momentum=0.0)
    out = engine(copy.deepcopy(random_gpt), stream, cfg, byte_tables)
    spans = plan_spans(stream, 1, stream.numel() - 1, cfg.chunk_tokens, True)
    second_end = [k for k in range(len(spans) - 1) if spans[k + 1].opens][1]  # the chunk ending document 2
    assert out.diverged and out.diverged_chunk == second_end


def test_a_phase_follows_every_nth_document_but_the_last(random_gpt, stream, byte_tables, monkeypatch):
    """One chunk per document (six: the text before the first BOS is one): with phase_docs=1, a phase after each of
    the first five documents, none after the last, whose end is the stream's."""
    calls = []
    real = ttt.global_pass_
    monkeypatch.setattr(ttt, "global_pass_", lambda model, tokens, first, end, cfg, adapted: (
        calls.append((first, end)), real(model, tokens, first, end, cfg, adapted))[1])
    cfg = config("phased", phase_docs=1, chunk_tokens=100)
    spans = plan_spans(stream, 1, stream.numel() - 1, cfg.chunk_tokens, True)
    assert len(spans) == 6 and all(s.opens for s in spans[1:])
    engine(copy.deepcopy(random_gpt), stream, cfg, byte_tables)
    assert calls == [(spans[k].a, spans[k].b) for k in range(5)]
