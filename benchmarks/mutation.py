"""Mutants nobody here wrote: mutmut over the core modules, each with the tests of its area.

For each module, a copy of the committed tree is made in a temporary
directory, its pyproject.toml gets a `[tool.mutmut]` section naming the
module and its tests (the fast tier), and `mutmut run` mutates it there
(mutmut 3: every operator, constant, comparison and call argument it
knows, one at a time, each run against the tests that reach the mutated
function). Reports mutants generated, killed, survived, timed out and
not reached by any test, per module, with the kill rate over all of them.
A survivor that `_equivalent.py` lists, with the reason no test can tell
it from the original, counts as justified. `benchmarks/mutants.py` keeps
the named, end-to-end mistakes; this one counts what a tool finds.

    pip install mutmut==3.8.1
    python benchmarks/mutation.py [--modules analysis/stats.py,...] [--survivors] [--keep DIR] [--smoke]

The copy holds the files git tracks, as they are in the working tree.

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
from _equivalent import EQUIVALENT

# module -> the tests of its area (each a file of the fast tier)
TARGETS = {
    "analysis/stats.py": ["tests/test_stats.py", "tests/test_analysis.py"],
    "analysis/metrics.py": ["tests/test_analysis.py"],
    "analysis/families.py": ["tests/test_analysis.py"],
    "e2ettt/model.py": ["tests/test_model.py", "tests/test_reference_forward.py", "tests/test_quant.py"],
    "e2ettt/evaluate.py": ["tests/test_evaluate.py", "tests/test_protocols.py", "tests/test_rows.py", "tests/test_ttt.py"],
    "e2ettt/data.py": ["tests/test_data.py", "tests/test_persistence.py", "tests/test_record.py", "tests/test_evaluate.py"],
    "e2ettt/tokenizer.py": ["tests/test_tokenizer.py", "tests/test_evaluate.py"],
    "e2ettt/ttt.py": ["tests/test_ttt.py", "tests/test_protocols.py", "tests/test_persistence.py", "tests/test_rows.py"],
    "e2ettt/quant/": ["tests/test_quant.py", "tests/test_persistence.py", "tests/test_record.py"],
}

# tests the suite runs but no mutant does: too slow to run once per mutant, each with its reason
NOT_PER_MUTANT = {
    "tests/test_analysis.py::test_a_planted_paired_difference_is_found_and_none_is_claimed_without_one":
        "200 draws of a report's paired tests, the false-positive rate's calibration (20 s on 2 cores)",
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
        "pytest_add_cli_args = " + json.dumps(["-m", "not slow", "-p", "no:cacheprovider", "-q",
                                                *(f"--deselect={t}" for t in NOT_PER_MUTANT)]),
        # torch's thread pools do not survive a fork from a process that has used them: each mutant's worker is
        # forked from a server that has only imported the tests
        'process_isolation = "forkserver"',
        "",
    ])


def mutate(module: str, tests: list[str], children: int, keep: Path | None = None,
           retest: bool = False, run_mutants: bool = True) -> tuple[dict, list, list, float]:
    """mutmut on `module` in a copy of the tree: (its CI/CD counts, the survivors not explained, those EQUIVALENT
    explains, wall seconds). With `keep`, the copy is made there and left (`mutmut show NAME` in it prints a mutant);
    a copy already there is refreshed and its mutants keep their results (an interrupted run goes on), except that
    with `retest` the survivors and the mutants no test reached are tested again (and those not yet tested).
    Without `run_mutants`, a kept copy's results are read as they stand."""
    work = Path(tempfile.mkdtemp(prefix="e2ettt-mutmut-")) if keep is None else keep
    work.mkdir(parents=True, exist_ok=True)
    try:
        tree_copy(work)
        with open(work / "pyproject.toml", "a") as f:
            f.write(mutmut_section(module, tests))
        # mutmut runs the tests from mutants/, so processes they start (ranks, CLIs) import the mutated tree too;
        # each mutant's tests are a pytest session of their own: the demo files they read are built once, here
        # one torch thread per mutant: --children mutants share the cores, and CPU-time limits count every thread
        env = {**os.environ, "E2ETTT_TEST_CACHE": str(work / "test-cache"), "OMP_NUM_THREADS": "1",
               "MKL_NUM_THREADS": "1"}
        again = []
        if retest and (work / "mutants").is_dir():
            listed = subprocess.run([sys.executable, "-m", "mutmut", "results"], cwd=work, env=env, capture_output=True,
                                    text=True).stdout
            again = [ln.split(":")[0].strip() for ln in listed.splitlines()
                     if ln.strip().endswith((": survived", ": no tests", ": not checked"))]
        t0 = time.perf_counter()
        run = subprocess.CompletedProcess([], 0, "", "")
        if run_mutants:
            run = subprocess.run([sys.executable, "-m", "mutmut", "run", "--max-children", str(children), *again],
                                 cwd=work, env=env, capture_output=True, text=True)
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
        return stats, *classify(work, module, survivors, env), wall
    finally:
        if keep is None:
            shutil.rmtree(work, ignore_errors=True)


DIFFS = """
import json, sys
from mutmut.__main__ import find_mutant, get_diff_for_mutant
print(json.dumps({n: get_diff_for_mutant(n, path=find_mutant(n).path) for n in sys.argv[1:]}))
"""


def function_of(mutant: str) -> str:
    """`e2ettt.model.xǁGPTǁforward__mutmut_3` -> `GPT.forward`; `e2ettt.data.x_load_shard__mutmut_1` -> `load_shard`."""
    mangled = mutant.rsplit(".", 1)[1].rsplit("__mutmut_", 1)[0]
    return ".".join(filter(None, mangled.split("ǁ")[1:])) if "ǁ" in mangled else mangled.removeprefix("x_")


def mutated_lines(diff: str) -> str:
    """The lines a mutant writes, joined by " / "; where it removes more lines than it writes (an argument dropped),
    the removed lines follow, so that the key names what went."""
    lines = diff.splitlines()
    added = [ln[1:].strip() for ln in lines if ln.startswith("+") and not ln.startswith("+++")]
    removed = [ln[1:].strip() for ln in lines if ln.startswith("-") and not ln.startswith("---")]
    if len(removed) > len(added):
        return " / ".join(added) + " (removed: " + " / ".join(removed) + ")"
    return " / ".join(added)


def classify(work: Path, module: str, survivors: list[str], env: dict) -> tuple[list[tuple[str, str]], list[tuple]]:
    """Survivors split into (name, mutated line) not yet explained and (name, line, reason) listed in EQUIVALENT."""
    if not survivors:
        return [], []
    shown = subprocess.run([sys.executable, "-c", DIFFS, *survivors], cwd=work, env=env, capture_output=True, text=True)
    if shown.returncode != 0:
        raise RuntimeError(f"mutmut could not show the survivors of {module}:\n{shown.stderr[-2000:]}")
    diffs = json.loads(shown.stdout)
    open_, explained = [], []
    for name in survivors:
        line = mutated_lines(diffs[name])
        reason = EQUIVALENT.get((module, function_of(name), line))
        (explained.append((name, line, reason)) if reason else open_.append((name, line)))
    return open_, explained


def stale_equivalents() -> list[str]:
    """EQUIVALENT's keys whose module or function no longer exists, and tests of NOT_PER_MUTANT that do not."""
    stale = []
    for module, function, _ in EQUIVALENT:
        files = sorted((REPO / module).glob("*.py")) if module.endswith("/") else [REPO / module]
        name = function.rsplit(".", 1)[-1]
        if module not in TARGETS or not any(f"def {name}(" in f.read_text() for f in files if f.is_file()):
            stale.append(f"{module} {function}")
    for test in NOT_PER_MUTANT:
        path, name = test.split("::")
        if not (REPO / path).is_file() or f"def {name}(" not in (REPO / path).read_text():
            stale.append(test)
    return stale


def smoke(modules: list[str]) -> list[dict]:
    """Each module's copy and config, read back by mutmut's own loader in the copy; every equivalent still named."""
    stale = stale_equivalents()
    if stale:
        raise SystemExit(f"benchmarks/mutation.py: equivalents or tests named that no longer exist: {', '.join(stale)}")
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
    p.add_argument("--keep", type=Path, help="make each module's copy in KEEP/<module> and leave it there")
    p.add_argument("--retest", action="store_true", help="with --keep: test the survivors of an earlier run again")
    p.add_argument("--report", action="store_true", help="with --keep: read the kept copies' results, run nothing")
    args = p.parse_args()
    if (args.report or args.retest) and not args.keep:
        raise SystemExit("--report and --retest read the copies an earlier run kept: give its --keep DIR")
    modules = args.modules.split(",")
    unknown = [m for m in modules if m not in TARGETS]
    if unknown:
        raise SystemExit(f"--modules: {', '.join(unknown)} not among {', '.join(TARGETS)}")
    if args.smoke:
        record("Mutation testing with mutmut: smoke (configs only)", smoke(modules), append=False)
        return
    rows = []
    for module in modules:
        keep = args.keep / module.strip("/").replace("/", "-") if args.keep else None
        stats, open_, explained, wall = mutate(module, TARGETS[module], args.children, keep, args.retest,
                                               run_mutants=not args.report)
        killed = stats.get("killed", 0) + stats.get("timeout", 0)
        untested = stats.get("total", 0) - sum(stats.get(k, 0) for k in
                                               ("killed", "timeout", "survived", "no_tests", "skipped", "suspicious",
                                                "segfault", "check_was_interrupted_by_user"))
        counted = stats.get("total", 0) - stats.get("skipped", 0)
        rows.append({"module": module, "tests": " ".join(Path(t).name for t in TARGETS[module]),
                     "mutants": stats.get("total", 0), "killed": stats.get("killed", 0),
                     "timed out": stats.get("timeout", 0), "survived": stats.get("survived", 0),
                     "equivalent (listed)": len(explained), "no test reaches": stats.get("no_tests", 0),
                     "not yet tested": untested,
                     "killed %": f"{100 * killed / max(counted, 1):.1f}",
                     "killed or equivalent %": f"{100 * (killed + len(explained)) / max(counted, 1):.1f}",
                     "wall s": round(wall)})
        print(f"{module}: {rows[-1]}", flush=True)
        if args.survivors:
            for name, line in open_:
                print(f"  survived: {name}\n    ({module!r}, {function_of(name)!r}, {line!r})")
    notes = ["percentages are of all mutants, those no test reaches (or not yet tested) counted as survivors; a "
             "timed-out mutant counts "
             "as killed (the tests hung or used 30x their CPU time); mutmut 3.8.1, fast tier only, one torch thread "
             "per mutant",
             "equivalent (listed): survivors that benchmarks/_equivalent.py names, each with why no test can tell it "
             "from the original",
             "survivors: `python benchmarks/mutation.py --modules M --survivors`, then `mutmut show NAME` in a copy"]
    record("Mutation testing with mutmut (core modules, each with its area's tests)", rows, notes)


if __name__ == "__main__":
    main()
