"""README.md's "What is tested" section states how many faults and bad inputs the tests cover:
these tests count them from the tests themselves (the rows of the fault table, the
parametrizations of the bad-input tests), so the numbers cannot drift from the suite again."""

from __future__ import annotations

import importlib
import re
import sys
from types import ModuleType

from tests.conftest import REPO

SECTION_START = "#### What is tested (fault injection on CPU)"
SECTION_END = "For example:"


def section() -> str:
    """The README section, whitespace collapsed (the numbers' phrases may wrap across lines)."""
    text = (REPO / "README.md").read_text()
    start = text.index(SECTION_START)
    return text[start:text.index(SECTION_END, start)]


def flat(text: str) -> str:
    return " ".join(text.split())


def test_module(name: str) -> ModuleType:
    """The module as pytest imported it in this session (by its basename: tests/ is no package),
    else imported afresh."""
    return sys.modules.get(name) or importlib.import_module(f"tests.{name}")


test_module.__test__ = False  # a helper, not a test


def parametrizations(test) -> int:
    """How many tests pytest collects from a test function: the product of its parametrize lists."""
    n = 1
    for mark in getattr(test, "pytestmark", []):
        if mark.name == "parametrize":
            n *= len(mark.args[1])
    return n


def bad_input_counts() -> dict[str, int]:
    config = test_module("test_config")
    counts = {
        "bad_inputs": parametrizations(test_module("test_bad_inputs").test_bad_input_fails_clearly_and_writes_nothing_mistakable),
        "scaling_fit": parametrizations(test_module("test_scaling_fit").test_bad_input_exits_2_naming_it_and_writes_nothing),
        "dashboard": parametrizations(test_module("test_dashboard").test_bad_input_exits_2_naming_it_and_writes_no_page),
        "compose": parametrizations(config.test_wrong_choices_and_types_are_refused_while_composing),
        "bad_configs": parametrizations(config.test_bad_configs_fail_naming_the_key),
        "range": parametrizations(config.test_numbers_outside_their_declared_range_are_refused),
        "rules": parametrizations(config.test_rules_across_keys_and_groups),
    }
    counts["cli"] = counts["bad_inputs"] + counts["scaling_fit"] + counts["dashboard"]
    counts["configs"] = counts["compose"] + counts["bad_configs"] + counts["range"] + counts["rules"]
    counts["total"] = counts["cli"] + counts["configs"]
    return counts


def fault_rows() -> list[str]:
    """The data rows of the fault table (not its header or the |---| line)."""
    rows = [line for line in section().splitlines() if line.startswith("| ")]
    assert rows and rows[0].startswith("| fault | test |"), "the fault table's header moved"
    return rows[1:]


def test_the_readme_states_the_bad_input_counts_of_the_tests():
    n = bad_input_counts()
    text = flat(section())
    # Each phrase with the number the tests give; a failure shows the phrase to put in README.md.
    phrases = [
        f"**{n['total']} bad inputs** are covered",
        f"and {n['total']} bad inputs (below)",
        f"**{n['cli']} go through the real CLIs**",
        f"{n['bad_inputs']} in `tests/test_bad_inputs.py`",
        f"{n['scaling_fit']} in `tests/test_scaling_fit.py`",
        f"{n['dashboard']} in `tests/test_dashboard.py`",
        f"**{n['configs']} bad configs are checked in-process**",
        f"{n['compose']} wrong choices and types refused while composing",
        f"{n['bad_configs']} bad values, unknown keys and conflicting settings",
        f"{n['range']} numbers outside their declared range",
        f"{n['rules']} rules across keys and groups",
    ]
    missing = [p for p in phrases if p not in text]
    assert not missing, f"README.md's 'What is tested' should say: {missing}"
    assert set(re.findall(r"(\d+) bad inputs", text)) == {str(n["total"])}  # no other count left behind


def test_the_readme_states_the_number_of_fault_kinds_and_names_real_tests():
    rows = fault_rows()
    phrase = f"{len(rows)} kinds of fault and attack"
    assert phrase in flat(section()), f"README.md's 'What is tested' should say: {phrase!r} (the table's rows)"
    sources = {path.name: path.read_text() for path in (REPO / "tests").glob("test_*.py")}
    for row in rows:
        tests = re.findall(r"`(?:tests/(test_\w+\.py)::)?(test_\w+)`", row)
        files = re.findall(r"`tests/(test_\w+)\.py` \((\d+) tests", row)  # a whole module, "(N tests: ...)"
        assert tests or files, f"a fault table row names no test: {row[:80]}"
        for file, test in tests:
            where = [sources[file]] if file else sources.values()
            assert any(re.search(rf"^def {test}\(", source, re.M) for source in where), f"no test {test} ({file or 'tests/'})"
        for name, stated in files:
            module = test_module(name)
            collected = sum(parametrizations(f) for key, f in vars(module).items()
                            if key.startswith("test_") and callable(f) and getattr(f, "__test__", True))
            assert int(stated) == collected, f"README.md says {stated} tests in tests/{name}.py; it has {collected}"
