"""Persistence: what TTT learnt, scored statically on the held-out slice that no segment touches, as adapted and as
put back on the regime's grid; a stream that TTT can only track gains in-stream and not on the slice."""
import shutil

import numpy as np

from e2ettt import data
from e2ettt.plan import segments
from e2ettt.quant.regimes import QuantConfig
from e2ettt.source import SourceConfig, load_split, resolve
from e2ettt.ttt import TTTConfig

from .trials import trial_rows

QUANT = QuantConfig(min_numel=1024)


def inputs_of(assets, data_dir=None):
    return resolve(SourceConfig(checkpoint=str(assets.checkpoint), data=str(data_dir or assets.data_dir),
                                tokenizer=str(assets.tokenizer)))


def test_at_lr_0_the_adapted_and_requantized_weights_score_the_held_out_slice_as_the_quantized_ones(tiny_demo):
    ttts = [TTTConfig(inner_lr=lr, chunk_tokens=256, context=128, max_tokens=1024, heldout_tokens=1024)
            for lr in (0.0, 0.1)]
    rows = {(i, seed): m for i, seed, m in trial_rows(inputs_of(tiny_demo), "int3", ttts, [1, 2], QUANT)}
    assert len(rows) == 4 and all(m.status == "ok" for m in rows.values())
    for seed in (1, 2):
        still, moved = rows[0, seed], rows[1, seed]
        assert still.heldout_quant_bpb > still.heldout_fp_bpb  # int3 damages the slice too
        assert still.heldout_adapted_bpb == still.heldout_quant_bpb  # nothing learnt: the same weights, to the bit
        assert still.heldout_requant_bpb == still.heldout_quant_bpb  # and the grid gives back its own codes
        assert moved.heldout_adapted_bpb != moved.heldout_quant_bpb
        assert moved.heldout_requant_bpb not in (moved.heldout_adapted_bpb, moved.heldout_quant_bpb)
    assert rows[0, 1].heldout_quant_bpb == rows[0, 2].heldout_quant_bpb  # one slice for every seed


def test_a_stream_that_can_only_be_tracked_gains_in_stream_and_not_on_the_held_out_slice(tiny_demo, tmp_path):
    """Each segment's text has its 16 commonest tokens shifted one place among themselves (a cipher the model has
    never seen); the held-out slice keeps the plain text. TTT learns the cipher where it trains, so it recovers
    in-stream; what it learnt does nothing for plain text, so persistent recovery is about zero or below."""
    ttt = TTTConfig(inner_lr=0.3, chunk_tokens=256, context=128, max_tokens=1024, heldout_tokens=1024)
    seeds = [1, 2, 3]
    val = np.array(load_split(inputs_of(tiny_demo), "val"))
    common = np.argsort(np.bincount(val, minlength=1024))[::-1][:16]
    shifted = np.arange(1024)
    shifted[common] = np.roll(common, 1)
    starts = segments(val, ttt.max_tokens, seeds, [ttt.chunk_tokens], ttt.heldout_tokens)
    for start in starts.values():
        span = slice(start - ttt.context, start + ttt.max_tokens + 1)
        val[span] = shifted[val[span]]
    plain = np.array(load_split(inputs_of(tiny_demo), "val"))
    assert np.array_equal(val[-ttt.heldout_tokens - 1 :], plain[-ttt.heldout_tokens - 1 :])  # the slice is plain text
    cipher = tmp_path / "cipher"
    shutil.copytree(tiny_demo.data_dir, cipher)
    (shard,) = data.find_shards(cipher, "val")
    data.write_shard(shard, val)
    rows = [m for _, _, m in trial_rows(inputs_of(tiny_demo, cipher), "fp", [ttt], seeds, QUANT)]
    assert len(rows) == 3 and all(m.status == "ok" for m in rows)
    in_stream = np.array([m.post_quant_bpb - m.post_ttt_bpb for m in rows])
    persistent = np.array([m.heldout_quant_bpb - m.heldout_adapted_bpb for m in rows])
    assert in_stream.min() > 0.02, in_stream
    assert persistent.max() < 0.1 * in_stream.min(), (in_stream, persistent)
