"""Reading what a governed request asks for: its JSON body and its prompt estimate.

Live admission and QA replay read requests with the same functions, so they estimate alike.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass
from typing import Any

from . import tokens
from .dialects import Dialect, RequestTerms

# Bodies longer than this are parsed and tokenized off the event loop, so other flows keep
# moving (tiktoken releases the GIL while it encodes).
INLINE_TOKENIZE_BYTES = 20_000


@dataclass(frozen=True)
class Read:
    body: dict[str, Any]
    terms: RequestTerms
    prompt: int  # the prompt estimate


def json_object(raw: bytes) -> dict[str, Any] | None:
    """The request body as a JSON object; None if it is not one or nests too deeply to parse."""
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError, RecursionError):
        return None
    return body if isinstance(body, dict) else None


@dataclass(frozen=True)
class Reader:
    """How one proxy reads a request: its dialect, the exact tokenizing budget, and the
    completion reserve for a request that sets no max tokens."""

    dialect: Dialect
    exact_chars: int
    default_reserve: int

    def terms(self, endpoint: str, body: dict[str, Any]) -> RequestTerms:
        return self.dialect.terms(endpoint, body, self.default_reserve)

    def estimate(self, endpoint: str, body: dict[str, Any]) -> Read | None:
        """None for a body nested too deeply to walk (as unreadable as bad JSON to the gate)."""
        try:
            prompt = self.dialect.estimate_prompt(endpoint, body, self.exact_chars)
        except RecursionError:
            return None
        return Read(body, self.terms(endpoint, body), prompt)

    def parse_and_estimate(self, raw: bytes, endpoint: str) -> Read | None:
        """The body, its terms and its prompt estimate; None for what the gate cannot read (not
        a JSON object, or nested too deeply to parse or to walk)."""
        body = json_object(raw)
        return None if body is None else self.estimate(endpoint, body)

    async def read(self, raw: bytes, endpoint: str) -> Read | None:
        """`parse_and_estimate`, on a worker thread for a large body; for a small one on the
        event loop, once the model's encoding is built (off the loop, the first time)."""
        if len(raw) > INLINE_TOKENIZE_BYTES:
            return await asyncio.to_thread(self.parse_and_estimate, raw, endpoint)
        body = json_object(raw)
        if body is None:
            return None
        await tokens.load_for(self.terms(endpoint, body).model)
        return self.estimate(endpoint, body)
