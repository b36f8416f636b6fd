"""The shell blocks of README.md and docs/: found, split into commands, and run as a reader would.

Each fenced shell block carries a marker comment on the line before it (blank lines between are
allowed) saying what keeps it from rotting:

    <!-- run-by: tests/e2e/test_docs_walkthroughs.py::test_name -->
        that test runs the block as shown
    <!-- run-by: docs-check -->
        tests/unit/test_docs.py checks each command without running it

A YAML block may carry `<!-- valid-quotas -->`: the docs check loads it as a quotas file.
"""

from __future__ import annotations

import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import threading
import tomllib
from dataclasses import dataclass
from pathlib import Path


def _root() -> Path:
    here = Path(__file__).resolve().parent
    return next(folder for folder in (here, *here.parents) if (folder / "pyproject.toml").exists())


ROOT = _root()
SHELL_LANGUAGES = frozenset({"sh", "bash", "shell", "console", "zsh"})
DOCS_CHECK = "docs-check"
_FENCE = re.compile(r"^( *)(`{3,}|~{3,})\s*([\w+-]*)\s*$")
_MARKER = re.compile(r"^\s*<!--\s*(run-by|valid-quotas)\s*(?::\s*(\S+))?\s*-->\s*$")


# Names the docs already use while the rename that creates them is under way in another branch:
# a check that needs one of them, missing here, is an expected failure naming the rename.
def doc_files() -> list[Path]:
    """README.md and every Markdown file under docs/, relative to the repository root."""
    docs = sorted((ROOT / "docs").rglob("*.md")) if (ROOT / "docs").is_dir() else []
    return [Path("README.md"), *(path.relative_to(ROOT) for path in docs)]


@dataclass(frozen=True)
class Block:
    doc: Path  # relative to the repository root
    line: int  # 1-based line of the opening fence
    language: str
    text: str  # the block's lines, dedented by the fence's indentation
    marker: str | None  # "docs-check", a test id, "valid-quotas", or None

    @property
    def where(self) -> str:
        return f"{self.doc}:{self.line}"

    @property
    def is_shell(self) -> bool:
        return self.language in SHELL_LANGUAGES


def blocks(text: str, doc: Path) -> list[Block]:
    """The fenced blocks of a Markdown text, each with the marker comment just before it."""
    found: list[Block] = []
    lines = text.splitlines()
    index = 0
    while index < len(lines):
        opening = _FENCE.match(lines[index])
        if not opening:
            index += 1
            continue
        indent, fence, language = opening.groups()
        end = index + 1
        while end < len(lines) and lines[end].strip() != fence:
            end += 1
        body = [
            line[len(indent) :] if line.startswith(indent) else line
            for line in lines[index + 1 : end]
        ]
        found.append(Block(doc, index + 1, language, "\n".join(body) + "\n", _marker(lines, index)))
        index = end + 1
    return found


def _marker(lines: list[str], fence_index: int) -> str | None:
    previous = fence_index - 1
    while previous >= 0 and not lines[previous].strip():
        previous -= 1
    match = _MARKER.match(lines[previous]) if previous >= 0 else None
    if match is None:
        return None
    kind, value = match.groups()
    return "valid-quotas" if kind == "valid-quotas" else value


def all_blocks() -> list[Block]:
    return [
        block
        for doc in doc_files()
        for block in blocks((ROOT / doc).read_text(encoding="utf-8"), doc)
    ]


def blocks_for(test_id: str) -> list[Block]:
    """The blocks whose marker names this test (`path::name`), in document order; at least one."""
    found = [block for block in all_blocks() if block.marker == test_id]
    assert found, f"no block in README.md or docs/ is marked <!-- run-by: {test_id} -->"
    return found


@dataclass
class Command:
    text: str  # as shown, continuation lines included
    expected: list[str]  # console blocks: the output lines shown after it

    @property
    def argv(self) -> list[str]:
        return shlex.split(self.text.replace("\\\n", " "), comments=True)


def commands(block: Block) -> list[Command]:
    """The commands of a shell block: `$ ` lines (with their output) in console blocks, else
    each line but comments; a line ending in a backslash continues on the next."""
    console = block.language == "console"
    found: list[Command] = []
    current: list[str] | None = None
    for line in block.text.splitlines():
        if current is not None:
            current.append(line)
        elif console and line.startswith("$ "):
            current = [line[2:]]
        elif console:
            if found:
                found[-1].expected.append(line)
            continue
        elif line.strip() and not line.lstrip().startswith("#"):
            current = [line]
        else:
            continue
        if not current[-1].endswith("\\"):
            found.append(Command("\n".join(current), []))
            current = None
    return found


# What changes from one run to the next in an answer: epoch seconds, waits, Retry-After.
_VOLATILE = re.compile(r"\b\d{10}\b|\b\d+\.\d+s\b|(?<=Retry-After: )\d+")


def output_matches(expected: str, actual_lines: list[str]) -> bool:
    """An expected output line is one of the actual lines, times and waits aside; one that ends
    in `...` stands for any line that starts with it."""
    prefix = expected.endswith("...")
    shown = expected[:-3] if prefix else expected
    pattern, last = "", 0
    for volatile in _VOLATILE.finditer(shown):
        pattern += re.escape(shown[last : volatile.start()]) + r"[\d.]+s?"
        last = volatile.end()
    pattern += re.escape(shown[last:]) + ("" if prefix else "$")
    return any(re.match(pattern, line) for line in actual_lines)


def console_scripts() -> dict[str, str]:
    """pyproject's [project.scripts]: name -> `module:function`."""
    with (ROOT / "pyproject.toml").open("rb") as file:
        return tomllib.load(file)["project"].get("scripts", {})


def tool_folder(folder: Path) -> Path:
    """A folder of launchers for the console scripts, as pip would install them."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, target in console_scripts().items():
        module, function = target.split(":")
        launcher = folder / name
        launcher.write_text(
            f"#!{sys.executable}\nimport sys\nfrom {module} import {function}\n"
            f"sys.exit({function}())\n",
            encoding="utf-8",
        )
        launcher.chmod(0o755)
    return folder


def reader_env(tools: Path, home: Path) -> dict[str, str]:
    """The environment of a reader in an activated venv: the tools on the PATH, no proxy set."""
    env = {
        name: value
        for name, value in os.environ.items()
        if name.lower() not in {"https_proxy", "http_proxy", "all_proxy", "no_proxy"}
    }
    path = [str(tools), str(Path(sys.executable).parent), env.get("PATH", "")]
    env.update(
        PATH=os.pathsep.join(path),
        PYTHONPATH=os.pathsep.join([str(ROOT / "addons"), str(ROOT)]),
        HOME=str(home),
    )
    return env


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def with_ports(text: str, ports: dict[int, int]) -> str:
    """The text with each port the docs show replaced by the one the test uses."""
    for shown, used in ports.items():
        text = re.sub(rf"(?<!\d){shown}(?!\d)", str(used), text)
    return text


class Terminal:
    """A block left running, as in a terminal of its own; stopped with its process group."""

    def __init__(self, script: str, cwd: Path, env: dict[str, str]) -> None:
        self.lines: list[str] = []
        self._changed = threading.Condition()
        self.popen = subprocess.Popen(
            ["bash", "-euo", "pipefail", "-c", script],
            cwd=cwd,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
        threading.Thread(target=self._drain, daemon=True).start()

    def _drain(self) -> None:
        assert self.popen.stdout is not None
        for line in self.popen.stdout:
            with self._changed:
                self.lines.append(line)
                self._changed.notify_all()
        with self._changed:
            self._changed.notify_all()

    def wait_for(self, pattern: str, timeout: float = 30) -> re.Match[str]:
        """The first output line matching `pattern`; fails when the block ends or time is up."""
        compiled = re.compile(pattern)
        with self._changed:
            finished = self._changed.wait_for(
                lambda: (
                    any(compiled.search(line) for line in self.lines)
                    or self.popen.poll() is not None
                ),
                timeout,
            )
            match = next(filter(None, map(compiled.search, self.lines)), None)
        assert match, f"no {pattern!r} (ended: {finished}):\n{self.output}"
        return match

    @property
    def output(self) -> str:
        return "".join(self.lines)

    def stop(self) -> None:
        if self.popen.poll() is None:
            os.killpg(self.popen.pid, signal.SIGTERM)
            try:
                self.popen.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(self.popen.pid, signal.SIGKILL)
                self.popen.wait(5)


def run_console(block: Block, cwd: Path, env: dict[str, str], ports: dict[int, int]) -> None:
    """Run a console block's commands in one shell, in order, and check that every output line
    it shows came out of its command."""
    shown = commands(block)
    separator = "@@docs-command-{}@@"
    script = "".join(
        f"printf '\\n{separator.format(index)}\\n'\n{with_ports(command.text, ports)}\n"
        for index, command in enumerate(shown)
    )
    run = subprocess.run(
        ["bash", "-c", script],
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=60,
    )
    outputs = re.split(r"@@docs-command-\d+@@\n", run.stdout)[1:]
    assert len(outputs) == len(shown), f"{block.where}: the commands did not all run:\n{run}"
    for command, output in zip(shown, outputs, strict=True):
        lines = [line.rstrip() for line in output.splitlines()]
        for line in command.expected:
            if line.strip() != "...":
                assert output_matches(line, lines), (
                    f"{block.where}: `{command.text}` did not print\n  {line}\nbut:\n{output}"
                )


def run_block(script: str, folder, env, timeout: float) -> subprocess.CompletedProcess:
    """A shell block of a document, run as a reader would paste it, failing on any error."""
    return subprocess.run(
        ["bash", "-euo", "pipefail", "-c", script],
        cwd=folder,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
