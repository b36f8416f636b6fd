"""Child processes (the mock, mitmdump, redis-server) for the capture tool, the end-to-end tests
and the benchmarks: started, drained, awaited, stopped."""

from __future__ import annotations

import re
import subprocess
import sys
import threading
import time
from pathlib import Path

# The script mitmdump loads TokenGate with (`-s`), in this source checkout.
ADDON = Path(__file__).resolve().parents[2] / "tokengate.py"
# The bundled mock provider on a free port (it prints the URL it listens at).
MOCK = [sys.executable, "-m", "tokengate_core.tools.mock", "--port", "0", "--quiet"]
# mitmdump: "... listening at 127.0.0.1:8080."; the mock: "... listening at http://127.0.0.1:4010"
LISTENING = re.compile(r"listening at \S*:(\d+)")


class Child:
    """A process whose output a thread drains (a full pipe would stall it) and keeps."""

    def __init__(
        self,
        argv: list[str],
        env: dict[str, str] | None = None,
        ready: re.Pattern = LISTENING,
        cwd: Path | None = None,
    ) -> None:
        self.lines: list[str] = []
        self.ready_match: re.Match[str] | None = None
        self.startup: float | None = None  # seconds from spawn to the first `ready` line
        self._ready = threading.Event()
        self._ready_pattern = ready
        spawned = time.perf_counter()
        self.popen = subprocess.Popen(
            argv,
            cwd=cwd,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        threading.Thread(target=self._drain, args=(spawned,), daemon=True).start()

    def _drain(self, spawned: float) -> None:
        assert self.popen.stdout is not None
        for line in self.popen.stdout:
            self.lines.append(line)
            if self.ready_match is None and (match := self._ready_pattern.search(line)):
                self.startup = time.perf_counter() - spawned
                self.ready_match = match
                self._ready.set()
        self._ready.set()  # exited without getting ready: let the waiter fail now

    def wait_ready(self, timeout: float) -> re.Match[str] | None:
        """The ready line's match, or None if the process exited or `timeout` passed first."""
        self._ready.wait(timeout)
        return self.ready_match

    @property
    def output(self) -> str:
        return "".join(self.lines)

    def memory_kib(self, field: str = "VmHWM") -> int | None:
        """A memory figure of the process from /proc (Linux), or None where unknown.

        VmHWM: peak resident memory so far; VmRSS: resident memory now.
        """
        try:
            status = Path(f"/proc/{self.popen.pid}/status").read_text()
        except OSError:
            return None
        match = re.search(rf"^{field}:\s+(\d+) kB", status, re.MULTILINE)
        return int(match.group(1)) if match else None

    def stop(self) -> int | None:
        if self.popen.poll() is None:
            self.popen.terminate()
            try:
                self.popen.wait(10)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(5)
        return self.popen.returncode
