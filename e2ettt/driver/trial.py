"""The Ray side of one trial: a Tune function trainable that fits one Ray Train TorchTrainer.

`run_trial` runs in the trial's driver process (a `trial_driver` slot on
the head). It looks up its `TrialSpec` by the key Tune hands it, builds a
TorchTrainer whose workers run `train_loop` (each row of the trial in turn,
in the process group Ray Train made: gloo on CPU, NCCL on GPU), and fits
it. While it runs, rank 0's reports (running numbers, and a typed
`rows.Report` with each row's new curve points and, at its end, its
measured columns) reach Tune through Ray's `TuneReportCallback`; when it
ends, one last report says how long it took, or why it failed. The Train
run is named after the trial, so a retried trial resumes under the same
name instead of starting a stray run. Workers fetch the weights and static
curves from Ray's object store (once per node), never from a disk.
"""
from __future__ import annotations

import math
import os
import time
import traceback
import uuid

from e2ettt import faults
from e2ettt.artifacts import total
from e2ettt.driver.stopping import SettingProgress
from e2ettt.plan import RowSpec, SettingSpec, TrialSpec
from e2ettt.rows import CurvePoint, Measured, Report
from e2ettt.ttt import ChunkRecord
from e2ettt.worker import ChunkSignal, Progress, RowVote, run_trial_on_rank


class TrialReporter(Progress):
    """Streams a trial to Tune while it runs, through Ray Train reports that every rank makes together,
    and asks the sweep's stop board, in the call rank 0 makes at each report, whether a setting must end.

    Rank 0 votes to report at the chunk where a seed crosses the stop rule's share of its tokens, or the
    setting an ASHA rung (those reports are the board's checkpoints: verdicts are taken there and nowhere
    else, so they depend on the text, not on the clock), when `report_seconds` have passed since the last
    report (or `max_chunks` chunks are waiting: progress only), and to stop a setting the board ended; the
    votes ride on the chunk's score all-reduce, so all ranks report, and stop, at the same chunk. Curves
    never sit whole in Tune's state: each report holds only the chunks since the previous one.
    """

    def __init__(self, spec: TrialSpec, board, max_chunks: int = 256):
        import ray.train

        self.rank = ray.train.get_context().get_world_rank()
        self.report, self.get, self.board = ray.train.report, ray.get, board
        self.every_s, self.max_chunks = spec.report_seconds, max_chunks
        self.attempt = uuid.uuid4().hex
        # rows an earlier attempt of this trial (a worker group that died) got into the table: not run again
        ids = [r.row_id for _, r in spec.rows]
        self.written = set(self.get(board.written.remote(ids))) if self.rank == 0 and board is not None else set()
        self.verdicts: dict[str, str] = {}  # setting key -> why the board ended it
        self.tokens_before: dict[str, int] = {}  # setting key -> tokens of its finished rows
        self.judge_at, self.rungs = (self.get(board.points.remote()) if self.rank == 0 and board is not None
                                     else (None, []))
        self.checkpoint = False  # the next report is a checkpoint of the stop rule
        self.last = time.monotonic()
        self.pending: list[CurvePoint] = []
        self.metrics: dict = {}
        self.setting_key = ""

    def _ask_board(self, progress: SettingProgress) -> None:
        if self.rank == 0 and self.board is not None and progress.setting_key not in self.verdicts:
            why = self.get(self.board.post.remote(progress))
            if why:
                self.verdicts[progress.setting_key] = why

    def _progress(self, diverged: bool = False, checkpoint: bool = False) -> SettingProgress:
        m = self.metrics
        return SettingProgress(self.setting_key, m["regime"], m["seed"], m["tokens_seen"], m["seed_fraction"],
                               m.get("running_recovery", math.nan), diverged, checkpoint)

    def _crosses(self) -> bool:
        """Whether the chunk being scored is the seed's judging point (the first chunk after an update, chunk 1 on,
        that takes the seed to the rule's share of its tokens), or takes the setting across an ASHA rung."""
        k = self.chunks_done
        if k >= len(self.static):
            return False
        before = sum(c[2] for c in self.static[:k])
        after = before + self.static[k][2]
        target = None if self.judge_at is None else self.judge_at * self.seed_tokens
        if target is not None and k >= 1 and after >= target and (k == 1 or before < target):
            return True
        done = self.tokens_before.get(self.setting_key, 0)
        return any(done + before < r <= done + after for r in self.rungs)

    def signal(self) -> ChunkSignal:
        """REPORT when a report is due or the chunk is a checkpoint; REPORT | STOP when the board ended the setting
        (rank 0 decides; the sum over ranks reaches every rank)."""
        if self.rank != 0:
            return ChunkSignal.NONE
        if self.setting_key in self.verdicts:
            return ChunkSignal.REPORT | ChunkSignal.STOP
        self.checkpoint = self._crosses()
        due = time.monotonic() - self.last >= self.every_s or len(self.pending) + 1 >= self.max_chunks
        return ChunkSignal.REPORT if due or self.checkpoint else ChunkSignal.NONE

    def row_started(self, setting: SettingSpec, row: RowSpec, static: dict, fp_static: dict) -> None:
        self.setting_key, self.row_id = setting.setting_key, row.row_id
        self.static, self.static_sums, self.chunks_done = static["chunks"], [0.0, 0.0], 0
        self.seed_tokens = sum(c[2] for c in self.static)
        self.metrics = {"setting_key": setting.setting_key, "regime": setting.regime, "seed": row.seed,
                        "pre_quant_bpb": total(fp_static).bpb, "post_quant_bpb": total(static).bpb,
                        "tokens_seen": self.tokens_before.get(setting.setting_key, 0), "seed_fraction": 0.0}

    def chunk(self, setting: SettingSpec, row: RowSpec, rec: ChunkRecord) -> bool:
        nll, nbytes, _ = self.static[rec.chunk]
        self.chunks_done = rec.chunk + 1
        self.static_sums = [self.static_sums[0] + nll, self.static_sums[1] + nbytes]
        running_static = self.static_sums[0] / (math.log(2) * self.static_sums[1])
        self.pending.append(CurvePoint.of(rec))
        self.metrics.update(tokens_seen=self.tokens_before.get(setting.setting_key, 0) + rec.tokens_seen,
                            seed_fraction=rec.tokens_seen / self.seed_tokens, running_ttt_bpb=rec.running_ttt_bpb,
                            running_static_bpb=running_static, running_recovery=running_static - rec.running_ttt_bpb)
        asked = ChunkSignal(round(rec.signal))
        if ChunkSignal.REPORT in asked:
            self._send(Report(row.row_id, self.attempt, tuple(self.pending)))
            self._ask_board(self._progress(checkpoint=self.checkpoint))
            self.checkpoint = False
        return ChunkSignal.STOP in asked

    def row_vote(self, setting: SettingSpec, row: RowSpec) -> RowVote:
        if self.rank != 0:
            return RowVote.RUN
        return (RowVote.DONE if row.row_id in self.written else
                RowVote.STOPPED if setting.setting_key in self.verdicts else RowVote.RUN)

    def stop_reason(self, setting: SettingSpec) -> str:
        return self.verdicts.get(setting.setting_key, "stopped by the sweep's stop board")

    def row_done(self, setting: SettingSpec, row: RowSpec, measured: Measured | None, curve: list[CurvePoint] | None) -> None:
        ran = self.metrics.get("seed") == row.seed and self.setting_key == setting.setting_key
        if not ran:  # a row the board ended before it started
            self.setting_key = setting.setting_key
            self.metrics = {"setting_key": setting.setting_key, "regime": setting.regime, "seed": row.seed,
                            "tokens_seen": self.tokens_before.get(setting.setting_key, 0), "seed_fraction": 0.0}
        self._send(Report(row.row_id, self.attempt, tuple(self.pending), measured))
        if ran:
            self._ask_board(self._progress(diverged=bool(measured and measured.diverged)))
            self.tokens_before[setting.setting_key] = self.tokens_before.get(setting.setting_key, 0) + self.seed_tokens
        self.metrics = {}

    def _send(self, report: Report) -> None:
        self.report({**self.metrics, "kind": "report", "report": report} if self.rank == 0 else {})
        self.pending = []
        self.last = time.monotonic()


def process_started_at() -> float:
    """Unix time this process started (Linux: /proc), NaN elsewhere."""
    try:
        ticks = int(open("/proc/self/stat").read().rsplit(")", 1)[1].split()[19])
        boot = next(float(ln.split()[1]) for ln in open("/proc/stat") if ln.startswith("btime"))
        return boot + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, StopIteration):
        return math.nan


def train_loop(config: dict) -> int:
    """What each Train worker runs. Imports stay inside: a trial's worker processes are new."""
    import ray.train.torch

    spec: TrialSpec = config["spec"]
    where = {"node_id": ray.get_runtime_context().get_node_id(), "fit_started_at": config["fit_started_at"],
             "worker_spawned_at": process_started_at()}
    out = run_trial_on_rank(spec, config["artifacts"], ray.train.torch.get_device(), fetch=ray.get,
                            progress=TrialReporter(spec, config["board"]), where=where)
    return len(out or [])  # rows went out as reports


def one_line(exc: BaseException) -> str:
    """The innermost cause of a (possibly Ray-wrapped) error, on one line."""
    text = str(exc).strip().splitlines()
    causes = [ln.strip() for ln in text if ln.strip() and not ln.startswith(" ") and ":" in ln]
    msg = causes[-1] if causes else (text[-1] if text else "")
    return f"{type(exc).__name__}: {msg}"[:500]


def run_trial(config: dict, specs: dict | None = None, artifacts: dict | None = None, board=None,
              resources: dict | None = None) -> None:
    """A Tune trial: fit the TorchTrainer of trial `config["trial"]`, then report how it ended."""
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer
    from ray.tune.integration.ray_train import TuneReportCallback

    spec: TrialSpec = specs[config["trial"]]
    res = resources
    # Read by Ray Train's controller, which this process starts: how long the worker group may take to come up
    # (nodes booting on an autoscaling cluster), after which the trial ends as an error instead of waiting forever.
    os.environ["RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"] = str(res["start_timeout"])
    use_gpu = res["gpus_per_worker"] > 0
    per_worker = {"CPU": res["cpus_per_worker"], **({"GPU": res["gpus_per_worker"]} if use_gpu else {})}
    for regime in spec.regimes:
        per_worker.update(faults.for_regime(spec.faults, regime).get("resources", {}))
    needed = {k for _, r in spec.rows for k in (r.weights, r.static, r.fp_static)}
    fit_started_at = time.time()
    try:
        trainer = TorchTrainer(
            train_loop_per_worker=train_loop,
            train_loop_config={"spec": spec, "artifacts": {k: artifacts[k] for k in needed}, "board": board,
                               "fit_started_at": fit_started_at},
            torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
            scaling_config=ScalingConfig(num_workers=spec.world_size, use_gpu=use_gpu, resources_per_worker=per_worker,
                                         placement_strategy="STRICT_PACK" if use_gpu else "PACK"),
            run_config=RunConfig(name=f"train-{spec.key}", storage_path=res["storage_path"],
                                 callbacks=[TuneReportCallback()],  # worker reports reach Tune as they happen
                                 # a worker lost while the group starts (a node preempted or gone) counts
                                 # against the same limit as one lost mid-run
                                 failure_config=FailureConfig(max_failures=res["max_worker_failures"],
                                                              controller_failure_limit=res["max_worker_failures"])),
        )
        result = trainer.fit()
        if result.return_value is None:
            raise RuntimeError("rank 0 returned no result")
        end = {"error": "", "traceback": ""}
    except Exception as exc:  # a failed trial is a row per unfinished seed, with its error, not a lost trial
        message = one_line(exc)
        if "worker group startup timed out" in f"{exc}\n{traceback.format_exc()}".lower():
            tries = res["max_worker_failures"] + 1
            message = (f"workers did not start within {res['start_timeout']:g} s ({tries} attempt{'s' * (tries > 1)}): "
                       f"no node could give {spec.world_size} "
                       f"worker(s) × {per_worker} (nodes that never came up, or resources no node type has)")
        end = {"error": message, "traceback": traceback.format_exc()[-4000:]}
    report_after_workers({"kind": "end", **end})


def report_after_workers(metrics: dict, settle_s: float = 0.5, limit_s: float = 60.0) -> None:
    """Report `metrics` to Tune once every worker report still on its way has gone through.

    The workers' reports reach Tune through the Tune session's inter-actor queue (`TuneReportCallback`), which the
    session's main thread forwards into its one-slot result queue; a report made from this thread goes into the same
    slot. If it lands there while the main thread holds a forwarded worker report, neither ever moves (seen on a
    loaded machine: the trial waits for ever). So this waits until both queues have stayed empty for `settle_s`
    (at most `limit_s`), then reports."""
    import ray.tune  # here, not at the top: Train workers unpickle `train_loop` from this module and never need Tune
    from ray.train._internal.session import get_session

    session = get_session()
    forwarded = getattr(session, "_inter_actor_queue", None)
    slot = getattr(session, "result_queue", None)
    t0 = time.monotonic()
    quiet_since = None
    while slot is not None and time.monotonic() - t0 < limit_s:
        idle = slot.empty() and (forwarded is None or forwarded.empty())
        now = time.monotonic()
        quiet_since = (quiet_since or now) if idle else None
        if quiet_since is not None and now - quiet_since >= settle_s:
            break
        time.sleep(0.05)
    ray.tune.report(metrics)
