"""The Ray side of one trial: a Tune function trainable that fits one Ray Train TorchTrainer.

`run_cell` runs in the trial's driver process (a `trial_driver` slot on the
head). It swaps the artifact names in its spec for the Ray object refs the
sweep handed it (`tune.with_parameters`), builds a TorchTrainer whose
workers run `train_loop` (every seed of the trial in turn, in the process
group Ray Train made: gloo on CPU, NCCL on GPU), fits it, and reports one
JSON payload (rows and curves, or the error) with `ray.tune.report`. The
Train run is named after the trial's setting key, so a retried trial
resumes under the same name instead of starting a stray run. Workers fetch
the weights and static curves from Ray's object store (once per node),
never from a disk.
"""
from __future__ import annotations

import json
import os
import time
import traceback

from e2ettt.worker import run_trial_on_rank


def train_loop(spec: dict) -> dict | None:
    """What each Train worker runs. Imports stay inside: every trial starts fresh worker
    processes, and import time is most of a small trial's start-up."""
    import ray
    import ray.train.torch

    out = run_trial_on_rank(spec, ray.train.torch.get_device(), fetch=ray.get)
    if out is not None:
        out["node_id"] = ray.get_runtime_context().get_node_id()
    return out


def one_line(exc: BaseException) -> str:
    """The innermost cause of a (possibly Ray-wrapped) error, on one line."""
    text = str(exc).strip().splitlines()
    causes = [ln.strip() for ln in text if ln.strip() and not ln.startswith(" ") and ":" in ln]
    msg = causes[-1] if causes else (text[-1] if text else "")
    return f"{type(exc).__name__}: {msg}"[:500]


def with_refs(spec: dict, refs: dict) -> dict:
    """The spec with artifact names replaced by the object refs of those artifacts."""
    static = {seed: {k: refs[name] for k, name in pair.items()} for seed, pair in spec["static"].items()}
    return {**spec, "weights": refs[spec["weights"]], "static": static}


def run_cell(config: dict, artifacts: dict | None = None) -> None:
    import ray.tune
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

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
            train_loop_config=with_refs(spec, artifacts or {}),
            torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
            scaling_config=ScalingConfig(num_workers=res["workers"], use_gpu=use_gpu, resources_per_worker=per_worker,
                                         placement_strategy="STRICT_PACK" if use_gpu else "PACK"),
            run_config=RunConfig(name=f"train-{config['key']}", storage_path=res["storage_path"],
                                 failure_config=FailureConfig(max_failures=res["max_worker_failures"],
                                                              controller_failure_limit=0)),
        )
        result = trainer.fit()
        payload = result.return_value
        if payload is None:
            raise RuntimeError("rank 0 returned no result")
        payload["trial_seconds"] = time.perf_counter() - t0
        payload["driver_started_at"] = started
    except Exception as exc:  # a failed trial is a row with its error, not a lost trial
        message = one_line(exc)
        if "worker group startup timed out" in f"{exc}\n{traceback.format_exc()}".lower():
            message = (f"workers did not start within {res['start_timeout']:g} s: no node could give {res['workers']} "
                       f"worker(s) × {per_worker} (nodes that never came up, or resources no node type has)")
        payload = {"error": message, "traceback": traceback.format_exc()[-4000:], "trial_seconds": time.perf_counter() - t0}
    ray.tune.report({"payload": json.dumps(payload, default=float)})
