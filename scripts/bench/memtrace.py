"""A mitmdump script for soak runs: what the process allocated between warm-up and the end.

Load it with a second `-s` beside TokenGate (or alone, for plain mitmdump):

    mitmdump ... -s scripts/bench/memtrace.py \\
        --set memtrace_out=trace.txt --set memtrace_warm_flows=2000

Once `memtrace_warm_flows` flows have ended (response or error) it starts tracemalloc, so the
warm-up runs at full speed; every `memtrace_warm_flows` flows after that it takes a snapshot
while the proxy still serves (at `done` connections are already being torn down). On `done` it
writes to `memtrace_out`, from the last of those snapshots: the connections and flows seen, the
memory allocated after warm-up and still held, summed by owner (the newest frame of each
traceback in `tokengate_core`, `mitmproxy`, `asyncio`, ...), the top tracebacks, and the live
objects per type that grew (from `gc`). Tracing slows mitmdump about tenfold: use it to name
what grows, never for timings. Snapshots pause the event loop; in a measurement run that is
harmless.
"""

from __future__ import annotations

import gc
import linecache
import tracemalloc
from collections import Counter
from pathlib import Path

from mitmproxy import ctx, exceptions

FRAMES = 10  # enough to reach the addon or mitmproxy frame that asked
TOP = 25
OWNERS = ("tokengate_core", "mitmproxy", "asyncio", "h11", "h2", "wsproto", "ssl", "socket")


def owner(trace: tracemalloc.Traceback) -> str:
    """Who made the allocation: the newest frame that belongs to a known package or module."""
    for frame in reversed(trace):  # a Traceback lists the oldest frame first
        for name in OWNERS:
            if f"/{name}/" in frame.filename or frame.filename.endswith(f"/{name}.py"):
                return name
    return "other"


def live_types() -> Counter[str]:
    """Live objects per type among those gc tracks (str and bytes are not: tracemalloc has them)."""
    gc.collect()
    # f-strings: a few types' __module__ is a descriptor, not a str
    return Counter(f"{type(o).__module__}.{type(o).__qualname__}" for o in gc.get_objects())


class MemTrace:
    def __init__(self) -> None:
        self.flows = 0
        self.client_connections = 0
        self.server_connections = 0
        self.warm_types: Counter[str] = Counter()
        self.last: tracemalloc.Snapshot | None = None
        self.last_types: Counter[str] = Counter()
        self.seen: dict[str, tuple[int, int, int]] = {}  # "warm"/"last": flows, clients, servers

    def load(self, loader) -> None:
        loader.add_option("memtrace_out", str, "", "File the memory report is written to on done.")
        loader.add_option(
            "memtrace_warm_flows",
            int,
            1000,
            "Ended flows after which tracing starts, and between two snapshots after that.",
        )

    def configure(self, updated) -> None:
        if "memtrace_warm_flows" in updated and ctx.options.memtrace_warm_flows < 1:
            raise exceptions.OptionsError("memtrace_warm_flows must be at least 1")

    def client_connected(self, client) -> None:
        self.client_connections += 1

    def server_connected(self, data) -> None:
        self.server_connections += 1

    def response(self, flow) -> None:
        self._ended()

    def error(self, flow) -> None:
        self._ended()

    def _ended(self) -> None:
        self.flows += 1
        if self.flows % ctx.options.memtrace_warm_flows:
            return
        counts = (self.flows, self.client_connections, self.server_connections)
        if not tracemalloc.is_tracing():
            self.warm_types = live_types()
            self.seen["warm"] = counts
            tracemalloc.start(FRAMES)
        else:
            self.last_types = live_types()
            self.last = tracemalloc.take_snapshot()
            self.seen["last"] = counts

    def done(self) -> None:
        if ctx.options.memtrace_out and self.last is not None:
            Path(ctx.options.memtrace_out).write_text(self.report(), encoding="utf-8")

    def report(self) -> str:
        mine = [tracemalloc.Filter(False, __file__, all_frames=True)]
        held = self.last.filter_traces(mine).statistics("traceback")
        by_owner: Counter[str] = Counter()
        for stat in held:
            by_owner[owner(stat.traceback)] += stat.size
        (warm_flows, warm_clients, warm_servers) = self.seen["warm"]
        (flows, clients, servers) = self.seen["last"]
        traced = flows - warm_flows
        grew = sorted(
            (name for name in self.last_types if self.last_types[name] > self.warm_types[name]),
            key=lambda name: self.warm_types[name] - self.last_types[name],
        )
        lines = [
            f"flows ended: {warm_flows} at warm-up, {flows} at the last snapshot",
            f"client connections: {warm_clients} at warm-up, {clients} at the last snapshot",
            f"server connections: {warm_servers} at warm-up, {servers} at the last snapshot",
            f"allocated after warm-up, still held, by owner (bytes; per flow over {traced}):",
            *(
                f"  {name:16} {size:12,d}  {size / max(1, traced):9.1f}"
                for name, size in by_owner.most_common()
            ),
            "live objects per type that grew (gc):",
            *(
                f"  {name:60} {self.last_types[name] - self.warm_types[name]:+8d}"
                f" -> {self.last_types[name]}"
                for name in grew[:TOP]
            ),
            f"top {TOP} tracebacks still held (newest frame first):",
        ]
        for stat in held[:TOP]:
            lines.append(f"{stat.size:,d} B in {stat.count} blocks ({owner(stat.traceback)})")
            for frame in reversed(stat.traceback):
                source = linecache.getline(frame.filename, frame.lineno).strip()
                lines.append(f"    {frame.filename}:{frame.lineno}  {source}")
        return "\n".join(lines) + "\n"


addons = [MemTrace()]
