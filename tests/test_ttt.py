import copy
import dataclasses
import math
import time

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import e2ettt.ttt as engine
from e2ettt.adapt import merge_
from e2ettt.evaluate import DeviceTables, Score, chunk_spans, plan_windows, score_windows, static_curve, token_nll
from e2ettt.launch import run_local
from e2ettt.testing import ttt_rank
from e2ettt.tokenizer import ByteTables
from e2ettt.ttt import (
    DynEval,
    TTTConfig,
    TTTResult,
    adapt_,
    backward_share_,
    gradient_stats,
    lr_at,
    make_optimizer,
    run_ttt,
    sync_gradients_,
)


@pytest.fixture
def tables():
    rng = np.random.default_rng(0)
    base = rng.integers(1, 4, 64).astype(np.int16)
    lead = rng.random(64) < 0.3
    boundary = np.zeros(64, bool)
    boundary[:4] = True
    base[:4] = 0
    return DeviceTables.from_tables(ByteTables(base, lead, boundary))


@pytest.fixture
def tokens():
    return torch.randint(4, 64, (601,), generator=torch.Generator().manual_seed(1))


CFG = TTTConfig(chunk_tokens=100, context=32, stride=16, inner_lr=0.05, micro_batch=3)


@pytest.mark.parametrize("fuse", [True, False])
def test_lr_zero_reproduces_static_eval_chunk_by_chunk(random_gpt, tokens, tables, fuse):
    cfg = TTTConfig(**{**CFG.__dict__, "inner_lr": 0.0, "fuse_score": fuse})
    static = static_curve(random_gpt, tokens, chunk_spans(600, 100), 32, 16, tables, 3)
    result = run_ttt(copy.deepcopy(random_gpt), tokens, tables, cfg, static)
    assert [c.ttt_bpb for c in result.chunks] == [s.bpb for s in static]
    assert result.first_chunk_delta == 0.0


@pytest.mark.parametrize("params", ["all", "norms", "lora:4"])
@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_lr_zero_leaves_scores_and_weights_as_they_were_for_every_adapted_choice(random_gpt, tokens, tables, params,
                                                                                  optimizer):
    """Whatever TTT may change and however it steps (momentum, AdamW's decoupled weight decay), lr 0 changes nothing:
    every chunk scores its static score and the weights it leaves (adapters merged) are the model's own, to the bit;
    at a small lr both move."""
    static = static_curve(random_gpt, tokens, chunk_spans(600, 100), 32, 16, tables, 3)
    for lr in (0.0, 0.05):
        cfg = dataclasses.replace(CFG, inner_lr=lr, params=params, optimizer=optimizer, weight_decay=0.1, momentum=0.9)
        model = copy.deepcopy(random_gpt)
        result = run_ttt(model, tokens, tables, cfg, static)
        merge_(model)
        same = all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), random_gpt.state_dict().values()))
        scores = [c.ttt_bpb for c in result.chunks]
        if lr == 0:
            assert scores == [s.bpb for s in static] and same
        else:
            assert scores[1:] != [s.bpb for s in static][1:] and not same  # the comparison can fail


def test_ttt_changes_scores_and_first_chunk_equals_static(random_gpt, tokens, tables):
    static = static_curve(random_gpt, tokens, chunk_spans(600, 100), 32, 16, tables, 3)
    result = run_ttt(copy.deepcopy(random_gpt), tokens, tables, CFG, static)
    unfused = run_ttt(copy.deepcopy(random_gpt), tokens, tables, TTTConfig(**{**CFG.__dict__, "fuse_score": False}), static)
    assert [c.ttt_bpb for c in result.chunks] == [c.ttt_bpb for c in unfused.chunks]  # fusing changes no number
    assert result.first_chunk_delta == 0.0
    assert result.chunks[1].ttt_bpb != static[1].bpb
    assert len(result.chunks) == 6 and result.total.tokens == 600


@pytest.mark.parametrize("k", [0, 2, 4])
def test_no_future_leak(random_gpt, tokens, tables, k):
    """Changing every token after chunk k leaves chunks <= k's scores unchanged."""
    base = run_ttt(copy.deepcopy(random_gpt), tokens, tables, CFG)
    changed = tokens.clone()
    end = (k + 1) * 100 + 1  # targets of chunk k end at position (k+1)*100
    changed[end:] = torch.randint(4, 64, (changed.numel() - end,), generator=torch.Generator().manual_seed(9))
    other = run_ttt(copy.deepcopy(random_gpt), changed, tables, CFG)
    assert [c.ttt_bpb for c in other.chunks[: k + 1]] == [c.ttt_bpb for c in base.chunks[: k + 1]]
    assert other.chunks[k + 1].ttt_bpb != base.chunks[k + 1].ttt_bpb


def test_each_chunk_is_scored_with_the_weights_adapted_on_the_chunks_before_it_only(random_gpt, tokens, tables):
    """Score first, exactly: chunk k's TTT score is the static score of chunk k under the weights TTT held after
    adapting on chunk k - 1, and those weights are the same whatever chunk k and later chunks hold."""
    k, stream = 2, tokens[:401]
    full = run_ttt(copy.deepcopy(random_gpt), stream, tables, CFG)
    changed = stream.clone()
    changed[1 + 100 * k :] = torch.randint(4, 64, (400 - 100 * k,), generator=torch.Generator().manual_seed(9))
    held = []
    for s in (stream, changed):
        model = copy.deepcopy(random_gpt)
        run_ttt(model, s, tables, CFG, on_chunk=lambda rec: rec.chunk == k - 1)  # ends after adapting on chunk k - 1
        held.append(model.state_dict())
    assert all(torch.equal(held[0][n], held[1][n]) for n in held[0])
    assert not torch.equal(held[0]["tok_emb.weight"], random_gpt.state_dict()["tok_emb.weight"])  # it did adapt
    model = copy.deepcopy(random_gpt)
    model.load_state_dict(held[0])
    chunk_k = plan_windows(1 + 100 * k, 1 + 100 * (k + 1), CFG.context, CFG.stride)
    assert score_windows(model, stream, chunk_k, tables, CFG.micro_batch).bpb == full.chunks[k].ttt_bpb


def reference_ttt(model, tokens, tables, cfg) -> list[float]:
    """Score-first TTT written plainly at one rank, one window at a time: score chunk k with no_grad, then take
    `epochs` SGD steps with momentum on its mean NLL (one optimizer for the whole stream, grad norm clipped, the
    cosine schedule over chunks written out); the per-chunk bpb."""
    opt = torch.optim.SGD(model.parameters(), lr=cfg.inner_lr, momentum=cfg.momentum)
    spans = chunk_spans(tokens.numel() - 1, cfg.chunk_tokens)
    out = []

    def chunk_nll(windows):
        terms = []
        for w in windows:
            logits = model(tokens[w.start : w.stop][None])[0, -w.scored :]
            terms.append(torch.nn.functional.cross_entropy(logits, tokens[w.stop + 1 - w.scored : w.stop + 1], reduction="sum"))
        return torch.stack(terms).sum()

    for k, (a, b) in enumerate(spans):
        windows = plan_windows(a, b, cfg.context, cfg.stride)
        with torch.no_grad():
            out.append(score_windows(model, tokens, windows, tables, 1).bpb)
        if k == len(spans) - 1:
            break
        for group in opt.param_groups:
            group["lr"] = cfg.inner_lr * 0.5 * (1 + math.cos(math.pi * k / (len(spans) - 1)))
        for _ in range(cfg.epochs):
            opt.zero_grad()
            (chunk_nll(windows) / (b - a)).backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            opt.step()
    return out


def test_the_loop_matches_score_first_ttt_written_plainly(random_gpt, tokens, tables):
    """Momentum carried from chunk to chunk, the schedule, epochs, clipping and the mean over a chunk's targets:
    the engine's per-chunk scores are those of the plain loop (to float rounding)."""
    cfg = TTTConfig(**{**CFG.__dict__, "epochs": 2, "schedule": "cosine", "inner_lr": 0.3})
    stream = tokens[:401]
    got = [c.ttt_bpb for c in run_ttt(copy.deepcopy(random_gpt), stream, tables, cfg).chunks]
    want = reference_ttt(copy.deepcopy(random_gpt), stream, tables, cfg)
    assert lr_at(cfg, 1, 4) == pytest.approx(0.3 * 0.75)
    assert got == pytest.approx(want, rel=1e-5, abs=0)
    plain = reference_ttt(copy.deepcopy(random_gpt), stream, tables, dataclasses.replace(cfg, momentum=0.0))
    assert got[1:] != pytest.approx(plain[1:], rel=1e-5, abs=0)  # momentum matters: the comparison can fail


def test_a_run_that_blows_up_is_diverged_where_it_does(random_gpt, tokens, tables):
    stream = tokens[:401]
    static = static_curve(random_gpt, stream, chunk_spans(400, 100), 32, 16, tables, 3)
    wild = TTTConfig(**{**CFG.__dict__, "inner_lr": 1e4, "grad_clip": 0.0, "momentum": 0.0})
    out = run_ttt(copy.deepcopy(random_gpt), stream, tables, wild, static)
    assert out.diverged and 1 <= out.diverged_chunk < 3 and len(out.chunks) == out.diverged_chunk + 1
    calm = run_ttt(copy.deepcopy(random_gpt), stream, tables, TTTConfig(**{**CFG.__dict__, "inner_lr": 0.0}), static)
    assert not calm.diverged and len(calm.chunks) == 4


def test_first_chunk_delta_is_chunk_0_against_the_static_curve_it_is_given(random_gpt, tokens, tables):
    """The row alarm's input: 0 for the model's own static curve, the gap for another model's."""
    stream = tokens[:301]
    other = static_curve(worse_than_uniform(random_gpt), stream, chunk_spans(300, 100), 32, 16, tables, 3)
    result = run_ttt(copy.deepcopy(random_gpt), stream, tables, CFG, other)
    assert result.first_chunk_delta == result.chunks[0].ttt_bpb - other[0].bpb
    assert result.first_chunk_delta < -0.5


def test_world_size_one_and_two_agree_and_ranks_hold_identical_weights(random_gpt, tokens, tables):
    one = run_local(ttt_rank, (copy.deepcopy(random_gpt), tokens, tables, CFG), 1)
    two = run_local(ttt_rank, (copy.deepcopy(random_gpt), tokens, tables, CFG), 2)
    assert two["tokens"] == one["tokens"] == 600
    assert two["bytes"] == one["bytes"]
    assert two["nll"] == pytest.approx(one["nll"], rel=1e-5)
    assert two["checksums"][0] == two["checksums"][1]
    assert two["checksums"][0] == pytest.approx(one["checksums"][0], rel=1e-5)


def test_uneven_shares_and_a_diverging_lr_end_cleanly_on_two_ranks(random_gpt, tokens, tables):
    # one window per chunk: rank 1 has nothing to score or train on, and must still keep step
    calm = TTTConfig(chunk_tokens=50, context=64, stride=64, inner_lr=0.0, micro_batch=2)
    static = static_curve(random_gpt, tokens, chunk_spans(600, 50), 64, 64, tables, 2)
    base = run_local(ttt_rank, (copy.deepcopy(random_gpt), tokens, tables, calm, static), 2)
    assert not base["diverged"] and base["checksums"][0] == base["checksums"][1]
    wild = TTTConfig(chunk_tokens=50, context=64, stride=64, inner_lr=1e4, grad_clip=0.0, momentum=0.0, micro_batch=2)
    out = run_local(ttt_rank, (copy.deepcopy(random_gpt), tokens, tables, wild, static), 2)
    assert out["diverged"] and out["diverged_chunk"] >= 1
    assert len(out["chunks"]) == out["diverged_chunk"] + 1


def worse_than_uniform(model):
    """The same model with its logits scaled up: confidently wrong, worse than a uniform guess."""
    broken = copy.deepcopy(model)
    with torch.no_grad():
        broken.tok_emb.weight.mul_(8.0)
    return broken


def test_a_model_bad_before_any_update_is_measured_not_called_diverged(random_gpt, tokens, tables):
    broken = worse_than_uniform(random_gpt)
    static = static_curve(broken, tokens, chunk_spans(600, 100), 32, 16, tables, 3)
    uniform_nats = math.log(64)
    assert sum(s.nll for s in static) / 600 > uniform_nats  # worse than a uniform guess before any update
    for lr in (0.0, 0.05):
        result = run_ttt(copy.deepcopy(broken), tokens, tables, TTTConfig(**{**CFG.__dict__, "inner_lr": lr}), static)
        assert not result.diverged and len(result.chunks) == 6 and math.isfinite(result.bpb)
    assert result.bpb <= sum(s.nll for s in static) / (math.log(2) * sum(s.bytes for s in static))  # no worse


def fitted(model, tokens, steps=60):
    """The model trained for a few steps on the stream: good on it, so that TTT has something to break."""
    model = copy.deepcopy(model).train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    windows = tokens[: 600 // 33 * 33].view(-1, 33)
    for _ in range(steps):
        loss = torch.nn.functional.cross_entropy(model(windows[:, :-1]).flatten(0, 1), windows[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def running_gaps(result, static) -> list[float]:
    """Running TTT bpb minus the running static bpb of the same chunks, chunk by chunk."""
    out = []
    for r in result.chunks:
        s = static[: r.chunk + 1]
        out.append(r.running_ttt_bpb - sum(x.nll for x in s) / (math.log(2) * sum(x.bytes for x in s)))
    return out


def test_ttt_that_breaks_a_model_is_diverged_once_it_is_worse_than_static_by_the_margin(random_gpt, tokens, tables):
    good = fitted(random_gpt, tokens)
    static = static_curve(good, tokens, chunk_spans(600, 100), 32, 16, tables, 3)
    harsh = TTTConfig(**{**CFG.__dict__, "inner_lr": 30.0, "momentum": 0.0})
    free = run_ttt(copy.deepcopy(good), tokens, tables, dataclasses.replace(harsh, diverge_bpb=0.0), static)
    gaps = running_gaps(free, static)
    assert not free.diverged and gaps[0] == 0.0 and max(gaps) > 0.5  # TTT really breaks it (no margin: runs on)
    margin = max(gaps) / 2
    result = run_ttt(copy.deepcopy(good), tokens, tables, dataclasses.replace(harsh, diverge_bpb=margin), static)
    first_over = next(i for i, g in enumerate(gaps) if g > margin)
    assert result.diverged and result.diverged_chunk == first_over and len(result.chunks) == first_over + 1


@pytest.mark.parametrize("spec", ["norms", "lora:2"])
def test_subsets_adapt_only_what_they_name(random_gpt, tokens, tables, spec):
    before = {k: v.clone() for k, v in random_gpt.state_dict().items()}
    model = copy.deepcopy(random_gpt)
    run_ttt(model, tokens, tables, TTTConfig(**{**CFG.__dict__, "params": spec, "inner_lr": 0.5}))
    after = model.state_dict()
    if spec == "norms":
        changed = {k for k in before if not torch.equal(before[k], after[k])}
        assert changed and all(before[k].ndim < 2 or "resid_mix" in k or "skip" in k for k in changed)
        assert "tok_emb.weight" not in changed
    else:
        lora = [k for k in after if k.endswith((".A", ".B"))]
        originals = [k for k in after if k.endswith("original")]
        assert lora and originals
        for k in originals:
            plain = k.replace("parametrizations.weight.original", "weight")
            assert torch.equal(after[k], before[plain])
        assert any(not torch.equal(after[k], torch.zeros_like(after[k])) for k in lora if k.endswith(".B"))
        assert torch.equal(after["tok_emb.weight"], before["tok_emb.weight"])


def test_bad_settings_fail_clearly():
    with pytest.raises(ValueError, match="ttt.optimizer must be one of sgd, adamw"):
        TTTConfig(optimizer="lion").validate()
    with pytest.raises(ValueError, match="ttt.params: unknown adapted-parameter spec 'some'"):
        TTTConfig(params="some").validate()


class SyncCounter(TorchDispatchMode):
    """Counts the operators that make the host wait for the device on a GPU (a scalar read, a data-dependent
    shape such as boolean-mask indexing, a tensor comparison returning a Python bool)."""

    WAITS = {"aten::_local_scalar_dense", "aten::nonzero", "aten::masked_select", "aten::is_nonzero", "aten::equal"}

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func._schema.name
        bool_index = name == "aten::index" and any(
            isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in (args[1] if len(args) > 1 else []) if i is not None)
        self.count += name in self.WAITS or bool_index
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("epochs", [1, 2])
def test_host_waits_per_chunk_do_not_grow_with_micro_batches(random_gpt, tokens, tables, epochs):
    counts = []
    for micro_batch in (1, 8):  # 7 windows per chunk: 7 micro-batches, or 1
        cfg = TTTConfig(**{**CFG.__dict__, "micro_batch": micro_batch, "epochs": epochs})
        with SyncCounter() as counter:
            result = run_ttt(copy.deepcopy(random_gpt), tokens, tables, cfg)
        counts.append(counter.count / len(result.chunks))
    # Per adapted chunk: the score vector (nll, bytes, signal) is read once after its all-reduce (one copy to the
    # host on a GPU, three scalar reads as counted here) and the gradient-norm flag once; nothing per micro-batch.
    assert counts[0] == counts[1] <= 4


def test_the_counter_sees_a_boolean_mask_wait():
    x = torch.randn(10)
    with SyncCounter() as counter:
        x[x > 0].sum()
    assert counter.count >= 1


def test_a_result_larger_than_the_pipe_comes_back_from_two_ranks():
    """A 3,000-chunk curve fills the pipe: rank 0 blocks until the parent reads it, so the parent must read first."""
    import threading

    from e2ettt.testing import long_curve

    out = {}
    worker = threading.Thread(target=lambda: out.setdefault("curve", run_local(long_curve, (3000,), 2)), daemon=True)
    worker.start()
    worker.join(timeout=120)
    assert not worker.is_alive(), "run_local hung on a long result"
    assert len(out["curve"]) == 3000 and out["curve"][-1]["chunk"] == 2999


# (field, a value refused, the message word for word, the values at the edge that are accepted)
REFUSED = [
    ("chunk_tokens", 0, "ttt.chunk_tokens must be positive, got 0", [1]),
    ("context", 0, "ttt.context must be positive, got 0", [1]),
    ("stride", -1, "ttt.stride must be in [0, context=256], got -1", [0, 256]),
    ("stride", 257, "ttt.stride must be in [0, context=256], got 257", []),
    ("optimizer", "lion", "ttt.optimizer must be one of sgd, adamw, dyneval, got 'lion'", ["sgd", "adamw", "dyneval"]),
    ("train_windows", "all", "ttt.train_windows must be scored or sequences, got 'all'", ["scored", "sequences"]),
    ("reset", "chunk", "ttt.reset must be never or document, got 'chunk'", ["never", "document"]),
    ("phase_docs", 1, "ttt.phase_docs=1 needs ttt.reset=document (phases come between documents)", [0]),
    ("phase_lr", -0.5, "ttt.phase_lr must be >= 0, got -0.5", [0.0]),
    ("decay_to_start", -0.5, "ttt.decay_to_start must be >= 0, got -0.5", [0.0]),
    ("stats_tokens", 0, "ttt.stats_tokens must be positive, got 0", [1]),
    ("schedule", "linear", "ttt.schedule must be constant or cosine, got 'linear'", ["constant", "cosine"]),
    ("inner_lr", -0.5, "ttt.inner_lr must be a finite number >= 0, got -0.5", [0.0]),
    ("inner_lr", math.inf, "ttt.inner_lr must be a finite number >= 0, got inf", []),
    ("inner_lr", math.nan, "ttt.inner_lr must be a finite number >= 0, got nan", []),
    ("epochs", -1, "ttt.epochs must be >= 0, got -1", [0]),
    ("step_windows", -1, "ttt.step_windows must be >= 0, got -1", [0]),
    ("micro_batch", 0, "ttt.micro_batch must be positive, got 0", [1]),
    ("grad_clip", -0.5, "ttt.grad_clip must be >= 0, got -0.5", [0.0]),
    ("max_tokens", -1, "ttt.max_tokens must be >= 0, got -1", [0]),
    ("heldout_tokens", -1, "ttt.heldout_tokens must be >= 0, got -1", [0]),
    ("dtype", "fp8", "ttt.dtype must be one of ['bf16', 'fp16', 'fp32'], got 'fp8'", ["fp32", "bf16", "fp16"]),
    ("checksum_every", -1, "ttt.checksum_every must be >= 0, got -1", [0]),
    ("diverge_bpb", -0.5, "ttt.diverge_bpb must be >= 0, got -0.5", [0.0]),
]


@pytest.mark.parametrize("field, bad, message, edges", REFUSED, ids=[f"{r[0]}={r[1]}" for r in REFUSED])
def test_each_setting_is_refused_past_its_edge_with_its_own_message_and_accepted_at_it(field, bad, message, edges):
    with pytest.raises(ValueError) as err:
        TTTConfig(**{field: bad}).validate()
    assert str(err.value) == message
    for ok in edges:
        TTTConfig(**{field: ok}).validate()


def test_phases_need_per_document_resets_and_are_accepted_with_them():
    TTTConfig(reset="document", phase_docs=1).validate()
    with pytest.raises(ValueError, match=r"^ttt.phase_docs=-1 needs ttt.reset=document"):
        TTTConfig(reset="document", phase_docs=-1).validate()


def test_dtypes_name_their_autocast_and_the_schedule_ends_at_zero():
    assert [TTTConfig(dtype=d).autocast_dtype for d in ("fp32", "bf16", "fp16")] == [None, torch.bfloat16, torch.float16]
    cos = TTTConfig(inner_lr=0.4, schedule="cosine")
    assert [lr_at(cos, k, 3) for k in range(3)] == pytest.approx([0.4, 0.2, 0.0])
    assert lr_at(cos, 0, 1) == 0.4  # one chunk: no schedule to follow
    assert [lr_at(cos, k, 2) for k in range(2)] == pytest.approx([0.4, 0.0])
    assert [lr_at(TTTConfig(inner_lr=0.4), k, 3) for k in range(3)] == [0.4, 0.4, 0.4]


def test_a_result_reads_its_bpb_and_throughput_off_its_total():
    done = TTTResult(total=Score(nll=8 * math.log(2), bytes=4.0, tokens=3000), seconds=2.0)
    assert (done.bpb, done.tokens_per_second) == (2.0, 1500.0)
    assert math.isnan(TTTResult(total=Score(1.0, 1.0, 10)).tokens_per_second)  # no time measured: no throughput


def test_dynamic_evaluation_steps_by_hand():
    """θ ← θ − η g/(√MS + ε) + min(1, λ √MS / mean √MS) (θ₀ − θ): two steps on three weights, one pull capped at 1."""
    p = torch.tensor([1.0, 2.0, 3.0], requires_grad=True)
    idle = torch.tensor([5.0], requires_grad=True)  # no gradient: left alone
    opt = DynEval([p, idle], lr=0.1, decay=0.9, ms=[torch.tensor([4.0, 1.0, 0.25]), torch.tensor([1.0])])
    rms = torch.tensor([2.0, 1.0, 0.5])
    pull = torch.clamp(0.9 * rms / (4.5 / 4), max=1.0)  # mean √MS over both tensors: (2 + 1 + 0.5 + 1) / 4
    assert pull[0] == 1.0 and pull[1] < 1.0  # the first weight's pull is capped
    p.grad = torch.ones(3)
    opt.step()  # no pull yet: θ = θ₀
    first = torch.tensor([1.0, 2.0, 3.0]) - 0.1 / rms
    torch.testing.assert_close(p.detach(), first, rtol=0, atol=1e-6)
    opt.step()
    want = first - 0.1 / rms + pull * (torch.tensor([1.0, 2.0, 3.0]) - first)
    torch.testing.assert_close(p.detach(), want, rtol=0, atol=1e-6)
    assert idle.item() == 5.0


def test_dynamic_evaluations_mean_squared_gradients_by_hand(random_gpt):
    model = copy.deepcopy(random_gpt)
    params = [model.tok_emb.weight]  # the tied embedding: every position's gradient reaches it
    seqs = torch.randint(4, 64, (2, 9), generator=torch.Generator().manual_seed(3))
    squares = []
    for row in seqs:
        model.zero_grad(set_to_none=True)
        token_nll(model, row[None, :-1], row[None, 1:]).mean().backward()
        squares.append(params[0].grad.detach().square())
    one = gradient_stats(model, params, seqs[:1])
    both = gradient_stats(model, params, seqs)
    torch.testing.assert_close(one[0], squares[0])  # one sequence: its own squared gradient, not halved
    torch.testing.assert_close(both[0], (squares[0] + squares[1]) / 2)
    assert params[0].grad is None  # the statistics leave no gradient behind
    seen = []
    hook = model.register_forward_hook(lambda m, a, out: seen.append(
        torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else None))
    gradient_stats(model, params, seqs[:1], torch.bfloat16)
    hook.remove()
    assert seen == [torch.bfloat16]  # the run's dtype reaches the forward


def test_each_optimizer_gets_the_settings_it_is_given():
    p = [torch.zeros(3, requires_grad=True)]
    cfg = TTTConfig(inner_lr=0.2, momentum=0.8, weight_decay=0.1)
    sgd = make_optimizer(cfg, p)
    assert type(sgd) is torch.optim.SGD
    assert [sgd.defaults[k] for k in ("lr", "momentum", "weight_decay")] == [0.2, 0.8, 0.1]
    adamw = make_optimizer(dataclasses.replace(cfg, optimizer="adamw"), p)
    assert type(adamw) is torch.optim.AdamW
    assert [adamw.defaults[k] for k in ("lr", "betas", "weight_decay")] == [0.2, (0.8, 0.999), 0.1]
    dyn = make_optimizer(dataclasses.replace(cfg, optimizer="dyneval", decay_to_start=0.5), p, [torch.ones(3)])
    assert type(dyn) is DynEval and dyn.defaults["lr"] == 0.2
    assert dyn.state[p[0]]["decay"].tolist() == [0.5, 0.5, 0.5]
    with pytest.raises(ValueError, match="^ttt.optimizer=dyneval needs the mean squared gradients of the train split"):
        make_optimizer(dataclasses.replace(cfg, optimizer="dyneval"), p)


def test_one_rank_divides_gradients_by_the_step_count_and_gives_an_untouched_weight_a_zero_one():
    used, unused = torch.ones(2, requires_grad=True), torch.ones(3, requires_grad=True)
    used.grad = torch.tensor([2.0, 6.0])
    sync_gradients_([used, unused], 4)
    assert used.grad.tolist() == [0.5, 1.5] and unused.grad.tolist() == [0.0, 0.0, 0.0]


def test_a_share_sums_on_the_streams_device(random_gpt, tokens, tables):
    """Run on `meta` (the stand-in for a GPU here): every tensor the step makes is on the stream's device."""
    model = copy.deepcopy(random_gpt).to("meta")
    meta_tables = DeviceTables(*(t.to("meta") for t in (tables.base_bytes, tables.has_leading_space, tables.is_boundary)))
    sums = backward_share_(model, tokens.to("meta"), plan_windows(1, 40, 32, 16), CFG, meta_tables)
    assert [(t.device.type, t.dtype) for t in sums] == [("meta", torch.float64)] * 2


def test_a_share_runs_in_micro_batches_under_the_runs_dtype_and_counts_a_sidecars_bytes(random_gpt, tokens, tables):
    model = copy.deepcopy(random_gpt)
    seen = []
    model.register_forward_hook(lambda m, args, out: seen.append(
        (args[0].shape[0], torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else None)))
    sidecar = 1 + np.arange(tokens.numel()) % 5  # a dataset's own bytes per token, unlike the tables'
    windows = plan_windows(1, 113, 32, 16)  # 7 windows of 16 targets: the first reads 16 tokens, the others 32
    cfg = dataclasses.replace(CFG, micro_batch=3, dtype="bf16")
    _, nbytes = backward_share_(model, tokens, windows, cfg, tables.for_stream(sidecar))
    assert seen == [(1, torch.bfloat16), (3, torch.bfloat16), (3, torch.bfloat16)]
    assert nbytes.item() == sidecar[1:113].sum()


def test_a_gradient_that_is_not_finite_inside_a_chunks_adaptation_ends_the_run_at_that_chunk(random_gpt, tokens, tables):
    """Two epochs at an absurd lr: the first step throws the weights to ~1e30, the second step's gradient is not
    finite. The run is diverged at chunk 0, where it happened, not at chunk 1's score."""
    wild = TTTConfig(**{**CFG.__dict__, "inner_lr": 1e30, "epochs": 2, "momentum": 0.0, "diverge_bpb": 0.0})
    out = run_ttt(copy.deepcopy(random_gpt), tokens[:401], tables, wild)
    assert out.diverged and out.diverged_chunk == 0 and len(out.chunks) == 1 and math.isfinite(out.chunks[0].nll)


def test_fused_scoring_saves_exactly_one_forward_per_adapted_chunk(random_gpt, tokens, tables):
    counts = []
    for fuse in (True, False):
        model = copy.deepcopy(random_gpt)
        calls = []
        model.register_forward_hook(lambda m, args, out, calls=calls: calls.append(args[0].shape[0]))
        run_ttt(model, tokens[:401], tables, dataclasses.replace(CFG, fuse_score=fuse))
        counts.append(sum(calls))
    assert counts[1] - counts[0] == 3 * 7  # three adapted chunks of 7 windows each: their scoring forward reused


def test_adapting_directly_takes_every_step_itself(random_gpt, tokens, tables):
    model = copy.deepcopy(random_gpt)
    params = list(model.parameters())
    before = [p.detach().clone() for p in params]
    opt = make_optimizer(CFG, params)
    bad = adapt_(model, opt, params, tokens, plan_windows(1, 101, 32, 16), CFG, 0.05, 1)
    assert not bool(bad) and any(not torch.equal(p, b) for p, b in zip(params, before))  # no fused step assumed


def test_the_seed_picks_the_lora_adapters_start(random_gpt, tokens, tables):
    runs = [[c.nll for c in run_ttt(copy.deepcopy(random_gpt), tokens[:401], tables,
                                    dataclasses.replace(CFG, params="lora:2", seed=seed)).chunks] for seed in (0, 1)]
    assert runs[0][0] == runs[1][0] and runs[0][1:] != runs[1][1:]  # the same first score, then other adapters


def test_divergence_is_judged_on_running_bpb_against_the_static_curve_to_the_margin(random_gpt, tokens, tables):
    """At lr 0 the run scores the real static curve S; handed a static curve of S − 0.5 bpb on every chunk, its
    running gap is 0.5 from the first chunk: diverged at a margin of 0.498, never at 0.502."""
    stream = tokens[:401]
    real = static_curve(random_gpt, stream, chunk_spans(400, 100), 32, 16, tables, 3)
    lower = [Score(s.nll - 0.5 * math.log(2) * s.bytes, s.bytes, s.tokens) for s in real]
    at = {}
    for margin in (0.498, 0.502):
        cfg = dataclasses.replace(CFG, inner_lr=0.0, diverge_bpb=margin)
        out = run_ttt(copy.deepcopy(random_gpt), stream, tables, cfg, lower)
        at[margin] = (out.diverged, out.diverged_chunk, len(out.chunks), out.world_size)
    assert at == {0.498: (True, 0, 1, 1), 0.502: (False, -1, 4, 1)}
    with pytest.raises(ValueError, match="^static curve has 3 chunks, the stream has 4$"):
        run_ttt(copy.deepcopy(random_gpt), stream, tables, CFG, real[:3])


def test_no_epochs_means_no_backward(random_gpt, tokens, tables):
    model = copy.deepcopy(random_gpt)
    run_ttt(model, tokens[:401], tables, dataclasses.replace(CFG, epochs=0))
    assert all(p.grad is None for p in model.parameters())  # scored only: no gradient was ever taken


def test_unfused_scoring_runs_in_micro_batches_under_the_runs_dtype(random_gpt, tokens, tables):
    model = copy.deepcopy(random_gpt)
    seen = set()
    model.register_forward_hook(lambda m, args, out: seen.add(
        (args[0].shape[0], torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else None)))
    run_ttt(model, tokens[:401], tables, dataclasses.replace(CFG, fuse_score=False, dtype="bf16", epochs=0))
    assert seen == {(1, torch.bfloat16), (3, torch.bfloat16)}  # 7 windows a chunk: the short first, then 3 and 3


def test_chunk_records_carry_the_signal_summed_and_the_lr_that_followed(random_gpt, tokens, tables):
    t0 = time.perf_counter()
    out = run_ttt(copy.deepcopy(random_gpt), tokens[:401], tables, CFG, signal=lambda: 2.5)
    wall = time.perf_counter() - t0
    got = out.chunks
    assert [c.signal for c in got] == [2.5] * 4
    assert [c.inner_lr for c in got] == [0.05, 0.05, 0.05, 0.0]  # nothing is adapted on after the last chunk
    assert [c.tokens_seen for c in got] == [100, 200, 300, 400] and all(c.bytes > 100 for c in got)
    assert all(c.adapt_seconds >= 0 for c in got) and sum(c.adapt_seconds for c in got) <= out.seconds  # durations
    assert 0 < out.seconds <= wall
    quiet = run_ttt(copy.deepcopy(random_gpt), tokens[:401], tables, CFG).chunks
    assert [c.signal for c in quiet] == [0.0] * 4


@pytest.mark.parametrize("every, checked", [(1, [0, 1, 2]), (2, [1]), (3, [2]), (0, [])])
def test_weights_are_compared_across_ranks_every_n_adapted_chunks(random_gpt, tokens, tables, monkeypatch, every, checked):
    seen = []
    monkeypatch.setattr(engine, "assert_same_weights", lambda params, where: seen.append((len(params), where)))
    out = run_ttt(copy.deepcopy(random_gpt), tokens[:401], tables, dataclasses.replace(CFG, checksum_every=every))
    n = len(list(random_gpt.parameters()))  # every adapted weight is compared
    assert seen == [(n, f"after chunk {k}") for k in checked]  # the last chunk is not adapted on: nothing to compare
    windows = [plan_windows(a, a + 100, 32, 16) for a in (1, 101, 201)]  # the three adapted chunks
    assert out.trained_targets == sum(w.scored for ws in windows for w in ws) == 300
    assert out.trained_positions == sum(w.stop - w.start for ws in windows for w in ws)


@pytest.mark.parametrize("at, stopped, scored", [(0, True, 1), (2, True, 3), (3, False, 4)])
def test_a_stop_asked_for_after_a_chunk_ends_the_run_there_unless_it_was_the_last(random_gpt, tokens, tables, at,
                                                                                  stopped, scored):
    """The early stopper's answer to a chunk's record: the run ends after that chunk, marked stopped; a stop asked for
    after the last chunk stops nothing, and the run is complete."""
    asked = []
    out = run_ttt(copy.deepcopy(random_gpt), tokens[:401], tables, CFG,
                  on_chunk=lambda record: asked.append(record.chunk) or record.chunk == at)
    assert out.stopped is stopped and not out.diverged
    assert asked == list(range(scored)) and [c.chunk for c in out.chunks] == list(range(scored))
