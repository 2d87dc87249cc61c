"""The benchmarks cannot rot: each script's --smoke runs its own configs and measurement code at small sizes, prints
its table, and leaves BENCHMARKS.md and the repository's runs/ as they were."""
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
BENCHMARKS_MD = REPO / "BENCHMARKS.md"
NOT_RECORDED = "(a smoke run: not appended to BENCHMARKS.md)"


def tiny_flags(demo, address: str) -> list[str]:
    """healing_grid flags that point a benchmark's sweeps at the tiny demo and at the Ray at `address` (the test
    session's: no Ray start-up per sweep)."""
    return ["--checkpoint", str(demo.checkpoint), "--data", str(demo.data_dir), "--tokenizer", str(demo.tokenizer),
            "--set", "quant.min_numel=1024", "--max-tokens", "1024", "--context", "128", "--chunks", "256",
            "--address", address]


def bench_runs() -> set[str]:
    """Run directories a benchmark would leave in runs/ (theirs are named bench-*)."""
    runs = REPO / "runs"
    return {p.name for p in runs.iterdir() if p.name.startswith("bench-")} if runs.is_dir() else set()


# benchmarks whose smoke another test runs, with more to check: the test that does
ELSEWHERE = {"fake_cluster.py": "tests/test_cluster.py::test_trials_run_in_parallel_on_nodes_the_autoscaler_adds"}


def case(script: str, header: str, says: str = NOT_RECORDED, needs: str = ""):
    """A benchmark, the start of its table's header line, a line it prints, and a module it needs that only the
    dev extra installs."""
    marks = []
    if needs:
        marks.append(pytest.mark.skipif(importlib.util.find_spec(needs) is None, reason=f"{needs} is not installed"))
    return pytest.param(script, header, says, marks=marks, id=script.removesuffix(".py"))


def smoke(script: str, header: str, says: str, flags: list[str], timeout: float) -> None:
    """`python benchmarks/SCRIPT --smoke FLAGS` exits 0, prints its table and `says`, and records nothing."""
    before, runs_before = BENCHMARKS_MD.read_bytes(), bench_runs()
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}
    done = subprocess.run([sys.executable, str(Path("benchmarks") / script), "--smoke", *flags], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)
    out = done.stdout
    assert done.returncode == 0, out[-3000:] + done.stderr[-3000:]
    assert any(line.startswith(header) for line in out.splitlines()), out[-3000:]  # the table's header line
    assert says in out, out[-3000:]
    assert BENCHMARKS_MD.read_bytes() == before
    assert bench_runs() == runs_before


@pytest.mark.parametrize("script, header, says", [
    case("quant_time.py", "| regime | seconds | quantized params |"),
    case("ttt_throughput.py", "| model | dtype | engine tok/s | naive tok/s |"),
    case("gpu_check.py", "| what | tokens/s | TFLOP/s executed |",
         "sweep trial: exit 0" if torch.cuda.is_available() else "CUDA not checked"),
    case("lockstep_scaling.py", "| W | threads/rank | tokens/s |"),
    case("mutants.py", "| mutant | area | mistake it stands for | killed by | s |", "every named test exists"),
    case("mutation.py", "| module | tests | mutmut reads |", needs="mutmut"),
])
def test_smoke_runs_the_benchmark_and_records_nothing(script, header, says):
    smoke(script, header, says, [], timeout=300)


@pytest.mark.slow
@pytest.mark.usefixtures("shared_ray")
@pytest.mark.parametrize("script, header, says", [
    case("early_stopping.py", "| run | rows | wall s | TTT tokens scored |"),
    case("sweep_overhead.py", "| part | one setting per trial | packed (default) |"),
])
def test_smoke_of_a_benchmark_that_sweeps_runs_on_the_sessions_ray_and_records_nothing(script, header, says, tiny_demo):
    import ray

    smoke(script, header, says, tiny_flags(tiny_demo, ray.get_runtime_context().gcs_address), timeout=900)


def test_every_benchmark_script_has_its_smoke_run_by_a_test():
    import inspect

    tests = (test_smoke_runs_the_benchmark_and_records_nothing,
             test_smoke_of_a_benchmark_that_sweeps_runs_on_the_sessions_ray_and_records_nothing)
    here = {p.values[0] for t in tests for m in t.pytestmark if m.name == "parametrize" for p in m.args[1]}
    scripts = {p.name for p in (REPO / "benchmarks").glob("*.py") if not p.name.startswith("_")}
    assert scripts == here | set(ELSEWHERE), scripts ^ (here | set(ELSEWHERE))
    for script, test in ELSEWHERE.items():
        path, name = test.split("::")
        source = inspect.getsource(getattr(importlib.import_module(path.removesuffix(".py").replace("/", ".")), name))
        assert f'"{script}"' in source and '"--smoke"' in source, test
