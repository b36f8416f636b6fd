"""The key swap: callers never hold the provider key, and it never stays where it could leak.

The provider key is set on the request just before it is sent and replaced by a placeholder as
soon as the request has left (response headers, error, or shutdown), so flows saved with `-w`,
shown in mitmweb or printed by mitmdump never carry it. At the same moment a reverse-mode flow gets
back the URL its caller used (the context path), so a saved flow replayed with `-C` through a gate
is routed and governed again.
"""

from __future__ import annotations

from mitmproxy import http

from . import flowstate
from .settings import Gate

CALLER_CREDENTIAL_HEADERS = ("authorization", "x-api-key", "api-key")
REDACTED = "Bearer [redacted by tokengate]"


class CredentialSwap:
    def __init__(self, gate: Gate) -> None:
        self.gate = gate
        # flow, and the caller's URL as (scheme, host, port, path)
        self._carrying_key: dict[str, tuple[http.HTTPFlow, tuple[str, str, int, str]]] = {}

    def requestheaders(self, flow: http.HTTPFlow) -> None:
        state = flowstate.governed(flow)
        if state is None:
            return
        for header in CALLER_CREDENTIAL_HEADERS:
            flow.request.headers.pop(header, None)
        proxy = self.gate.proxy(state.get("proxy", ""))
        if proxy is None or flowstate.answered_by_gate(flow):
            return
        # By its parts: a request mitmproxy refuses as malformed reaches this hook without a
        # host, and its URL (`://:0/...`) would not parse back.
        request = flow.request
        callers_url = (request.scheme, request.host, request.port, request.path)
        if state["upstream_path"] is not None:
            flow.request.url = proxy.provider.base_url + state["upstream_path"]  # updates Host
        flow.request.headers["authorization"] = f"Bearer {proxy.provider.api_key}"
        self._carrying_key[flow.id] = (flow, callers_url)

    def _redact(self, flow: http.HTTPFlow) -> None:
        carrying = self._carrying_key.pop(flow.id, None)
        if carrying is not None:
            flow.request.headers["authorization"] = REDACTED
            request = flow.request
            request.scheme, request.host, request.port, request.path = carrying[1]

    def request(self, flow: http.HTTPFlow) -> None:
        # A flow the gate answers after reading the body (429, 400) never leaves.
        if flowstate.answered_by_gate(flow):
            self._redact(flow)

    def responseheaders(self, flow: http.HTTPFlow) -> None:
        self._redact(flow)

    def response(self, flow: http.HTTPFlow) -> None:
        self._redact(flow)

    def error(self, flow: http.HTTPFlow) -> None:
        self._redact(flow)

    def done(self) -> None:
        for flow, _ in list(self._carrying_key.values()):
            self._redact(flow)
