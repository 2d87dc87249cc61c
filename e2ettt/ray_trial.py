"""The Ray side of a sweep: one Tune trial = one Ray Train TorchTrainer run.

Only the sweep imports this module (the rest of the library runs without
Ray). `run_cell` is the Tune function trainable: it builds a TorchTrainer
whose workers run `train_loop` (the TTT engine in lockstep, in the process
group Ray Train made: gloo on CPU, NCCL on GPU), fits it, and reports one
JSON payload (the row and the curve, or the error) with `ray.tune.report`.
The Train run is named after the cell's key, so a retried trial resumes
under the same name instead of starting a stray run.
"""
from __future__ import annotations

import json
import time
import traceback

from e2ettt.worker import run_trial_on_rank


def train_loop(spec: dict) -> dict | None:
    """What each Train worker runs. Imports stay inside: every trial starts fresh worker
    processes, and import time is most of a small trial's start-up."""
    import ray.train.torch

    return run_trial_on_rank(spec, ray.train.torch.get_device())


def one_line(exc: BaseException) -> str:
    """The innermost cause of a (possibly Ray-wrapped) error, on one line."""
    text = str(exc).strip().splitlines()
    causes = [ln.strip() for ln in text if ln.strip() and not ln.startswith(" ") and ":" in ln]
    msg = causes[-1] if causes else (text[-1] if text else "")
    return f"{type(exc).__name__}: {msg}"[:500]


def run_cell(config: dict) -> None:
    import ray.tune
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    config = config["cell"]
    spec, res = config["spec"], config["resources"]
    use_gpu = res["gpus_per_worker"] > 0
    per_worker = {"CPU": res["cpus_per_worker"], **({"GPU": res["gpus_per_worker"]} if use_gpu else {})}
    trainer = TorchTrainer(
        train_loop_per_worker=train_loop,
        train_loop_config=spec,
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        scaling_config=ScalingConfig(num_workers=res["workers"], use_gpu=use_gpu, resources_per_worker=per_worker,
                                     placement_strategy="STRICT_PACK" if use_gpu else "PACK"),
        run_config=RunConfig(name=f"train-{config['cell_key']}", storage_path=res["storage_path"],
                             failure_config=FailureConfig(max_failures=res["max_worker_failures"])),
    )
    t0 = time.perf_counter()
    try:
        result = trainer.fit()
        payload = result.return_value
        if payload is None:
            raise RuntimeError("rank 0 returned no result")
        payload["row"]["trial_seconds"] = time.perf_counter() - t0
    except Exception as exc:  # a failed trial is a row with its error, not a lost trial
        payload = {"row": {"status": "error", "error": one_line(exc)}, "curve": [],
                   "traceback": traceback.format_exc()[-4000:]}
    ray.tune.report({"payload": json.dumps(payload, default=float), "status": payload["row"]["status"]})
