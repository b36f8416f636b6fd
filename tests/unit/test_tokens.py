"""Token counting: offline encodings, the model table, and prompt estimates per endpoint."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import tiktoken
import tiktoken.load
from tiktoken_ext import openai_public
from tokengate_core import tokens
from tokengate_core.dialects.openai import estimate_prompt


def chat(messages: list, model: str = "gpt-4o", **extra: object) -> int:
    return estimate_prompt("chat/completions", {"model": model, "messages": messages, **extra})


HELLO = [{"role": "user", "content": "Hello!"}]


def test_encodings_build_without_tiktoken_loader(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_network(*args: object, **kwargs: object) -> bytes:
        raise AssertionError(f"tiktoken tried to fetch {args!r}")

    monkeypatch.setattr(tiktoken.load, "read_file", no_network)
    monkeypatch.setattr(tiktoken.load, "read_file_cached", no_network)
    original_loader = openai_public.load_tiktoken_bpe
    monkeypatch.setattr(tokens, "_encodings", {})  # built again, from the packaged files
    tokens.preload()
    for name in tokens.SHIPPED_ENCODINGS:
        encoding = tokens.get_encoding(name)
        assert isinstance(encoding, tiktoken.Encoding)
        assert encoding.name == name
        assert len(encoding.encode("hello world")) == 2
        assert encoding.decode(encoding.encode("héllo 東京")) == "héllo 東京"
        assert "<|endoftext|>" in encoding.special_tokens_set
    assert tokens.get_encoding("o200k_base").n_vocab > 199_000
    assert 100_000 < tokens.get_encoding("cl100k_base").n_vocab < 101_000
    # The temporary loader swap is undone.
    assert openai_public.load_tiktoken_bpe is original_loader


def test_encodings_are_built_when_a_model_needs_them() -> None:
    """A fresh process builds o200k_base in the background at start and cl100k_base only for a
    model that uses it (each ~30-50 MB), never on the event loop."""
    script = (
        "import asyncio\n"
        "from tokengate_core import tokens\n"
        "tokens.build_in_background()\n"
        "asyncio.run(tokens.load_for('gpt-4o-mini'))\n"
        "print(tokens.is_built('o200k_base'), tokens.is_built('cl100k_base'))\n"
        "asyncio.run(tokens.load_for('gpt-4'))\n"
        "print(tokens.is_built('cl100k_base'))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60
    )
    assert done.stdout.split() == ["True", "False", "True"], done.stderr


def test_encodings_are_cached() -> None:
    assert tokens.get_encoding("o200k_base") is tokens.get_encoding("o200k_base")


def test_unshipped_encoding_raises() -> None:
    with pytest.raises(tokens.EncodingUnavailable, match="not shipped"):
        tokens.get_encoding("r50k_base")


@pytest.mark.parametrize(
    ("model", "encoding"),
    [
        ("gpt-4o", "o200k_base"),
        ("gpt-4o-mini", "o200k_base"),
        ("gpt-4", "cl100k_base"),
        ("gpt-3.5-turbo", "cl100k_base"),
        ("text-embedding-3-small", "cl100k_base"),
        ("no-such-model", "o200k_base"),
        ("", "o200k_base"),
        (None, "o200k_base"),
        ("text-davinci-003", "o200k_base"),  # p50k_base in tiktoken: not shipped
        ("gpt2", "o200k_base"),  # the gpt2 encoding: not shipped
    ],
)
def test_encoding_name_for_model(model: str | None, encoding: str) -> None:
    assert tokens.encoding_name_for_model(model) == encoding


def test_unshipped_encoding_for_known_model_falls_back(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(tiktoken.model.MODEL_TO_ENCODING, "legacy-model", "p50k_base")
    assert tiktoken.model.encoding_name_for_model("legacy-model") == "p50k_base"
    assert tokens.encoding_name_for_model("legacy-model") == "o200k_base"


@pytest.mark.parametrize("model", ["gpt-4o", "gpt-4", None])
def test_hello_world_is_two_tokens(model: str | None) -> None:
    assert tokens.count_text("hello world", model) == 2


def test_empty_text_is_zero() -> None:
    assert tokens.count_text("", "gpt-4o") == 0


def test_model_selects_encoding() -> None:
    text = "Bonjour, ça va très bien aujourd\u2019hui 🙂 — 東京"
    assert tokens.count_text(text, "gpt-4") == len(tokens.get_encoding("cl100k_base").encode(text))
    assert tokens.count_text(text, "gpt-4o") == len(tokens.get_encoding("o200k_base").encode(text))
    assert tokens.count_text(text, "gpt-4") != tokens.count_text(text, "gpt-4o")


def test_chat_hello_matches_openai() -> None:
    assert chat(HELLO) == 9  # what OpenAI reports as prompt_tokens for this request


def test_chat_two_messages() -> None:
    messages = [{"role": "system", "content": "Be brief."}, *HELLO]
    # 3 priming + 2 x 3 framing + "system"(1) + "Be brief."(3) + "user"(1) + "Hello!"(2)
    assert chat(messages) == 16


def test_name_adds_tokens() -> None:
    named = [{"role": "user", "name": "bob", "content": "Hello!"}]
    assert chat(named) == 9 + 1 + 1  # one for the name field, one for "bob"


def test_image_part_adds_85_and_url_is_not_counted_as_text() -> None:
    parts = [
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "Hello!"},
                {"type": "image_url", "image_url": {"url": "https://example.com/" + "x" * 500}},
            ],
        }
    ]
    assert chat(parts) == chat(HELLO) + 85


def test_text_parts_count_like_plain_content() -> None:
    parts = [{"role": "user", "content": [{"type": "text", "text": "Hello!"}]}]
    assert chat(parts) == 9


def test_tool_calls_in_history_add_tokens() -> None:
    call = {"id": "c1", "type": "function", "function": {"name": "f", "arguments": '{"a":1}'}}
    messages = [*HELLO, {"role": "assistant", "content": None, "tool_calls": [call]}]
    assert chat(messages) > chat(HELLO) + 3


def test_tools_add_tokens() -> None:
    tools = [
        {
            "type": "function",
            "function": {
                "name": "get_weather",
                "description": "Current weather for a city",
                "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
            },
        }
    ]
    with_tools = chat(HELLO, tools=tools)
    compact = json.dumps(tools, separators=(",", ":"))
    assert with_tools == 9 + tokens.count_text(compact, "gpt-4o")
    assert with_tools > 9 + 10


def test_response_format_adds_tokens() -> None:
    schema = {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object"}}}
    assert chat(HELLO, response_format=schema) > 9


def test_completions_prompt_token_ids() -> None:
    body = {"model": "gpt-3.5-turbo-instruct", "prompt": [15339, 1917, 0, 42, 7]}
    assert estimate_prompt("completions", body) == 5


def test_completions_prompt_list_of_token_id_lists() -> None:
    body = {"model": "gpt-3.5-turbo-instruct", "prompt": [[1, 2, 3], [4, 5]]}
    assert estimate_prompt("completions", body) == 5


def test_completions_prompt_text_and_list_of_texts() -> None:
    assert estimate_prompt("completions", {"model": "gpt-4", "prompt": "hello world"}) == 2
    body = {"model": "gpt-4", "prompt": ["hello world", "hello world"]}
    assert estimate_prompt("completions", body) == 4


def test_embeddings_input_list_of_strings_sums() -> None:
    inputs = ["hello world", "Hello!", "The quick brown fox"]
    body = {"model": "text-embedding-3-small", "input": inputs}
    expected = sum(tokens.count_text(text, "gpt-4") for text in inputs)  # both are cl100k
    assert estimate_prompt("embeddings", body) == expected == 2 + 2 + 4


def test_embeddings_single_string() -> None:
    body = {"model": "text-embedding-3-small", "input": "hello world"}
    assert estimate_prompt("embeddings", body) == 2


def test_responses_input_string_and_instructions() -> None:
    body = {"model": "gpt-4o", "input": "Hello!", "instructions": "Be brief."}
    assert estimate_prompt("responses", body) == 2 + 3
    assert estimate_prompt("responses", {"model": "gpt-4o", "input": "Hello!"}) == 2


def test_responses_input_message_list_counts_like_chat() -> None:
    body = {"model": "gpt-4o", "input": HELLO}
    assert estimate_prompt("responses", body) == 9


def test_responses_input_image_and_tools() -> None:
    body = {
        "model": "gpt-4o",
        "input": [
            {
                "role": "user",
                "content": [
                    {"type": "input_text", "text": "Hello!"},
                    {"type": "input_image", "image_url": "https://example.com/a.png"},
                ],
            }
        ],
    }
    assert estimate_prompt("responses", body) == 9 + 85
    tools = [{"type": "function", "name": "f", "parameters": {"type": "object"}}]
    assert estimate_prompt("responses", {**body, "tools": tools}) > 9 + 85


@pytest.mark.parametrize("special", ["<|endoftext|>", "<|im_start|>", "<|fim_prefix|>"])
def test_special_token_text_does_not_raise(special: str) -> None:
    for model in ("gpt-4o", "gpt-4"):
        count = tokens.count_text(special, model)
        assert count > 1  # counted as ordinary text, not as one special token
        messages = [{"role": "user", "content": f"say {special} please"}]
        expected = 3 + 3 + 1 + tokens.count_text(f"say {special} please", model)
        assert chat(messages, model=model) == expected
    body = {"model": "gpt-4o", "input": special, "instructions": special}
    assert estimate_prompt("responses", body) == 2 * tokens.count_text(special, "gpt-4o")
    assert estimate_prompt("embeddings", {"input": [special]}) > 1


def test_unknown_endpoint_and_odd_shapes() -> None:
    assert estimate_prompt("models", {"model": "gpt-4o"}) == 0
    assert estimate_prompt("chat/completions", {"messages": "Hello!"}) == 2
    assert estimate_prompt("chat/completions", {"model": 5, "messages": HELLO}) == 9
    assert estimate_prompt("completions", {}) == 0
