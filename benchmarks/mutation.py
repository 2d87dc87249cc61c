"""Mutants nobody here wrote: mutmut over the core modules, each with the tests of its area.

For each module, a copy of the committed tree is made in a temporary
directory, its pyproject.toml gets a `[tool.mutmut]` section naming the
module and its tests (the fast tier), and `mutmut run` mutates it there
(mutmut 3: every operator, constant, comparison and call argument it
knows, one at a time, each run against the tests that reach the mutated
function). Reports mutants generated, killed, survived, timed out and
not reached by any test, per module, with the kill rate over the mutants
the tests reach. `benchmarks/mutants.py` keeps the named, end-to-end
mistakes; this one counts what a tool finds.

    pip install mutmut==3.8.1
    python benchmarks/mutation.py [--modules analysis/stats.py,...] [--survivors] [--smoke]

`--smoke` checks that every module and test named exists, makes the copy
and its `[tool.mutmut]` section, and has mutmut read that config there,
without mutating anything.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import REPO, record

# module -> the tests of its area (each a file of the fast tier)
TARGETS = {
    "analysis/stats.py": ["tests/test_stats.py"],
    "analysis/metrics.py": ["tests/test_analysis.py"],
    "analysis/families.py": ["tests/test_analysis.py"],
    "e2ettt/model.py": ["tests/test_model.py", "tests/test_reference_forward.py"],
    "e2ettt/evaluate.py": ["tests/test_evaluate.py"],
    "e2ettt/data.py": ["tests/test_data.py"],
    "e2ettt/tokenizer.py": ["tests/test_tokenizer.py"],
    "e2ettt/ttt.py": ["tests/test_ttt.py", "tests/test_protocols.py"],
    "e2ettt/quant/": ["tests/test_quant.py"],
}


def tree_copy(dst: Path) -> None:
    """The committed tree (what `git ls-files` lists) at `dst`."""
    files = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, check=True).stdout.split(b"\0")
    for name in filter(None, files):
        src = REPO / name.decode()
        if src.is_file():
            (dst / name.decode()).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst / name.decode())


def mutmut_section(module: str, tests: list[str]) -> str:
    package = module.split("/")[0]
    pattern = module + "*" if module.endswith("/") else module
    others = sorted({p.name for p in REPO.iterdir() if p.is_dir() and not p.name.startswith(".")} - {package, "tests"})
    return "\n".join([
        "", "[tool.mutmut]",
        f"source_paths = [{json.dumps(package)}]",
        f"only_mutate = [{json.dumps(pattern)}]",
        f"also_copy = {json.dumps(others + ['README.md', 'BENCHMARKS.md'])}",
        f"pytest_add_cli_args_test_selection = {json.dumps(tests)}",
        'pytest_add_cli_args = ["-m", "not slow", "-p", "no:cacheprovider", "-q"]',
        "",
    ])


def mutate(module: str, tests: list[str], children: int) -> tuple[dict, list[str], float]:
    """mutmut on `module` in a copy of the tree: (its CI/CD counts, the surviving mutants' names, wall seconds)."""
    work = Path(tempfile.mkdtemp(prefix="e2ettt-mutmut-"))
    try:
        tree_copy(work)
        with open(work / "pyproject.toml", "a") as f:
            f.write(mutmut_section(module, tests))
        # mutmut runs the tests from mutants/, so processes they start (ranks, CLIs) import the mutated tree too
        env = dict(os.environ)
        t0 = time.perf_counter()
        run = subprocess.run([sys.executable, "-m", "mutmut", "run", "--max-children", str(children)], cwd=work, env=env,
                             capture_output=True, text=True)
        wall = time.perf_counter() - t0
        if run.returncode != 0 and not (work / "mutants").is_dir():
            raise RuntimeError(f"mutmut run on {module} failed:\n{(run.stdout + run.stderr)[-3000:]}")
        subprocess.run([sys.executable, "-m", "mutmut", "export-cicd-stats"], cwd=work, env=env, capture_output=True)
        stats_file = work / "mutants" / "mutmut-cicd-stats.json"
        if not stats_file.is_file():
            raise RuntimeError(f"mutmut left no statistics for {module}:\n{(run.stdout + run.stderr)[-3000:]}")
        stats = json.loads(stats_file.read_text())
        shown = subprocess.run([sys.executable, "-m", "mutmut", "results"], cwd=work, env=env, capture_output=True,
                               text=True).stdout
        survivors = [ln.split(":")[0].strip() for ln in shown.splitlines() if ln.strip().endswith(": survived")]
        return stats, survivors, wall
    finally:
        shutil.rmtree(work, ignore_errors=True)


def smoke(modules: list[str]) -> list[dict]:
    """Each module's copy and config, read back by mutmut's own loader in the copy."""
    rows = []
    for module in modules:
        missing = [p for p in [module, *TARGETS[module]] if not (REPO / p).exists()]
        if missing:
            raise SystemExit(f"benchmarks/mutation.py: TARGETS names {', '.join(missing)}, which do not exist")
        work = Path(tempfile.mkdtemp(prefix="e2ettt-mutmut-"))
        try:
            tree_copy(work)
            with open(work / "pyproject.toml", "a") as f:
                f.write(mutmut_section(module, TARGETS[module]))
            probe = ("from mutmut.configuration import config; c = config(); "
                     "print(c.only_mutate, c.pytest_add_cli_args_test_selection)")
            read = subprocess.run([sys.executable, "-c", probe], cwd=work, capture_output=True, text=True)
            if read.returncode != 0:
                raise SystemExit(f"mutmut cannot read the config for {module}:\n{read.stderr[-2000:]}")
            rows.append({"module": module, "tests": " ".join(Path(t).name for t in TARGETS[module]),
                         "mutmut reads": read.stdout.strip()})
        finally:
            shutil.rmtree(work, ignore_errors=True)
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--modules", default=",".join(TARGETS), help="comma-separated modules of TARGETS")
    p.add_argument("--children", type=int, default=os.cpu_count() or 1, help="mutants tested at once")
    p.add_argument("--survivors", action="store_true", help="print the surviving mutants' names")
    p.add_argument("--smoke", action="store_true", help="check the copies and configs only; append nothing")
    args = p.parse_args()
    modules = args.modules.split(",")
    unknown = [m for m in modules if m not in TARGETS]
    if unknown:
        raise SystemExit(f"--modules: {', '.join(unknown)} not among {', '.join(TARGETS)}")
    if args.smoke:
        record("Mutation testing with mutmut: smoke (configs only)", smoke(modules), append=False)
        return
    rows = []
    for module in modules:
        stats, survivors, wall = mutate(module, TARGETS[module], args.children)
        reached = stats.get("total", 0) - stats.get("no_tests", 0) - stats.get("skipped", 0)
        rows.append({"module": module, "tests": " ".join(Path(t).name for t in TARGETS[module]),
                     "mutants": stats.get("total", 0), "killed": stats.get("killed", 0),
                     "survived": stats.get("survived", 0), "timed out": stats.get("timeout", 0),
                     "no test reaches": stats.get("no_tests", 0),
                     "killed % of reached": f"{100 * (stats.get('killed', 0) + stats.get('timeout', 0)) / max(reached, 1):.0f}",
                     "wall s": round(wall)})
        print(f"{module}: {rows[-1]}", flush=True)
        if args.survivors:
            for name in survivors:
                print(f"  survived: {name}")
    notes = ["a timed-out mutant counts as killed (the tests hung or ran 15x their time); mutmut 3.8.1, fast tier only",
             "survivors: `python benchmarks/mutation.py --modules M --survivors`, then `mutmut show NAME` in a copy"]
    record("Mutation testing with mutmut (core modules, each with its area's tests)", rows, notes)


if __name__ == "__main__":
    main()
