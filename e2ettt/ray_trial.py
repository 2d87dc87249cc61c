"""The Ray side of one trial: a Tune function trainable that fits one Ray Train TorchTrainer.

`run_cell` runs in the trial's driver process (a `trial_driver` slot on the
head). It swaps the artifact names in its spec for the Ray object refs the
sweep handed it (`tune.with_parameters`), builds a TorchTrainer whose
workers run `train_loop` (every seed of the trial in turn, in the process
group Ray Train made: gloo on CPU, NCCL on GPU), and fits it. While it runs,
the workers' reports (running numbers, new curve chunks, each seed's row)
reach Tune through Ray's `TuneReportCallback`; when it ends, one payload
(its time, or the error) goes to Tune with `ray.tune.report`. The Train run
is named after the trial's setting key, so a retried trial resumes under
the same name instead of starting a stray run. Workers fetch the weights
and static curves from Ray's object store (once per node), never from a
disk, and learn from the sweep's stop board whether its stopper ended them.
"""
from __future__ import annotations

import json
import math
import os
import time
import traceback
import uuid

from e2ettt.prepare import total
from e2ettt.ttt import ChunkRecord
from e2ettt.worker import Progress, curve_point, run_trial_on_rank


def stop_reason(result: dict, threshold: float, min_fraction: float) -> str:
    """Why a running trial should end ("" if it should not): TTT hurting its regime, or a diverged seed."""
    if threshold <= 0 or result.get("kind") not in ("chunks", "seed_done"):
        return ""
    if result.get("diverged"):
        return f"seed {result['seed']} diverged: the setting's other seeds are not run"
    if result.get("seed_fraction", 0.0) >= min_fraction and result.get("running_recovery", 0.0) < -threshold:
        return (f"TTT hurting: running recovery {result['running_recovery']:+.4f} bpb after "
                f"{result['seed_fraction']:.0%} of seed {result['seed']}'s tokens")
    return ""


class TuneProgress(Progress):
    """Streams a trial to Tune while it runs, through Ray Train reports that every rank makes together.

    Rank 0 votes to report when `every_s` seconds have passed since the last report (or `max_chunks`
    chunks are waiting); the vote rides on the chunk's score all-reduce, so all ranks report at the
    same chunk. A report carries the running numbers the stopper judges (tokens seen, running TTT and
    static bpb of this regime, their difference) and the chunks since the previous report, from which
    the driver rebuilds each curve; the end of a seed carries its row. Curves never sit whole in Tune's
    state: each report holds only its own chunks.
    """

    def __init__(self, key: str, regime: str, every_s: float, node_id: str, board=None, stop_rule: tuple = (0.0, 1.0),
                 max_chunks: int = 256):
        import ray
        import ray.train

        self.rank = ray.train.get_context().get_world_rank()
        self.report = ray.train.report
        self.board, self.get, self.reason = board, ray.get, ""
        self.stop_rule = stop_rule  # (threshold, min_fraction): the sweep stopper's rule, to know when to wait for it
        self.waiting_on: int | None = None  # a finished seed that looked like one the stopper ends: wait for its verdict
        self.base = {"setting_key": key, "regime": regime, "node_id": node_id, "attempt": uuid.uuid4().hex}
        self.every_s, self.max_chunks = every_s, max_chunks
        self.last = time.monotonic()
        self.pending: list[dict] = []
        self.tokens_before = 0
        self.metrics: dict = {}

    def _stop_requested(self) -> bool:
        """Rank 0 asks the sweep's stop board whether the stopper ended this trial (one small call per report)."""
        if self.board is not None and not self.reason:
            self.reason = self.get(self.board.reason.remote(self.base["setting_key"]))
        return bool(self.reason)

    def signal(self) -> float:
        """1: report now; 3: report now and stop (rank 0 decides; the sum over ranks reaches every rank)."""
        due = time.monotonic() - self.last >= self.every_s or len(self.pending) + 1 >= self.max_chunks
        if self.rank != 0 or not due:
            return 0.0
        return 3.0 if self._stop_requested() else 1.0

    def stop_vote(self) -> float:
        """Before a seed: if the previous one looked like a seed the stopper ends, wait for its verdict
        (a seed's report reaches the stopper a moment after the seed ends), else ask without waiting."""
        if self.rank != 0:
            return 0.0
        if self.waiting_on is not None and self.board is not None and not self.reason:
            deadline = time.monotonic() + 30.0
            while (why := self.get(self.board.verdict.remote(self.base["setting_key"], self.waiting_on))) is None:
                if time.monotonic() > deadline:
                    break
                time.sleep(0.05)
            self.reason = why or ""
            self.waiting_on = None
        return 1.0 if self._stop_requested() else 0.0

    def stop_reason(self) -> str:
        return self.reason or "stopped by the sweep's stopper"

    def seed_started(self, seed: int, static: dict, fp_static: dict) -> None:
        self.static = static["chunks"]
        self.static_sums = [0.0, 0.0]
        self.seed_tokens = sum(c[2] for c in self.static)
        self.metrics = {"seed": seed, "pre_quant_bpb": total(fp_static).bpb, "post_quant_bpb": total(static).bpb,
                        "seed_tokens": self.seed_tokens, "tokens_seen": self.tokens_before, "seed_fraction": 0.0,
                        "diverged": False}

    def chunk(self, seed: int, rec: ChunkRecord) -> bool:
        nll, nbytes, _ = self.static[rec.chunk]
        self.static_sums = [self.static_sums[0] + nll, self.static_sums[1] + nbytes]
        running_static = self.static_sums[0] / (math.log(2) * self.static_sums[1])
        self.pending.append(curve_point(rec))
        self.metrics.update(tokens_seen=self.tokens_before + rec.tokens_seen, seed_fraction=rec.tokens_seen / self.seed_tokens,
                            running_ttt_bpb=rec.running_ttt_bpb, running_static_bpb=running_static,
                            running_recovery=running_static - rec.running_ttt_bpb)
        if rec.signal > 0:
            self._send("chunks")
        return rec.signal >= 2

    def seed_done(self, seed: int, row: dict | None, curve: list[dict] | None) -> None:
        ran = self.metrics.get("seed") == seed  # a seed the stopper skipped never started
        self.metrics.update(seed=seed, diverged=bool(row and row.get("diverged")))
        self._send("seed_done", json.dumps(row, default=float) if row is not None else "")
        looks_stopped = stop_reason({**self.metrics, "kind": "seed_done"}, *self.stop_rule)
        self.waiting_on = seed if ran and looks_stopped else None
        if ran:
            self.tokens_before += self.seed_tokens

    def _send(self, kind: str, row: str = "") -> None:
        self.report({**self.base, **self.metrics, "kind": kind, "chunks": json.dumps(self.pending, default=float),
                     "row": row})
        self.pending = []
        self.last = time.monotonic()


def train_loop(spec: dict) -> dict | None:
    """What each Train worker runs. Imports stay inside: every trial starts fresh worker
    processes, and import time is most of a small trial's start-up."""
    import ray
    import ray.train.torch

    progress = TuneProgress(spec["key"], spec["regime"], spec["report_seconds"], ray.get_runtime_context().get_node_id(),
                            spec.get("board"), tuple(spec.get("stop_rule", (0.0, 1.0))))
    out = run_trial_on_rank(spec, ray.train.torch.get_device(), fetch=ray.get, progress=progress)
    return {"seeds": len(out["seeds"])} if out is not None else None  # rows and curves went out as reports


def one_line(exc: BaseException) -> str:
    """The innermost cause of a (possibly Ray-wrapped) error, on one line."""
    text = str(exc).strip().splitlines()
    causes = [ln.strip() for ln in text if ln.strip() and not ln.startswith(" ") and ":" in ln]
    msg = causes[-1] if causes else (text[-1] if text else "")
    return f"{type(exc).__name__}: {msg}"[:500]


def with_refs(spec: dict, refs: dict, board=None) -> dict:
    """The spec with artifact names replaced by the object refs of those artifacts, and the stop board."""
    static = {seed: {k: refs[name] for k, name in pair.items()} for seed, pair in spec["static"].items()}
    return {**spec, "weights": refs[spec["weights"]], "static": static, "board": board}


def run_cell(config: dict, artifacts: dict | None = None, board=None) -> None:
    import ray.tune
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer
    from ray.tune.integration.ray_train import TuneReportCallback

    config = config["trial"]
    spec, res = config["spec"], config["resources"]
    # Read by Ray Train's controller, which this process starts: how long the worker group may take to come up
    # (nodes booting on an autoscaling cluster), after which the trial ends as an error instead of waiting forever.
    os.environ["RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"] = str(res["start_timeout"])
    use_gpu = res["gpus_per_worker"] > 0
    per_worker = {"CPU": res["cpus_per_worker"], **({"GPU": res["gpus_per_worker"]} if use_gpu else {}),
                  **res.get("extra", {})}
    t0, started = time.perf_counter(), time.time()
    try:
        trainer = TorchTrainer(
            train_loop_per_worker=train_loop,
            train_loop_config=with_refs(spec, artifacts or {}, board),
            torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
            scaling_config=ScalingConfig(num_workers=res["workers"], use_gpu=use_gpu, resources_per_worker=per_worker,
                                         placement_strategy="STRICT_PACK" if use_gpu else "PACK"),
            run_config=RunConfig(name=f"train-{config['key']}", storage_path=res["storage_path"],
                                 callbacks=[TuneReportCallback()],  # worker reports reach Tune as they happen
                                 failure_config=FailureConfig(max_failures=res["max_worker_failures"],
                                                              controller_failure_limit=0)),
        )
        result = trainer.fit()
        if result.return_value is None:
            raise RuntimeError("rank 0 returned no result")
        payload = {"trial_seconds": time.perf_counter() - t0, "driver_started_at": started}
    except Exception as exc:  # a failed trial is a row with its error, not a lost trial
        message = one_line(exc)
        if "worker group startup timed out" in f"{exc}\n{traceback.format_exc()}".lower():
            message = (f"workers did not start within {res['start_timeout']:g} s: no node could give {res['workers']} "
                       f"worker(s) × {per_worker} (nodes that never came up, or resources no node type has)")
        payload = {"error": message, "traceback": traceback.format_exc()[-4000:], "trial_seconds": time.perf_counter() - t0}
    ray.tune.report({"kind": "payload", "setting_key": config["key"], "payload": json.dumps(payload, default=float)})
