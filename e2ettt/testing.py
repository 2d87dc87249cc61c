"""Helpers for tests and benchmarks: rank functions for multi-process runs (importable by spawned ranks),
the config of a fake autoscaling cluster on this machine, and Ray nodes stopped by their own PIDs."""
from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from e2ettt.distributed import checksum, world
from e2ettt.evaluate import DeviceTables
from e2ettt.ttt import TTTConfig, run_ttt


def ttt_rank(model, tokens, tables: DeviceTables, cfg: TTTConfig, static=None) -> dict:
    """Run TTT on this rank; return totals and every rank's weight checksum (gathered)."""
    result = run_ttt(model, tokens, tables, cfg, static)
    mine = checksum(list(model.parameters()))
    rank, world_size = world()
    sums = [mine]
    if world_size > 1:
        sums = [torch.empty_like(mine) for _ in range(world_size)]
        torch.distributed.all_gather(sums, mine)
    return {"nll": result.total.nll, "bytes": result.total.bytes, "tokens": result.total.tokens,
            "diverged": result.diverged, "diverged_chunk": result.diverged_chunk,
            "checksums": [s.tolist() for s in sums], "chunks": [c.ttt_bpb for c in result.chunks]}


def fake_autoscaling_config(gcs_address: str, worker_cpus: int = 2, max_workers: int = 2,
                            head_resources: dict | None = None) -> dict:
    """An autoscaler config for Ray's fake multi-node provider: worker nodes are real raylets on this
    machine, added on demand (start the head with RAY_FAKE_CLUSTER=1 and --autoscaling-config)."""
    return {
        "cluster_name": "fake", "max_workers": max_workers, "upscaling_speed": 1.0, "idle_timeout_minutes": 1,
        "provider": {"type": "external",
                     "module": "ray.autoscaler._private.fake_multi_node.node_provider.FakeMultiNodeProvider",
                     "use_node_id_as_ip": True, "disable_node_updaters": True, "disable_launch_config_check": True,
                     "gcs_address": gcs_address},
        "auth": {}, "head_node_type": "ray.head.default",
        "available_node_types": {
            "ray.head.default": {"resources": head_resources or {"CPU": 0, "trial_driver": 4}, "node_config": {},
                                 "max_workers": 0},
            "worker": {"resources": {"CPU": worker_cpus}, "node_config": {}, "min_workers": 0, "max_workers": max_workers},
        },
        "file_mounts": {}, "cluster_synced_files": [], "file_mounts_sync_continuously": False, "rsync_exclude": [],
        "rsync_filter": [], "initialization_commands": [], "setup_commands": [], "head_setup_commands": [],
        "worker_setup_commands": [], "head_start_ray_commands": [], "worker_start_ray_commands": [],
    }


def processes_naming(gcs_port: str) -> list[int]:
    """PIDs of the processes whose command line gives a GCS address ending in `gcs_port` (":PORT"): a node's."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                argv = (entry / "cmdline").read_bytes().decode(errors="replace").split("\0")
            except OSError:
                continue
            if any(a.startswith(("--gcs-address=", "--gcs_address=")) and a.endswith(gcs_port) for a in argv):
                found.append(int(entry.name))
    return found


def long_curve(n: int) -> list[dict] | None:
    """A curve of n chunks on rank 0 (a result far larger than a pipe's buffer)."""
    rank, _ = world()
    curve = [{"chunk": k, "tokens_seen": 48 * (k + 1), "ttt_bpb": 1.0, "static_bpb": 1.0} for k in range(n)]
    return curve if rank == 0 else None


@contextlib.contextmanager
def ray_node(*args: str, env: dict | None = None, prefix: list[str] | None = None, cwd: str | os.PathLike | None = None,
             timeout: float = 180.0):
    """A Ray node of `ray start --block ARGS` (a head or a worker), up when this enters, stopped when it leaves by
    SIGTERM to its own `ray start`, whose handler stops the processes that node started, and then to any process
    still naming a head's GCS port (nodes an autoscaler added leave their log monitors behind). Never `ray stop`, which
    stops every Ray on the host, a user's running sweep included. `prefix` wraps the command (it must exec it)."""
    cmd = [*(prefix or []), str(Path(sys.executable).parent / "ray"), "start", "--block", *args]
    env = {**os.environ, "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0", **(env or {})}
    with tempfile.NamedTemporaryFile("w+", prefix="ray-node-", suffix=".log") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=cwd, start_new_session=True)
        try:
            deadline = time.monotonic() + timeout
            while "block forever" not in Path(log.name).read_text():
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"ray start {' '.join(args)} did not come up:\n{Path(log.name).read_text()[-3000:]}")
                time.sleep(0.2)
            yield proc
        finally:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=60)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()
            port = next((a.split("=", 1)[1] for a in args if a.startswith("--port=")), None) if "--head" in args else None
            for pid in processes_naming(f":{port}") if port else []:  # the cluster is down: nothing of it may stay
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGTERM)
