"""The key swap: callers never hold the provider key, and it never stays where it could leak.

The provider key is set on the request just before it is sent and replaced by a placeholder as
soon as the request has left (response headers, error, or shutdown), so flows saved with `-w`,
shown in mitmweb or printed by mitmdump never carry it. A flow keeps the URL it was sent to (the
log shows the provider URL that was called; a client replay `-C` through a gate is routed again by
the notes saved with it); a flow that never reached the provider (the gate answered it, or it
failed before connecting) gets back the URL its caller used. A provider that echoes a key in its
answer has it scrubbed before the caller sees it (scrub.py).
"""

from __future__ import annotations

import logging
import urllib.parse
from collections.abc import Set
from dataclasses import dataclass
from functools import lru_cache

from mitmproxy import http
from mitmproxy.net.http import url
from mitmproxy.utils.strutils import always_str

from . import notes
from .config import Config
from .gate import Gate
from .scrub import MARK, MARK_HEADER, PLACEHOLDER, Secrets, StreamScrub, scrub_body, scrub_head

log = logging.getLogger("tokengate")

REDACTED_KEY = PLACEHOLDER  # in place of the provider key, once it has left


@dataclass(frozen=True)
class Destination:
    """Where a request goes, as mitmproxy keeps it (scheme, host, port, path)."""

    scheme: bytes
    host: str
    port: int
    path: bytes

    @classmethod
    def of(cls, request: http.Request) -> Destination:
        data = request.data
        return cls(data.scheme, data.host, data.port, data.path)

    @property
    def authority(self) -> str:
        return url.hostport(self.scheme.decode(), self.host, self.port)

    def apply(self, request: http.Request) -> None:
        """What setting `request.url` does (Host header and :authority follow the host),
        without parsing and re-encoding a URL each time: in a profile, the two URL assignments
        per flow were a third of the gate's own time. Usually only the path changes."""
        data = request.data
        authority = self.authority
        stale_host = (
            (data.scheme, data.host, data.port) != (self.scheme, self.host, self.port)
            or data.headers.get("Host", authority) != authority
            or (data.authority and data.authority != authority.encode())
        )
        if stale_host:
            request.scheme, request.host, request.port = self.scheme, self.host, self.port
        data.path = self.path


@lru_cache(maxsize=256)
def provider_destination(base_url: str, upstream_path: str) -> Destination:
    """The provider URL a governed request goes to (cached: few distinct paths are used).

    Only the configured base URL is parsed; the caller's part of the path is appended as it
    came (UTF-8, as mitmproxy stores a path), since a URL parser refuses what is not ASCII.
    """
    scheme, host, port, _ = url.parse(base_url)
    path = (urllib.parse.urlsplit(base_url).path + upstream_path).encode("utf-8", "surrogateescape")
    if not path.startswith(b"/"):
        path = b"/" + path
    return Destination(scheme, always_str(host, "idna", "strict"), port, path)


class CredentialSwap:
    def __init__(self, gate: Gate) -> None:
        self.gate = gate
        # flow id -> the flow, the caller's destination, the headers in which the key is redacted
        self._carrying_key: dict[str, tuple[http.HTTPFlow, Destination, dict[str, str]]] = {}
        # flow id -> the keys to scrub from its answer (those in force when it was sent)
        self._answering: dict[str, Secrets] = {}
        self._secrets: tuple[Config | None, Secrets] = (None, Secrets({}))

    def requestheaders(self, flow: http.HTTPFlow) -> None:
        note = notes.of(flow)
        if note is None:
            return
        # A flow refused for its path (404) has no candidate: every dialect's headers go.
        names = note["candidates"] or (self.gate.config.proxies if self.gate.config else ())
        for name in names:
            proxy = self.gate.proxy(name)
            for header in proxy.dialect.credential_headers if proxy else ():
                flow.request.headers.pop(header, None)
        proxy = self.gate.proxy(note.get("proxy", ""))
        if proxy is None or notes.answered_by_gate(flow):
            return
        callers = Destination.of(flow.request)
        if note["upstream_path"] is not None:
            provider_destination(proxy.provider.base_url, note["upstream_path"]).apply(flow.request)
        api_key = proxy.provider.api_key
        # A keyless provider (a local server) gets no credential at all: the caller's is gone.
        redacted = proxy.dialect.provider_auth(REDACTED_KEY) if api_key else {}
        if api_key:
            flow.request.headers.update(proxy.dialect.provider_auth(api_key))
        self._carrying_key[flow.id] = (flow, callers, redacted)
        self._answering[flow.id] = self._secrets_in_force()

    def _secrets_in_force(self) -> Secrets:
        """Every configured provider's key (built once per configuration)."""
        config, secrets = self._secrets
        if config is not self.gate.config:
            providers = self.gate.config.providers if self.gate.config else {}
            secrets = Secrets({name: p.api_key for name, p in providers.items()})
            self._secrets = (self.gate.config, secrets)
        return secrets

    def _redact(self, flow: http.HTTPFlow) -> Destination | None:
        """Redact the provider key; the caller's destination, if the flow carried the key."""
        carrying = self._carrying_key.pop(flow.id, None)
        if carrying is None:
            return None
        _, callers, redacted = carrying
        flow.request.headers.update(redacted)
        return callers

    def request(self, flow: http.HTTPFlow) -> None:
        # A flow the gate answers after reading the body (429, 400) never leaves: it shows what
        # its caller sent.
        if notes.answered_by_gate(flow) and (callers := self._redact(flow)) is not None:
            callers.apply(flow.request)
            self._answering.pop(flow.id, None)

    def responseheaders(self, flow: http.HTTPFlow) -> None:
        self._redact(flow)
        secrets = self._answering.get(flow.id)
        if not secrets or flow.response is None:
            return
        self._scrubbed(flow, scrub_head(flow.response, secrets), headers_left=False)
        stream = flow.response.stream
        if stream:  # runs after Metering, which may have set its own hook: it is wrapped
            del self._answering[flow.id]
            flow.response.stream = StreamScrub(
                secrets,
                stream if callable(stream) else None,
                keep_length="content-length" in flow.response.headers,
                found=lambda owners: self._scrubbed(flow, owners, headers_left=True),
            )

    def response(self, flow: http.HTTPFlow) -> None:
        self._redact(flow)
        secrets = self._answering.pop(flow.id, None)
        if secrets and flow.response is not None:
            self._scrubbed(flow, scrub_body(flow.response, secrets), headers_left=False)

    def _scrubbed(self, flow: http.HTTPFlow, owners: Set[str], headers_left: bool) -> None:
        """Mark an answer that carried a provider key: a header (while the headers have not
        left), the flow's notes (ledger and comment), and one log line per flow."""
        if not owners:
            return
        if not headers_left:
            flow.response.headers[MARK_HEADER] = MARK
        note = notes.of(flow)
        if note.get("scrubbed"):
            return
        note["scrubbed"] = True
        log.warning(
            "tokengate: the answer to %s/%s carried the key of provider %s; scrubbed (flow %s)",
            note.get("proxy"),
            note.get("key"),
            ", ".join(sorted(owners)),
            flow.id,
        )

    def error(self, flow: http.HTTPFlow) -> None:
        callers = self._redact(flow)
        self._answering.pop(flow.id, None)
        if callers is not None and flow.server_conn.timestamp_start is None:
            callers.apply(flow.request)  # it never reached the provider

    def done(self) -> None:
        for flow, _, _ in list(self._carrying_key.values()):
            self._redact(flow)
        self._answering.clear()
