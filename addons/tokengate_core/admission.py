"""Which flows the gate governs, who is calling, and what they may do with the provider's key."""

from __future__ import annotations

from mitmproxy import http

from . import flowstate, responses
from .keys import caller_key, format_timestamp
from .routing import is_reverse, route
from .settings import Gate


class Router:
    """Marks the flows that belong to a configured proxy; everything else passes untouched."""

    def __init__(self, gate: Gate) -> None:
        self.gate = gate

    def requestheaders(self, flow: http.HTTPFlow) -> None:
        # A flow loaded from a file may carry the notes of the run that saved it; they must not
        # make the addons act on it now.
        flow.metadata.pop(flowstate.META, None)
        # Flows loaded from a file or replayed by the server already carry a response.
        if self.gate.config is None or flow.response is not None or not flow.live:
            return
        found = route(self.gate.config, flow.request, is_reverse(flow))
        if found is None:
            return
        flow.metadata[flowstate.META] = {
            "candidates": [proxy.name for proxy in found.candidates],
            "upstream_path": found.upstream_path,
            "endpoint": found.endpoint,
            "allowed": found.allowed,
        }


class Authenticator:
    """Finds the caller's key among the routed proxies' keys; 401 from the gate otherwise.

    An expired key is named in its 401, so its holder knows to ask for a new one rather than
    suspect a typo.
    """

    def __init__(self, gate: Gate) -> None:
        self.gate = gate

    def requestheaders(self, flow: http.HTTPFlow) -> None:
        state = flowstate.governed(flow)
        if state is None:
            return
        secret = caller_key(flow.request.headers)
        if secret is None:
            flowstate.answer(
                flow,
                responses.unauthorized(
                    "Missing API key. Send your TokenGate key as 'Authorization: Bearer <key>' "
                    "or 'X-API-Key: <key>'."
                ),
            )
            return
        for name in state["candidates"]:
            proxy = self.gate.proxy(name)
            key = proxy.keys.find(secret) if proxy else None
            if key is not None:
                state["proxy"] = proxy.name
                state["key"] = key.name
                state["key_fp"] = key.sha256[:16]
                if key.expired(self.gate.clock()):
                    flowstate.answer(
                        flow,
                        responses.unauthorized(
                            f"This API key ({key.name!r}) expired at "
                            f"{format_timestamp(key.expires)}. Ask the gateway's operator for "
                            "a new one."
                        ),
                    )
                return
        flowstate.answer(flow, responses.unauthorized("Incorrect API key provided."))


class EndpointPolicy:
    """403 from the gate for governed paths that are neither metered nor read-only.

    Callers hold a gate key, not the provider's: they may generate (metered) and list models,
    not use the provider account for anything the gate cannot meter.
    """

    def requestheaders(self, flow: http.HTTPFlow) -> None:
        state = flowstate.governed(flow)
        if state is None or flowstate.answered_by_gate(flow) or state["allowed"]:
            return
        flowstate.answer(
            flow,
            responses.invalid_request(
                403,
                f"{flow.request.method} {flow.request.path} is not available through this "
                "gateway: it serves the chat/completions, completions, embeddings and responses "
                "endpoints and the model list.",
                "endpoint_not_allowed",
            ),
        )
