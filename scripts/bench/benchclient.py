"""A lean HTTP/1.1 load client for the benchmarks: keep-alive connections, pre-encoded requests.

The client must not be the bottleneck and must cost the same for every target, so it does no
more than write prepared bytes and read a status line, headers and a body (Content-Length or
chunked) per request; `drive` reports the CPU it used beside the figures.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import socket
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

WARMUP = 3  # untimed requests per connection: connection set-up, first-call caches
REQUEST_TIMEOUT = 10.0  # for the warm-up, and past the time cap for the requests in flight


@dataclass
class Run:
    """What one load level measured: per-request seconds, answers, and what the client cost."""

    latencies: list[float] = field(default_factory=list)
    statuses: Counter = field(default_factory=Counter)  # status -> count; 0: no answer
    seconds: float = 0.0
    client_cpu: float = 0.0
    cut: bool = False  # the time cap ended it before the request count

    @property
    def failed(self) -> int:
        return sum(count for status, count in self.statuses.items() if status != 200)


def encode_request(port: int, path: str, key: str, body: dict) -> bytes:
    """The whole HTTP/1.1 request, encoded once: sending it costs the client nothing more."""
    data = json.dumps(body).encode()
    head = (
        f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nAuthorization: Bearer {key}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(data)}\r\n\r\n"
    )
    return head.encode() + data


async def read_response(reader: asyncio.StreamReader) -> tuple[int, bytes, float]:
    """Status, header block and when the first body byte came; the body is read and dropped."""
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    lowered = head.lower()
    if b"\r\ntransfer-encoding: chunked\r\n" in lowered:
        first = 0.0
        while size := int((await reader.readline()).split(b";")[0], 16):
            first = first or time.perf_counter()
            await reader.readexactly(size + 2)
        while await reader.readline() not in (b"\r\n", b""):  # trailers
            pass
        return status, head, first or time.perf_counter()
    marker = lowered.find(b"\r\ncontent-length:")
    if marker < 0:
        raise ValueError("an answer without Content-Length or chunked encoding")
    length = int(lowered[marker + 17 : lowered.index(b"\r\n", marker + 2)])
    await reader.readexactly(length)
    return status, head, time.perf_counter()


async def connect(port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return reader, writer


async def drive(
    port: int,
    requests: Sequence[bytes],
    total: int,
    concurrency: int,
    seconds: float,
    first_byte: bool = False,
    expect_header: bytes | None = None,
) -> Run:
    """`total` requests over `concurrency` keep-alive connections, for at most `seconds`.

    Request i is `requests[i % len(requests)]`. A latency ends at the last body byte, or with
    `first_byte` at the first. The warm-up answers must carry `expect_header` (the gate's), so a
    target that is not what it claims fails loudly instead of being measured.
    """
    run = Run()
    connections: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
    try:
        async with asyncio.timeout(REQUEST_TIMEOUT):
            for _ in range(concurrency):
                connections.append(await connect(port))
            for reader, writer in connections:
                for i in range(WARMUP):
                    writer.write(requests[i % len(requests)])
                    status, head, _ = await read_response(reader)
                    if status != 200 or (expect_header and expect_header not in head.lower()):
                        raise RuntimeError(f"warm-up answer on port {port}:\n{head.decode()}")
        counter = itertools.count()
        cap = time.monotonic() + seconds

        async def worker(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            while (i := next(counter)) < total:
                if time.monotonic() > cap:
                    run.cut = True
                    return
                began = time.perf_counter()
                writer.write(requests[i % len(requests)])
                try:
                    status, _, first = await read_response(reader)
                except (OSError, ValueError, asyncio.IncompleteReadError):
                    run.statuses[0] += 1  # no answer: the connection is gone, so is the worker
                    return
                run.latencies.append((first if first_byte else time.perf_counter()) - began)
                run.statuses[status] += 1

        cpu, began = time.process_time(), time.perf_counter()
        try:
            async with asyncio.timeout(seconds + REQUEST_TIMEOUT):
                await asyncio.gather(*(worker(*connection) for connection in connections))
        except TimeoutError:
            run.cut = True
        run.seconds = time.perf_counter() - began
        run.client_cpu = time.process_time() - cpu
    finally:
        for _, writer in connections:
            writer.close()
    return run
