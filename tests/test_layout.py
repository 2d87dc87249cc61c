"""The import graph: no cycles, the library below the driver, analysis without torch (read from the source, not run)."""
import ast
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DRIVER = {"e2ettt.orchestrate", "e2ettt.recorder", "e2ettt.stopping", "e2ettt.ray_trial"}


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports() -> dict[str, set[str]]:
    """Each module of e2ettt/, analysis/ and sweeps/ -> the project modules it imports (at any depth in its code)."""
    files = [p for d in ("e2ettt", "analysis", "sweeps") for p in (REPO / d).rglob("*.py")]
    names = {module_name(p) for p in files}
    graph = {}
    for path in files:
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                found |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module:
                found |= {node.module} | {f"{node.module}.{a.name}" for a in node.names}
        graph[module_name(path)] = {m for m in found if m in names and m != module_name(path)}
    return graph


def test_no_import_cycles():
    graph = imports()
    state: dict[str, int] = {}

    def visit(m: str, path: list[str]) -> None:
        state[m] = 1
        for n in sorted(graph[m]):
            assert state.get(n) != 1, f"import cycle: {' -> '.join(path + [n])}"
            if n not in state:
                visit(n, path + [n])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])


def test_the_library_never_imports_the_driver_layer_sweeps_or_analysis():
    for m, deps in imports().items():
        if m.startswith("e2ettt") and m not in DRIVER:
            assert not deps & DRIVER, f"{m} imports the driver layer: {deps & DRIVER}"
        if m.startswith("e2ettt"):
            assert not any(d.startswith(("sweeps", "analysis")) for d in deps), f"{m} imports {deps}"


def test_analysis_reads_tables_without_the_library_beyond_them():
    """The tables, the shard and tokenizer readers the n-gram baselines count with (numpy, sentencepiece), and the
    regime grammar whose family rule the analysis groups by."""
    allowed = {"e2ettt", "e2ettt.tables", "e2ettt.storage", "e2ettt.data", "e2ettt.tokenizer", "e2ettt.quant",
               "e2ettt.quant.regimes"}
    graph = imports()
    for m, deps in graph.items():
        if m.startswith("analysis"):
            assert {d for d in deps if d.startswith("e2ettt")} <= allowed, f"{m} imports {deps}"
    for m in allowed:
        assert graph[m] <= allowed, f"{m}, read by analysis, imports {graph[m]}"


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
    assert "score-first" in design.lower() and "tables.py" in design
