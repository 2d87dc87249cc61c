"""The cluster path on this machine: cluster.yaml against Ray's schema and the EC2 API model, a multi-node
Ray whose worker nodes cannot see the driver's disk, autoscaling from zero with Ray's fake node provider,
a storage URI on a local S3 server, and trials that ask for nodes that never come."""
import json
import os
import shlex
import socket
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml

from e2ettt import faults
from e2ettt.cluster import capacity_from_config
from e2ettt.testing import fake_autoscaling_config
from sweeps import healing_grid

REPO = Path(__file__).resolve().parent.parent
CLUSTER_YAML = yaml.safe_load((REPO / "cluster.yaml").read_text())


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ray_cli(*args: str, env: dict | None = None, prefix: list[str] | None = None) -> None:
    cmd = [str(Path(sys.executable).parent / "ray"), *args]
    subprocess.run((prefix or []) + cmd, check=True, capture_output=True, env={**os.environ, **(env or {})}, timeout=120)


def ray_stop() -> None:
    subprocess.run([str(Path(sys.executable).parent / "ray"), "stop", "--force"], capture_output=True, timeout=120)


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
        assert node_type["node_config"]["ImageId"].startswith("resolve:ssm:/aws/service/deeplearning/")
    bad = as_launched({**config["available_node_types"]["gpu_8xh100"]["node_config"], "InstanceMarketOptions": None})
    assert ParamValidator().validate(bad, shape).has_errors()  # the check can fail: a null field is rejected
    assert any("boto3" in c for c in config["head_setup_commands"])  # the autoscaler on the head imports boto3
    assert "trial_driver" in config["available_node_types"]["head"]["resources"]
    assert all("venv" in c for c in config["head_start_ray_commands"] + config["worker_start_ray_commands"] if "ray " in c)


def test_concurrency_comes_from_the_clusters_largest_size():
    eight = {"CPU": 8, "GPU": 8}
    assert capacity_from_config(CLUSTER_YAML, eight, strict=True) == (4, 4, 8)  # one 8-GPU trial per p5, 4 nodes
    assert capacity_from_config(CLUSTER_YAML, {"CPU": 1, "GPU": 1}, strict=True)[0] == 32  # 1-GPU trials share nodes
    assert capacity_from_config(CLUSTER_YAML, {"CPU": 8, "GPU": 16}, strict=True)[0] == 0  # fits no node
    capped = {**CLUSTER_YAML, "max_workers": 2}
    assert capacity_from_config(capped, eight, strict=True) == (2, 2, 8)


# ---------------------------------------------------------------- no shared filesystem

@pytest.mark.slow
@pytest.mark.skipif(not namespaces_allowed(), reason="private mount namespaces (unshare -m + tmpfs) are not permitted here")
def test_sweep_on_nodes_that_cannot_see_the_drivers_disk(tmp_path, tiny_demo, capsys):
    """Worker nodes run in private mount namespaces with a tmpfs over the run directory's parent: nothing
    the driver or another node writes there is visible to them. The sweep gives the local run's numbers."""
    hidden = tmp_path / "out"
    hidden.mkdir()
    port = free_port()
    ray_stop()
    try:
        ray_cli("start", "--head", f"--port={port}", "--num-cpus=0", "--resources={\"trial_driver\": 4}",
                "--include-dashboard=false", "--disable-usage-stats")
        for _ in range(2):  # each worker node: its own mount namespace, the run directory replaced by an empty tmpfs
            private = ["unshare", "-m", "sh", "-c", f"mount -t tmpfs tmpfs {shlex.quote(str(hidden))} && exec \"$0\" \"$@\""]
            ray_cli("start", f"--address=127.0.0.1:{port}", "--num-cpus=2", "--disable-usage-stats", prefix=private)
        marker = hidden / "written-by-the-driver"
        marker.write_text("x")
        assert not any(probe_workers(port, marker))  # the environment is right: workers cannot see the driver's files
        args = smoke_args(tiny_demo, hidden, "--seeds", "0,1", "--name", "nofs")
        assert healing_grid.main(args + ["--address", f"127.0.0.1:{port}"]) == 0
        remote = pd.read_parquet(hidden / "nofs" / "trials.parquet").set_index(["regime", "seed"]).sort_index()
        head_node = json.loads((hidden / "nofs" / "manifest.json").read_text())
        # Without --address the sweep starts its own Ray, although a cluster is up and `ray start` left its address.
        capsys.readouterr()
        assert healing_grid.main(smoke_args(tiny_demo, tmp_path / "local", "--seeds", "0,1", "--name", "nofs")) == 0
    finally:
        ray_stop()
    local = pd.read_parquet(tmp_path / "local" / "nofs" / "trials.parquet").set_index(["regime", "seed"]).sort_index()
    assert list(remote["status"]) == ["ok"] * 4 and len(set(remote["node_id"])) >= 1
    assert not set(local["node_id"]) & set(remote["node_id"])  # the local run did not join the cluster
    assert set(head_node["nodes"]) == set(remote["node_id"])  # the manifest lists every node that ran a trial
    for col in ("pre_quant_bpb", "post_quant_bpb", "post_ttt_bpb", "first_chunk_delta"):
        assert remote[col].to_numpy() == pytest.approx(local[col].to_numpy(), abs=1e-9), col


# ---------------------------------------------------------------- autoscaling from zero

@pytest.mark.slow
def test_trials_run_in_parallel_on_nodes_the_autoscaler_adds(tmp_path, tiny_demo, capsys, monkeypatch):
    port = free_port()
    config = tmp_path / "autoscaler.yaml"
    import ray

    config.write_text(yaml.safe_dump(fake_autoscaling_config(f"{ray._private.services.get_node_ip_address()}:{port}")))
    # set before `ray start`: the nodes the autoscaler adds inherit the head's environment
    monkeypatch.setenv(faults.ENV, json.dumps({"fp": {"hold_seconds": 6}, "int3": {"hold_seconds": 6}}))
    ray_stop()
    try:
        ray_cli("start", "--head", f"--port={port}", f"--autoscaling-config={config}", "--num-cpus=0",
                "--resources={\"trial_driver\": 4}", "--include-dashboard=false", "--disable-usage-stats",
                env={"RAY_FAKE_CLUSTER": "1", "AUTOSCALER_UPDATE_INTERVAL_S": "1"})
        code = healing_grid.main(smoke_args(tiny_demo, tmp_path, "--name", "autoscale", "--address", f"127.0.0.1:{port}",
                                            "--cluster-config", str(config), "--set", "progress_seconds=5"))
        out = capsys.readouterr().out
    finally:
        ray_stop()
    assert code == 0, out
    assert "up to 2 worker nodes" in out and "hold 2 trial(s) at once" in out
    assert "node(s) up with" in out  # while nodes come up, the sweep says where it stands
    rows = pd.read_parquet(tmp_path / "autoscale" / "trials.parquet").set_index("regime")
    assert list(rows["status"]) == ["ok", "ok"]
    assert rows.loc["fp", "node_id"] != rows.loc["int3", "node_id"]  # two nodes, both added by the autoscaler
    assert not {rows.loc["fp", "node_id"], rows.loc["int3", "node_id"]} & {""}
    fp, q = rows.loc["fp"], rows.loc["int3"]
    assert fp["started_at"] < q["ended_at"] and q["started_at"] < fp["ended_at"]  # on their nodes at the same time


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
def test_a_trial_whose_nodes_never_come_ends_as_an_error_and_the_others_finish(tmp_path, tiny_demo, capsys, monkeypatch):
    monkeypatch.setenv(faults.ENV, json.dumps({"int3": {"resources": {"no_such_node_type": 1}}}))
    args = smoke_args(tiny_demo, tmp_path, "--name", "never", "--start-timeout", "8", "--set", "settings_per_trial=1")
    t0 = time.perf_counter()
    assert healing_grid.main(args) == 0
    rows = pd.read_parquet(tmp_path / "never" / "trials.parquet").set_index("regime")
    assert rows.loc["fp", "status"] == "ok"
    assert rows.loc["int3", "status"] == "error"
    assert rows.loc["int3", "error"].startswith("workers did not start within 8 s")
    assert "no_such_node_type" in rows.loc["int3", "error"] and "\n" not in rows.loc["int3", "error"]
    assert time.perf_counter() - t0 < 240
