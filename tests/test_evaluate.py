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
