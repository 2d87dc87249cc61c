"""Shared by the benchmark scripts: machine description, appending figures to BENCHMARKS.md, the smoke runs' model."""
from __future__ import annotations

import contextlib
import os
import platform
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import torch

from e2ettt.model import GPTConfig

REPO = Path(__file__).resolve().parent.parent
BENCHMARKS_MD = REPO / "BENCHMARKS.md"
SMOKE_MODEL = GPTConfig(vocab_size=1024, num_layers=2, model_dim=64, num_heads=2, num_kv_heads=1)  # the tests' tiny GPT


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = f", GPU {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else ""
    return f"{cpu}, {os.cpu_count()} logical CPUs{gpu}; torch {torch.__version__}, Python {platform.python_version()}"


def fmt(v) -> str:
    return f"{v:,.3g}" if isinstance(v, float) else str(v)


def markdown(rows: list[dict]) -> str:
    cols = list(rows[0])
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(fmt(r[c]) for c in cols) + " |" for r in rows]
    return "\n".join(lines)


def record(title: str, rows: list[dict], notes: list[str] = (), append: bool = True) -> None:
    """Print the table and, if `append`, append it with machine, command and date to BENCHMARKS.md."""
    table = markdown(rows)
    print(table)
    for n in notes:
        print(n)
    if not append:
        print("(a smoke run: not appended to BENCHMARKS.md)")
        return
    command = "python " + " ".join([os.path.relpath(sys.argv[0], REPO)] + sys.argv[1:])
    block = [f"\n## {title}\n", f"- date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}",
             f"- machine: {machine()}", f"- command: `{command}`", "", table, ""]
    block += [f"- {n}" for n in notes]
    if not BENCHMARKS_MD.exists():
        BENCHMARKS_MD.write_text("# Benchmarks\n\nFigures appended by the scripts in `benchmarks/` (newest last).\n")
    with open(BENCHMARKS_MD, "a") as f:
        f.write("\n".join(block) + "\n")


@contextlib.contextmanager
def scratch(smoke: bool, runs: Path = REPO / "runs") -> Iterator[Path]:
    """Where a benchmark's sweeps write: `runs` for a real run; for a smoke run, a temporary directory removed after."""
    if not smoke:
        yield runs
        return
    with tempfile.TemporaryDirectory(prefix="e2ettt-bench-smoke-") as tmp:
        yield Path(tmp)


def planned_only(argv: list[str]) -> str:
    """A smoke run's stand-in for the second sweep of a comparison: healing_grid with `argv` and --dry-run (flags,
    config, inputs and plan all built and checked; nothing started), its plan line returned; the comparison is then
    measured on the first sweep's rows. One line and exit 1 if it fails."""
    import subprocess

    done = subprocess.run([sys.executable, str(REPO / "sweeps" / "healing_grid.py"), *argv, "--dry-run"], cwd=REPO,
                          capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(argv)} --dry-run failed ({done.returncode}):\n{(done.stdout + done.stderr)[-3000:]}")
    return next((ln.strip() for ln in done.stdout.splitlines() if ln.startswith("dry run:")), "")


def shown(path: Path) -> str:
    """`path` relative to the repository if it lies in it."""
    return str(path.relative_to(REPO) if path.is_relative_to(REPO) else path)


def matmul_rate(n: int = 2048, dtype: torch.dtype = torch.float32, device: str = "cpu", repeat: int = 5) -> float:
    """Measured FLOP/s of an n×n×n matmul (best of `repeat`)."""
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    a @ b
    best = float("inf")
    for _ in range(repeat):
        if device == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        a @ b
        if device == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best
