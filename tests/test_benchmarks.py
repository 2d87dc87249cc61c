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


def tiny_flags(demo) -> list[str]:
    """healing_grid flags that point a benchmark's sweeps at the tiny demo, on a local Ray of 2 CPUs."""
    return ["--checkpoint", str(demo.checkpoint), "--data", str(demo.data_dir), "--tokenizer", str(demo.tokenizer),
            "--set", "quant.min_numel=1024", "--max-tokens", "1024", "--context", "128", "--chunks", "256",
            "--local-cpus", "2"]


def bench_runs() -> set[str]:
    """Run directories a benchmark would leave in runs/ (theirs are named bench-*)."""
    runs = REPO / "runs"
    return {p.name for p in runs.iterdir() if p.name.startswith("bench-")} if runs.is_dir() else set()


def case(script: str, header: str, says: str = NOT_RECORDED, sweeps: bool = False, needs: str = ""):
    """A benchmark, the start of its table's header line, a line it prints, whether it runs sweeps (on the tiny
    demo; they start Ray: slow), and a module it needs that only the dev extra installs."""
    marks = [pytest.mark.slow] if sweeps else []
    if needs:
        marks.append(pytest.mark.skipif(importlib.util.find_spec(needs) is None, reason=f"{needs} is not installed"))
    return pytest.param(script, header, says, sweeps, marks=marks, id=script.removesuffix(".py"))


@pytest.mark.parametrize("script, header, says, sweeps", [
    case("quant_time.py", "| regime | seconds | quantized params |"),
    case("ttt_throughput.py", "| model | dtype | engine tok/s | naive tok/s |"),
    case("gpu_check.py", "| what | tokens/s | TFLOP/s executed |",
         "sweep trial: exit 0" if torch.cuda.is_available() else "CUDA not checked"),
    case("lockstep_scaling.py", "| W | threads/rank | tokens/s |"),
    case("mutants.py", "| mutant | area | mistake it stands for | killed by | s |", "every named test exists"),
    case("mutation.py", "| module | tests | mutmut reads |", needs="mutmut"),
    case("early_stopping.py", "| run | rows | wall s | TTT tokens scored |", sweeps=True),
    case("sweep_overhead.py", "| part | one setting per trial | packed (default) |", sweeps=True),
    case("fake_cluster.py", "| run | trials | capacity (trials at once) |", sweeps=True),
])
def test_smoke_runs_the_benchmark_and_records_nothing(script, header, says, sweeps, request):
    flags = tiny_flags(request.getfixturevalue("tiny_demo")) if sweeps else []
    before, runs_before = BENCHMARKS_MD.read_bytes(), bench_runs()
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}
    done = subprocess.run([sys.executable, str(Path("benchmarks") / script), "--smoke", *flags], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=900 if sweeps else 300)
    out = done.stdout
    assert done.returncode == 0, out[-3000:] + done.stderr[-3000:]
    assert any(line.startswith(header) for line in out.splitlines()), out[-3000:]  # the table's header line
    assert says in out, out[-3000:]
    assert BENCHMARKS_MD.read_bytes() == before
    assert bench_runs() == runs_before
