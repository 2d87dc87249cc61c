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


def test_eval_segment_cap_and_seed():
    tokens = np.concatenate([[1] + [doc + 4] * 99 for doc in range(50)])  # 50 distinct documents of 100 tokens
    assert data.eval_segment(tokens, 0, 3) is tokens
    seg0 = data.eval_segment(tokens, 300, 0)
    assert seg0.size == 301 and seg0[0] == 1
    starts = []
    for seed in range(1, 6):
        seg = data.eval_segment(tokens, 300, seed)
        start = next(s for s in range(0, tokens.size - 300, 100) if np.array_equal(tokens[s : s + 301], seg))
        starts.append(start)
        assert seg.size == 301 and seg[0] == data.BOS_ID
    assert len(set(starts)) > 1  # other seeds start at other documents
