"""Shared by the benchmark scripts: machine description and appending figures to BENCHMARKS.md."""
from __future__ import annotations

import os
import platform
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
BENCHMARKS_MD = REPO / "BENCHMARKS.md"


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


def record(title: str, rows: list[dict], notes: list[str] = ()) -> None:
    """Print the table and append it, with machine, command and date, to BENCHMARKS.md."""
    table = markdown(rows)
    print(table)
    for n in notes:
        print(n)
    command = "python " + " ".join([os.path.relpath(sys.argv[0], REPO)] + sys.argv[1:])
    block = [f"\n## {title}\n", f"- date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}",
             f"- machine: {machine()}", f"- command: `{command}`", "", table, ""]
    block += [f"- {n}" for n in notes]
    if not BENCHMARKS_MD.exists():
        BENCHMARKS_MD.write_text("# Benchmarks\n\nFigures appended by the scripts in `benchmarks/` (newest last).\n")
    with open(BENCHMARKS_MD, "a") as f:
        f.write("\n".join(block) + "\n")


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
