import numpy as np
import pytest

from e2ettt import data


def test_shard_round_trip(tmp_path):
    tokens = np.random.default_rng(0).integers(0, 65536, size=5000)
    path = data.write_shard(tmp_path / "x_val_000000.bin", tokens)
    assert path.stat().st_size == 1024 + 2 * 5000
    np.testing.assert_array_equal(data.read_shard(path), tokens)
    np.testing.assert_array_equal(data.load_tokens(tmp_path, "val"), tokens)


def _corrupt(tmp_path, mutate):
    path = data.write_shard(tmp_path / "x_val_000000.bin", np.arange(100))
    raw = bytearray(path.read_bytes())
    path.write_bytes(bytes(mutate(raw)))
    return path


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda b: b[:500], "shorter than the 1024-byte header"),
        (lambda b: b"\x00\x00\x00\x00" + b[4:], "bad magic 0"),
        (lambda b: b[:4] + (2).to_bytes(4, "little") + b[8:], "unsupported shard version 2"),
        (lambda b: b[:-2], "truncated or trailing"),
        (lambda b: b + b"\x00\x00", "truncated or trailing"),
        (lambda b: b[:8] + (-5).to_bytes(4, "little", signed=True) + b[12:], "negative token count"),
    ],
)
def test_corrupt_shard_names_file_and_problem(tmp_path, mutate, message):
    path = _corrupt(tmp_path, mutate)
    with pytest.raises(data.ShardError) as err:
        data.read_shard(path)
    assert str(path) in str(err.value) and message in str(err.value)


def test_missing_shards_and_tokens_outside_vocab(tmp_path):
    with pytest.raises(data.ShardError, match="no \\*_val_\\*.bin shards"):
        data.load_tokens(tmp_path, "val")
    data.write_shard(tmp_path / "x_val_000000.bin", np.array([1, 5, 2000]))
    with pytest.raises(data.ShardError, match="token id 2000 is outside the tokenizer's vocabulary of 1024"):
        data.load_tokens(tmp_path, "val", vocab_size=1024)


def test_seeds_get_distinct_non_overlapping_segments_at_document_starts():
    tokens = np.concatenate([[1] + [doc + 4] * 99 for doc in range(50)])  # 50 distinct documents of 100 tokens
    seg0 = data.eval_segment(tokens, 300, 0)
    assert seg0.size == 301 and data.segment_start(tokens, 300, 0) == 0  # seed 0: the start of the stream
    starts = data.segment_starts(tokens, 300)
    assert len(starts) == 12 and len(set(starts)) == 12  # 0, 400, ..., 4400: every segment of 301 tokens fits
    spans = sorted((s, s + 301) for s in starts)
    assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:]))  # no two seeds share a token
    for seed, start in enumerate(starts):
        seg = data.eval_segment(tokens, 300, seed)
        assert seg.size == 301 and seg[0] == data.BOS_ID and np.array_equal(seg, tokens[start : start + 301])
    assert starts[1:4] != [400, 800, 1200]  # seeds 1..3 sample across the stream, not its first documents
    with pytest.raises(ValueError, match="ttt.seed=12: the validation stream holds 12 non-overlapping segments"):
        data.segment_start(tokens, 300, 12)


def test_seeds_that_cannot_mean_other_text_are_refused():
    tokens = np.concatenate([[1] + [doc + 4] * 99 for doc in range(50)])
    assert data.eval_segment(tokens, 0, 0) is tokens
    with pytest.raises(ValueError, match="ttt.seed=3 without a token cap .* every seed would evaluate the same tokens"):
        data.eval_segment(tokens, 0, 3)
    with pytest.raises(ValueError, match="without a token cap"):
        data.eval_segment(tokens, 10_000, 1)  # a cap that covers the stream is no cap
    no_bos = tokens.copy()
    no_bos[no_bos == data.BOS_ID] = 5
    assert data.segment_start(no_bos, 300, 0) == 0
    with pytest.raises(ValueError, match="holds 1 non-overlapping segments .* starting at a document"):
        data.segment_start(no_bos, 300, 1)


def test_a_token_limit_reads_only_the_shards_it_needs(tmp_path):
    data.write_shard(tmp_path / "x_train_000000.bin", np.arange(100))
    data.write_shard(tmp_path / "x_train_000001.bin", np.arange(100, 200))
    (tmp_path / "x_train_000002.bin").write_bytes(b"not a shard")  # never opened under a limit of 150
    np.testing.assert_array_equal(data.load_tokens(tmp_path, "train", limit=150), np.arange(150))
    with pytest.raises(data.ShardError, match="x_train_000002.bin"):
        data.load_tokens(tmp_path, "train")
