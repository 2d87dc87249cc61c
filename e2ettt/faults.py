"""Faults a test injects into trials (a killed worker, a raised error, a trial that holds its node, resources
no node has), read from the E2ETTT_FAULTS environment variable, which Ray's processes inherit.

E2ETTT_FAULTS='{"int3": {"kill_once_marker": "/tmp/m", "kill_rank": 1, "kill_chunk": 1}, "int4": {"raise": "boom"}}'
keys faults by regime. Unset, as in every user's run, nothing is injected.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

ENV = "E2ETTT_FAULTS"


class InjectedFault(RuntimeError):
    """Raised on purpose by a test's `raise` fault."""


def for_regime(regime: str) -> dict:
    return json.loads(os.environ.get(ENV) or "{}").get(regime, {})


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
