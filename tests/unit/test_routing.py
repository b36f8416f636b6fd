"""Which governed requests are metered, which are allowed, and which the gate refuses."""

from __future__ import annotations

import pytest
from tokengate_core.dialects.openai import OpenAI
from tokengate_core.routing import classify


@pytest.mark.parametrize(
    ("method", "path", "expected"),
    [
        ("POST", "/chat/completions", ("chat/completions", True)),
        ("POST", "/v1/chat/completions?x=1", ("chat/completions", True)),
        ("POST", "//chat/completions/", ("chat/completions", True)),
        ("POST", "/completions", ("completions", True)),
        ("POST", "/embeddings", ("embeddings", True)),
        ("POST", "/v1/responses", ("responses", True)),
        ("GET", "/models", (None, True)),
        ("GET", "/v1/models/gpt-4o", (None, True)),
        ("GET", "/chat/completions", (None, False)),
        ("DELETE", "/models/ft-mine", (None, False)),
        ("POST", "/files", (None, False)),
        ("POST", "/images/generations", (None, False)),
        ("GET", "/realtime", (None, False)),
        ("GET", "/models/a/b", (None, False)),
        # dot segments and encoded slashes would let the provider resolve an unchecked path
        ("POST", "/embeddings/../chat/completions", (None, False)),
        ("POST", "/embeddings/%2e%2e/chat/completions", (None, False)),
        ("POST", "/./chat/completions", (None, False)),
        ("POST", "/chat%2Fcompletions", (None, False)),
        ("GET", "/models/..", (None, False)),
    ],
)
def test_classify(method, path, expected):
    assert classify(method, path, OpenAI()) == (*expected, None)
