"""Pointing a request at the provider and back without URL parsing must do what `request.url`
does: scheme, host, port and path, with the Host header and HTTP/2 :authority following."""

from __future__ import annotations

import pytest
from mitmproxy.test import tutils
from tokengate_core.credentials import Destination, provider_destination

CASES = [
    # (request as the caller sent it: url, Host header or None, http version), target URL
    ("http://gate.test:8080/p/chat/completions", "gate.test:8080", "HTTP/1.1",
     "https://api.example.com/v1/chat/completions"),
    ("http://127.0.0.1:4010/p/chat/completions", "127.0.0.1:4010", "HTTP/1.1",
     "http://127.0.0.1:4010/v1/chat/completions?x=1"),
    ("https://api.example.com/v1/models", "spoofed.example", "HTTP/1.1",
     "https://api.example.com/v1/models"),
    ("https://api.example.com/v1/models", None, "HTTP/1.1", "https://api.example.com/v1/x"),
    ("https://api.example.com/v1/models", None, "HTTP/2.0", "https://api.example.com:8443/v1/x"),
    ("https://api.example.com/v1/models", None, "HTTP/2.0", "https://api.example.com/v1/x"),
]  # fmt: skip


def request_for(caller_url: str, host_header: str | None, version: str):
    request = tutils.treq(http_version=version.encode())
    request.url = caller_url
    if host_header is None:
        request.headers.pop("Host", None)
    else:
        request.headers["Host"] = host_header
    if version == "HTTP/2.0":
        request.authority = "stale.example"
    return request


def seen(request) -> tuple:
    data = request.data
    return data.scheme, data.host, data.port, data.path, request.headers.get("Host"), data.authority


@pytest.mark.parametrize(("caller_url", "host_header", "version", "target"), CASES)
def test_destination_does_what_setting_the_url_does(caller_url, host_header, version, target):
    expected = request_for(caller_url, host_header, version)
    ours = request_for(caller_url, host_header, version)
    callers = Destination.of(ours)
    callers_url = expected.url

    expected.url = target
    base, _, rest = target.partition("/v1")
    provider_destination(base + "/v1", rest).apply(ours)
    assert seen(ours) == seen(expected)

    expected.url = callers_url  # the redaction puts back what the caller asked for
    callers.apply(ours)
    assert seen(ours) == seen(expected)


@pytest.mark.parametrize(
    ("base_url", "upstream_path", "path"),
    [
        ("https://api.example.com/v1", "/chat/completions?q=\u00e4", "/v1/chat/completions?q=ä"),
        ("https://api.example.com/v1", "/ch\u00e4t", "/v1/chät"),
        ("https://api.example.com/v1", "", "/v1"),
        ("https://api.example.com/v1", "?x", "/v1?x"),
        ("http://127.0.0.1:4010", "", "/"),
        ("http://127.0.0.1:4010", "/models", "/models"),
    ],
)
def test_a_caller_path_outside_ascii_goes_to_the_provider_as_sent(base_url, upstream_path, path):
    """Found by the fuzz: a query with a non-ASCII character made URL parsing raise in the hook."""
    request = request_for("http://gate.test:8080/p/x", "gate.test:8080", "HTTP/1.1")
    provider_destination(base_url, upstream_path).apply(request)
    assert request.path == path
    assert request.host == base_url.split("//")[1].split(":")[0].split("/")[0]
