"""The cluster path on this machine: cluster.yaml against Ray's schema and the EC2 API model, a multi-node
Ray whose worker nodes cannot see the driver's disk, autoscaling from zero with Ray's fake node provider,
a storage URI on a local S3 server, and trials that ask for nodes that never come."""
import contextlib
import json
import os
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml

from e2ettt.driver.cluster import capacity_from_config
from e2ettt.launch import free_port
from e2ettt.testing import ray_node
from sweeps import healing_grid

from .trials import sweep_rows

REPO = Path(__file__).resolve().parent.parent
CLUSTER_YAML = yaml.safe_load((REPO / "cluster.yaml").read_text())


def namespaces_allowed() -> bool:
    probe = subprocess.run(["unshare", "-m", "sh", "-c", "mount -t tmpfs tmpfs /mnt"], capture_output=True)
    return probe.returncode == 0


def probe_workers(port: int, path: Path) -> list[bool]:
    """Whether a task on each worker node sees `path`."""
    import ray

    ray.init(address=f"127.0.0.1:{port}", log_to_driver=False)
    try:
        @ray.remote(num_cpus=2)
        def sees(p: str) -> bool:
            return os.path.exists(p)

        return ray.get([sees.remote(str(path)) for _ in range(2)])
    finally:
        ray.shutdown()


def smoke_args(demo, out, *extra):
    return ["--checkpoint", str(demo.checkpoint), "--data", str(demo.data_dir), "--tokenizer", str(demo.tokenizer),
            "--out", str(out), "--smoke", "--set", "quant.min_numel=1024", "--max-tokens", "1024", "--context", "128",
            "--chunks", "256", *extra]


# ---------------------------------------------------------------- cluster.yaml

def run_instances_shape():
    import botocore.session

    session = botocore.session.get_session()
    client = session.create_client("ec2", region_name="us-east-1", endpoint_url="http://127.0.0.1:9",
                                   aws_access_key_id="dummy", aws_secret_access_key="dummy")
    return client.meta.service_model.operation_model("RunInstances").input_shape


def as_launched(node_config: dict) -> dict:
    """What Ray's AWS provider hands boto3's create_instances after bootstrap (ids are placeholders)."""
    return {**node_config, "MinCount": 1, "MaxCount": 1, "SubnetId": "subnet-0123456789abcdef0",
            "SecurityGroupIds": ["sg-0123456789abcdef0"], "KeyName": "ray-autoscaler_us-east-1",
            "TagSpecifications": [{"ResourceType": "instance", "Tags": [{"Key": "ray-cluster-name", "Value": "e2ettt"}]}]}


def test_cluster_yaml_passes_rays_validation_and_the_ec2_api_model():
    from botocore.validate import ParamValidator
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = prepare_config(CLUSTER_YAML)
    validate_config(config)
    shape = run_instances_shape()
    for name, node_type in config["available_node_types"].items():
        report = ParamValidator().validate(as_launched(node_type["node_config"]), shape)
        assert not report.has_errors(), f"{name}: {report.generate_report()}"
    types = config["available_node_types"]
    [image] = {t["node_config"]["ImageId"] for t in types.values()}  # one image for every node
    assert re.fullmatch(r"ami-(PINNED|[0-9a-f]{8}|[0-9a-f]{17})", image)  # the placeholder, or the id the README pins
    # the head's role cannot pass a role: a GPU node with an instance profile would never launch
    assert not any("IamInstanceProfile" in t["node_config"] for n, t in types.items() if n != config["head_node_type"])
    bad = as_launched({**config["available_node_types"]["gpu_8xh100"]["node_config"], "InstanceMarketOptions": None})
    assert ParamValidator().validate(bad, shape).has_errors()  # the check can fail: a null field is rejected
    assert any("boto3" in c for c in config["head_setup_commands"])  # the autoscaler on the head imports boto3
    assert "trial_driver" in config["available_node_types"]["head"]["resources"]
    assert all("venv" in c for c in config["head_start_ray_commands"] + config["worker_start_ray_commands"] if "ray " in c)


def test_concurrency_comes_from_the_clusters_largest_size():
    eight = {"CPU": 8, "GPU": 8}
    assert capacity_from_config(CLUSTER_YAML, eight, strict=True) == (4, 4, 32)  # one 8-GPU trial per p5, 4 nodes
    assert capacity_from_config(CLUSTER_YAML, {"CPU": 1, "GPU": 1}, strict=True) == (32, 4, 32)  # driver slots for all 32
    assert capacity_from_config(CLUSTER_YAML, {"CPU": 8, "GPU": 16}, strict=True)[0] == 0  # fits no node
    capped = {**CLUSTER_YAML, "max_workers": 2}
    assert capacity_from_config(capped, eight, strict=True) == (2, 2, 32)


def test_a_dead_heads_address_file_is_removed_and_a_live_ones_kept(tmp_path, monkeypatch):
    """`ray start` records its head's address in Ray's temp directory and `ray stop` removes it; a head stopped any
    other way leaves it, and a local Ray's processes would look for the State API there."""
    import socket

    from e2ettt.driver.cluster import forget_dead_address

    monkeypatch.setenv("RAY_TMPDIR", str(tmp_path))
    record = tmp_path / "ray" / "ray_current_cluster"
    said = []
    assert not forget_dead_address(said.append) and not said  # no file: nothing to do
    record.parent.mkdir()
    with socket.socket() as live:
        live.bind(("127.0.0.1", 0))
        live.listen()
        record.write_text(f"127.0.0.1:{live.getsockname()[1]}")
        assert not forget_dead_address(said.append) and record.exists() and not said  # a Ray listens there
    dead = free_port()
    record.write_text(f"127.0.0.1:{dead}")
    assert forget_dead_address(said.append) and not record.exists()
    assert len(said) == 1 and f"127.0.0.1:{dead}, where no Ray listens" in said[0]
    record.write_text("not an address")
    assert forget_dead_address(said.append) and not record.exists()


# ---------------------------------------------------------------- no shared filesystem

@pytest.mark.slow
@pytest.mark.skipif(not namespaces_allowed(), reason="private mount namespaces (unshare -m + tmpfs) are not permitted here")
@pytest.mark.usefixtures("own_ray")
def test_sweep_on_nodes_that_cannot_see_the_drivers_disk(tmp_path, tiny_demo, capsys):
    """Worker nodes run in private mount namespaces with a tmpfs over the run directory's parent: nothing
    the driver or another node writes there is visible to them. The sweep gives the local run's numbers."""
    hidden = tmp_path / "out"
    hidden.mkdir()
    port = free_port()
    with contextlib.ExitStack() as nodes:
        nodes.enter_context(ray_node("--head", f"--port={port}", "--num-cpus=0", "--resources={\"trial_driver\": 4}",
                                     "--include-dashboard=false", "--disable-usage-stats"))
        for _ in range(2):  # each worker node: its own mount namespace, the run directory replaced by an empty tmpfs
            private = ["unshare", "-m", "sh", "-c", f"mount -t tmpfs tmpfs {shlex.quote(str(hidden))} && exec \"$0\" \"$@\""]
            nodes.enter_context(ray_node(f"--address=127.0.0.1:{port}", "--num-cpus=2", "--disable-usage-stats",
                                         prefix=private))
        marker = hidden / "written-by-the-driver"
        marker.write_text("x")
        assert not any(probe_workers(port, marker))  # the environment is right: workers cannot see the driver's files
        args = smoke_args(tiny_demo, hidden, "--name", "nofs")
        assert healing_grid.main(args + ["--address", f"127.0.0.1:{port}"]) == 0
        remote = pd.read_parquet(hidden / "nofs" / "trials.parquet").set_index("row_id").sort_index()
        head_node = json.loads((hidden / "nofs" / "manifest.json").read_text())
        # Without --address the sweep starts a Ray of its own, although a cluster is up and `ray start` left its address.
        import ray

        from e2ettt.driver.cluster import start_ray

        local_cfg = healing_grid.build_config(healing_grid.parse_args(smoke_args(tiny_demo, tmp_path, "--name", "local")))
        assert start_ray(local_cfg, log=lambda *a: None)
        try:
            assert not ray.get_runtime_context().gcs_address.endswith(f":{port}")
        finally:
            ray.shutdown()
    assert list(remote["status"]) == ["ok"] * 2 and len(set(remote["node_id"])) >= 1
    assert set(head_node["nodes"]) == set(remote["node_id"])  # the manifest lists every node that ran a trial
    # the numbers of the same plan on this machine's processes, without Ray: the same rows, to the last digits
    plain = smoke_args(tiny_demo, tmp_path / "plain", "--name", "nofs")  # row ids: not of the out dir
    local = sweep_rows(healing_grid.build_config(healing_grid.parse_args(plain)))
    assert set(local) == set(remote.index)
    for col in ("pre_quant_bpb", "post_quant_bpb", "post_ttt_bpb", "first_chunk_delta"):
        assert remote[col].to_numpy() == pytest.approx([getattr(local[r], col) for r in remote.index], abs=1e-9), col


# ---------------------------------------------------------------- autoscaling from zero

@pytest.mark.slow
def test_trials_run_in_parallel_on_nodes_the_autoscaler_adds(tiny_demo):
    """The fake-cluster benchmark's smoke at 2 nodes (a head with Ray's fake multi-node provider, 0 worker nodes up):
    the sweep sizes itself from the autoscaler config, says where it stands while nodes come up, and its two trials
    run at once on two nodes the autoscaler added (each holds its workers 6 s, so both are placed together)."""
    hold = json.dumps({"fp": {"hold_seconds": 6}, "int3": {"hold_seconds": 6}})  # reaches the nodes in each trial
    done = subprocess.run([sys.executable, str(REPO / "benchmarks" / "fake_cluster.py"), "--smoke", "--nodes", "2",
                           "--checkpoint", str(tiny_demo.checkpoint), "--data", str(tiny_demo.data_dir),
                           "--tokenizer", str(tiny_demo.tokenizer), "--set", "quant.min_numel=1024", "--max-tokens", "1024",
                           "--context", "128", "--chunks", "256", "--regimes", "fp,int3", "--set", "progress_seconds=5",
                           "--set", f"faults={hold}"], cwd=REPO, capture_output=True, text=True, timeout=900)
    out = done.stdout
    assert done.returncode == 0, out[-3000:] + done.stderr[-3000:]
    assert "up to 2 worker nodes" in out and "hold 2 trial(s) at once" in out
    assert "node(s) up with" in out  # while nodes come up, the sweep says where it stands
    header = next(ln for ln in out.splitlines() if ln.startswith("| run | trials |"))
    cold = next(ln for ln in out.splitlines() if ln.startswith("| cold:"))
    table = dict(zip([c.strip() for c in header.split("|")[1:-1]], [c.strip() for c in cold.split("|")[1:-1]]))
    assert table["trials"] == "2" and table["rows ok"] == "2 of 2"
    assert table["worker nodes used"] == "2"  # two nodes, both added by the autoscaler
    assert table["most in flight"] == "2"  # on their nodes at the same time


# ---------------------------------------------------------------- storage URI

@pytest.fixture
def s3(tmp_path, monkeypatch):
    """A local S3 server (moto) and the environment every Ray process inherits to reach it."""
    port = free_port()
    server = subprocess.Popen([str(Path(sys.executable).parent / "moto_server"), "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_ENDPOINT_URL_S3": f"http://127.0.0.1:{port}", "AWS_EC2_METADATA_DISABLED": "true"}
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    import boto3

    client = boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL_S3"])
    for _ in range(50):
        try:
            client.create_bucket(Bucket="sweeps")
            break
        except Exception:
            time.sleep(0.2)
    yield client
    server.terminate()


@pytest.mark.slow
@pytest.mark.usefixtures("own_ray")  # its S3 endpoint is in the environment, which a running Ray never sees
def test_storage_uri_keeps_state_artifacts_and_tables_and_a_fresh_machine_resumes(tmp_path, tiny_demo, s3, capsys):
    args = smoke_args(tiny_demo, tmp_path / "head-1", "--name", "s3run", "--storage", "s3://sweeps/e2ettt")
    assert healing_grid.main(args) == 0
    keys = [o["Key"] for page in s3.get_paginator("list_objects_v2").paginate(Bucket="sweeps") for o in page.get("Contents", [])]
    assert any(k.startswith("e2ettt/s3run/ray/tune-") for k in keys)  # Tune's experiment state
    assert any(k.endswith("/weights.pt") for k in keys) and any("/static-" in k for k in keys)  # artifacts
    assert any(k.startswith("e2ettt/s3run/trials.parquet/part-") for k in keys)
    assert "e2ettt/s3run/manifest.json" in keys
    capsys.readouterr()
    fresh = smoke_args(tiny_demo, tmp_path / "head-2", "--name", "s3run", "--storage", "s3://sweeps/e2ettt")
    assert healing_grid.main(fresh) == 0  # a new machine: empty local run directory
    out = capsys.readouterr().out
    assert "2 rows (2 already in" in out and "parts taken from s3://sweeps/e2ettt" in out
    again = pd.read_parquet(tmp_path / "head-2" / "s3run" / "trials.parquet")
    first = pd.read_parquet(tmp_path / "head-1" / "s3run" / "trials.parquet")
    assert sorted(again["post_ttt_bpb"]) == sorted(first["post_ttt_bpb"])


# ---------------------------------------------------------------- nodes that never come

@pytest.mark.slow
@pytest.mark.usefixtures("shared_ray")
def test_a_trial_whose_nodes_never_come_ends_as_an_error_and_the_others_finish(tmp_path, tiny_demo, capsys):
    args = smoke_args(tiny_demo, tmp_path, "--name", "never", "--start-timeout", "8", "--set", "settings_per_trial=1",
                      "--set", "faults=" + json.dumps({"int3": {"resources": {"no_such_node_type": 1}}}))
    assert healing_grid.main(args) == 0
    rows = pd.read_parquet(tmp_path / "never" / "trials.parquet").set_index("regime")
    assert rows.loc["fp", "status"] == "ok"
    assert rows.loc["int3", "status"] == "error"
    assert rows.loc["int3", "error"].startswith("workers did not start within 8 s (2 attempts)")  # one retry
    assert "no_such_node_type" in rows.loc["int3", "error"] and "\n" not in rows.loc["int3", "error"]


@pytest.mark.usefixtures("own_ray")
def test_a_gpu_count_no_node_offers_is_one_line_before_ray(tmp_path, tiny_inputs, capsys):
    """Locally, only this machine's GPUs; joining a cluster, what its autoscaler config's node types hold (checked
    before the sweep connects: nothing listens at the address given)."""
    import ray
    import torch

    base = smoke_args(tiny_inputs, tmp_path, "--name", "gpus")
    if not torch.cuda.is_available():
        assert healing_grid.main(base + ["--gpus-per-trial", "1"]) == 2
        err = capsys.readouterr().err.strip()
        assert "--gpus-per-trial 1: this machine has 0 GPU(s)" in err and len(err.splitlines()) == 1
    on_p5 = ["--address", f"127.0.0.1:{free_port()}", "--cluster-config", str(REPO / "cluster.yaml")]
    assert healing_grid.main(base + on_p5 + ["--gpus-per-trial", "9"]) == 2
    err = capsys.readouterr().err.strip()
    assert "no node type can hold a trial needing" in err and "'GPU': 9" in err and len(err.splitlines()) == 1
    assert not ray.is_initialized()


@pytest.mark.slow
@pytest.mark.usefixtures("own_ray")
def test_a_sweep_asking_for_gpus_a_cpu_cluster_lacks_waits_aloud_then_ends_with_one_line(tmp_path, tiny_demo, capsys):
    """No autoscaler config tells what the cluster could hold: the sweep waits for a node with a GPU, says so every
    progress_seconds, and ends after --start-timeout with one line naming what no node offered."""
    port = free_port()
    with ray_node("--head", f"--port={port}", "--num-cpus=2", "--num-gpus=0", "--resources={\"trial_driver\": 4}",
                  "--include-dashboard=false", "--disable-usage-stats"):
        code = healing_grid.main(smoke_args(tiny_demo, tmp_path, "--name", "nogpu", "--address", f"127.0.0.1:{port}",
                                            "--gpus-per-trial", "1", "--start-timeout", "6", "--set", "progress_seconds=2"))
        out, err = capsys.readouterr()
    assert code == 2
    assert "waiting for nodes: " in out and "with 0 GPU" in out
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in out + err
    assert "no node offered 1 worker(s) × {'CPU': 1, 'GPU': 1} on one node within --start-timeout 6 s" in err


# ---------------------------------------------------------------- the README's job, as printed

def readme_smoke_job() -> tuple[str, str]:
    """The README's smoke `ray job submit` line and the `ray rsync-down` line that fetches its tables."""
    section = (REPO / "README.md").read_text().split("## On a cluster", 1)[1].split("\n## ", 1)[0]
    lines = [ln.strip() for ln in section.splitlines()]
    submit = next(ln for ln in lines if ln.startswith("ray job submit") and "--smoke" in ln)
    fetch = next(ln for ln in lines if ln.startswith("ray rsync-down") and "/runs/smoke" in ln)
    return submit, fetch


@pytest.mark.slow
def test_the_readmes_smoke_job_runs_on_a_head_with_a_job_server_and_leaves_its_tables_for_the_fetch(tmp_path):
    """The README's job line with nothing changed but the head's home (/home/ubuntu, mapped to a directory here) and
    the job server's port: the repository, venv and inputs where cluster.yaml puts them, a head started (from
    another directory) with its job server, the job submitted through it, its tables where the fetch line reads.
    The inputs are the embedded demo's (built once, cached): a real checkpoint's default quantization settings
    need matrices of its size."""
    import shutil

    from e2ettt.demo import DemoConfig, build_demo, default_cache_dir

    demo = build_demo(DemoConfig(), default_cache_dir())
    submit, fetch = readme_smoke_job()
    home = tmp_path / "ubuntu"
    (home / "e2ettt").mkdir(parents=True)
    shutil.copytree(REPO / "sweeps", home / "e2ettt" / "sweeps")  # the recipe; its runs/ beside it
    (home / "venv").symlink_to(Path(sys.prefix))
    cmd = shlex.split(submit.replace("/home/ubuntu", str(home)))
    inputs = {"--checkpoint": demo.checkpoint, "--tokenizer": demo.tokenizer, "--data": demo.data_dir}
    for flag, src in inputs.items():
        dst = Path(cmd[cmd.index(flag) + 1])
        dst.parent.mkdir(parents=True, exist_ok=True)
        (shutil.copytree if Path(src).is_dir() else shutil.copy)(src, dst)
    port, dashboard = free_port(), free_port()
    elsewhere = tmp_path / "where-ray-start-ran"
    elsewhere.mkdir()
    with ray_node("--head", f"--port={port}", "--num-cpus=2", "--resources={\"trial_driver\": 4}",
                  "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}",
                  "--disable-usage-stats", cwd=elsewhere):
        cmd[0] = str(Path(sys.executable).parent / "ray")
        cmd[cmd.index("--address") + 1] = f"http://127.0.0.1:{dashboard}"  # the tunnel's end
        job = subprocess.run(cmd, capture_output=True, text=True, timeout=900, cwd=tmp_path)
    assert job.returncode == 0, job.stdout[-3000:] + job.stderr[-3000:]
    assert "Job 'raysubmit_" in job.stdout + job.stderr and "succeeded" in job.stdout + job.stderr
    fetched = Path(shlex.split(fetch)[-2].replace("/home/ubuntu", str(home)))  # ray rsync-down cluster.yaml SRC DST
    rows = pd.read_parquet(fetched / "trials.parquet")
    assert sorted(rows["regime"]) == ["fp", "int3"] and set(rows["status"]) == {"ok"}
    assert not (elsewhere / "runs").exists()  # nothing landed in the directory `ray start` ran from


def readme_pod_lines() -> tuple[list[str], list[str]]:
    """The README's one-machine `ray start --head` line and the sweep line that joins it."""
    section = (REPO / "README.md").read_text().split("## One GPU machine", 1)[1].split("\n## ", 1)[0]
    lines = [ln.strip() for ln in section.splitlines()]
    head = next(ln for ln in lines if ln.startswith("ray start --head"))
    sweep = next(ln for ln in lines if ln.startswith("python sweeps/healing_grid.py --address auto"))
    return shlex.split(head), shlex.split(sweep)


@pytest.mark.slow
@pytest.mark.usefixtures("own_ray")
def test_the_readmes_one_machine_head_takes_a_sweep_at_address_auto_and_a_plain_head_is_refused(
        tmp_path, tiny_demo, capsys, monkeypatch):
    """The head as the README starts it (its flags and a port of the test's own, so that no other Ray on the host
    is touched) and the sweep line as printed, on the tiny demo. A head started without the line's resources ends
    the sweep with one line saying what to add, where Tune would wait for ever."""
    head, sweep = readme_pod_lines()
    assert head[:3] == ["ray", "start", "--head"] and sweep[:2] == ["python", "sweeps/healing_grid.py"]
    tiny = ["--checkpoint", str(tiny_demo.checkpoint), "--data", str(tiny_demo.data_dir), "--tokenizer",
            str(tiny_demo.tokenizer), "--out", str(tmp_path), "--set", "quant.min_numel=1024", "--max-tokens", "1024",
            "--context", "128", "--chunks", "256", "--seeds", "0"]
    port = free_port()
    monkeypatch.setenv("RAY_ADDRESS", f"127.0.0.1:{port}")  # where 'auto' looks first: this test's head
    with ray_node("--head", f"--port={port}", "--disable-usage-stats"):
        assert healing_grid.main(sweep[2:] + tiny + ["--name", "plain"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "no node of this cluster has the 'trial_driver' resource" in err, err
    assert "ray start --head --resources='{\"trial_driver\": 8}'" in err
    with ray_node(*head[2:], f"--port={port}"):
        assert healing_grid.main(sweep[2:] + tiny + ["--name", "pod"]) == 0
    rows = pd.read_parquet(tmp_path / "pod" / "trials.parquet")
    assert sorted(rows["regime"]) == ["fp", "int3"] and set(rows["status"]) == {"ok"}
