"""Early stopping: one rule, optional successive halving, and one board that holds every verdict.

The board also holds which rows the driver has written, so that a worker
group that restarts after a lost worker or node does not run them again.

A running trial's rank 0 posts each setting's progress to the `StopBoard`
at every report and at the end of every seed, and gets the verdict back in
the same call; the trial's ranks then end that setting together at the
next chunk boundary (the vote rides on the chunk's score all-reduce), keep
its partial curve as a `stopped` row, and go on with the trial's next
setting. Tune never ends a trial itself: its termination stops the trial's
driver but leaves the Ray Train workers inside it holding their CPUs or
GPUs, so that the next trial's workers cannot start.

- `judge` is the rule: a setting ends when one of its seeds diverged, or
  when its running recovery (the regime's own static bpb − its TTT bpb over
  the same chunks) is below −threshold at a seed's judging point: the
  first chunk scored after an update (chunk 1 on) that takes the seed to
  `min_fraction` of its tokens. A damaged regime is judged against its own
  static curve, so it is never ended for being damaged.
- Verdicts are taken at fixed points of the text, never of the clock: each
  seed is judged at its judging point (and, with ASHA, where the setting
  crosses a rung), whose report the trial forces;
  reports sent because `report_seconds` passed show progress only. So the
  same grid gives the same statuses on a fast and a slow machine. (ASHA's
  cutoffs compare a setting with those that reached the rung before it, so
  with several trials in flight they depend on arrival order, as
  asynchronous halving does by design; the default fifo rule does not.)
- `Rungs` adds asynchronous successive halving (ASHA: Li et al., "A System
  for Massively Parallel Hyperparameter Tuning", MLSys 2020) over running
  recovery at rungs of tokens seen, one bracket per regime, so that a
  regime with little damage is never cut for having less to recover.
- Settings an fp control belongs to are `protected`: never stopped, on a
  resumed sweep too, because regime rows at the same settings are matched
  to them.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

from e2ettt.plan import Sweep


@dataclass(frozen=True)
class StopRule:
    threshold: float = 0.02  # bpb: running recovery below -threshold means TTT hurts; 0 = the rule never stops
    min_fraction: float = 0.25  # ... judged only after this fraction of a seed's tokens
    asha: bool = False  # also cut settings below a rung's cutoff
    first_rung: int = 0  # tokens a setting has seen at ASHA's first rung
    last_rung: int = 0  # tokens of a whole setting (every seed): no rung at or beyond it
    eta: float = 3.0  # ASHA's reduction factor: at each rung, the best 1/eta go on


@dataclass(frozen=True)
class SettingProgress:
    """Where one setting of a running trial stands."""

    setting_key: str
    regime: str  # ASHA's bracket
    seed: int
    tokens_seen: int  # targets scored at this setting, over its seeds so far
    seed_fraction: float  # of the current seed's targets
    running_recovery: float  # static − TTT running bpb of the current seed (negative: TTT hurts)
    diverged: bool = False
    checkpoint: bool = False  # taken where the seed crosses min_fraction, or the setting an ASHA rung: judged here


def judge(p: SettingProgress, rule: StopRule) -> str:
    """Why a setting should end ("" if it should not)."""
    if rule.threshold <= 0:
        return ""
    if p.diverged:
        return f"seed {p.seed} diverged: the setting's other seeds are not run"
    if p.checkpoint and p.seed_fraction >= rule.min_fraction and p.running_recovery < -rule.threshold:
        return (f"TTT hurting: running recovery {p.running_recovery:+.4f} bpb after {p.seed_fraction:.0%} "
                f"of seed {p.seed}'s tokens")
    return ""


@dataclass
class Rungs:
    """Asynchronous successive halving: at each rung a setting goes on only if its value is at least the
    (1 − 1/eta) quantile of the values its bracket recorded at that rung before it."""

    first: int
    last: int
    eta: float = 3.0
    recorded: dict = field(default_factory=dict)  # (bracket, rung) -> {setting key: value}

    @property
    def milestones(self) -> list[int]:
        if self.first <= 0 or self.last <= self.first:
            return []
        count = int(math.log(self.last / self.first) / math.log(self.eta)) + 1
        return [int(self.first * self.eta**k) for k in range(count) if self.first * self.eta**k < self.last]

    def cut(self, bracket: str, key: str, tokens: int, value: float) -> str:
        """Record `value` at the highest rung `tokens` has reached; why the setting is cut there ("" if not)."""
        for rung in reversed(self.milestones):
            if tokens < rung:
                continue
            seen = self.recorded.setdefault((bracket, rung), {})
            if key in seen:
                return ""
            others = [v for v in seen.values() if not math.isnan(v)]
            seen[key] = value
            if others and value < (cutoff := _quantile(others, 1 - 1 / self.eta)):
                return (f"ASHA: running recovery {value:+.4f} bpb below the {bracket} cutoff {cutoff:+.4f} "
                        f"at the {rung:,}-token rung")
            return ""
        return ""


def _quantile(values: list[float], q: float) -> float:
    """Linear-interpolation quantile (as numpy's default)."""
    s = sorted(values)
    pos = q * (len(s) - 1)
    lo = int(math.floor(pos))
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


class StopBoard:
    """Every verdict of a sweep, in one place: a Ray actor in a sweep, a plain object in a test.

    A verdict is final: once a setting is stopped, every later post about it gets the same reason."""

    def __init__(self, rule: StopRule, protected: set[str] | frozenset = frozenset()):
        self.rule = rule
        self.protected = set(protected)
        self.rungs = Rungs(rule.first_rung, rule.last_rung, rule.eta) if rule.asha else None
        self.verdicts: dict[str, str] = {}
        self.rows: set[str] = set()  # rows the driver has written

    def post(self, p: SettingProgress) -> str:
        """Take a setting's progress; return why it must end ("" to go on)."""
        if p.setting_key in self.verdicts:
            return self.verdicts[p.setting_key]
        if p.setting_key in self.protected:
            return ""
        why = judge(p, self.rule)
        if not why and self.rungs is not None and p.checkpoint:
            why = self.rungs.cut(p.regime, p.setting_key, p.tokens_seen, p.running_recovery)
        if why:
            self.verdicts[p.setting_key] = why
        return why

    def points(self) -> tuple[float, list[int]]:
        """Where trials must report for a verdict: the share of a seed's tokens it is judged at (None when the rule
        never stops), and the ASHA rungs in tokens of a setting."""
        return (self.rule.min_fraction if self.rule.threshold > 0 else None,
                self.rungs.milestones if self.rungs is not None else [])

    def row_written(self, row_id: str) -> None:
        self.rows.add(row_id)

    def written(self, row_ids: list[str]) -> list[str]:
        """Which of `row_ids` are in the table (a worker group that restarts does not run them again)."""
        return [r for r in row_ids if r in self.rows]


def board_args(sweep: Sweep) -> tuple[StopRule, set[str]]:
    """The rule and the protected settings of a sweep's stop board (ASHA's last rung: a whole setting's tokens)."""
    cfg = sweep.cfg
    setting_tokens = max((len(s.rows) for t in sweep.trials for s in t.settings), default=1) * sweep.row_targets
    rule = StopRule(cfg.stop_threshold, cfg.stop_min_fraction, asha=cfg.scheduler == "asha",
                    first_rung=max(1, int(setting_tokens * cfg.stop_min_fraction)), last_rung=setting_tokens)
    return rule, {s.setting_key for t in sweep.trials for s in t.settings if s.protected}
