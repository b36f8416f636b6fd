"""Store writes that an answer need not wait for, run in the background.

A settlement changes the books but not the answer: the answer's figures come from the windows
taken at admission with this call's usage applied (`limiter.settled_view`). So the response
leaves at once and the settlement follows. Whoever must see the writes (the next reserve, a
usage query, shutdown before the stores close) awaits `caught_up()`, which waits only for the
writes handed over before it was called: steady traffic cannot starve it.

Writes run concurrently, as they did when each flow awaited its own: a store that stalls
(each call timing out) costs every waiting write one timeout, not one timeout per write queued
ahead of it.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

log = logging.getLogger("tokengate")


class WriteBehind:
    def __init__(self) -> None:
        self._running: set[asyncio.Task] = set()  # also the references that keep them alive

    @property
    def pending(self) -> int:
        return len(self._running)

    def hand_over(self, write: Callable[[], Awaitable[object]]) -> None:
        """Start `write()`; the caller does not wait for it."""
        task = asyncio.get_running_loop().create_task(_logged(write), name="tokengate write")
        # mitmproxy runs tasks eagerly: a write that never waits (memory store) is done already.
        if not task.done():
            self._running.add(task)
            task.add_done_callback(self._running.discard)

    async def caught_up(self) -> None:
        """Return once every write handed over before this call has finished."""
        if self._running:
            await asyncio.wait(set(self._running))


async def _logged(write: Callable[[], Awaitable[object]]) -> None:
    try:
        await write()
    except Exception:  # a bug in one write must not go unnoticed, nor stop the others
        log.exception("tokengate: a store write failed")
