"""The layers, read from the source (not run): no cycles, Ray only in `e2ettt/driver/`, the library below the driver,
the analysis without torch; and each wall fails when an import is planted through it."""
import ast
import shutil
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
CODE = ("e2ettt", "analysis", "sweeps")
DRIVER = "e2ettt.driver"  # the Ray layer: the only folder that may import Ray
# what the analysis may read of the library: the tables, the shard and tokenizer readers the n-gram baselines count
# with (numpy, sentencepiece), and the regime grammar whose family rule it groups by
ANALYSIS_READS = {"e2ettt", "e2ettt.tables", "e2ettt.storage", "e2ettt.data", "e2ettt.tokenizer", "e2ettt.quant",
                  "e2ettt.quant.regimes"}


def module_name(root: Path, path: Path) -> str:
    parts = path.relative_to(root).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(root: Path = REPO) -> dict[str, tuple[set[str], set[str]]]:
    """Each module of e2ettt/, analysis/ and sweeps/ under `root` -> (the project modules it imports, the top-level
    names of everything else it imports), at any depth in its code."""
    files = [p for d in CODE for p in (root / d).rglob("*.py")]
    names = {module_name(root, p) for p in files}
    graph = {}
    for path in files:
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                found |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                found |= {node.module} | {f"{node.module}.{a.name}" for a in node.names}
        me = module_name(root, path)
        ours = {m for m in found if m in names and m != me}
        others = {m.split(".")[0] for m in found if m.split(".")[0] not in CODE}
        graph[me] = (ours, others)
    return graph


def in_driver(module: str) -> bool:
    return module == DRIVER or module.startswith(DRIVER + ".")


def cycles(graph) -> list[str]:
    found, state = [], {}

    def visit(m: str, path: list[str]) -> None:
        state[m] = 1
        for n in sorted(graph[m][0]):
            if state.get(n) == 1:
                found.append(f"import cycle: {' -> '.join(path + [n])}")
            elif n not in state:
                visit(n, path + [n])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
    return found


def reach(graph, module: str) -> set[str]:
    """Every project module `module` imports, directly or through others."""
    seen, todo = set(), [module]
    while todo:
        for n in graph[todo.pop()][0] - seen:
            seen.add(n)
            todo.append(n)
    return seen


def breaches(root: Path = REPO) -> list[str]:
    """Every import that crosses a wall, one line each."""
    graph = imports(root)
    out = cycles(graph)
    for m, (ours, others) in graph.items():
        if "ray" in others and not in_driver(m):
            out.append(f"{m} imports ray outside {DRIVER}")
        if m.startswith("e2ettt") and not in_driver(m) and any(in_driver(d) for d in ours):
            out.append(f"{m} imports the driver layer: {sorted(d for d in ours if in_driver(d))}")
        if m.startswith("e2ettt") and any(d.startswith(("sweeps", "analysis")) for d in ours):
            out.append(f"{m} imports {sorted(d for d in ours if d.startswith(('sweeps', 'analysis')))}")
        if m.startswith("analysis"):
            library = {d for d in ours if d.startswith("e2ettt")}
            if not library <= ANALYSIS_READS:
                out.append(f"{m} reads {sorted(library - ANALYSIS_READS)} of the library")
            torch = sorted(d for d in {m} | reach(graph, m) if "torch" in graph[d][1])
            if torch:
                out.append(f"{m} imports torch (through {torch})")
    return out


def test_the_walls_hold():
    assert breaches() == []


def test_only_the_driver_folder_imports_ray_and_it_does():
    graph = imports()
    with_ray = {m for m, (_, others) in graph.items() if "ray" in others}
    assert with_ray and all(in_driver(m) for m in with_ray)
    assert "e2ettt.driver.orchestrate" in with_ray and "e2ettt.plan" not in with_ray


@pytest.mark.parametrize("module, line, breach", [
    ("e2ettt/ttt.py", "import ray", "e2ettt.ttt imports ray outside e2ettt.driver"),
    ("e2ettt/quant/gptq.py", "from ray import tune", "e2ettt.quant.gptq imports ray outside e2ettt.driver"),
    ("e2ettt/model.py", "from e2ettt.driver import orchestrate", "e2ettt.model imports the driver layer"),
    ("e2ettt/plan.py", "from e2ettt.driver.stopping import StopBoard", "e2ettt.plan imports the driver layer"),
    ("e2ettt/data.py", "from analysis import metrics", "e2ettt.data imports ['analysis"),
    ("analysis/metrics.py", "import torch", "analysis.metrics imports torch"),
    ("e2ettt/tables.py", "import torch", "analysis.runs imports torch (through ['e2ettt.tables'])"),
    ("analysis/report.py", "from e2ettt import ttt", "analysis.report reads ['e2ettt.ttt'] of the library"),
    ("e2ettt/evaluate.py", "from e2ettt import worker", "import cycle"),
])
def test_each_wall_fails_when_an_import_is_planted_through_it(tmp_path, module, line, breach):
    for d in CODE:
        shutil.copytree(REPO / d, tmp_path / d, ignore=shutil.ignore_patterns("__pycache__", "*.pt", "*.model"))
    assert breaches(tmp_path) == []
    path = tmp_path / module
    path.write_text(path.read_text() + f"\n\ndef planted():\n    {line}\n")
    assert any(b.startswith(breach) for b in breaches(tmp_path)), breaches(tmp_path)


def test_the_top_level_is_the_fixed_one_and_every_library_module_is_in_the_design():
    import re
    import subprocess

    tracked = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True).stdout.split()
    top = {p.split("/")[0] for p in tracked} - {".ci", ".gitignore", "BENCHMARKS.md"}
    assert top == {"e2ettt", "sweeps", "analysis", "tests", "benchmarks", "docs", "cluster.yaml", "pyproject.toml",
                   "README.md"}
    design = (REPO / "docs" / "design.md").read_text()
    layout = (REPO / "README.md").read_text().split("## Layout", 1)[1]
    for path in (REPO / "e2ettt").rglob("*.py"):
        if path.name != "__init__.py" and path.name != "__main__.py":
            assert re.search(rf"\b{path.stem}\b", layout), f"README's layout does not name {path.relative_to(REPO)}"
            assert re.search(rf"\b{path.stem}\b", design), f"docs/design.md does not name {path.relative_to(REPO)}"
    assert "score-first" in design.lower() and "tables.py" in design
