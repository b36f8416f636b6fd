"""A provider that echoes the key it received must not hand it to the caller: scrubbed from the
status line, headers and bodies (buffered, compressed, streamed and split) and marked."""

from __future__ import annotations

import gzip
import json
import logging

import pytest
from mitmproxy.http import Headers
from mitmproxy.test import tutils
from tokengate_core import audit, notes
from tokengate_core.scrub import MARK, MARK_HEADER, PLACEHOLDER, Secrets, StreamScrub, masked

from tests.support.calls import HELLO
from tests.support.harness import gate_in_harness, reverse_flow, through
from tests.support.processes import PROVIDER_KEY
from tests.support.quotas import PROXIES

KEY = PROVIDER_KEY.encode()
ECHO = json.dumps({"error": {"message": f"Incorrect API key provided: {PROVIDER_KEY}."}}).encode()
NORMAL = json.dumps(
    {
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "sk-provider"}}],
        "usage": {"prompt_tokens": 9, "completion_tokens": 11},
    }
).encode()  # a key's first characters are no key


# The scrub itself.


def test_every_providers_whole_key_is_found_and_replaced():
    secrets = Secrets({"a": "sk-aaaa-1", "b": "sk-b/22", "keyless": ""})
    text = b'{"m": "sk-aaaa-1 and sk-b\\/22", "n": "sk-b/22"}'
    assert secrets.found(text) == {"a", "b"}  # the JSON-escaped form of "sk-b/22" too
    scrubbed = secrets.replace(text)
    assert b"sk-aaaa-1" not in scrubbed and b"sk-b" not in scrubbed
    assert scrubbed.count(PLACEHOLDER.encode()) == 3
    assert secrets.found(b"sk-aaaa- sk-b/2") == set()
    assert not Secrets({"keyless": ""})


def test_a_key_inside_another_is_replaced_whole():
    secrets = Secrets({"short": "sk-abc", "long": "sk-abcdef"})
    assert secrets.replace(b"[sk-abcdef]") == b"[" + PLACEHOLDER.encode() + b"]"


def test_keeping_the_length_fits_the_placeholder_to_the_key():
    assert masked(10) == b"[redacted "
    assert masked(30) == PLACEHOLDER.encode() + b"*" * 7
    assert len(Secrets({"p": PROVIDER_KEY}).replace(ECHO, keep_length=True)) == len(ECHO)


@pytest.mark.parametrize("keep_length", [False, True])
def test_a_key_split_at_any_byte_across_two_chunks_never_passes(keep_length):
    secrets = Secrets({"mock": PROVIDER_KEY})
    body = b'data: {"content": "You sent ' + KEY + b'."}\n\ndata: [DONE]\n\n'
    expected = secrets.replace(body, keep_length)
    for cut in range(len(body) + 1):
        seen: list[set[str]] = []
        stream = StreamScrub(secrets, None, keep_length, seen.append)
        out = [stream(body[:cut]), stream(body[cut:]), stream(b"")]
        assert b"".join(b"".join(chunks) for chunks in out) == expected, cut
        assert all(chunk and KEY not in chunk for chunks in out for chunk in chunks)
        assert seen == [{"mock"}]


@pytest.mark.parametrize(
    ("data", "held"),
    [
        (b"", 0),
        (b"no key here\n", 0),
        (b"x" + KEY[:1], 1),
        (b"x" + KEY[:7], 7),
        (KEY[:-1], len(KEY) - 1),
        (b"x" + KEY[1:5], 0),  # key bytes, but not the start of a key
        (KEY[:3] + b"z" + KEY[:2], 2),  # only the last start counts
        (b"x" + KEY[:1] + KEY[:5], 5),  # a false start right before the real one
        (KEY, 0),  # a whole key is replaced, not held
    ],
)
def test_unfinished_is_exactly_the_end_that_begins_a_key(data, held):
    secrets = Secrets({"mock": PROVIDER_KEY})
    assert secrets.unfinished(data) == held


def test_only_what_could_begin_a_key_is_held_back():
    secrets = Secrets({"mock": PROVIDER_KEY})
    stream = StreamScrub(secrets, None, False, lambda owners: None)
    event = b'data: {"content": "Hi"}\n\n'
    assert stream(event) == [event]  # a whole event leaves at once
    assert stream(b"ends in sk-prov") == [b"ends in "]
    assert stream(b"ider, no key") == [b"sk-provider, no key"]
    tail = KEY[:-1]  # the most ever held: one byte short of the longest key
    assert stream(b"x" + tail) == [b"x"]
    assert stream(b"") == [tail]


def test_the_inner_stream_hook_runs_first_and_may_return_bytes_or_chunks():
    secrets = Secrets({"mock": PROVIDER_KEY})
    as_list = StreamScrub(secrets, lambda chunk: [chunk, b"!"] if chunk else [], False, print)
    assert as_list(KEY) == [PLACEHOLDER.encode() + b"!"]
    as_bytes = StreamScrub(secrets, lambda chunk: chunk.upper(), False, print)
    assert as_bytes(b"key: ") == [b"KEY: "]


# In the gate's pipeline.


@pytest.fixture
def gate_addons(tmp_path, monkeypatch):
    roomy = PROXIES.replace("count: 1000,", "count: 1000000,")  # a stream per split position
    with gate_in_harness(tmp_path, monkeypatch, roomy) as harnessed:
        yield harnessed


async def forwarded(addons, **request):
    flow = reverse_flow(**request)
    await through(addons, ("requestheaders", "request"), flow)
    assert flow.response is None  # it left for the provider
    return flow


async def test_json_error_echo_is_scrubbed_and_marked(gate_addons, caplog):
    _, _, addons = gate_addons
    flow = await forwarded(addons)
    flow.response = tutils.tresp(status_code=401, content=ECHO)
    with caplog.at_level(logging.WARNING, "tokengate"):
        await through(addons, ("responseheaders", "response"), flow)
    body = flow.response.content
    assert KEY not in body and PLACEHOLDER.encode() in body
    assert flow.response.headers["content-length"] == str(len(body))
    assert flow.response.headers[MARK_HEADER] == MARK
    assert notes.of(flow)["scrubbed"] is True
    assert audit.live_entry(flow, notes.of(flow))["scrubbed"] is True
    assert "provider key scrubbed" in flow.comment  # Reporting ran after the scrub
    (line,) = [r.getMessage() for r in caplog.records if "scrubbed" in r.getMessage()]
    assert "p/alice" in line and "provider mock" in line and PROVIDER_KEY not in line


async def test_header_and_status_line_echo_is_scrubbed(gate_addons):
    _, _, addons = gate_addons
    flow = await forwarded(addons)
    flow.response = tutils.tresp(status_code=401, reason=b"Bad key " + KEY, content=b"{}")
    flow.response.headers["x-echo-key"] = f"Bearer {PROVIDER_KEY}"
    await through(addons, ("responseheaders",), flow)
    assert flow.response.headers["x-echo-key"] == f"Bearer {PLACEHOLDER}"
    assert flow.response.reason == f"Bad key {PLACEHOLDER}"
    assert flow.response.headers[MARK_HEADER] == MARK
    await through(addons, ("response",), flow)
    assert notes.of(flow)["scrubbed"] is True


async def test_an_echo_in_one_header_alone_is_marked(gate_addons):
    _, _, addons = gate_addons
    flow = await forwarded(addons)
    flow.response = tutils.tresp(status_code=401, content=b"{}")
    flow.response.headers["x-echo-key"] = PROVIDER_KEY
    await through(addons, ("responseheaders", "response"), flow)
    assert flow.response.headers["x-echo-key"] == PLACEHOLDER
    assert flow.response.headers[MARK_HEADER] == MARK and notes.of(flow)["scrubbed"] is True


async def test_an_echo_in_a_body_that_does_not_decode_is_scrubbed_as_it_is(gate_addons):
    _, _, addons = gate_addons
    flow = await forwarded(addons)
    flow.response = tutils.tresp(status_code=401, content=b"")
    flow.response.headers["content-encoding"] = "gzip"  # but it is not
    flow.response.raw_content = ECHO
    await through(addons, ("responseheaders", "response"), flow)
    assert KEY not in flow.response.raw_content
    assert notes.of(flow)["scrubbed"] is True


async def test_an_echo_in_the_trailers_is_scrubbed(gate_addons):
    _, _, addons = gate_addons
    flow = await forwarded(addons)
    flow.response = tutils.tresp(content=NORMAL)
    flow.response.trailers = Headers(x_echo=f"key {PROVIDER_KEY}")
    await through(addons, ("responseheaders", "response"), flow)
    assert flow.response.trailers["x-echo"] == f"key {PLACEHOLDER}"
    assert flow.response.content == NORMAL
    assert notes.of(flow)["scrubbed"] is True


async def test_gzip_encoded_echo_is_scrubbed_and_stays_gzip(gate_addons):
    _, _, addons = gate_addons
    flow = await forwarded(addons)
    flow.response = tutils.tresp(status_code=401, content=b"")
    flow.response.headers["content-encoding"] = "gzip"
    flow.response.raw_content = gzip.compress(ECHO)
    await through(addons, ("responseheaders", "response"), flow)
    assert flow.response.headers["content-encoding"] == "gzip"
    body = gzip.decompress(flow.response.raw_content)
    assert KEY not in body and PLACEHOLDER.encode() in body
    assert flow.response.headers["content-length"] == str(len(flow.response.raw_content))
    assert flow.response.headers[MARK_HEADER] == MARK


async def test_sse_echo_split_anywhere_is_scrubbed_behind_the_meter(gate_addons):
    _, _, addons = gate_addons
    event = {"choices": [{"index": 0, "delta": {"content": f"You sent {PROVIDER_KEY}."}}]}
    upstream = f"data: {json.dumps(event)}\n\ndata: [DONE]\n\n".encode()
    for cut in range(len(upstream) + 1):
        flow = await forwarded(addons, body={**HELLO, "stream": True})
        flow.response = tutils.tresp(content=None)
        flow.response.headers["content-type"] = "text/event-stream"
        await through(addons, ("responseheaders",), flow)
        pieces = (upstream[:cut], upstream[cut:], b"")
        received = b"".join(b"".join(flow.response.stream(piece)) for piece in pieces)
        await through(addons, ("response",), flow)
        assert KEY not in received and PLACEHOLDER.encode() in received, cut
        assert received.endswith(b"data: [DONE]\n\n")  # the meter's trailer went before it
        assert b"x-tokens-consumed=" in received
        assert notes.of(flow)["scrubbed"] is True
        assert notes.of(flow)["usage"]["total_tokens"] > 0  # metered on what the provider sent
        assert MARK_HEADER not in flow.response.headers  # its headers had left already


async def test_a_stream_echoing_twice_is_logged_once(gate_addons, caplog):
    _, _, addons = gate_addons
    flow = await forwarded(addons, body={**HELLO, "stream": True})
    flow.response = tutils.tresp(content=None)
    flow.response.headers["content-type"] = "text/event-stream"
    await through(addons, ("responseheaders",), flow)
    event = {"choices": [{"index": 0, "delta": {"content": f"{PROVIDER_KEY}"}}]}
    with caplog.at_level(logging.WARNING, "tokengate"):
        for _ in range(2):
            flow.response.stream(f"data: {json.dumps(event)}\n\n".encode())
        flow.response.stream(b"")
        await through(addons, ("response",), flow)
    lines = [r.getMessage() for r in caplog.records if "scrubbed" in r.getMessage()]
    assert lines == [
        f"tokengate: the answer to p/alice carried the key of provider mock; scrubbed "
        f"(flow {flow.id})"
    ]


async def test_streamed_body_of_fixed_length_keeps_its_length(gate_addons):
    _, _, addons = gate_addons
    flow = await forwarded(addons)
    flow.response = tutils.tresp(status_code=401, content=None)
    flow.response.headers["content-length"] = str(len(ECHO))
    flow.response.stream = True  # as mitmproxy's stream_large_bodies sets it
    await through(addons, ("responseheaders",), flow)
    cut = ECHO.index(KEY) + 5  # the key split between two chunks
    pieces = (ECHO[:cut], ECHO[cut:], b"")
    received = b"".join(b"".join(flow.response.stream(piece)) for piece in pieces)
    assert len(received) == len(ECHO) and KEY not in received
    await through(addons, ("response",), flow)
    assert notes.of(flow)["scrubbed"] is True


async def test_flow_the_gate_does_not_govern_is_untouched(gate_addons):
    _, _, addons = gate_addons
    flow = reverse_flow(path="/elsewhere/chat/completions", key=None)
    await through(addons, ("requestheaders", "request"), flow)
    assert notes.of(flow) is None
    flow.response = tutils.tresp(status_code=401, content=ECHO)
    flow.response.headers["x-echo-key"] = PROVIDER_KEY
    await through(addons, ("responseheaders", "response"), flow)
    assert flow.response.content == ECHO and flow.response.headers["x-echo-key"] == PROVIDER_KEY
    assert MARK_HEADER not in flow.response.headers


async def test_normal_answer_is_passed_as_it_came(gate_addons, caplog):
    _, _, addons = gate_addons
    flow = await forwarded(addons)
    flow.response = tutils.tresp(content=NORMAL)
    with caplog.at_level(logging.WARNING, "tokengate"):
        await through(addons, ("responseheaders", "response"), flow)
    assert flow.response.content == NORMAL
    assert MARK_HEADER not in flow.response.headers
    assert "scrubbed" not in notes.of(flow)
    assert "scrubbed" not in audit.live_entry(flow, notes.of(flow))
    assert not caplog.records
