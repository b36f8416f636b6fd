"""Counts in the log and on flows read as written English: one key, one token."""

from __future__ import annotations

from tokengate_core.annotate import comment
from tokengate_core.config import plural


def test_plural():
    assert [plural(n, "key") for n in (0, 1, 2)] == ["0 keys", "1 key", "2 keys"]


def test_a_flow_of_one_token_says_one_token():
    state = {"proxy": "p", "key": "alice", "model": "m"}
    one = comment({**state, "usage": {"total_tokens": 1, "source": "reported"}}, 200)
    assert one == "tokengate: p/alice m 1 token (reported)"
    two = comment({**state, "usage": {"total_tokens": 2, "source": "reported"}}, 200)
    assert two == "tokengate: p/alice m 2 tokens (reported)"
