"""Where a benchmarked mitmdump spends its CPU: py-spy samples it from outside while it serves.

py-spy (a dev dependency) attaches to the running process by its PID, so the proxy runs exactly
as measured, only slowed by the sampling: figures of a profiled run are not comparable with an
unprofiled one. The samples are kept as folded stacks (one line per distinct stack and its
count, flamegraph.pl's input) and summarised here: the share of samples in TokenGate's own
code, the functions where the samples land, and through which TokenGate functions.
"""

from __future__ import annotations

import contextlib
import re
import signal
import subprocess
import sys
from collections import Counter
from collections.abc import Iterable, Iterator
from pathlib import Path

from tokengate_core.tools.children import Child

PY_SPY = str(Path(sys.executable).with_name("py-spy"))
RATE = 200  # samples per second
SAMPLING = re.compile(r"Sampling process")
OURS = re.compile(r"tokengate_core[/\\]|addons[/\\]tokengate\.py")
LINE = re.compile(r":\d+\)$")  # a frame's line number: functions are counted whole
TOP = 8
NATIVE = "(no Python frame)"  # a thread sampled outside Python code


@contextlib.contextmanager
def sampled(pid: int, output: Path) -> Iterator[None]:
    """Sample process `pid` while the block runs; folded stacks go to `output`."""
    argv = [PY_SPY, "record", "--pid", str(pid), "--rate", str(RATE), "--nonblocking"]
    spy = Child([*argv, "--format", "raw", "--output", str(output)], ready=SAMPLING)
    try:
        if spy.wait_ready(10) is None:
            raise RuntimeError(f"py-spy did not start sampling:\n{spy.output}")
        yield
    finally:
        if spy.popen.poll() is None:
            spy.popen.send_signal(signal.SIGINT)  # py-spy writes its output on Ctrl-C
            with contextlib.suppress(subprocess.TimeoutExpired):
                spy.popen.wait(10)
        spy.stop()


def summary(files: Iterable[Path], requests: int) -> dict:
    """Shares of samples: in TokenGate's code, by leaf function, by TokenGate entry point.

    py-spy leaves out idle threads, so samples per request (in ms at RATE) tell how long the
    process was busy for each of the `requests` it served while sampled.
    """
    total = ours = 0
    leaves: Counter[str] = Counter()
    entries: Counter[str] = Counter()
    for path in files:
        for line in path.read_text(encoding="utf-8").splitlines():
            stack, _, count = line.rpartition(" ")
            if not count.isdigit():
                continue
            samples = int(count)
            frames = [LINE.sub(")", frame) for frame in stack.split(";")] if stack else [NATIVE]
            total += samples
            leaves[frames[-1]] += samples
            if entry := next((frame for frame in frames if OURS.search(frame)), None):
                ours += samples
                entries[entry] += samples

    def shares(counter: Counter[str]) -> list[list]:
        return [[frame, count / total] for frame, count in counter.most_common(TOP)]

    return {
        "samples": total,
        "busy_ms_per_request": total / RATE * 1000 / requests if requests else None,
        "tokengate_share": ours / total if total else None,
        "top_functions": shares(leaves) if total else [],
        "top_tokengate_entries": shares(entries) if total else [],
    }
