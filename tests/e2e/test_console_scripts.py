"""The user tools: the console scripts pyproject.toml declares, and their `scripts/` shims."""

from __future__ import annotations

import importlib
import subprocess
import sys
import tomllib

import pytest

from tests.support.processes import ROOT

SCRIPTS = {
    "tokengate-keys": "keys",
    "tokengate-report": "report",
    "tokengate-capture": "capture",
    "tokengate-mock": "mock_openai",
}


def declared() -> dict[str, str]:
    with (ROOT / "pyproject.toml").open("rb") as handle:
        return tomllib.load(handle)["project"]["scripts"]


def test_every_declared_console_script_resolves_to_a_callable():
    # Parsed rather than read from importlib.metadata: the test venv may be installed from
    # another checkout, whose metadata would not show this one's entry points.
    entry_points = declared()
    assert set(entry_points) == set(SCRIPTS)
    for name, target in entry_points.items():
        module, _, function = target.partition(":")
        assert callable(getattr(importlib.import_module(module), function)), name


@pytest.mark.parametrize("name", sorted(SCRIPTS))
def test_the_shim_runs_the_same_tool_from_any_folder(name, tmp_path):
    shim = ROOT / "scripts" / f"{SCRIPTS[name]}.py"
    run = subprocess.run(
        [sys.executable, str(shim), "--help"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode == 0, run.stderr
    module = importlib.import_module(declared()[name].partition(":")[0])
    assert module.__doc__.splitlines()[0] in " ".join(run.stdout.split())
