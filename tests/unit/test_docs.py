"""The docs check: no command in README.md or docs/ can rot unnoticed, no link points nowhere.

Every shell block carries a marker (tests/support/docblocks.py): `run-by` a test that runs it, or
`docs-check`, whose commands are checked here without running them. Each checker returns the
problems it finds, so the tests at the end can show that each one fails on a broken document.
"""

from __future__ import annotations

import argparse
import ast
import asyncio
import contextlib
import functools
import importlib
import io
import re
import subprocess
import sys
from pathlib import Path
from unittest import mock

import pytest
from mitmproxy.exceptions import OptionsError
from tokengate_core.config import load_config

from tests.support.docblocks import (
    DOCS_CHECK,
    ROOT,
    Block,
    Command,
    all_blocks,
    blocks,
    commands,
    console_scripts,
    doc_files,
)

README_MAX_LINES = 250
_ASSIGNMENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*=")
_LINK = re.compile(r"\]\(([^)\s]+)\)")
_HEADING = re.compile(r"^#{1,6}\s+(.*?)\s*#*\s*$")


# Markers


def marker_problems(found: list[Block]) -> list[str]:
    """Shell blocks without a marker, and commands hidden in blocks that are not shell."""
    problems = []
    for block in found:
        runnable = block.marker == DOCS_CHECK or "::" in (block.marker or "")
        if block.is_shell and not runnable:
            problems.append(f"{block.where}: shell block without <!-- run-by: ... --> marker")
        elif not block.language:
            problems.append(f"{block.where}: fenced block without a language")
        elif not block.is_shell and any(line.startswith("$ ") for line in block.text.splitlines()):
            problems.append(
                f"{block.where}: commands in a {block.language} block (make it console)"
            )
    return problems


def runner_problems(test_id: str) -> list[str]:
    """A `run-by` test must exist and read its blocks through `run_by`/`blocks_for`."""
    path, _, name = test_id.partition("::")
    file = ROOT / path
    if not file.is_file():
        return [f"{test_id}: no file {path}"]
    functions = [
        node
        for node in ast.walk(ast.parse(file.read_text(encoding="utf-8")))
        if isinstance(node, ast.FunctionDef) and node.name == name
    ]
    if not functions:
        return [f"{test_id}: no test {name} in {path}"]
    reads = any(
        isinstance(call, ast.Call)
        and getattr(call.func, "id", getattr(call.func, "attr", None)) in {"run_by", "blocks_for"}
        and any(name in ast.unparse(argument) for argument in call.args)
        for call in ast.walk(functions[0])
    )
    return [] if reads else [f"{test_id}: the test does not read its blocks (run_by({name!r}))"]


def test_every_shell_block_is_marked():
    assert marker_problems(all_blocks()) == []


@pytest.mark.parametrize(
    "test_id", sorted({b.marker for b in all_blocks() if b.marker and "::" in b.marker})
)
def test_run_by_names_a_test_that_runs_the_block(test_id):
    assert runner_problems(test_id) == []


# Commands checked without running them


class _Parsed(Exception):
    """Raised in place of running a tool once its arguments have parsed."""


def parse_problems(prog: str, function, argv: list[str]) -> list[str]:
    """Run `function` (a tool's main) up to its argparse parse of `argv`, and no further."""
    parse_args = argparse.ArgumentParser.parse_args

    def parse_then_stop(self, args=None, namespace=None):
        parse_args(self, args, namespace)
        raise _Parsed

    errors = io.StringIO()
    with (
        mock.patch.object(argparse.ArgumentParser, "parse_args", parse_then_stop),
        mock.patch.object(sys, "argv", [prog, *argv]),
        contextlib.redirect_stderr(errors),
        contextlib.redirect_stdout(io.StringIO()),
    ):
        try:
            function()
        except _Parsed:
            return []
        except SystemExit as exit_:
            if exit_.code in (0, None):  # --help
                return []
            return [f"{prog} refuses {argv}: {errors.getvalue().strip()}"]
    return [f"{prog}: returned without parsing its arguments"]


def _entry_point(target: str):
    module, _, function = target.partition(":")
    return getattr(importlib.import_module(module), function or "main")


@functools.cache
def _mitmdump():
    """mitmdump's argument parser and every option name, TokenGate's included, as at start."""
    from mitmproxy import options
    from mitmproxy.tools import cmdline
    from mitmproxy.tools.dump import DumpMaster

    async def build():
        opts = options.Options()
        master = DumpMaster(opts, with_termlog=False)
        gate = importlib.util.spec_from_file_location(
            "_docs_tokengate", ROOT / "addons/tokengate.py"
        )
        module = importlib.util.module_from_spec(gate)
        gate.loader.exec_module(module)
        master.addons.add(*module.addons)
        return cmdline.mitmdump(opts), opts

    return asyncio.run(build())


def mitmdump_problems(argv: list[str]) -> list[str]:
    from mitmproxy.proxy.mode_specs import ProxyMode

    parser, opts = _mitmdump()
    errors = io.StringIO()
    try:
        with contextlib.redirect_stderr(errors):
            args = parser.parse_args(argv)
    except SystemExit:
        return [f"mitmdump refuses {argv}: {errors.getvalue().strip()}"]
    problems = [
        f"mitmdump -s {s}: no such file" for s in args.scripts or [] if not (ROOT / s).is_file()
    ]
    for setting in args.setoptions or []:
        name, _, value = setting.partition("=")
        if name not in opts._options:
            problems.append(f"mitmdump --set {setting}: no such option")
            continue
        try:  # as mitmdump reads it (the addons' own checks run only in a real start)
            opts._parse_setval(opts._options[name], [value])
        except OptionsError as error:
            problems.append(f"mitmdump --set {setting}: {error}")
    for mode in args.mode or []:
        try:
            ProxyMode.parse(mode)
        except ValueError as error:
            problems.append(f"mitmdump --mode {mode}: {error}")
    return problems


def pytest_problems(argv: list[str]) -> list[str]:
    paths = [arg for arg in argv if not arg.startswith("-") and "/" in arg]
    return [f"pytest {path}: no such path" for path in paths if not (ROOT / path).exists()]


def shell_script_problems(path: str) -> list[str]:
    script = ROOT / path
    if not script.is_file():
        return [f"{path}: no such script"]
    if not script.stat().st_mode & 0o111:
        return [f"{path}: not executable"]
    syntax = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    return [f"{path}: {syntax.stderr.strip()}"] if syntax.returncode else []


def command_problems(command: Command) -> list[str]:
    """What is wrong with a command a reader would type, judged without running it."""
    argv = command.argv
    while argv and _ASSIGNMENT.match(argv[0]):
        argv = argv[1:]
    if not argv:
        return []
    program, args = argv[0], argv[1:]
    scripts = console_scripts()
    if program == "export":
        return [f"export {arg}: not NAME=VALUE" for arg in args if not _ASSIGNMENT.match(arg)]
    if program == "scripts/test.sh":  # its arguments go to pytest
        return shell_script_problems(program) + pytest_problems(args)
    if program.endswith(".sh"):
        return shell_script_problems(program)
    if program in scripts:
        return parse_problems(program, _entry_point(scripts[program]), args)
    if program.startswith("tokengate-"):
        return [f"{program}: not in pyproject's [project.scripts]"]
    if Path(program).name in {"python", "python3"} and args[:1] == ["-m"] and len(args) > 1:
        module, rest = args[1], args[2:]
        if module == "pytest":
            return pytest_problems(rest)
        try:
            return parse_problems(module, _entry_point(module), rest)
        except ModuleNotFoundError as error:
            return [f"python -m {module}: {error}"]
    if Path(program).name in {"mitmdump", "mitmweb"}:
        return mitmdump_problems(args)
    return [f"{program}: no docs check knows this program; mark the block run-by a test"]


def _docs_checked() -> list:
    return [
        pytest.param(command, id=f"{block.where}:{index}")
        for block in all_blocks()
        if block.marker == DOCS_CHECK
        for index, command in enumerate(commands(block))
    ]


@pytest.mark.parametrize("command", _docs_checked())
def test_docs_checked_command(command):
    assert command_problems(command) == []


# Quotas shown as valid


@pytest.mark.parametrize(
    "block",
    [b for b in all_blocks() if b.marker == "valid-quotas"],
    ids=lambda block: block.where,
)
def test_quotas_block_loads(block, tmp_path):
    path = tmp_path / "quotas.yaml"
    path.write_text(block.text, encoding="utf-8")
    load_config(path, check_credentials=False)


# Links, numbers, length


def slug(heading: str) -> str:
    """The anchor GitHub gives a heading."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def _prose(text: str) -> list[str]:
    """The lines of a Markdown text outside its fenced blocks."""
    lines, fenced = [], None
    for line in text.splitlines():
        fence = re.match(r"^\s*(`{3,}|~{3,})", line)
        if fence and fenced is None:
            fenced = fence.group(1)
        elif fence and line.strip() == fenced:
            fenced = None
        elif fenced is None:
            lines.append(line)
    return lines


def anchors(text: str) -> set[str]:
    return {slug(match.group(1)) for line in _prose(text) if (match := _HEADING.match(line))}


def link_problems(doc: Path, text: str) -> list[str]:
    problems = []
    for line in _prose(text):
        for target in _LINK.findall(line):
            if re.match(r"^[a-z]+:", target):
                continue
            path, _, anchor = target.partition("#")
            file = (ROOT / doc).parent / path if path else ROOT / doc
            if not file.exists():
                problems.append(f"{doc}: link to {target}: no such file")
            elif anchor and (file.suffix != ".md" or anchor not in anchors(file.read_text())):
                problems.append(f"{doc}: link to {target}: no such heading")
    return problems


def test_relative_links_resolve():
    problems = [
        problem
        for doc in doc_files()
        for problem in link_problems(doc, (ROOT / doc).read_text(encoding="utf-8"))
    ]
    assert problems == []


def test_no_issue_numbers():
    found = [
        f"{doc}: {match.group(0)}"
        for doc in doc_files()
        for match in re.finditer(r"\bissues?\s*#?\d+", (ROOT / doc).read_text(), re.IGNORECASE)
    ]
    assert found == []


def test_readme_reads_in_ten_minutes():
    assert len((ROOT / "README.md").read_text().splitlines()) <= README_MAX_LINES


# The checks fail where they should


def test_an_unmarked_shell_block_fails():
    text = "Run:\n\n```sh\nrm -rf build\n```\n\n```text\n$ make\n```\n\n```\nx\n```\n"
    assert len(marker_problems(blocks(text, Path("x.md")))) == 3


def test_a_runner_that_does_not_read_its_block_fails():
    here = Path(__file__).resolve().relative_to(ROOT).as_posix()
    assert runner_problems(f"{here}::test_no_issue_numbers")
    assert runner_problems(f"{here}::test_that_does_not_exist")
    assert runner_problems("tests/no_such_file.py::test_x")


@pytest.mark.parametrize(
    "line",
    [
        "tokengate-keys create rate-limited-proxy my-app --expiry 30d",  # --expires
        "tokengate-keys vanish rate-limited-proxy my-app",
        "tokengate-nothing list",
        "python -m scripts.no_such_tool --quick",
        "mitmdump -s addons/no_such_addon.py",
        "mitmdump --set tokengate_confg=quotas.yaml",
        "mitmdump --mode reverse",
        "mitmdump --no-such-flag",
        "scripts/no_such.sh",
        "python -m pytest tests/no_such_suite",
        "export 1BAD",
        "curl -s localhost:8080",
    ],
)
def test_a_wrong_command_fails(line):
    assert command_problems(Command(line, [])) != []


def test_a_right_command_passes():
    parser = argparse.ArgumentParser()
    parser.add_argument("--flag")

    def tool():
        parser.parse_args()
        raise AssertionError("the tool ran")

    assert parse_problems("tool", tool, ["--flag", "x"]) == []
    assert parse_problems("tool", tool, ["--other"]) != []
    assert mitmdump_problems(["-s", "addons/tokengate.py", "--set", "tokengate_max_body=1m"]) == []


def test_a_broken_link_fails():
    text = (
        "[a](README.md#no-such-heading) [b](docs/none.md) [c](README.md#tokengate) [d](https://x)"
    )
    assert link_problems(Path("README.md"), text) == [
        "README.md: link to README.md#no-such-heading: no such heading",
        "README.md: link to docs/none.md: no such file",
    ]
