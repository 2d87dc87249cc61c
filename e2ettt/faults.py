"""Faults a test injects into trials (a killed worker, a raised error, a trial that holds its node, resources
no node has), carried by the sweep's own config to every trial, so that they reach the workers of a Ray that was
already running when the sweep started.

    --set faults='{"int3": {"kill_once_marker": "/tmp/m", "kill_rank": 1, "kill_chunk": 1}, "int4": {"raise": "boom"}}'

keys faults by regime (`SweepConfig.faults`, then `TrialSpec.faults`). Empty, as in every user's run, nothing is
injected.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

KINDS = ("hold_seconds", "raise", "kill_once_marker", "kill_rank", "kill_chunk", "resources")


class InjectedFault(RuntimeError):
    """Raised on purpose by a test's `raise` fault."""


def parse(text: str) -> dict:
    """The faults of a JSON text by regime; a text that is not such an object is a ValueError naming the setting."""
    if not text:
        return {}
    try:
        faults = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"faults: not JSON ({exc})") from None
    if not isinstance(faults, dict) or not all(isinstance(v, dict) for v in faults.values()):
        raise ValueError("faults: expected an object of regime -> {fault: value}")
    unknown = sorted({k for v in faults.values() for k in v} - set(KINDS))
    if unknown:
        raise ValueError(f"faults: unknown fault(s) {unknown}; known: {', '.join(KINDS)}")
    return faults


def for_regime(faults: str, regime: str) -> dict:
    return parse(faults).get(regime, {})


def inject(fault: dict, rank: int, chunk: int) -> None:
    """Act out `fault` on `rank` after `chunk` was scored."""
    if fault.get("hold_seconds") and chunk == 0:  # a trial that occupies its node for a while
        time.sleep(float(fault["hold_seconds"]))
    if fault.get("raise"):
        raise InjectedFault(fault["raise"])
    marker = fault.get("kill_once_marker")
    if marker and rank == fault.get("kill_rank", 1) and chunk == fault.get("kill_chunk", 0):
        if not Path(marker).exists():
            Path(marker).write_text(str(os.getpid()))
            os._exit(17)  # a worker dies without cleanup, as on a preempted node
