"""The SSE parser under arbitrary chunking, and usage metering of JSON bodies and streams."""

from __future__ import annotations

import itertools
import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tokengate_core import tokens
from tokengate_core.config import Limit
from tokengate_core.dialects.openai import (
    MAX_BELIEVABLE_TOKENS,
    OpenAI,
    generated_text,
    reported_usage,
)
from tokengate_core.limiter import LimitStatus, Usage
from tokengate_core.sse import Event, EventFramer, SSEParser
from tokengate_core.streaming import StreamRelay, trailer_comment
from tokengate_core.usage import (
    BodyMeter,
    BoundedBuffer,
    Metered,
    StreamMeter,
    caller_hung_up,
    charge,
    meter_json,
)

OPENAI = OpenAI()

# A realistic stream: comments, a typed event, multi-line data, non-ASCII text, CRLF line ends,
# an event with no space after the colon, unknown fields, and a final `[DONE]`.
PAYLOAD = (
    ": keep-alive\r\n"
    "\r\n"
    "retry: 3000\r\n"
    'data: {"choices":[{"delta":{"content":"Grüß "}}]}\r\n'
    "\r\n"
    "event: ping\r\n"
    "id: 7\r\n"
    "data:first\r\n"
    "data:  second\r\n"
    "\r\n"
    'data: {"choices":[{"delta":{"content":"東京 🙂"}}]}\r\n'
    "\r\n"
    "data: [DONE]\r\n"
    "\r\n"
).encode()

EXPECTED = [
    Event("message", '{"choices":[{"delta":{"content":"Grüß "}}]}'),
    Event("ping", "first\n second"),
    Event("message", '{"choices":[{"delta":{"content":"東京 🙂"}}]}'),
    Event("message", "[DONE]"),
]


def feed_all(chunks: list[bytes]) -> list[Event]:
    parser = SSEParser()
    events: list[Event] = []
    for chunk in chunks:
        if chunk:  # b"" means end of stream; it is fed only once, last
            events += parser.feed(chunk)
    return events + parser.feed(b"")


def test_payload_at_once() -> None:
    assert feed_all([PAYLOAD]) == EXPECTED


def test_every_single_split_point() -> None:
    for cut in range(len(PAYLOAD) + 1):
        assert feed_all([PAYLOAD[:cut], PAYLOAD[cut:]]) == EXPECTED, f"split at byte {cut}"


def test_every_pair_of_split_points_near_crlf_and_utf8() -> None:
    # Three pieces around the interesting bytes (a CRLF and a 4-byte emoji).
    crlf = PAYLOAD.index(b"\r\n\r\n")
    emoji = PAYLOAD.index("🙂".encode())
    for a in range(crlf - 2, crlf + 5):
        for b in range(emoji - 1, emoji + 6):
            assert feed_all([PAYLOAD[:a], PAYLOAD[a:b], PAYLOAD[b:]]) == EXPECTED


def test_byte_by_byte() -> None:
    assert feed_all([PAYLOAD[i : i + 1] for i in range(len(PAYLOAD))]) == EXPECTED


@settings(max_examples=150, deadline=None)
@given(st.lists(st.integers(min_value=0, max_value=len(PAYLOAD)), max_size=20))
def test_random_chunkings(cuts: list[int]) -> None:
    points = [0, *sorted(cuts), len(PAYLOAD)]
    chunks = [PAYLOAD[a:b] for a, b in itertools.pairwise(points)]
    assert feed_all(chunks) == EXPECTED


@pytest.mark.parametrize("eol", ["\n", "\r\n", "\r"], ids=["LF", "CRLF", "CR"])
def test_line_endings(eol: str) -> None:
    text = PAYLOAD.decode().replace("\r\n", eol).encode()
    assert feed_all([text]) == EXPECTED
    assert feed_all([text[i : i + 1] for i in range(len(text))]) == EXPECTED


def test_mixed_line_endings() -> None:
    stream = b"data: a\rdata: b\ndata: c\r\n\rdata: d\n\r\n"
    assert feed_all([stream]) == [Event("message", "a\nb\nc"), Event("message", "d")]


def test_crlf_split_between_chunks_is_one_line_end() -> None:
    parser = SSEParser()
    assert parser.feed(b"data: a\r") == []
    # If the LF were taken as a second (blank) line, "a" would be dispatched here on its own.
    assert parser.feed(b"\ndata: b\r") == []
    assert parser.feed(b"\n\r") == [Event("message", "a\nb")]
    assert parser.feed(b"\n") == []  # the LF of that last CRLF, not another blank line
    assert parser.feed(b"data: c\n\n") == [Event("message", "c")]


def test_cr_then_separate_lf_chunk_is_not_a_blank_line_after_empty_decode() -> None:
    # A chunk that decodes to nothing (half a UTF-8 character) between CR and LF.
    parser = SSEParser()
    assert parser.feed(b"data: a\r") == []
    assert parser.feed(b"\ndata: \xc3") == []
    assert parser.feed(b"\xa9\r") == []
    assert parser.feed(b"\n\n") == [Event("message", "a\né")]


def test_comments_are_skipped() -> None:
    stream = b": hello\n:\n: data: not-data\ndata: x\n: in between\n\n"
    assert feed_all([stream]) == [Event("message", "x")]


def test_comment_only_block_dispatches_nothing() -> None:
    assert feed_all([b": keep-alive\n\n: keep-alive\n\n"]) == []


def test_multiline_data_joined_with_lf() -> None:
    assert feed_all([b"data: one\ndata: two\ndata:\ndata: four\n\n"]) == [
        Event("message", "one\ntwo\n\nfour")
    ]


def test_field_without_colon_and_space_handling() -> None:
    # "data" alone is an empty data line; only one leading space of the value is removed.
    assert feed_all([b"data\ndata:  x \n\n"]) == [Event("message", "\n x ")]


def test_event_type_applies_to_one_event_only() -> None:
    stream = b"event: delta\ndata: 1\n\ndata: 2\n\n"
    assert feed_all([stream]) == [Event("delta", "1"), Event("message", "2")]


def test_event_type_without_data_is_discarded() -> None:
    # A blank line with an empty data buffer resets the event type (WHATWG).
    assert feed_all([b"event: lost\n\ndata: 2\n\n"]) == [Event("message", "2")]


def test_other_fields_are_ignored() -> None:
    assert feed_all([b"id: 1\nretry: 10\nfoo: bar\ndata: x\n\n"]) == [Event("message", "x")]


@pytest.mark.parametrize("text", ["é", "€", "🙂", "東"])
def test_multibyte_utf8_split_across_chunks(text: str) -> None:
    raw = f"data: {text}{text}\n\n".encode()
    for cut in range(len(raw) + 1):
        events = feed_all([raw[:cut], raw[cut:]])
        assert events == [Event("message", text + text)], f"split at {cut}"


def test_invalid_utf8_is_replaced_not_raised() -> None:
    assert feed_all([b"data: \xff\xfe ok\n\n"]) == [Event("message", "\ufffd\ufffd ok")]


def test_truncated_utf8_at_end_of_stream() -> None:
    parser = SSEParser()
    assert parser.feed(b"data: ok\n\ndata: \xe2\x82") == [Event("message", "ok")]
    assert parser.feed(b"") == []  # the unterminated event is still not dispatched


def test_final_event_without_blank_line_is_not_dispatched() -> None:
    """WHATWG: at end of stream an incomplete event is discarded.

    feed(b"") marks the end of the stream: it processes a last line that had no line end, but
    a blank line never came, so the pending event is dropped rather than dispatched.
    """
    parser = SSEParser()
    assert parser.feed(b"data: a\n\ndata: b") == [Event("message", "a")]
    assert parser.feed(b"") == []

    parser = SSEParser()
    assert parser.feed(b"data: a\n\ndata: b\n") == [Event("message", "a")]
    assert parser.feed(b"") == []


# --- reported_usage -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("payload", "expected"),
    [
        (  # chat/completions and completions
            {
                "object": "chat.completion",
                "usage": {"prompt_tokens": 12, "completion_tokens": 5, "total_tokens": 17},
            },
            Usage(12, 5),
        ),
        (  # embeddings report no completion tokens
            {"object": "list", "usage": {"prompt_tokens": 8, "total_tokens": 8}},
            Usage(8, 0),
        ),
        (  # Responses API
            {
                "object": "response",
                "usage": {"input_tokens": 20, "output_tokens": 7, "total_tokens": 27},
            },
            Usage(20, 7),
        ),
        (  # Responses API stream terminal event wraps the response
            {
                "type": "response.completed",
                "response": {"id": "r1", "usage": {"input_tokens": 3, "output_tokens": 4}},
            },
            Usage(3, 4),
        ),
        ({"usage": {"prompt_tokens": 0, "completion_tokens": 0}}, Usage(0, 0)),
        (
            {"usage": {"prompt_tokens": MAX_BELIEVABLE_TOKENS, "completion_tokens": 1}},
            Usage(MAX_BELIEVABLE_TOKENS, 1),
        ),
        (  # cached and reasoning sub-counts are parts of prompt and completion
            {
                "usage": {
                    "prompt_tokens": 100,
                    "completion_tokens": 40,
                    "prompt_tokens_details": {"cached_tokens": 64},
                    "completion_tokens_details": {"reasoning_tokens": 30},
                }
            },
            Usage(100, 40, cached_prompt=64, reasoning=30),
        ),
        (  # the Responses API names the same details input/output
            {
                "usage": {
                    "input_tokens": 10,
                    "output_tokens": 9,
                    "input_tokens_details": {"cached_tokens": 4},
                    "output_tokens_details": {"reasoning_tokens": 8},
                }
            },
            Usage(10, 9, cached_prompt=4, reasoning=8),
        ),
        (  # a sub-count larger than its whole, or not a count, is not believed
            {
                "usage": {
                    "prompt_tokens": 10,
                    "completion_tokens": 5,
                    "prompt_tokens_details": {"cached_tokens": 64},
                    "completion_tokens_details": {"reasoning_tokens": "3"},
                }
            },
            Usage(10, 5, cached_prompt=10),
        ),
        (  # the tier the answer was served at, priced apart
            {"service_tier": "flex", "usage": {"prompt_tokens": 1, "completion_tokens": 2}},
            Usage(1, 2, service_tier="flex"),
        ),
        (
            {
                "type": "response.completed",
                "response": {
                    "service_tier": "priority",
                    "usage": {"input_tokens": 3, "output_tokens": 4},
                },
            },
            Usage(3, 4, service_tier="priority"),
        ),
        (
            {"service_tier": 7, "usage": {"prompt_tokens": 1, "completion_tokens": 2}},
            Usage(1, 2),
        ),
    ],
    ids=[
        "chat",
        "embeddings",
        "responses",
        "responses-event",
        "zeros",
        "at-maximum",
        "details",
        "responses-details",
        "odd-details",
        "tier",
        "responses-tier",
        "odd-tier",
    ],
)
def test_reported_usage(payload: dict, expected: Usage) -> None:
    assert reported_usage(payload) == expected


@pytest.mark.parametrize(
    "usage",
    [
        {"prompt_tokens": -1, "completion_tokens": 5},
        {"prompt_tokens": 5, "completion_tokens": -1},
        {"prompt_tokens": True, "completion_tokens": 5},
        {"prompt_tokens": 5, "completion_tokens": False},
        {"prompt_tokens": "12", "completion_tokens": 5},
        {"prompt_tokens": 12, "completion_tokens": "5"},
        {"prompt_tokens": 12.0, "completion_tokens": 5},
        {"prompt_tokens": MAX_BELIEVABLE_TOKENS + 1, "completion_tokens": 5},
        {"prompt_tokens": 5, "completion_tokens": 10**12},
        {"input_tokens": -3, "output_tokens": 2},
        {"input_tokens": 3, "output_tokens": "2"},
        {"completion_tokens": 5},
        {},
    ],
)
def test_unbelievable_usage_is_none(usage: dict) -> None:
    assert reported_usage({"usage": usage}) is None
    assert reported_usage({"type": "response.completed", "response": {"usage": usage}}) is None


@pytest.mark.parametrize(
    "payload",
    [None, [], "usage", 5, {}, {"usage": None}, {"usage": [1, 2]}, {"response": {"usage": None}}],
)
def test_no_usage_is_none(payload: object) -> None:
    assert reported_usage(payload) is None


# --- meter_json ---------------------------------------------------------------------------------


def chat_body(content: str, usage: dict | None = None) -> bytes:
    body: dict = {
        "object": "chat.completion",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": content}}],
    }
    if usage is not None:
        body["usage"] = usage
    return json.dumps(body).encode()


def test_meter_json_reported() -> None:
    body = chat_body("Hi there", {"prompt_tokens": 11, "completion_tokens": 3, "total_tokens": 14})
    assert meter_json(OPENAI, body, prompt_estimate=99, model="gpt-4o") == Metered(
        Usage(11, 3), "reported"
    )


def test_meter_json_responses_reported() -> None:
    body = json.dumps(
        {
            "object": "response",
            "output": [{"type": "message", "content": [{"type": "output_text", "text": "x"}]}],
            "usage": {"input_tokens": 4, "output_tokens": 1},
        }
    ).encode()
    assert meter_json(OPENAI, body, 50, None) == Metered(Usage(4, 1), "reported")


# Counted differently by gpt-4's encoding and gpt-4o's (the default): shows which one was used.
MIXED_TEXT = "Bonjour, ça va très bien aujourd\u2019hui 🙂 — 東京"


@pytest.mark.parametrize("model", ["gpt-4o", "gpt-4"])
def test_meter_json_missing_usage_is_estimated(model: str) -> None:
    content = MIXED_TEXT
    metered = meter_json(OPENAI, chat_body(content), prompt_estimate=42, model=model)
    assert metered.source == "estimated"
    assert metered.usage == Usage(42, tokens.count_text(content, model))
    assert metered.usage.completion > 0


@pytest.mark.parametrize(
    ("payload", "text"),
    [
        # chat/completions: every text a message can carry, in order
        (
            {"choices": [{"message": {"content": "a", "refusal": "b", "reasoning_content": "c"}}]},
            "abc",
        ),
        ({"choices": [None, "x", {"message": {"content": "hi"}}]}, "hi"),  # odd choices skipped
        (
            {
                "choices": [
                    {
                        "message": {
                            "content": None,
                            "tool_calls": [
                                "junk",
                                {"function": None},
                                {"function": {"arguments": 5}},
                                {"function": {"arguments": '{"a":1}'}},
                            ],
                        }
                    }
                ]
            },
            '{"a":1}',
        ),
        ({"choices": [{"text": "once"}, {"text": " upon"}]}, "once upon"),  # completions
        # Responses API: a delta event, and a whole response's output items
        ({"type": "response.output_text.delta", "delta": "x"}, "x"),
        ({"type": "response.output_text.done", "delta": "x", "text": "x"}, ""),  # said already
        ({"delta": "stray"}, ""),
        (
            {
                "output": [
                    {"type": "message", "content": [{"text": "Hi"}, "junk", {"text": 5}]},
                    {"type": "function_call", "arguments": '{"q":1}'},
                    "junk",
                ]
            },
            'Hi{"q":1}',
        ),
        ({"output": [{"type": "message", "content": None}]}, ""),
        (["not", "an", "object"], ""),
    ],
)
def test_generated_text_is_every_text_the_answer_carries(payload, text: str) -> None:
    assert generated_text(payload) == text


def test_meter_json_unbelievable_usage_falls_back_to_estimate() -> None:
    body = chat_body("hello world", {"prompt_tokens": -5, "completion_tokens": 2})
    assert meter_json(OPENAI, body, 7, "gpt-4o") == Metered(Usage(7, 2), "estimated")


NESTED = b'{"usage": ' + b"[" * 5000 + b"]" * 5000 + b"}"  # json.loads gives up (RecursionError)


@pytest.mark.parametrize("body", [b"", b"{not json", b"\xff\xfe\x00", b"<html>502</html>", NESTED])
def test_meter_json_invalid_json(body: bytes) -> None:
    assert meter_json(OPENAI, body, prompt_estimate=13, model="gpt-4o") == Metered(
        Usage(13, 0), "estimated"
    )


# --- StreamMeter --------------------------------------------------------------------------------


def sse(*payloads: object, eol: str = "\n") -> bytes:
    out = []
    for payload in payloads:
        data = payload if isinstance(payload, str) else json.dumps(payload)
        out.append(f"data: {data}{eol}{eol}")
    return "".join(out).encode()


DELTAS = ["Hel", "lo", ", wor", "ld", "!"]


def chat_chunks(with_usage: bool) -> list[object]:
    chunks: list[object] = [
        {"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}], "usage": None}
    ]
    chunks += [{"choices": [{"index": 0, "delta": {"content": d}}], "usage": None} for d in DELTAS]
    chunks.append({"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]})
    if with_usage:
        chunks.append(
            {
                "choices": [],
                "usage": {"prompt_tokens": 17, "completion_tokens": 4, "total_tokens": 21},
            }
        )
    chunks.append("[DONE]")
    return chunks


def feed_in_pieces(meter: StreamMeter, data: bytes, size: int = 7) -> None:
    for i in range(0, len(data), size):
        meter.feed(data[i : i + size])


def test_stream_with_usage_chunk_is_reported() -> None:
    data = sse(*chat_chunks(with_usage=True))
    meter = StreamMeter(OPENAI.stream, prompt_estimate=30, model="gpt-4o")
    feed_in_pieces(meter, data)
    assert meter.done
    assert meter.bytes_seen == len(data)
    assert meter.result() == Metered(Usage(17, 4), "reported")


def test_stream_without_usage_is_estimated_from_concatenated_deltas() -> None:
    data = sse(*chat_chunks(with_usage=False), eol="\r\n")
    meter = StreamMeter(OPENAI.stream, prompt_estimate=30, model="gpt-4o")
    feed_in_pieces(meter, data, size=3)
    text = "".join(DELTAS)
    assert meter.done
    # Deltas are counted as one text ("Hello" is one token, "Hel" + "lo" would be two).
    assert meter.result() == Metered(Usage(30, tokens.count_text(text, "gpt-4o")), "estimated")
    assert tokens.count_text(text, "gpt-4o") < sum(tokens.count_text(d, "gpt-4o") for d in DELTAS)


def test_stream_without_usage_is_counted_with_the_models_encoding() -> None:
    assert tokens.count_text(MIXED_TEXT, "gpt-4") != tokens.count_text(MIXED_TEXT, None)
    meter = StreamMeter(OPENAI.stream, prompt_estimate=3, model="gpt-4")
    meter.feed(sse({"choices": [{"delta": {"content": MIXED_TEXT}}]}, "[DONE]"))
    assert meter.result() == Metered(Usage(3, tokens.count_text(MIXED_TEXT, "gpt-4")), "estimated")


def test_a_body_is_kept_up_to_its_bound_and_metered_whole() -> None:
    buffer = BoundedBuffer(10)
    assert buffer.passing(b"12345") == b"12345"
    buffer.feed(b"67890")
    assert (buffer.data, buffer.overflowed, buffer.bytes_seen) == (b"1234567890", False, 10)
    assert buffer.passing(b"!") == b"!"
    assert (buffer.data, buffer.overflowed, buffer.bytes_seen) == (b"", True, 11)
    body = chat_body(MIXED_TEXT)
    meter = BodyMeter(OPENAI, prompt_estimate=7, model="gpt-4")  # not the default encoding's count
    assert meter.limit == BodyMeter.MAX_BYTES == 64 * 1024 * 1024
    for start in range(0, len(body), 4):
        meter.passing(body[start : start + 4])
    assert meter.result() == Metered(Usage(7, tokens.count_text(MIXED_TEXT, "gpt-4")), "estimated")
    meter.feed(b" " * BodyMeter.MAX_BYTES)  # beyond the bound: only the prompt is charged
    assert meter.result() == Metered(Usage(7, 0), "estimated")


def test_stream_without_done_is_not_done_but_still_metered() -> None:
    data = sse(*chat_chunks(with_usage=False)[:-1])
    meter = StreamMeter(OPENAI.stream, 5, "gpt-4o")
    meter.feed(data)
    assert not meter.done
    assert meter.result().usage.completion == tokens.count_text("".join(DELTAS), "gpt-4o")


def test_stream_bytes_seen_counts_every_chunk() -> None:
    meter = StreamMeter(OPENAI.stream, 0, None)
    meter.feed(b": keep")
    meter.feed(b"-alive\n\n")
    meter.feed(b"data: not json\n\n")
    meter.feed(b"")
    assert meter.bytes_seen == len(b": keep-alive\n\n") + len(b"data: not json\n\n")
    assert not meter.done
    assert meter.result() == Metered(Usage(0, 0), "estimated")


def test_stream_done_marker() -> None:
    meter = StreamMeter(OPENAI.stream, 0, None)
    meter.feed(b"data: [DONE]\n\n")
    assert meter.done


def test_stream_tool_call_arguments_are_counted() -> None:
    args = ['{"city":', ' "Paris"}']
    chunks = [
        {"choices": [{"delta": {"tool_calls": [{"index": 0, "function": {"arguments": a}}]}}]}
        for a in args
    ]
    meter = StreamMeter(OPENAI.stream, 1, "gpt-4o")
    meter.feed(sse(*chunks, "[DONE]"))
    assert meter.result().usage == Usage(1, tokens.count_text("".join(args), "gpt-4o"))


RESPONSES_TEXT = ["Hel", "lo", " there"]


def responses_events(final_usage: dict | None, terminal: str = "response.completed") -> bytes:
    events = [
        {"type": "response.created", "response": {"id": "r", "output": [], "usage": None}},
        {"type": "response.in_progress", "response": {"id": "r", "output": [], "usage": None}},
    ]
    events += [
        {"type": "response.output_text.delta", "item_id": "m", "delta": d} for d in RESPONSES_TEXT
    ]
    full = "".join(RESPONSES_TEXT)
    events += [
        {"type": "response.output_text.done", "item_id": "m", "text": full},
        {
            "type": terminal,
            "response": {
                "id": "r",
                "output": [{"type": "message", "content": [{"type": "output_text", "text": full}]}],
                "usage": final_usage,
            },
        },
    ]
    out = []
    for event in events:
        out.append(f"event: {event['type']}\ndata: {json.dumps(event)}\n\n")
    return "".join(out).encode()


def test_responses_stream_reported() -> None:
    data = responses_events({"input_tokens": 9, "output_tokens": 3, "total_tokens": 12})
    meter = StreamMeter(OPENAI.stream, 50, "gpt-4o")
    feed_in_pieces(meter, data, size=11)
    assert meter.done
    assert meter.bytes_seen == len(data)
    assert meter.result() == Metered(Usage(9, 3), "reported")


@pytest.mark.parametrize("terminal", ["response.completed", "response.incomplete"])
def test_responses_stream_without_usage_counts_deltas_once(terminal: str) -> None:
    meter = StreamMeter(OPENAI.stream, 50, "gpt-4o")
    meter.feed(responses_events(None, terminal))
    assert meter.done
    expected = tokens.count_text("".join(RESPONSES_TEXT), "gpt-4o")
    # Neither the `.done` text nor the terminal event's output is counted a second time.
    assert meter.result() == Metered(Usage(50, expected), "estimated")


def test_responses_failed_event_sets_done() -> None:
    meter = StreamMeter(OPENAI.stream, 5, None)
    meter.feed(sse({"type": "response.failed", "response": {"error": {"code": "x"}}}))
    assert meter.done
    assert meter.result() == Metered(Usage(5, 0), "estimated")


# --- EventFramer and StreamRelay: what the caller receives ----------------------------------------


def frame_all(chunks: list[bytes]) -> list[bytes]:
    framer = EventFramer()
    events: list[bytes] = []
    for chunk in chunks:
        if chunk:
            events += framer.feed(chunk)
    return events + framer.feed(b"")


def test_framer_keeps_every_byte_and_cuts_after_each_blank_line() -> None:
    mixed = PAYLOAD + b"data: a\rdata: b\r\rdata: c\n\r\ndata: tail-without-blank-line"
    whole = frame_all([mixed])
    assert b"".join(whole) == mixed
    assert whole[-1] == b"data: tail-without-blank-line"
    for raw in whole[:-1]:
        assert raw.endswith((b"\n\n", b"\r\n\r\n", b"\r\r", b"\n\r\n"))
        assert len(SSEParser().feed(raw)) <= 1  # never two events in one piece
    for cut in range(1, len(mixed)):
        assert frame_all([mixed[:cut], mixed[cut:]]) == whole, cut


def test_framer_holds_a_cr_until_it_knows_whether_lf_follows() -> None:
    framer = EventFramer()
    assert framer.feed(b"data: x\r\n\r") == []
    assert framer.feed(b"\n") == [b"data: x\r\n\r\n"]


STATUSES = (
    LimitStatus(Limit("total_tokens", 1000, 60, "1m"), used=100, reserved=300, reset_at=0.0),
    LimitStatus(Limit("requests", 10, 60, "1m"), used=2, reserved=1, reset_at=0.0),
)
RESERVED = Usage(17, 280)  # this flow's part of the 300 reserved


def relay(drop_usage_chunk: bool) -> StreamRelay:
    return StreamRelay(
        StreamMeter(OPENAI.stream, prompt_estimate=30, model="gpt-4o"),
        drop_usage_chunk,
        lambda metered: trailer_comment(STATUSES, RESERVED, metered),
    )


def relayed(stream: StreamRelay, chunk: bytes) -> bytes:
    """What one call passes on; never an empty chunk (mitmproxy would end the body with it)."""
    out = stream(chunk)
    assert b"" not in out
    return b"".join(out)


def relay_all(stream: StreamRelay, chunks: list[bytes]) -> bytes:
    out = b"".join(relayed(stream, chunk) for chunk in chunks if chunk)
    return out + relayed(stream, b"")


# 1000 - 100 settled - 300 reserved + 297 of them this flow's - 21 it used = 876.
TRAILER = b": x-ratelimit-remaining-tokens=876 x-tokens-consumed=21\n\n"


def test_trailer_comment_is_remaining_as_if_settled() -> None:
    assert trailer_comment(STATUSES, RESERVED, Metered(Usage(17, 4), "reported")) == TRAILER
    huge = Metered(Usage(17, 5000), "reported")
    assert b"remaining-tokens=0 " in trailer_comment(STATUSES, RESERVED, huge)  # never < 0
    requests_only = (STATUSES[1],)
    assert trailer_comment(requests_only, RESERVED, huge) == b": x-tokens-consumed=5017\n\n"


@pytest.mark.parametrize("eol", ["\n", "\r\n"])
def test_injected_usage_chunk_is_removed_at_every_split_point(eol: str) -> None:
    data = sse(*chat_chunks(with_usage=True), eol=eol)
    usage_event = sse(chat_chunks(with_usage=True)[-2], eol=eol)
    done = f"data: [DONE]{eol}{eol}".encode()
    expected = data.replace(usage_event, b"").replace(done, TRAILER + done)
    assert expected != data and b'"choices": []' not in expected
    for cut in range(len(data) + 1):
        stream = relay(drop_usage_chunk=True)
        assert relay_all(stream, [data[:cut], data[cut:]]) == expected, cut
        assert stream.result() == Metered(Usage(17, 4), "reported")
        assert stream.bytes_seen == len(data)


@given(st.lists(st.integers(1, 400), max_size=30))
def test_relay_under_random_chunkings(cuts: list[int]) -> None:
    data = sse(*chat_chunks(with_usage=True))
    expected = relay_all(relay(drop_usage_chunk=True), [data])
    bounds = sorted({0, len(data), *(c % (len(data) + 1) for c in cuts)})
    pieces = [data[a:b] for a, b in itertools.pairwise(bounds)]
    assert relay_all(relay(drop_usage_chunk=True), pieces) == expected


def test_usage_chunk_the_caller_asked_for_passes_unchanged() -> None:
    data = sse(*chat_chunks(with_usage=True))
    done = b"data: [DONE]\n\n"
    assert relay_all(relay(drop_usage_chunk=False), [data]) == data.replace(done, TRAILER + done)


def test_complete_events_pass_in_the_same_call_and_comments_survive() -> None:
    stream = relay(drop_usage_chunk=True)
    first = b": keep-alive\n\n" + sse(chat_chunks(with_usage=False)[0])
    assert relayed(stream, first + b'data: {"choi') == first  # the half event waits its end
    assert relayed(stream, b'ces": []}\n\n') == b'data: {"choices": []}\n\n'  # no usage: kept
    assert stream(b"data: [DONE]") == []
    assert stream(b"") == [b"data: [DONE]"]  # cut before its blank line: passed on, no trailer


def test_event_nested_too_deeply_is_followed_as_unparseable() -> None:
    stream = relay(drop_usage_chunk=True)
    data = b"data: " + NESTED + b"\n\n" + sse(*chat_chunks(with_usage=False))
    assert relay_all(stream, [data]).startswith(b"data: " + NESTED)
    assert stream.result().source == "estimated"


def test_chunk_without_choices_and_null_usage_is_the_callers() -> None:
    # Azure sends prompt filter results this way; only a real usage object is the gate's chunk.
    prompt_filter = {"choices": [], "usage": None, "prompt_filter_results": [{"index": 0}]}
    data = sse(prompt_filter, *chat_chunks(with_usage=True))
    usage_event = sse(chat_chunks(with_usage=True)[-2])
    done = b"data: [DONE]\n\n"
    expected = data.replace(usage_event, b"").replace(done, TRAILER + done)
    assert relay_all(relay(drop_usage_chunk=True), [data]) == expected
    assert expected.startswith(sse(prompt_filter))


def test_stream_text_is_counted_once_for_trailer_and_settlement(monkeypatch) -> None:
    counted: list[str] = []
    monkeypatch.setattr(tokens, "count_text", lambda text, model: counted.append(text) or 0)
    stream = relay(drop_usage_chunk=True)
    relay_all(stream, [sse(*chat_chunks(with_usage=False))])  # the trailer counted it
    assert stream.result() == stream.result() == Metered(Usage(30, 0), "estimated")
    assert counted == ["".join(DELTAS)]
    # A stream still going is counted again once more text has arrived, not before.
    meter = StreamMeter(OPENAI.stream, prompt_estimate=30, model="gpt-4o")
    meter.feed(sse(*chat_chunks(with_usage=False)[:2]))
    meter.result()
    meter.result()
    meter.feed(sse(*chat_chunks(with_usage=False)[2:4]))
    meter.result()
    assert counted[1:] == ["Hel", "Hello, wor"]


def test_responses_stream_gets_the_trailer_after_response_completed() -> None:
    completed = {
        "type": "response.completed",
        "response": {"usage": {"input_tokens": 17, "output_tokens": 4}},
    }
    delta = {"type": "response.output_text.delta", "delta": "Hi"}
    data = b"event: response.output_text.delta\n" + sse(delta)
    data += b"event: response.completed\n" + sse(completed)
    assert relay_all(relay(drop_usage_chunk=False), [data]) == data + TRAILER


HELD = Usage(9, 91)
SO_FAR = Metered(Usage(9, 20), "estimated")


@pytest.mark.parametrize(
    ("status", "metered", "sent_then_hung_up", "expected"),
    [
        (200, Metered(Usage(9, 11), "reported"), False, Metered(Usage(9, 11), "reported")),
        (399, SO_FAR, False, SO_FAR),
        (400, Metered(Usage(9, 11), "reported"), False, None),  # the provider's error: free
        (500, None, True, None),
        (None, SO_FAR, True, SO_FAR),  # cut short: what streamed, not the reservation
        (None, SO_FAR, False, SO_FAR),
        (None, None, True, Metered(HELD, "estimated")),  # hung up after it left
        (None, None, False, None),  # the provider failed before answering
    ],
)
def test_charge_of_an_admitted_request(status, metered, sent_then_hung_up, expected):
    assert charge(status, metered, HELD, sent_then_hung_up) == expected


@pytest.mark.parametrize(
    ("message", "expected"),
    [
        ("Client disconnected.", True),
        ("stream reset by client (CANCEL)", True),
        ("Server disconnected.", False),
        ("Connection refused", False),
        ("", False),
    ],
)
def test_caller_hung_up_reads_mitmproxys_words(message, expected):
    assert caller_hung_up(message) is expected
