"""The AWS recipe run the way a user runs it, against a local moto EC2/IAM server: the README's pinning step
writes the image into a copy of cluster.yaml, Ray's own bootstrap (`bootstrap_aws`: instance profile and role, key pair,
subnets, security group) runs on it, and Ray launches one node of every type (the head as `ray up` does, GPU
nodes through the node launcher of the head's autoscaler). The role Ray made for the head, read back from the
server, must allow every action those launches and the sweep's storage need; moto does not check iam:PassRole
on a launch, so this file does. Ray's file mounts, run with rsync on a laptop-like tree, ship each input once.
"""
import copy
import os
import shutil
import subprocess
import sys
import time
import types
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from e2ettt.launch import free_port
from tests.iam_policy import allowed, missing

REPO = Path(__file__).resolve().parent.parent
CLUSTER_YAML = REPO / "cluster.yaml"
REGION = "us-east-1"
PIN_IMAGE = r"s/(ImageId: &ami )ami-[0-9A-Za-z]+/\1{ami}/"  # the README's pinning sed, $AMI filled in
P_QUOTA_VCPUS = 768  # README: the "Running On-Demand P instances" quota that max_workers p5 nodes take
SSM_IMAGE = "resolve:ssm:/aws/service/deeplearning/ami/x86_64/base-oss-nvidia-driver-gpu-ubuntu-22.04/latest/ami-id"


def fresh_boto() -> None:
    """Forget boto3's default session and Ray's cached clients: both keep the endpoint and keys they were made with."""
    import boto3
    from ray.autoscaler._private.aws.utils import client_cache, resource_cache

    boto3.DEFAULT_SESSION = None
    resource_cache.cache_clear()
    client_cache.cache_clear()


@pytest.fixture(scope="module")
def aws(tmp_path_factory):
    """A moto EC2/IAM server with AWS's managed policies, real instance types and no stock images, and an
    environment in which boto3 (so Ray) reaches only it, with dummy keys and a throwaway home for Ray's SSH key."""
    server_bin = Path(sys.executable).parent / "moto_server"
    if not server_bin.exists():
        pytest.skip("moto_server is not installed (pip install 'moto[server]')")
    port = free_port()
    env = {**os.environ, "MOTO_IAM_LOAD_MANAGED_POLICIES": "true", "MOTO_EC2_LOAD_DEFAULT_AMIS": "false",
           "MOTO_ENABLE_AMI_VALIDATION": "true", "MOTO_EC2_ENABLE_INSTANCE_TYPE_VALIDATION": "true"}
    server = subprocess.Popen([str(server_bin), "-H", "127.0.0.1", "-p", str(port)], env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        try:
            urllib.request.urlopen(f"{url}/moto-api/", timeout=2)
            break
        except OSError as exc:
            if server.poll() is not None or time.monotonic() > deadline:
                server.kill()
                pytest.skip(f"moto_server did not start on port {port}: {exc}")
            time.sleep(0.1)
    home = tmp_path_factory.mktemp("home")
    with pytest.MonkeyPatch.context() as mp:
        for key in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL_S3"):
            mp.delenv(key, raising=False)
        for key, value in {"AWS_ENDPOINT_URL": url, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                           "AWS_DEFAULT_REGION": REGION, "AWS_EC2_METADATA_DISABLED": "true", "HOME": str(home),
                           "AWS_CONFIG_FILE": str(home / "aws-config"),
                           "AWS_SHARED_CREDENTIALS_FILE": str(home / "aws-credentials")}.items():
            mp.setenv(key, value)
        fresh_boto()
        try:
            yield url
        finally:
            fresh_boto()
            server.terminate()
            server.wait(timeout=30)


# ---------------------------------------------------------------- roles and what they must allow

def role_arn_of(iam, profile: dict) -> str:
    """The role behind an IamInstanceProfile given by Name or Arn."""
    name = profile.get("Name") or profile["Arn"].rsplit("/", 1)[1]
    return iam.get_instance_profile(InstanceProfileName=name)["InstanceProfile"]["Roles"][0]["Arn"]


def role_documents(iam, role_arn: str) -> list[dict]:
    """A role's policy documents: the default version of each attached managed policy, then its inline policies."""
    role = role_arn.rsplit("/", 1)[1]
    docs = []
    for policy in iam.list_attached_role_policies(RoleName=role)["AttachedPolicies"]:
        version = iam.get_policy(PolicyArn=policy["PolicyArn"])["Policy"]["DefaultVersionId"]
        docs.append(iam.get_policy_version(PolicyArn=policy["PolicyArn"], VersionId=version)["PolicyVersion"]["Document"])
    for name in iam.list_role_policies(RoleName=role)["PolicyNames"]:
        docs.append(iam.get_role_policy(RoleName=role, PolicyName=name)["PolicyDocument"])
    return docs


def head_role_needs(config: dict, role_arn) -> list[tuple[str, str]]:
    """What the head's instance role must be allowed: what Ray's AWS node provider on the head calls to list,
    launch, tag and end each worker type (iam:PassRole on the role of a worker's instance profile; ssm:GetParameters
    when EC2 resolves a `resolve:ssm:` image with the launching identity's rights), and --storage on S3, which
    the sweep's driver on the head writes. `role_arn` maps an IamInstanceProfile to its role's ARN."""
    stopped = config["provider"].get("cache_stopped_nodes", True)
    ends = ("ec2:StopInstances", "ec2:StartInstances") if stopped else ("ec2:TerminateInstances",)
    needs = {("ec2:DescribeInstances", "*"), *((a, "*") for a in ends),
             ("s3:ListBucket", "*"), ("s3:GetObject", "*"), ("s3:PutObject", "*")}
    for name, node_type in config["available_node_types"].items():
        if name == config["head_node_type"]:
            continue
        node_config = node_type["node_config"]
        needs |= {("ec2:RunInstances", "*"), ("ec2:CreateTags", "*")}  # Ray tags instances in RunInstances
        if "IamInstanceProfile" in node_config:
            needs.add(("iam:PassRole", role_arn(node_config["IamInstanceProfile"])))
        if str(node_config.get("ImageId", "")).startswith("resolve:ssm:"):
            needs.add(("ssm:GetParameters", "*"))
    return sorted(needs)


# ---------------------------------------------------------------- the launch

@dataclass
class Launch:
    """cluster.yaml after the README's pin step and Ray's bootstrap, and what launching every node type made."""

    config: dict  # as bootstrapped (what `ray up` holds; the head gets it without `head_node`)
    ami: str  # the image the pin step wrote
    instances: dict  # node type -> its EC2 instances (describe_instances)
    failures: list  # the launches Ray's node launcher reports failed (its event summary)
    iam: object  # a boto3 IAM client on the server

    def role_of(self, profile: dict) -> str:
        return role_arn_of(self.iam, profile)

    @property
    def head_role(self) -> str:
        return self.role_of(self.config["head_node"]["IamInstanceProfile"])


def pin_image(source: Path, dest: Path, ami: str) -> dict:
    """The README's pinning step on a copy of cluster.yaml: the same sed, with the id the SSM parameter gave."""
    shutil.copy(source, dest)
    subprocess.run(["sed", "-i.bak", "-E", PIN_IMAGE.format(ami=ami), str(dest)], check=True)
    return yaml.safe_load(dest.read_text())


def launch_every_node_type(config: dict) -> list[str]:
    """One node of each type, composed as Ray composes it: the head as `ray up` does (the bootstrap's `head_node`
    fields, then the type's node_config), GPU nodes through the foreground node launcher the head's autoscaler
    runs, given the config the head receives (without `head_node`). Returns the launches Ray reports failed."""
    from ray.autoscaler._private.aws.node_provider import AWSNodeProvider
    from ray.autoscaler._private.event_summarizer import EventSummarizer
    from ray.autoscaler._private.node_launcher import BaseNodeLauncher
    from ray.autoscaler._private.node_provider_availability_tracker import NodeProviderAvailabilityTracker
    from ray.autoscaler._private.util import ConcurrentCounter
    from ray.autoscaler.tags import NODE_KIND_HEAD, TAG_RAY_NODE_KIND, TAG_RAY_NODE_NAME, TAG_RAY_USER_NODE_TYPE

    provider = AWSNodeProvider(config["provider"], config["cluster_name"])
    head = config["head_node_type"]
    provider.create_node({**config["head_node"], **config["available_node_types"][head]["node_config"]},
                         {TAG_RAY_NODE_KIND: NODE_KIND_HEAD, TAG_RAY_USER_NODE_TYPE: head,
                          TAG_RAY_NODE_NAME: f"ray-{config['cluster_name']}-head"}, 1)
    on_head = {k: v for k, v in config.items() if k != "head_node"}
    pending, events = ConcurrentCounter(), EventSummarizer()
    launcher = BaseNodeLauncher(provider, pending, events, NodeProviderAvailabilityTracker(),
                                node_types=on_head["available_node_types"])
    for name in on_head["available_node_types"]:
        if name != head:
            pending.inc(name, 1)
            launcher.launch_node(on_head, 1, name)
    return [line for line in events.summary() if line.startswith("Failed to launch")]


def instances_by_type(ec2, cluster_name: str) -> dict:
    found: dict = {}
    pages = ec2.get_paginator("describe_instances").paginate(
        Filters=[{"Name": "tag:ray-cluster-name", "Values": [cluster_name]}])
    for page in pages:
        for reservation in page["Reservations"]:
            for inst in reservation["Instances"]:
                tags = {t["Key"]: t["Value"] for t in inst.get("Tags", [])}
                found.setdefault(tags["ray-user-node-type"], []).append(inst)
    return found


@pytest.fixture(scope="module")
def launched(aws, tmp_path_factory):
    import boto3
    import ray.autoscaler._private.aws.config as aws_config
    from ray.autoscaler._private.util import prepare_config, validate_config

    ec2, iam = boto3.client("ec2", region_name=REGION), boto3.client("iam", region_name=REGION)
    ami = ec2.register_image(Name="Deep Learning Base OSS Nvidia Driver GPU AMI (Ubuntu 22.04)")["ImageId"]
    config = pin_image(CLUSTER_YAML, tmp_path_factory.mktemp("laptop") / "cluster.yaml", ami)
    config = prepare_config(config)
    validate_config(config)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(aws_config, "time", types.SimpleNamespace(sleep=lambda s: None))  # IAM propagation waits (2 x 15 s)
        config = aws_config.bootstrap_aws(config)
    failures = launch_every_node_type(config)
    return Launch(config, ami, instances_by_type(ec2, config["cluster_name"]), failures, iam)


# ---------------------------------------------------------------- tests

def test_rays_bootstrap_and_launcher_start_every_node_type_on_one_pinned_image(launched):
    shipped = yaml.safe_load(CLUSTER_YAML.read_text())["available_node_types"]
    assert len({t["node_config"]["ImageId"] for t in shipped.values()}) == 1  # one image for the whole cluster
    assert not launched.failures, launched.failures
    assert set(launched.instances) == set(shipped)
    for name, node_type in shipped.items():
        [inst] = launched.instances[name]
        assert inst["InstanceType"] == node_type["node_config"]["InstanceType"], name
        assert inst["ImageId"] == launched.ami, name
        if name == launched.config["head_node_type"]:  # the profile Ray made: its role launches the GPU nodes
            assert inst["IamInstanceProfile"]["Arn"].endswith(":instance-profile/ray-autoscaler-v1")
        else:
            assert "IamInstanceProfile" not in inst, name
    attached = launched.iam.list_attached_role_policies(RoleName=launched.head_role.rsplit("/", 1)[1])
    assert {p["PolicyName"] for p in attached["AttachedPolicies"]} == {"AmazonEC2FullAccess", "AmazonS3FullAccess"}


def test_the_role_ray_makes_for_the_head_allows_all_the_recipe_needs(launched):
    needs = head_role_needs(launched.config, launched.role_of)
    assert ("ec2:RunInstances", "*") in needs and ("s3:PutObject", "*") in needs
    assert missing(role_documents(launched.iam, launched.head_role), needs) == []


def test_a_worker_instance_profile_or_an_ssm_image_needs_what_rays_role_lacks(launched):
    """The two ways back to refused worker launches: an instance profile on GPU nodes (iam:PassRole) and an image
    that EC2 resolves from SSM at launch (ssm:GetParameters); the README would have to grant either."""
    docs = role_documents(launched.iam, launched.head_role)
    profile = {"IamInstanceProfile": {"Name": "ray-autoscaler-v1"}}  # what cluster.yaml gave GPU nodes before
    for change, lacking in ((profile, f"iam:PassRole on {launched.head_role}"),
                            ({"ImageId": SSM_IMAGE}, "ssm:GetParameters on *")):
        config = copy.deepcopy(launched.config)
        for name, node_type in config["available_node_types"].items():
            if name != config["head_node_type"]:
                node_type["node_config"].update(change)
        assert missing(docs, head_role_needs(config, launched.role_of)) == [lacking]


def test_gpu_nodes_declare_what_ec2_gives_and_take_the_quota_the_readme_states(launched):
    import boto3

    config = launched.config
    workers = [t for n, t in config["available_node_types"].items() if n != config["head_node_type"]]
    kinds = sorted({t["node_config"]["InstanceType"] for t in workers})
    found = boto3.client("ec2", region_name=REGION).describe_instance_types(InstanceTypes=kinds)["InstanceTypes"]
    info = {i["InstanceType"]: i for i in found}
    for node_type in workers:
        it = info[node_type["node_config"]["InstanceType"]]
        gpus = sum(g["Count"] for g in it.get("GpuInfo", {}).get("Gpus", []))
        assert node_type["resources"] == {"CPU": it["VCpuInfo"]["DefaultVCpus"], "GPU": gpus}
    [gpu_type] = workers  # one GPU type: the whole cluster's max_workers can be of it
    vcpus = info[gpu_type["node_config"]["InstanceType"]]["VCpuInfo"]["DefaultVCpus"]
    assert min(gpu_type["max_workers"], config["max_workers"]) * vcpus == P_QUOTA_VCPUS


def test_policy_evaluator_refuses_what_it_cannot_prove_allowed():
    docs = [{"Statement": [{"Effect": "Allow", "Action": "ec2:*", "Resource": "*"},
                           {"Effect": "Allow", "NotAction": ["iam:*", "s3:*"], "Resource": "*"},
                           {"Effect": "Allow", "Action": "iam:PassRole", "Resource": "arn:aws:iam::1:role/ray-?"},
                           {"Effect": "Allow", "Action": "iam:CreateServiceLinkedRole", "Resource": "*",
                            "Condition": {"StringEquals": {"iam:AWSServiceName": "spot.amazonaws.com"}}}]},
            {"Statement": {"Effect": "Deny", "Action": "ec2:Terminate*", "Resource": "*"}}]
    assert allowed(docs, "ec2:RunInstances") and allowed(docs, "EC2:runinstances") and allowed(docs, "sqs:SendMessage")
    assert not allowed(docs, "ec2:TerminateInstances")  # an explicit Deny wins over ec2:*
    assert not allowed(docs, "s3:PutObject")  # outside NotAction's Allow, and nothing else allows it
    assert allowed(docs, "iam:PassRole", "arn:aws:iam::1:role/ray-a")
    assert not allowed(docs, "iam:PassRole", "arn:aws:iam::1:role/ray-ab") and not allowed(docs, "iam:PassRole")
    assert not allowed(docs, "iam:CreateServiceLinkedRole")  # conditional: not provable without the request
    assert missing(docs, [("ec2:RunInstances", "*"), ("s3:GetObject", "*")]) == ["s3:GetObject on *"]


# ---------------------------------------------------------------- file mounts

def sync_mounts(mounts: dict, exclude: list[str], dest: Path) -> None:
    """Ray's file-mount sync from the current directory (updater.py: `~` expanded, a directory gets a trailing
    slash on both sides, then `rsync -avz` with Ray's own --exclude arguments), into `dest` instead of a node."""
    for remote, local in mounts.items():
        local, target = os.path.expanduser(local), str(dest) + remote
        if os.path.isdir(local):
            local, target = local.rstrip("/") + "/", target.rstrip("/") + "/"
        os.makedirs(os.path.dirname(target.rstrip("/")), exist_ok=True)
        rsync(local, target, exclude)


def rsync(source: str, target: str, exclude: list[str]) -> None:
    """One of Ray's rsync calls (command_runner.py `run_rsync_up`/`run_rsync_down`) without its SSH transport."""
    from ray.autoscaler._private.command_runner import SSHCommandRunner

    excludes = SSHCommandRunner._create_rsync_filter_args(None, {"rsync_exclude": exclude})  # reads only its options
    subprocess.run(["rsync", "-avz", *excludes, source, target], check=True, capture_output=True)


def files_under(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()}


def write_files(root: Path, names) -> None:
    for name in names:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(name)


@pytest.mark.skipif(shutil.which("rsync") is None, reason="rsync is not installed: Ray's file mounts run it")
def test_file_mounts_ship_each_input_once_and_the_fetch_brings_a_run_back(tmp_path, monkeypatch):
    config = yaml.safe_load(CLUSTER_YAML.read_text())
    exclude = config["rsync_exclude"]
    inputs = {"final_model.pt", "fineweb_1024_bpe.model", "data/fineweb_val_000000.bin", "data/fineweb_train_000000.bin"}
    repo_files = {"pyproject.toml", "e2ettt/__init__.py", "sweeps/healing_grid.py"}
    laptop = tmp_path / "laptop"  # your machine as the README leaves it: inputs in ~/golf, `ray up` run in the checkout
    write_files(laptop / "golf", inputs)
    write_files(laptop / "e2ettt", [*repo_files, ".venv/bin/python", "runs/golf/trials.parquet/part-0.parquet",
                                    "e2ettt/__pycache__/model.cpython-311.pyc",
                                    "data/datasets/fineweb10B_sp1024/fineweb_train_000001.bin"])
    monkeypatch.setenv("HOME", str(laptop))
    monkeypatch.chdir(laptop / "e2ettt")
    head, worker = tmp_path / "head", tmp_path / "worker"
    sync_mounts(config["file_mounts"], exclude, head)  # ray up: your machine -> head
    sync_mounts({remote: str(head) + remote for remote in config["file_mounts"]}, exclude, worker)  # head -> GPU node
    for node in (head, worker):
        assert files_under(node / "home/ubuntu/golf") == inputs, node.name
        assert files_under(node / "home/ubuntu/e2ettt") == repo_files, node.name  # no input, env, run or dataset
    # the README's fetch, `ray rsync-down cluster.yaml /home/ubuntu/e2ettt/runs/golf runs/`, of a run the head wrote
    write_files(head / "home/ubuntu/e2ettt/runs/golf", ["trials.parquet/part-1.parquet", "manifest.json"])
    rsync(str(head / "home/ubuntu/e2ettt/runs/golf"), "fetched/", exclude)
    assert files_under(Path("fetched/golf")) == {"trials.parquet/part-1.parquet", "manifest.json"}
    sync_mounts(config["file_mounts"], ["/data"], tmp_path / "old")  # the old pattern would drop golf/data
    assert files_under(tmp_path / "old/home/ubuntu/golf") == {"final_model.pt", "fineweb_1024_bpe.model"}


def test_the_readme_pins_the_image_with_the_sed_these_tests_run():
    readme = (REPO / "README.md").read_text()
    assert f'sed -i.bak -E "{PIN_IMAGE.format(ami="$AMI")}" cluster.yaml' in readme
