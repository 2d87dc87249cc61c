"""W processes on this machine in one gloo process group, without Ray.

For the command line and the tests: `run_local(fn, args, world_size)` runs
`fn(*args)` on every rank and returns rank 0's return value. A rank that
raises makes the call raise with that rank's message.
"""
from __future__ import annotations

import copy
import os
import queue as queues
import socket
import traceback
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank: int, world_size: int, port: int, fn: Callable, args: tuple, queue) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world_size, timeout=timedelta(seconds=120))
    try:
        # torch.multiprocessing hands CPU tensors over in shared memory: without a
        # private copy every rank would update the same parameters.
        out = fn(*copy.deepcopy(args))
        queue.put((rank, "ok", out))
    except BaseException as exc:  # report, then let the group die
        queue.put((rank, "error", f"rank {rank}: {type(exc).__name__}: {exc}\n{traceback.format_exc()}"))
        raise
    finally:
        dist.destroy_process_group()


def run_local(fn: Callable, args: tuple, world_size: int) -> Any:
    if world_size == 1:
        return fn(*args)
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_rank_main, args=(r, world_size, port, fn, args, queue)) for r in range(world_size)]
    for p in procs:
        p.start()
    # Drain while the ranks run: a result larger than the pipe's buffer (a long curve) blocks its
    # sender until it is read, so joining first would wait forever.
    results = {}
    while len(results) < world_size:
        try:
            rank, status, out = queue.get(timeout=0.5)
            results[rank] = (status, out)
        except queues.Empty:
            if not any(p.is_alive() for p in procs):
                break
    for p in procs:
        p.join()
    errors = [out for status, out in results.values() if status == "error"]
    if errors:
        raise RuntimeError(errors[0])
    if 0 not in results:
        codes = [p.exitcode for p in procs]
        raise RuntimeError(f"rank 0 returned nothing (exit codes {codes})")
    return results[0][1]
