"""A trial on its ranks without Ray: several settings in one trial give each the numbers of a trial of its own."""
import pytest

from e2ettt import artifacts
from e2ettt.distributed import world
from e2ettt.launch import run_local
from e2ettt.plan import make_trial, needs, plan_settings, segments
from e2ettt.quant.regimes import QuantConfig
from e2ettt.source import SourceConfig, fingerprint, load_split, resolve
from e2ettt.ttt import TTTConfig
from e2ettt.worker import ChunkSignal, Progress, RowVote, run_trial_on_rank

from .trials import trial_rows

WINDOWINGS = {"lr 0": (0.0, 32, "fp32"), "sliding": (0.05, 32, "fp32"), "bf16": (0.05, 0, "bf16")}  # inner_lr, stride, dtype


def windowing_rows(assets) -> list[tuple[str, int, object]]:
    """The fp model of `assets` through a trial at one rank, a setting per windowing (`WINDOWINGS`) at seeds 0 and
    1 (a segment inside the stream, with context before it): (windowing, seed, measured columns) of each row, made as
    the sweep makes them, artifacts included."""
    inputs = resolve(SourceConfig(checkpoint=str(assets.checkpoint), data=str(assets.data_dir),
                                  tokenizer=str(assets.tokenizer)))
    ttts = [TTTConfig(inner_lr=lr, chunk_tokens=128, context=64, stride=stride, dtype=dtype, max_tokens=512)
            for lr, stride, dtype in WINDOWINGS.values()]
    names = list(WINDOWINGS)
    return [(names[i], seed, m) for i, seed, m in trial_rows(inputs, "fp", ttts, [0, 1], QuantConfig(min_numel=1024))]


@pytest.fixture(scope="module")
def planned(tiny_demo):
    inputs = resolve(SourceConfig(checkpoint=str(tiny_demo.checkpoint), data=str(tiny_demo.data_dir),
                                  tokenizer=str(tiny_demo.tokenizer)))
    fp = fingerprint(inputs)
    starts = segments(load_split(inputs, "val"), 1024, [0, 1], [256])
    ttts = [TTTConfig(inner_lr=lr, chunk_tokens=256, context=128, max_tokens=1024) for lr in (0.01, 0.1)]
    quant = QuantConfig(min_numel=1024)
    settings = [s for regime in ("fp", "int3") for s in plan_settings(fp, regime, ttts, starts, quant, "cpu", 2)]
    values, _ = artifacts.prepare_local(needs(settings, fp, quant, "cpu", "fp32"), inputs, quant)  # as the Ray tasks do
    return inputs, settings, values


def test_settings_packed_in_one_trial_give_the_numbers_of_trials_of_their_own(planned):
    inputs, settings, values = planned
    packed = {row.row_id: m for row, m, _ in run_local(run_trial_on_rank, (make_trial(settings, inputs, 2), values), 2)}
    assert len(packed) == 8 and all(m.status == "ok" for m in packed.values())
    assert all(m.alarms == "" for m in packed.values())  # chunk 0 scored on two ranks is the one-rank static score
    # the second setting runs after another of its regime, the last after a change of regime
    for setting in (settings[1], settings[3]):
        alone = run_local(run_trial_on_rank, (make_trial([setting], inputs, 2), values), 2)
        for row, m, _ in alone:
            for col in ("pre_quant_bpb", "post_quant_bpb", "post_ttt_bpb", "first_chunk_delta", "tokens_scored"):
                assert getattr(packed[row.row_id], col) == pytest.approx(getattr(m, col), abs=1e-9), col
    assert len({m.post_ttt_bpb for m in packed.values()}) == 8  # the settings really differ


def same(value):
    return value


class Scripted(Progress):
    """Rank 0 votes a script (the other ranks send nothing): row `done` was written by an earlier attempt, setting
    `ended` was ended by the board before its rows, and `halt` is asked to stop at its first chunk."""

    def __init__(self, done: str, ended: str, halt: str):
        self.done, self.ended, self.halt, self.current = done, ended, halt, ""

    def row_started(self, setting, row, static, fp_static):
        self.current = setting.setting_key

    def signal(self):
        if world()[0] != 0 or self.current != self.halt:
            return ChunkSignal.NONE
        return ChunkSignal.REPORT | ChunkSignal.STOP

    def chunk(self, setting, row, record):
        return ChunkSignal.STOP in ChunkSignal(round(record.signal))

    def row_vote(self, setting, row):
        if world()[0] != 0:
            return RowVote.RUN
        return (RowVote.DONE if row.row_id == self.done else
                RowVote.STOPPED if setting.setting_key == self.ended else RowVote.RUN)


def test_rank_0_s_votes_reach_every_rank_a_done_row_is_skipped_an_ended_setting_is_not_run_a_stop_ends_it(planned):
    inputs, settings, values = planned
    done, ended, halt, free = settings
    script = Scripted(done.rows[0].row_id, ended.setting_key, halt.setting_key)
    out = run_local(run_trial_on_rank, (make_trial(settings, inputs, 2), values, "cpu", same, script), 2)
    got = {row.row_id: m for row, m, _ in out}
    assert done.rows[0].row_id not in got and got[done.rows[1].row_id].status == "ok"
    assert not any(r.row_id in got for r in ended.rows)  # written as stopped through row_done, never run
    first = got[halt.rows[0].row_id]
    assert first.status == "stopped" and first.tokens_scored < got[free.rows[0].row_id].tokens_scored
    assert halt.rows[1].row_id not in got  # the rest of a stopped setting is not run
    assert all(got[r.row_id].status == "ok" for r in free.rows)


def test_a_fault_in_the_trial_s_own_config_reaches_its_ranks(planned):
    """Faults travel in the TrialSpec, not the environment: they reach workers of a Ray already running."""
    inputs, settings, values = planned
    trial = make_trial(settings[2:3], inputs, 2, faults='{"int3": {"raise": "planted in the spec"}}')
    with pytest.raises(RuntimeError, match="planted in the spec"):
        run_local(run_trial_on_rank, (trial, values), 2)
    assert make_trial(settings[:1], inputs, 2, faults='{"int3": {"raise": "x"}}').faults  # kept by the constructor
    assert trial.without({settings[2].rows[0].row_id}).faults == trial.faults


def test_a_trial_refuses_to_run_on_another_number_of_ranks_than_planned(planned):
    inputs, settings, values = planned
    with pytest.raises(RuntimeError, match="planned for 2 ranks but runs on 1"):
        run_trial_on_rank(make_trial(settings[:1], inputs, 2), values)


def test_rows_of_every_windowing_raise_no_alarm_and_lr_0_gives_the_static_numbers(tiny_inputs):
    """On sliding windows, in bf16 and on a segment inside the stream, chunk 0's TTT score is the static score to the
    bit (one rank: the same computation) and no row alarm fires; at lr 0 every TTT number is the static one."""
    rows = windowing_rows(tiny_inputs)
    assert [(name, seed) for name, seed, _ in rows] == [(name, seed) for name in WINDOWINGS for seed in (0, 1)]
    assert {name: m.alarms for name, _, m in rows} == {name: "" for name in WINDOWINGS}
    assert {name: m.first_chunk_delta for name, _, m in rows} == {name: 0.0 for name in WINDOWINGS}
    assert all(m.status == "ok" and m.tokens_scored == 512 for _, _, m in rows)
    assert all(m.post_ttt_bpb == m.post_quant_bpb for name, _, m in rows if name == "lr 0")
    assert all(m.post_ttt_bpb != m.post_quant_bpb for name, _, m in rows if name != "lr 0")
    # the held-out slice: the fp control's quantized weights are its own; lr 0 leaves them as they were, to the bit
    assert all(m.heldout_quant_bpb == m.heldout_fp_bpb > 0 for _, _, m in rows)
    assert all(m.heldout_adapted_bpb == m.heldout_quant_bpb for name, _, m in rows if name == "lr 0")
    assert all(m.heldout_adapted_bpb != m.heldout_quant_bpb for name, _, m in rows if name != "lr 0")
