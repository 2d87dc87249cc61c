"""The mutation harness cannot rot: every planted bug still applies to today's source, and one is killed end to end."""
import importlib.util
import re
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def harness():
    spec = importlib.util.spec_from_file_location("mutants", REPO / "benchmarks" / "mutants.py")
    module = sys.modules[spec.name] = importlib.util.module_from_spec(spec)  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_every_mutant_applies_exactly_once_and_names_tests_that_exist():
    h = harness()
    h.check_edits(REPO, h.MUTANTS)  # raises if an old text is gone or occurs twice
    names = [x.name for x in h.MUTANTS]
    assert len(names) == len(set(names)) and len(names) >= 20
    assert {x.area for x in h.MUTANTS if x.name in h.QUICK} == {x.area for x in h.MUTANTS}  # quick: one per area
    for x in h.MUTANTS:
        assert x.edits and x.tests and x.mistake
        for node in x.tests:
            path, name = node.split("::")
            assert re.search(rf"^def {re.escape(name.split('[')[0])}\(", (REPO / path).read_text(), re.M), node


def test_a_mutant_is_killed_in_a_copy_that_the_run_imports(tmp_path):
    h = harness()
    source = h.copy_source(tmp_path / "source")
    h.check_imports_copy(source)
    mutant = next(x for x in h.MUTANTS if x.name == "hadamard_on_weights_only")
    outcome = h.run_mutant(mutant, source, tmp_path, tmp_path / "cache")
    assert not outcome.error and outcome.killed_by == list(mutant.tests)
    assert not (tmp_path / mutant.name).exists()  # the mutated copy is removed; its source was never touched
    assert mutant.edits[0].old in (source / mutant.edits[0].path).read_text()
