"""`GET <context>/tokengate/usage`: a caller's own standing, answered by the gate itself.

Runs after authentication, so only a valid key learns anything, and only about its own windows
(or its proxy's shared ones with `scope: proxy`). The request is never forwarded.
"""

from __future__ import annotations

import json
import math
from typing import Any

from mitmproxy import http

from . import flowstate, responses
from .limiter import LimitStatus, seconds_until
from .metering import buckets_for, note_windows
from .routing import USAGE_ENDPOINT
from .settings import Gate
from .stores import StoreUnavailable


def standing(proxy, key: str, statuses: tuple[LimitStatus, ...], now: float) -> dict[str, Any]:
    return {
        "object": "tokengate.usage",
        "proxy": proxy.name,
        "key": key,
        "scope": proxy.scope,
        "limits": [
            {
                "name": status.limit.name,
                "dimension": status.limit.dimension,
                "limit": status.limit.count,
                "window_seconds": status.limit.seconds,
                "used": status.used,
                "reserved": status.reserved,
                "remaining": status.remaining,
                "reset": math.ceil(status.reset_at),
                "reset_in_seconds": seconds_until(status.reset_at, now),
            }
            for status in statuses
        ],
    }


class UsageQuery:
    def __init__(self, gate: Gate) -> None:
        self.gate = gate

    async def requestheaders(self, flow: http.HTTPFlow) -> None:
        state = flowstate.governed(flow)
        if state is None or flowstate.answered_by_gate(flow) or state["endpoint"] != USAGE_ENDPOINT:
            return
        proxy = self.gate.proxy(state["proxy"])
        if proxy is None:
            return
        try:
            await self.gate.writes.caught_up()
            statuses = await self.gate.store.status(buckets_for(proxy, state["key"]))
        except StoreUnavailable:
            unreachable = "The usage store is unreachable; try again shortly."
            headers = {"Retry-After": "1"}
            flowstate.answer(
                flow, responses.gate_response(503, unreachable, "server_error", None, headers)
            )
            return
        note_windows(state, statuses)
        now = self.gate.clock()
        body = json.dumps(standing(proxy, state["key"], statuses, now), indent=2).encode()
        headers = {"Content-Type": "application/json", responses.SOURCE_HEADER: "gateway"}
        headers.update(responses.ratelimit_headers(statuses, now))
        flowstate.answer(flow, http.Response.make(200, body, headers))
