"""Mutation testing of the gate's core rules with mutmut: would a small bug fail a test?

For each module in TARGETS, mutmut changes the code one small way at a time (`<` for `<=`, a
constant off by one, `and` for `or`, an argument dropped) and runs that module's fast unit tests
against each change; a change that no test fails "survives". It runs in a scratch copy of the
checkout (nothing here changes), each module against only its own tests, within a time budget.
docs/mutation.md has the last results and why the survivors left are harmless.

    .venv/bin/python -m scripts.mutation [--only limiter.py] [--jobs 2] [--minutes 10] [--json]

Prints a table per module and the diff of every mutant left alive (survived, or run by no test).
Some survivors are equivalent to the code (docs/mutation.md says which and why), so the exit
status says only whether every module finished within the budget (0) or not (1).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = "tokengate_core"

# The modules mutated, as paths under addons/tokengate_core (a subfolder works too, e.g.
# "dialects/openai.py"), each with the unit tests that pin it: fast ones only, no processes.
# A module that moves or is renamed moves here too (tests/unit/test_mutation_script.py checks).
TARGETS: dict[str, tuple[str, ...]] = {
    "limiter.py": ("tests/unit/test_limiter.py",),
    "answers.py": ("tests/unit/test_answers.py",),
    "keys.py": ("tests/unit/test_keys.py", "tests/addon/test_caller_keys.py"),
    "credentials.py": (
        "tests/unit/test_credentials.py",
        "tests/addon/test_addons.py",
        "tests/addon/test_scrub.py",
    ),
    "scrub.py": ("tests/addon/test_scrub.py",),
    "usage.py": ("tests/unit/test_sse_usage.py",),
    "dialects/openai.py": (
        "tests/unit/test_openai_dialect.py",
        "tests/unit/test_sse_usage.py",
        "tests/unit/test_tokens.py",
        "tests/unit/test_routing.py",
    ),
}
PYTEST_ARGS = ["-p", "no:cacheprovider", "--hypothesis-seed=0"]  # the same cases every run
LIVE = ("survived", "no tests")  # a mutant no test ran is as alive as one no test failed
RESULT = re.compile(r"^\s+(\S+): (.+)$", re.MULTILINE)


@dataclass
class Outcome:
    module: str
    tests: list[str]
    seconds: float = 0.0
    counts: dict[str, int] = field(default_factory=dict)
    survivors: dict[str, str] = field(default_factory=dict)  # mutant name -> status and diff
    finished: bool = False


def scratch_copy(folder: Path, module: str, tests: tuple[str, ...]) -> None:
    """The package under src/ (where mutmut looks), the tests and the scripts they import, and
    pyproject.toml with mutmut told which module to mutate and which tests to run."""
    shutil.copytree(ROOT / "addons" / PACKAGE, folder / "src" / PACKAGE)
    ignore = shutil.ignore_patterns("__pycache__", ".hypothesis")
    for part in ("tests", "scripts"):
        shutil.copytree(ROOT / part, folder / part, ignore=ignore)
    settings = {
        "source_paths": ["src"],
        "only_mutate": [f"src/{PACKAGE}/{module}"],
        "also_copy": ["scripts"],
        "pytest_add_cli_args": PYTEST_ARGS,
        "pytest_add_cli_args_test_selection": list(tests),
    }
    table = "".join(f"{name} = {json.dumps(value)}\n" for name, value in settings.items())
    pyproject = (ROOT / "pyproject.toml").read_text(encoding="utf-8")
    (folder / "pyproject.toml").write_text(f"{pyproject}\n[tool.mutmut]\n{table}", "utf-8")


@dataclass
class Ran:
    code: int
    out: str
    err: str


def mutmut(folder: Path, *args: str, timeout: float) -> Ran | None:
    """Run mutmut in `folder`; None when it ran out of time. It forks a worker per mutant, so
    it runs in a session of its own and the whole session is stopped then."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # the copy, not the checkout
    process = subprocess.Popen(
        [str(Path(sys.executable).with_name("mutmut")), *args],
        cwd=folder,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        out, err = process.communicate(timeout=max(1.0, timeout))
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.communicate()
        return None
    return Ran(process.returncode, out, err)


def mutate(module: str, tests: tuple[str, ...], jobs: int, deadline: float) -> Outcome:
    outcome = Outcome(module, list(tests))
    began = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="tokengate-mutation-") as tmp:
        folder = Path(tmp)
        scratch_copy(folder, module, tests)
        run = mutmut(folder, "run", "--max-children", str(jobs), timeout=deadline - began)
        listed = mutmut(folder, "results", "--all", "true", timeout=60)
        statuses = dict(RESULT.findall(listed.out if listed else ""))
        for status in statuses.values():
            outcome.counts[status] = outcome.counts.get(status, 0) + 1
        for name, status in statuses.items():
            if status in LIVE:
                shown = mutmut(folder, "show", name, timeout=60)
                outcome.survivors[name] = shown.out if shown else f"# {name}: {status}"
        outcome.finished = run is not None and run.code == 0 and bool(statuses)
        if run is not None and not statuses:  # mutmut could not start: say why
            print(run.out[-3000:], run.err[-3000:], sep="\n", file=sys.stderr)
    outcome.seconds = round(time.monotonic() - began, 1)
    return outcome


def markdown(outcomes: list[Outcome]) -> str:
    lines = [
        "| module | tests | mutants | killed | survived | other | seconds |",
        "|---|---|--:|--:|--:|--:|--:|",
    ]
    for o in outcomes:
        total = sum(o.counts.values())
        killed, survived = o.counts.get("killed", 0), o.counts.get("survived", 0)
        other = ", ".join(
            f"{n} {s}" for s, n in o.counts.items() if s not in ("killed", "survived")
        )
        note = "" if o.finished else " (unfinished)"
        tests = ", ".join(Path(t).name for t in o.tests)
        lines.append(
            f"| {o.module}{note} | {tests} | {total} | {killed} | {survived} | {other or 0} "
            f"| {o.seconds:.0f} |"
        )
    for o in outcomes:
        for name, diff in o.survivors.items():
            lines += ["", f"`{name}`", "```diff", diff.strip(), "```"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", action="append", choices=sorted(TARGETS), help="a module")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 2)
    parser.add_argument("--minutes", type=float, default=10.0, help="budget for the whole run")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    deadline = time.monotonic() + args.minutes * 60
    outcomes = []
    for module in args.only or TARGETS:
        if time.monotonic() >= deadline:
            outcomes.append(Outcome(module, list(TARGETS[module])))
            continue
        outcomes.append(mutate(module, TARGETS[module], args.jobs, deadline))
        print(f"{module}: {outcomes[-1].counts} in {outcomes[-1].seconds}s", file=sys.stderr)
    if args.json:
        print(json.dumps([asdict(o) for o in outcomes], indent=2))
    else:
        print(markdown(outcomes))
    return 0 if all(o.finished for o in outcomes) else 1


if __name__ == "__main__":
    sys.exit(main())
