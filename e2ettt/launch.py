"""W processes on this machine in one process group, without Ray.

For the command line and the tests: `run_local(fn, args, world_size)` runs
`fn(*args)` on every rank in a gloo group and returns rank 0's return value.
With `device="cuda"` the group is NCCL, rank r runs on GPU r and gets its
`torch.device` as a last argument (`device="cpu"`: gloo, and the CPU device
passed the same way). A rank that raises makes the call raise with that
rank's message.
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

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rank_device(device: str | None, rank: int) -> tuple:
    """The extra argument rank `rank` gets: none, or its torch.device (GPU `rank` for cuda)."""
    if device is None:
        return ()
    if device == "cuda":
        if not torch.cuda.is_available() or torch.cuda.device_count() <= rank:
            found = torch.cuda.device_count() if torch.cuda.is_available() else 0
            raise ValueError(f"--device cuda: rank {rank} needs GPU {rank}, this machine has {found}")
        torch.cuda.set_device(rank)
        return (torch.device("cuda", rank),)
    if device != "cpu":
        raise ValueError(f"--device must be cpu or cuda, got {device!r}")
    return (torch.device("cpu"),)


def _rank_main(rank: int, world_size: int, port: int, fn: Callable, args: tuple, queue, device: str | None) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    mine = rank_device(device, rank)
    backend = "nccl" if device == "cuda" else "gloo"
    dist.init_process_group(backend, rank=rank, world_size=world_size, timeout=timedelta(seconds=120))
    try:
        # torch.multiprocessing hands CPU tensors over in shared memory: without a
        # private copy every rank would update the same parameters.
        out = fn(*copy.deepcopy(args), *mine)
        queue.put((rank, "ok", out))
    except BaseException as exc:  # report, then let the group die
        queue.put((rank, "error", f"rank {rank}: {type(exc).__name__}: {exc}\n{traceback.format_exc()}"))
        raise
    finally:
        dist.destroy_process_group()


def run_local(fn: Callable, args: tuple, world_size: int, device: str | None = None) -> Any:
    if world_size == 1:
        return fn(*args, *rank_device(device, 0))
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_rank_main, args=(r, world_size, port, fn, args, queue, device)) for r in range(world_size)]
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
