"""Each regime's quantized weights and static curves for a sweep, made once as Ray tasks.

`prepare` quantizes every regime the trials read and scores its static
curves as Ray tasks on the trials' kind of device (a GPU each on a GPU
sweep), each static task starting as soon as its weights exist, and hands
back object refs: trials fetch the values from Ray's object store, once per
node. Copies kept in the sweep's `Store` are reused (a resumed sweep), new
ones kept there. `artifacts.prepare_local` is the same without Ray.
"""
from __future__ import annotations

import dataclasses
import time

import ray

from e2ettt.artifacts import Needs, load_regime, load_static, quantize_regime, save_regime, save_static, static_objects
from e2ettt.quant.regimes import QuantConfig
from e2ettt.source import Inputs
from e2ettt.storage import Store


def prepare(needs: Needs, inputs: Inputs, qcfg: QuantConfig, device: str, threads: int, store: Store, prefix: str,
            log=print) -> tuple[dict, dict]:
    """Every artifact in `needs` as an object ref by key, and each regime's quantization report.

    Copies in `store` under `prefix` are reused; the rest are made by Ray tasks on the trials' kind of
    device, each static task starting as soon as its weights exist. One loop waits for all of them."""
    opts = {"num_cpus": threads, "num_gpus": 1 if device == "cuda" else 0}
    quantize = ray.remote(**opts)(quantize_regime).options(num_returns=2)
    score = ray.remote(**opts)(static_objects)
    t0 = time.perf_counter()
    refs, reports, pending = {}, {}, {}  # pending: ref -> (kind, key)
    reused = 0
    for wkey, (regime, draw) in needs.weights.items():
        cached = load_regime(store, f"{prefix}/{wkey}")
        if cached is not None:
            reports.setdefault(regime, cached[0])
            refs[wkey] = ray.put(cached[1])
            reused += 1
        else:
            report_ref, refs[wkey] = quantize.remote(inputs, regime, dataclasses.replace(qcfg, rotation_seed=draw), device,
                                                     threads, needs.dtypes.get(wkey, "fp32"))
            pending[report_ref] = ("weights", wkey)
    if reused:
        log(f"  {reused} regime weights reused from {store.url(prefix)}")
    todo: dict[str, dict] = {}  # weights key -> static key -> windowing
    for skey, (wkey, windowing) in needs.static.items():
        cached = load_static(store, f"{prefix}/{skey}")
        if cached is not None:
            refs[skey] = ray.put(cached)
        else:
            todo.setdefault(wkey, {})[skey] = windowing
    for wkey, jobs in todo.items():
        out = score.options(num_returns=len(jobs)).remote(inputs, refs[wkey], list(jobs.values()), device, threads)
        for skey, ref in zip(jobs, out if len(jobs) > 1 else [out]):
            refs[skey] = ref
            pending[ref] = ("static", skey)
    computed = sum(kind == "static" for kind, _ in pending.values())
    while pending:
        done, _ = ray.wait(list(pending), num_returns=1)
        kind, key = pending.pop(done[0])
        if kind == "weights":
            regime, draw = needs.weights[key]
            rep = ray.get(done[0])
            save_regime(store, f"{prefix}/{key}", rep, ray.get(refs[key]))
            if regime not in reports:  # a regime drawn per seed: its first draw speaks for it
                reports[regime] = rep
                log(f"  {regime:>20}: {rep['quantized_params']:>10,} params quantized, {rep['artifact_bytes']:>10,} "
                    f"bytes (lzma), {rep['seconds']:.1f} s on {rep['device']}")
        else:
            save_static(store, f"{prefix}/{key}", ray.get(done[0]))
    log(f"  {len(needs.weights)} regime weights ready ({len(reports)} regimes), {computed} static curves computed "
        f"({len(needs.static) - computed} reused) in {time.perf_counter() - t0:.0f} s")
    return refs, reports
