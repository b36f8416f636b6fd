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
from .dialects.base import BodyRefused

# Bodies longer than this are parsed and tokenized off the event loop, so other flows keep
# moving (tiktoken releases the GIL while it encodes).
INLINE_TOKENIZE_BYTES = 20_000


@dataclass(frozen=True)
class Read:
    body: dict[str, Any]
    terms: RequestTerms
    prompt: int  # the prompt estimate


@dataclass(frozen=True)
class Unreadable:
    """Why the gate cannot read a body (it is refused with 400 rather than guessed at)."""

    reason: str
    parsed: bool = False  # the JSON was read; the API itself would refuse the body (`reason`)


NOT_JSON = Unreadable("it is not valid JSON (in UTF-8)")
NOT_AN_OBJECT = Unreadable("expected a JSON object")
TOO_DEEP = Unreadable("it nests more deeply than the gateway reads")


def json_object(raw: bytes) -> dict[str, Any] | Unreadable:
    """The request body as a JSON object, or why it is not one the gate can read."""
    try:
        body = json.loads(raw)
    except RecursionError:
        return TOO_DEEP
    except (ValueError, UnicodeDecodeError):
        return NOT_JSON
    return body if isinstance(body, dict) else NOT_AN_OBJECT


@dataclass(frozen=True)
class Reader:
    """How one proxy reads a request: its dialect, the exact tokenizing budget, the
    completion reserve for a request that sets no max tokens, and the deployment its path
    named (Azure)."""

    dialect: Dialect
    exact_chars: int
    default_reserve: int
    deployment: str | None = None

    def terms(self, endpoint: str, body: dict[str, Any]) -> RequestTerms:
        """Raises BodyRefused for a body the API would refuse."""
        return self.dialect.terms(endpoint, body, self.default_reserve, self.deployment)

    def estimate(
        self, endpoint: str, body: dict[str, Any], terms: RequestTerms | None = None
    ) -> Read | Unreadable:
        """A body nested too deeply to walk is as unreadable to the gate as bad JSON; one its
        API would refuse is refused as it would be."""
        try:
            terms = terms or self.terms(endpoint, body)
            # Counted with the encoding of the model the call is for: an Azure body names a
            # deployment, or nothing, where the deployment serves a model.
            named = (
                body if terms.model in (None, body.get("model")) else {**body, "model": terms.model}
            )
            prompt = self.dialect.estimate_prompt(endpoint, named, self.exact_chars)
        except RecursionError:
            return TOO_DEEP
        except BodyRefused as e:
            return Unreadable(str(e), parsed=True)
        return Read(body, terms, prompt)

    def parse_and_estimate(self, raw: bytes, endpoint: str) -> Read | Unreadable:
        """The body, its terms and its prompt estimate, or why the gate cannot read it."""
        body = json_object(raw)
        return body if isinstance(body, Unreadable) else self.estimate(endpoint, body)

    async def read(self, raw: bytes, endpoint: str) -> Read | Unreadable:
        """`parse_and_estimate`, on a worker thread for a large body; for a small one on the
        event loop, once the model's encoding is built (off the loop, the first time)."""
        if len(raw) > INLINE_TOKENIZE_BYTES:
            return await asyncio.to_thread(self.parse_and_estimate, raw, endpoint)
        body = json_object(raw)
        if isinstance(body, Unreadable):
            return body
        try:
            terms = self.terms(endpoint, body)
        except BodyRefused as e:
            return Unreadable(str(e), parsed=True)
        await tokens.load_for(terms.model)
        return self.estimate(endpoint, body, terms)
