"""Store writes that an answer need not wait for, run in the background in the order given.

A settlement changes the books but not the answer: the answer's figures come from the windows
taken at admission with this call's usage applied (`limiter.settled_view`). So the response
leaves at once and the settlement follows, one write at a time, in order. Whoever must see the
writes (the next reserve, a usage query, shutdown before the stores close) awaits
`caught_up()`, which waits only for what was handed over before it was called: steady traffic
cannot starve it.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Awaitable, Callable

log = logging.getLogger("tokengate")


class WriteBehind:
    def __init__(self) -> None:
        self._queue: deque[Callable[[], Awaitable[object]]] = deque()
        self._done = 0  # writes finished since the start
        self._progress: asyncio.Event | None = None  # set (and dropped) after each write
        self._running = False
        self._runner: asyncio.Task | None = None  # a reference, so the task is not collected

    @property
    def pending(self) -> int:
        return len(self._queue)

    def hand_over(self, write: Callable[[], Awaitable[object]]) -> None:
        """Run `write()` after the writes handed over before it; the caller does not wait."""
        self._queue.append(write)
        self._start()

    async def caught_up(self) -> None:
        """Return once every write handed over before this call has finished."""
        target = self._done + len(self._queue)
        while self._done < target:
            self._start()  # a runner cancelled (shutdown) leaves its writes to the next one
            if self._progress is None:
                self._progress = asyncio.Event()
            await self._progress.wait()

    def _start(self) -> None:
        # A flag, not the task: mitmproxy runs tasks eagerly, so with a store that answers at
        # once the task may already have finished when create_task returns.
        if not self._running and self._queue:
            self._running = True
            self._runner = asyncio.get_running_loop().create_task(
                self._run(), name="tokengate write-behind"
            )

    async def _run(self) -> None:
        try:
            while self._queue:
                try:
                    await self._queue[0]()
                except Exception:  # a bug in one write must not stop the ones behind it
                    log.exception("tokengate: a store write failed")
                self._queue.popleft()
                self._done += 1
                if self._progress is not None:
                    self._progress.set()
                    self._progress = None
        finally:
            self._running = False
