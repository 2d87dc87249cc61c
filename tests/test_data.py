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


def test_seeds_get_distinct_non_overlapping_segments_spread_through_the_stream():
    tokens = np.concatenate([[1] + [doc + 4] * 96 for doc in range(50)])  # 50 documents of 97 tokens: 4,849 targets
    assert data.segment_start(tokens, 300, 0) == 0 and data.eval_segment(tokens, 300, 0).size == 301  # seed 0: the start
    starts = data.segment_starts(tokens, 300)
    assert sorted(starts) == [300 * i for i in range(16)]  # every slot of 300 targets, each a seed's
    targets = [set(range(s + 1, s + 301)) for s in starts]
    assert all(a.isdisjoint(b) for i, a in enumerate(targets) for b in targets[i + 1 :])  # no target scored twice
    assert any(tokens[s] != data.BOS_ID for s in starts)  # segments start inside documents too
    assert starts[1:4] != [300, 600, 900]  # seeds 1..3 sample across the stream, not its opening
    with pytest.raises(ValueError, match="ttt.seed=16: the validation stream holds 16 non-overlapping segments"):
        data.segment_start(tokens, 300, 16)


def test_a_segment_may_carry_earlier_tokens_as_context():
    tokens = np.arange(1000)
    seg = data.segment(tokens, 600, 300, prefix=100)
    assert seg[0] == 500 and seg[100] == 600 and seg[-1] == 900  # 100 tokens of context, then the segment's 301
    assert data.segment(tokens, 0, 0, prefix=50) is tokens  # no cap: the whole stream, nothing before it


def test_seeds_that_cannot_mean_other_text_are_refused():
    tokens = np.concatenate([[1] + [doc + 4] * 99 for doc in range(50)])
    assert data.eval_segment(tokens, 0, 0) is tokens
    with pytest.raises(ValueError, match="ttt.seed=3 without a token cap .* every seed would evaluate the same tokens"):
        data.eval_segment(tokens, 0, 3)
    with pytest.raises(ValueError, match="without a token cap"):
        data.eval_segment(tokens, 10_000, 1)  # a cap that covers the stream is no cap


def test_calibration_sequences_come_from_across_the_split(tmp_path):
    data.write_shard(tmp_path / "x_train_000000.bin", np.arange(1000) % 60000)
    data.write_shard(tmp_path / "x_train_000001.bin", np.arange(1000, 3000) % 60000)
    seqs = data.spread_sequences(tmp_path, "train", 4, 10).reshape(4, 10)
    assert seqs[0, 0] == 0 and seqs[-1, -1] == 2999  # from the first token to the last, across both shards
    assert (np.diff(seqs, axis=1) == 1).all()  # each a contiguous run of the stream (one crosses the shard boundary)
    assert len(set(seqs[:, 0] // 1000)) == 3  # not all from the first shard
    with pytest.raises(data.ShardError, match="fewer than one sequence of 5000"):
        data.spread_sequences(tmp_path, "train", 1, 5000)


def test_a_token_limit_reads_only_the_shards_it_needs(tmp_path):
    data.write_shard(tmp_path / "x_train_000000.bin", np.arange(100))
    data.write_shard(tmp_path / "x_train_000001.bin", np.arange(100, 200))
    (tmp_path / "x_train_000002.bin").write_bytes(b"not a shard")  # never opened under a limit of 150
    np.testing.assert_array_equal(data.load_tokens(tmp_path, "train", limit=150), np.arange(150))
    with pytest.raises(data.ShardError, match="x_train_000002.bin"):
        data.load_tokens(tmp_path, "train")


def test_sequences_spread_over_three_shards_are_the_streams_own_runs(tmp_path):
    """spread_sequences by hand: `count` runs of `seq_len` at np.linspace offsets over the whole split, read across
    shard ends, int64; a token id at the vocabulary's size is refused, one below it is not."""
    sizes = [7, 5, 9]
    stream = np.arange(sum(sizes)) + 40
    for i, (a, b) in enumerate(zip(np.cumsum([0, *sizes[:-1]]), np.cumsum(sizes))):
        data.write_shard(tmp_path / f"x_train_00000{i}.bin", stream[a:b])
    seqs = data.spread_sequences(tmp_path, "train", 5, 4)
    offsets = np.linspace(0, stream.size - 4, 5).round().astype(int)  # 0, 4, 8, 13, 17: 4 and 17 cross shard ends
    assert seqs.dtype == np.int64
    np.testing.assert_array_equal(seqs, np.concatenate([stream[o : o + 4] for o in offsets]))
    np.testing.assert_array_equal(data.spread_sequences(tmp_path, "train", 1, 13), stream[:13])  # across all three
    assert data.spread_sequences(tmp_path, "train", 1, 4).dtype == np.int64  # one shard's tokens only: int64 too
    assert data.spread_sequences(tmp_path, "train", 9, 4, vocab_size=int(stream.max()) + 1).size == 20  # 21 // 4 = 5
    with pytest.raises(data.ShardError) as err:
        data.spread_sequences(tmp_path, "train", 5, 4, vocab_size=int(stream.max()))
    assert str(err.value) == (f"{tmp_path}: train token id {stream.max()} is outside the tokenizer's vocabulary of "
                              f"{stream.max()} (shards made with another tokenizer?)")


def test_byte_sidecars_load_as_one_int64_stream_beside_their_shards(tmp_path):
    assert data.load_sidecar(tmp_path, "val") is None
    for i, n in enumerate((6, 4)):
        data.write_shard(tmp_path / f"x_val_00000{i}.bin", np.arange(n))
        data.write_shard(tmp_path / f"x_val_bytes_00000{i}.bin", np.arange(n) + 100 * i + 1)
    got = data.load_sidecar(tmp_path, "val")
    assert got.dtype == np.int64
    np.testing.assert_array_equal(got, [1, 2, 3, 4, 5, 6, 101, 102, 103, 104])
    data.write_shard(tmp_path / "x_val_bytes_000001.bin", np.arange(3))
    with pytest.raises(data.ShardError) as err:
        data.load_sidecar(tmp_path, "val")
    assert str(err.value) == f"{tmp_path / 'x_val_bytes_000001.bin'}: 3 entries for the 4 tokens of x_val_000001.bin"


def test_the_held_out_slice_is_the_streams_last_targets_and_must_fit_beside_a_segment():
    tokens = np.arange(101)  # 100 targets
    assert data.heldout_span(tokens, 10, 5) == (96, 101)
    assert data.heldout_span(tokens, 10, 1) == (100, 101)
    assert data.heldout_span(tokens, 10, 0) is None and data.heldout_span(tokens, 0, 5) is None  # no slice; no cap
    assert data.heldout_span(tokens, 10, 90) == (11, 101)  # 90 + 10 + 1 = 101 tokens: just fits
    # a cap covers the stream when it leaves no target out: none (0), or at least the stream's 100 targets
    assert [data.covers_stream(tokens, m) for m in (0, 1, 99, 100, 101)] == [True, False, False, True, True]
    with pytest.raises(ValueError) as err:
        data.heldout_span(tokens, 10, 91)
    assert str(err.value) == ("ttt.heldout_tokens=91 and ttt.max_tokens=10 do not both fit the validation stream of "
                              "100 targets")


def test_eval_segment_is_seed_0_without_a_held_out_slice_unless_told():
    tokens = np.arange(101)  # 100 targets: 10 slots of 10, or 9 beside a held-out slice
    np.testing.assert_array_equal(data.eval_segment(tokens, 10), tokens[:11])
    for seed in (2, 5):
        for heldout in (0, 5):
            start = data.segment_starts(tokens, 10, heldout)[seed]
            np.testing.assert_array_equal(data.eval_segment(tokens, 10, seed, heldout) if heldout else
                                          data.eval_segment(tokens, 10, seed), tokens[start : start + 11])
    assert data.segment_starts(tokens, 10) != data.segment_starts(tokens, 10, 5)


def test_seed_starts_by_hand_and_what_a_seed_too_many_is_told():
    """The slots and their shuffled order pinned on a small stream (a change would move every seed's text), and
    segment_start's three refusals word for word."""
    tokens = np.arange(101)  # 100 targets: 10 slots of 10
    assert data.segment_starts(tokens, 10) == [0, 50, 60, 30, 70, 40, 90, 80, 10, 20]
    assert data.segment_starts(tokens, 10, 5) == [0, 30, 50, 40, 70, 60, 10, 20, 80]  # 95 // 10 slots beside 5 held out
    assert data.segment_starts(tokens, 10, 1) == [0, 30, 50, 40, 70, 60, 10, 20, 80]
    assert data.segment_starts(np.arange(15), 10) == [0]  # one slot: seed 0 alone
    assert data.segment_start(tokens, 10) == 0 and data.segment_start(tokens, 10, 2) == 60
    assert data.segment_start(tokens, 10, 2, heldout=1) == 50 and data.segment_start(tokens, 0) == 0
    for args, says in [((0, 1), "ttt.seed=1 without a token cap smaller than the stream (100 targets): every seed would "
                                "evaluate the same tokens; set ttt.max_tokens (--max-tokens) or use seed 0"),
                       ((10, 10), "ttt.seed=10: the validation stream holds 10 non-overlapping segments of 10 tokens, "
                                  "so seeds 0..9 are available; lower ttt.max_tokens or use fewer seeds"),
                       ((10, 9, 5), "ttt.seed=9: the validation stream holds 9 non-overlapping segments of 10 tokens "
                                    "besides its held-out last 5, so seeds 0..8 are available; lower ttt.max_tokens or "
                                    "use fewer seeds"),
                       ((10, -1), "ttt.seed must be >= 0, got -1")]:
        with pytest.raises(ValueError) as err:
            data.segment_start(tokens, *args)
        assert str(err.value) == says


def test_the_validation_cut_keeps_whole_windows_and_one_target_more():
    # parameter-golf's load_validation_tokens: ((N-1)//T)*T + 1 tokens, the first ones
    assert data.truncate_for_eval(np.arange(11), 4).tolist() == list(range(9))
    assert data.truncate_for_eval(np.arange(9), 4).tolist() == list(range(9))
    assert data.truncate_for_eval(np.arange(5), 4).tolist() == list(range(5))
    assert data.truncate_for_eval(np.arange(2), 1).tolist() == [0, 1]  # one window of one token
    with pytest.raises(data.ShardError, match="^validation stream of 4 tokens is shorter than one window of 4$"):
        data.truncate_for_eval(np.arange(4), 4)


def test_shards_of_no_token_and_one_token_and_the_uint16_edges(tmp_path):
    empty = data.write_shard(tmp_path / "x_val_000000.bin", np.array([], dtype=np.int64))
    assert empty.stat().st_size == 1024  # a header and nothing else is a valid shard
    tokens = data.read_shard(empty)
    assert tokens.size == 0 and tokens.dtype == np.uint16
    one = data.read_shard(data.write_shard(tmp_path / "x_val_000001.bin", np.array([65535])))
    assert one.tolist() == [65535] and one.dtype == np.uint16
    assert not one.flags.writeable  # memory-mapped read-only: no caller can write into a user's shard
    for bad, shown in ((-1, "[-1, 5]"), (65536, "[5, 65536]")):
        with pytest.raises(ValueError, match=rf"y.bin: token ids must fit in uint16, got range \{shown}"):
            data.write_shard(tmp_path / "y.bin", np.array([bad, 5]) if bad < 0 else np.array([5, bad]))
    assert not (tmp_path / "y.bin").exists() and sorted(p.name for p in tmp_path.iterdir()) == [
        "x_val_000000.bin", "x_val_000001.bin"]  # nothing half-written, no temporary file left


def test_missing_files_and_directories_are_named(tmp_path):
    with pytest.raises(data.ShardError, match=r"nope.bin: no such shard file$"):
        data.read_shard(tmp_path / "nope.bin")
    with pytest.raises(data.ShardError, match=r"absent: data directory does not exist$"):
        data.find_shards(tmp_path / "absent", "val")


def test_the_first_id_past_the_vocabulary_is_refused_and_the_last_inside_it_is_not(tmp_path):
    data.write_shard(tmp_path / "x_val_000000.bin", np.array([1, 1023]))
    assert data.load_tokens(tmp_path, "val", vocab_size=1024).tolist() == [1, 1023]
    with pytest.raises(data.ShardError, match="token id 1023 is outside the tokenizer's vocabulary of 1023"):
        data.load_tokens(tmp_path, "val", vocab_size=1023)
