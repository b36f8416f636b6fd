"""The mutation script's own wiring: every module it mutates and every test it runs exists (a
renamed module must be renamed in TARGETS too), and its table reads as docs/mutation.md shows."""

from __future__ import annotations

from scripts.mutation import PACKAGE, ROOT, TARGETS, Outcome, markdown


def test_every_target_and_its_tests_exist():
    for module, tests in TARGETS.items():
        assert (ROOT / "addons" / PACKAGE / module).is_file(), module
        assert tests, module
        for test in tests:
            assert (ROOT / test).is_file(), test


def test_table_counts_each_module_and_shows_each_survivor():
    done = Outcome("limiter.py", ["tests/unit/test_limiter.py"], 12.4, {"killed": 9, "survived": 1})
    done.finished = True
    done.survivors["tokengate_core.limiter.x_f__mutmut_1"] = "# x: survived\n-a\n+b\n"
    late = Outcome("keys.py", ["tests/unit/test_keys.py"], 0.0, {})
    lines = markdown([done, late]).splitlines()
    assert lines[2] == "| limiter.py | test_limiter.py | 10 | 9 | 1 | 0 | 12 |"
    assert lines[3] == "| keys.py (unfinished) | test_keys.py | 0 | 0 | 0 | 0 | 0 |"
    assert lines[5:] == [
        "`tokengate_core.limiter.x_f__mutmut_1`",
        "```diff",
        "# x: survived",
        "-a",
        "+b",
        "```",
    ]
