"""Early stopping's rule, successive halving and the board that holds the verdicts (no Ray: the board is a plain class)."""
import pytest

from e2ettt.driver.stopping import Rungs, SettingProgress, StopBoard, StopRule, judge


def progress(key="int3-a", regime="int3", seed=0, tokens=1000, fraction=0.5, recovery=0.0, diverged=False,
             checkpoint=True):
    return SettingProgress(key, regime, seed, tokens, fraction, recovery, diverged, checkpoint)


def test_the_rule_ends_a_hurting_setting_only_after_its_share_of_a_seed():
    rule = StopRule(threshold=0.02, min_fraction=0.25)
    assert judge(progress(fraction=0.2, recovery=-0.5), rule) == ""  # too early to tell
    assert judge(progress(fraction=0.3, recovery=-0.019), rule) == ""  # within the threshold
    assert judge(progress(fraction=0.3, recovery=-0.021), rule).startswith("TTT hurting: running recovery -0.0210")
    assert judge(progress(fraction=0.0, diverged=True, seed=2), rule).startswith("seed 2 diverged")
    off = StopRule(threshold=0.0)
    assert judge(progress(fraction=1.0, recovery=-3.0), off) == "" and judge(progress(diverged=True), off) == ""


def test_verdicts_are_taken_at_checkpoints_of_the_text_never_at_reports_of_the_clock():
    """A report sent because report_seconds passed shows progress; only the report forced where the seed crosses
    min_fraction (or the setting an ASHA rung) is judged, so a fast machine and a slow one stop the same seeds."""
    rule = StopRule(threshold=0.02, min_fraction=0.25, asha=True, first_rung=100, last_rung=1000)
    board = StopBoard(rule)
    assert board.post(progress(fraction=0.6, recovery=-0.5, checkpoint=False)) == ""  # a timed report
    assert board.post(progress(fraction=0.9, recovery=-0.5, checkpoint=False, tokens=150)) == ""
    assert board.rungs.recorded == {}  # timed reports record no rung value either
    assert board.post(progress(fraction=0.25, recovery=-0.5)).startswith("TTT hurting")
    assert board.post(progress(key="d", diverged=True, checkpoint=False)).startswith("seed 0 diverged")  # always
    assert board.points() == (0.25, [100, 300, 900])
    assert StopBoard(StopRule(threshold=0)).points() == (None, [])


def test_a_damaged_regime_that_heals_is_never_judged_hurting():
    """Recovery is the regime's own static bpb minus its TTT bpb: damage alone never makes it negative."""
    assert judge(progress(fraction=1.0, recovery=+1.4), StopRule()) == ""


def test_successive_halving_records_once_per_rung_and_compares_with_earlier_values():
    rungs = Rungs(first=100, last=1000, eta=3)
    assert rungs.milestones == [100, 300, 900]
    assert rungs.cut("int3", "a", 150, 0.05) == ""  # first at its rung: nothing to compare with
    assert rungs.cut("int3", "b", 120, 0.04).startswith("ASHA: running recovery +0.0400")  # below {0.05}'s quantile
    assert rungs.cut("int3", "c", 400, 0.06) == ""  # the highest rung it reached (300), first there
    assert rungs.recorded == {("int3", 100): {"a": 0.05, "b": 0.04}, ("int3", 300): {"c": 0.06}}


def test_successive_halving_cuts_the_weak_and_keeps_the_strong():
    rungs = Rungs(first=100, last=1000, eta=3)
    assert [rungs.cut("int3", k, 100, v) for k, v in (("a", 0.01), ("b", 0.02), ("c", 0.03))] == ["", "", ""]
    assert rungs.cut("int3", "d", 100, 0.001).startswith("ASHA: running recovery +0.0010")  # below the 2/3 quantile
    assert rungs.cut("int3", "e", 100, 0.05) == ""
    assert rungs.cut("int3", "a", 100, -1.0) == ""  # recorded once per rung: no second verdict there


def test_brackets_are_per_regime_so_small_damage_is_not_cut_for_having_less_to_recover():
    rungs = Rungs(first=100, last=1000, eta=3)
    for key, value in (("int2-a", 0.9), ("int2-b", 1.0), ("int2-c", 1.1)):
        rungs.cut("int2", key, 100, value)
    assert rungs.cut("gptq-int3", "g", 100, 0.008) == ""  # far below int2's recoveries, but alone in its bracket


def test_the_board_holds_verdicts_and_never_stops_a_protected_control():
    board = StopBoard(StopRule(threshold=0.02, min_fraction=0.25), protected={"fp-a"})
    hurting = dict(fraction=0.5, recovery=-0.3)
    assert board.post(progress(key="fp-a", regime="fp", **hurting)) == ""  # the control of regime rows runs on
    assert board.post(progress(key="fp-a", regime="fp", diverged=True)) == ""
    why = board.post(progress(key="int3-a", **hurting))
    assert why.startswith("TTT hurting") and board.verdicts == {"int3-a": why}
    assert board.post(progress(key="int3-a", fraction=1.0, recovery=+0.5)) == why  # a verdict is final
    assert "int3-b" not in board.verdicts


def test_the_board_cuts_by_rungs_only_with_asha_and_never_a_protected_control():
    rule = StopRule(threshold=0.02, asha=True, first_rung=100, last_rung=1000)
    board = StopBoard(rule, protected={"fp-z"})
    for key, value in (("a", 0.02), ("b", 0.03), ("c", 0.04)):
        assert board.post(progress(key=key, tokens=100, fraction=0.1, recovery=value)) == ""
    assert board.post(progress(key="d", tokens=100, fraction=0.1, recovery=0.0)).startswith("ASHA")
    assert board.post(progress(key="fp-z", regime="int3", tokens=100, fraction=0.1, recovery=-0.01)) == ""
    fifo = StopBoard(StopRule(threshold=0.02), protected=set())
    for key, value in (("a", 0.02), ("b", 0.03), ("c", 0.04), ("d", 0.0)):
        assert fifo.post(progress(key=key, tokens=100, fraction=0.1, recovery=value)) == ""


@pytest.mark.parametrize("values", [[0.1, 0.2, 0.3, 0.4], [1.0], [2.0, -1.0]])
def test_the_quantile_is_numpys_linear_one(values):
    import numpy as np

    from e2ettt.driver.stopping import _quantile

    assert _quantile(values, 2 / 3) == pytest.approx(float(np.quantile(values, 2 / 3)))
