import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from e2ettt import data
from e2ettt.checkpoint import load_model
from e2ettt.demo import load_documents
from e2ettt.evaluate import DeviceTables, as_tensor, chunk_spans, eval_val, plan_windows, score_windows
from e2ettt.tokenizer import ByteTables, build_byte_tables, load_tokenizer


@pytest.mark.parametrize("context, stride", [(16, 16), (16, 5), (7, 1)])
def test_windows_score_every_target_once_within_context(context, stride):
    windows = plan_windows(3, 101, context, stride)
    scored = [t for w in windows for t in range(w.stop + 1 - w.scored, w.stop + 1)]
    assert scored == list(range(3, 101))
    for w in windows:
        assert 0 <= w.start and w.stop - w.start <= context and w.scored <= w.stop - w.start


def test_every_target_is_scored_from_the_tokens_before_it_only(random_gpt):
    """Batched, masked window scores equal one forward per target over its window's tokens before it, and the bytes
    the tables' count of each (previous, target) pair."""
    rng = np.random.default_rng(0)
    tables = ByteTables(rng.integers(0, 4, 64).astype(np.int16), rng.random(64) < 0.4, rng.random(64) < 0.2)
    tokens = torch.randint(0, 64, (120,), generator=torch.Generator().manual_seed(0))
    windows = plan_windows(1, 120, 16, 5)
    got = score_windows(random_gpt, tokens, windows, DeviceTables.from_tables(tables), micro_batch=4)
    nll = 0.0
    with torch.no_grad():
        for w in windows:
            for t in range(w.stop + 1 - w.scored, w.stop + 1):
                logits = random_gpt(tokens[w.start : t][None])[0, -1]
                nll += float(F.cross_entropy(logits.double(), tokens[t]))
    ids = tokens.numpy()
    assert got.tokens == 119
    assert got.bytes == int(tables.count_bytes(ids[:-1], ids[1:]).sum())
    assert got.nll == pytest.approx(nll, rel=1e-6)


def test_chunk_larger_than_stream_is_a_clear_error():
    with pytest.raises(ValueError, match="chunk_tokens=500 is larger than the 99 target tokens"):
        chunk_spans(99, 500)


def test_bpb_matches_an_independent_computation(tiny_inputs):
    """Naive per-window loss and bytes from decoded text agree with eval_val."""
    sp = load_tokenizer(tiny_inputs.tokenizer)
    model = load_model(tiny_inputs.checkpoint, tiny_inputs.model, vocab_size=tiny_inputs.model.vocab_size)
    docs = load_documents(30)[:3]
    stream = np.concatenate([[data.BOS_ID] + sp.encode(t) for _, t in docs])
    T = 64
    usable = ((stream.size - 1) // T) * T
    tokens = as_tensor(stream)
    score = eval_val(model, tokens, T, DeviceTables.from_tables(build_byte_tables(sp)), micro_batch=3)

    nll, count = 0.0, 0
    with torch.no_grad():
        for i in range(usable // T):
            x = tokens[i * T : (i + 1) * T][None]
            y = tokens[i * T + 1 : (i + 1) * T + 1]
            nll += float(F.cross_entropy(model(x)[0].double(), y, reduction="sum"))
            count += T
    # bytes: UTF-8 length of the text each target adds, read off the decoder
    ids = stream[: usable + 1].tolist()
    doc_start = 0
    nbytes = 0
    for j in range(1, len(ids)):
        if ids[j] == data.BOS_ID:
            doc_start = j
            continue
        before = sp.decode(ids[doc_start + 1 : j]) if j > doc_start + 1 else ""
        after = sp.decode(ids[doc_start + 1 : j + 1])
        nbytes += len(after.encode()) - len(before.encode())
    assert score.tokens == count
    assert score.bytes == nbytes
    assert score.bpb == pytest.approx(nll / (math.log(2) * nbytes), abs=1e-6)
    # parameter-golf's formula: (loss/tokens)/ln2 * tokens/bytes
    assert score.bpb == pytest.approx((score.nll / count) / math.log(2) * count / score.bytes, abs=1e-12)


def test_sliding_windows_do_not_change_the_targets(tiny_inputs, random_gpt):
    tokens = torch.randint(0, 64, (300,))
    tables = DeviceTables.from_tables(build_byte_tables(load_tokenizer(tiny_inputs.tokenizer), 64))
    a = score_windows(random_gpt, tokens, plan_windows(1, 300, 32), tables)
    b = score_windows(random_gpt, tokens, plan_windows(1, 300, 32, 8), tables)
    assert a.tokens == b.tokens == 299 and a.bytes == b.bytes and a.nll != b.nll


def spy_batches(model) -> list:
    """(batch size, autocast dtype or None) of each forward of `model`."""
    calls = []
    model.register_forward_hook(lambda m, args, out: calls.append(
        (args[0].shape[0], torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else None)))
    return calls


def test_scores_batch_16_windows_by_default_and_pass_micro_batch_and_dtype_on(random_gpt):
    """score_windows, static_curve and eval_val: micro-batches of 16 unless told, under the dtype they are given."""
    from e2ettt.evaluate import Span, static_curve

    tables = DeviceTables.from_tables(ByteTables(np.ones(64, np.int16), np.zeros(64, bool), np.zeros(64, bool)))
    tokens = torch.randint(0, 64, (20 * 8 + 1,), generator=torch.Generator().manual_seed(0))
    windows = plan_windows(1, 161, 8)  # 20 windows of 8
    calls = spy_batches(random_gpt)
    for score in (lambda **kw: score_windows(random_gpt, tokens, windows, tables, **kw),
                  lambda **kw: static_curve(random_gpt, tokens, [Span(1, 161)], 8, None, tables, **kw),
                  lambda **kw: eval_val(random_gpt, tokens, 8, tables, **kw)):
        calls.clear()
        score()
        assert calls == [(16, None), (4, None)]
        calls.clear()
        score(micro_batch=5, dtype=torch.bfloat16)
        assert calls == [(5, torch.bfloat16)] * 4
        calls.clear()
        score(micro_batch=10, dtype=torch.float16)  # not the CPU's default autocast dtype
        assert calls == [(10, torch.float16)] * 2


def test_eval_val_scores_whole_windows_of_the_stream_as_parameter_golf_cuts_it(random_gpt):
    tables = DeviceTables.from_tables(ByteTables(np.ones(64, np.int16), np.zeros(64, bool), np.zeros(64, bool)))
    for n, scored in [(2 * 8 + 1, 16), (3 * 8, 16), (3 * 8 + 1, 24)]:  # ((n - 1) // 8) * 8 targets
        tokens = torch.randint(0, 64, (n,), generator=torch.Generator().manual_seed(n))
        got = eval_val(random_gpt, tokens, 8, tables)
        assert (got.tokens, got.bytes) == (scored, scored)


def test_a_byte_sidecar_gives_each_target_its_own_bytes(random_gpt):
    """for_stream: the sidecar's entries at the scored targets' positions, float64, on the tables' device; without
    a sidecar the tables themselves."""
    tables = DeviceTables.from_tables(ByteTables(np.ones(64, np.int16), np.zeros(64, bool), np.zeros(64, bool)))
    assert tables.for_stream(None) is tables
    tokens = torch.randint(0, 64, (41,), generator=torch.Generator().manual_seed(1))
    sidecar = np.arange(41, dtype=np.uint16) % 7 + 1
    with_sidecar = tables.for_stream(sidecar)
    assert with_sidecar.stream_bytes.dtype == torch.float64 and with_sidecar.stream_bytes.device == torch.device("cpu")
    on_meta = DeviceTables.from_tables(ByteTables(np.ones(64, np.int16), np.zeros(64, bool), np.zeros(64, bool)), "meta")
    assert [(t.dtype, t.device.type) for t in (on_meta.base_bytes, on_meta.has_leading_space, on_meta.is_boundary)] == [
        (torch.float64, "meta"), (torch.bool, "meta"), (torch.bool, "meta")]  # byte sums in float64 on any path
    assert on_meta.for_stream(sidecar).stream_bytes.device.type == "meta"  # the tables' device, as a GPU's would be
    assert torch.equal(with_sidecar.stream_bytes, torch.as_tensor(sidecar, dtype=torch.float64))
    got = score_windows(random_gpt, tokens, plan_windows(5, 41, 8, 3), with_sidecar, micro_batch=3)
    assert got.tokens == 36 and got.bytes == float(sidecar[5:41].sum())
    plain = score_windows(random_gpt, tokens, plan_windows(5, 41, 8, 3), tables, micro_batch=3)
    assert plain.bytes == 36.0 and plain.nll == pytest.approx(got.nll, rel=1e-12)


def test_document_spans_start_after_each_bos_and_read_back_to_it():
    """BOS (1) at 2, 5, 9, 10, 17 and 19; targets [7, 19): the first document began before `first` (its windows read
    back to the BOS at 5), a BOS as a target opens the next document at the target after it, and a BOS at the last
    target or past it opens none. The stream's first chunk opens it (TTT starts there from the starting weights)."""
    from e2ettt.evaluate import Span, document_spans

    ids = np.full(24, 7)
    ids[[2, 5, 9, 10, 17, 19]] = 1
    assert document_spans(ids, 7, 19, 2) == [
        Span(7, 9, 5, True), Span(9, 10, 5, False),  # the first document's targets 7..9, the BOS at 9 included
        Span(10, 11, 9, True),  # the BOS at 10 is the one-target document after the BOS at 9
        Span(11, 13, 10, True), Span(13, 15, 10, False), Span(15, 17, 10, False), Span(17, 18, 10, False),
        Span(18, 19, 17, True),  # the BOS at 17 opens the document of target 18; the BOS at 19 is past the end
    ]
    ids[18] = 1  # the last target is a BOS: the document after it has no targets here
    assert document_spans(ids, 7, 19, 20) == [Span(7, 10, 5, True), Span(10, 11, 9, True), Span(11, 18, 10, True),
                                              Span(18, 19, 17, True)]
    assert document_spans(ids, 3, 6, 1) == [Span(3, 4, 2, True), Span(4, 5, 2, False), Span(5, 6, 2, False)]
    assert document_spans(ids, 6, 8, 1)[0] == Span(6, 7, 5, True)  # the BOS right before `first`
    assert document_spans(ids, 9, 12, 4) == [Span(9, 10, 5, True), Span(10, 11, 9, True), Span(11, 12, 10, True)]
    with pytest.raises(ValueError, match="^chunk_tokens must be positive, got 0$"):
        document_spans(ids, 7, 19, 0)


def test_plan_spans_cut_the_targets_from_first_and_refuse_a_chunk_larger_than_them():
    from e2ettt.evaluate import Span, plan_spans

    ids = np.full(20, 7)
    ids[[2, 9]] = 1
    assert plan_spans(ids, 5, 10, 4, False) == [Span(5, 9), Span(9, 13), Span(13, 15)]
    assert plan_spans(torch.as_tensor(ids), 5, 10, 4, True) == [Span(5, 9, 2, True), Span(9, 10, 2, False),
                                                                 Span(10, 14, 9, True), Span(14, 15, 9, False)]
    assert plan_spans(ids, 5, 10, 4, True) == plan_spans(torch.as_tensor(ids), 5, 10, 4, True)  # numpy ids too
    for by_document in (False, True):
        with pytest.raises(ValueError, match="^chunk_tokens=12 is larger than the 10 target tokens"):
            plan_spans(ids, 5, 10, 12, by_document)
    assert chunk_spans(10, 10) == [(1, 11)] and chunk_spans(3, 1, 4) == [(4, 5), (5, 6), (6, 7)]
    with pytest.raises(ValueError, match="^chunk_tokens must be positive, got 0$"):
        chunk_spans(10, 0)


def test_as_tensor_is_int64_on_the_device_asked():
    t = as_tensor(np.array([1, 65535], dtype=np.uint16), "meta")
    assert t.dtype == torch.int64 and t.device.type == "meta"
    assert as_tensor(np.array([1, 65535], dtype=np.uint16)).tolist() == [1, 65535]


def test_evenly_spaced_windows_are_one_view_of_the_stream_and_others_a_copy_with_the_same_tokens():
    """batch_tensors: inputs, targets and mask of a group, read from the stream without a copy when the windows are
    evenly spaced (the fast path), stacked otherwise; the mask marks each window's last `scored` targets."""
    from e2ettt.evaluate import Window, batch_tensors

    stream = torch.arange(100)
    for group in ([Window(0, 8, 8), Window(8, 16, 8), Window(16, 24, 8)],  # non-overlapping
                  [Window(3, 11, 2), Window(5, 13, 2), Window(7, 15, 2)],  # sliding, stride 2
                  [Window(4, 12, 8)],  # one window
                  [Window(0, 8, 8), Window(8, 16, 8)],  # two
                  [Window(0, 8, 8), Window(1, 9, 1), Window(2, 10, 1)],  # stride 1, first window scores all
                  [Window(0, 8, 8), Window(10, 18, 3), Window(12, 20, 3)]):  # uneven: a copy
        x, y, mask = batch_tensors(stream, group)
        assert x.tolist() == [list(range(w.start, w.stop)) for w in group]
        assert y.tolist() == [list(range(w.start + 1, w.stop + 1)) for w in group]
        assert mask.tolist() == [[i >= 8 - w.scored for i in range(8)] for w in group]
        steps = {b.start - a.start for a, b in zip(group, group[1:])}
        if len(steps) <= 1:  # a view: nothing copied, nothing waits for the device
            assert x.untyped_storage().data_ptr() == stream.untyped_storage().data_ptr()
        else:
            assert x.untyped_storage().data_ptr() != stream.untyped_storage().data_ptr()
        assert {t.device.type for t in batch_tensors(stream.to("meta"), group)} == {"meta"}  # as on a GPU


def test_plan_windows_by_hand_and_what_they_refuse():
    assert plan_windows(1, 10, 4) == plan_windows(1, 10, 4, 4) == [(0, 4, 4), (4, 8, 4), (5, 9, 1)]
    assert plan_windows(2, 8, 4, 1, floor=1) == [(1, 2, 1), (1, 3, 1), (1, 4, 1), (1, 5, 1), (2, 6, 1), (3, 7, 1)]
    assert plan_windows(3, 9, 4, 3) == [(1, 5, 3), (4, 8, 3)]
    with pytest.raises(ValueError, match=r"^target positions start at 1 \(token 0 has no predecessor\)$"):
        plan_windows(0, 10, 4)
    for stride in (-1, 5):
        with pytest.raises(ValueError, match=rf"^stride must be in \(0, context=4\], got {stride}$"):
            plan_windows(1, 10, 4, stride)
