"""The interface every API dialect implements, and the types it shares with the gate."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from ..limiter import Usage


@dataclass(frozen=True)
class RequestTerms:
    """What a request body asks the provider for, in the gate's terms."""

    model: str | None
    stream: bool
    completion_reserve: int  # tokens the completion(s) may use, to reserve before sending
    completions: int = 1  # how many completions share it (`n`): each needs a token at least
    service_tier: str | None = None  # the tier asked for, priced apart (`flex`, `priority`)


class StreamEvents(Protocol):
    """What a dialect reads from one parsed event of a streamed answer."""

    def usage(self, payload: Any, so_far: Usage | None) -> Usage | None:
        """Usage known after this event (reported figures only), given what was known before."""

    def text(self, payload: Any) -> str:
        """Generated text the event carries (counted when the provider reports no usage)."""

    def ends(self, data: str, payload: Any) -> str | None:
        """'before' when the event ends the stream and the gate's trailer goes before it,
        'after' when it goes after it, None for any other event."""

    def gate_only(self, payload: Any) -> bool:
        """An event the gate asked for (a usage-only chunk) that the caller did not."""


class Dialect(Protocol):
    name: str
    served: str  # what the gate serves of this API, in words (the 403's message names it)
    # Headers a caller may put its gate key in; all are removed before the request leaves.
    credential_headers: tuple[str, ...]
    stream: StreamEvents

    def caller_key(self, headers: Mapping[str, str]) -> str | None:
        """The caller's key; raises ConflictingKeys when two credentials disagree."""

    def provider_auth(self, api_key: str) -> dict[str, str]:
        """Headers that carry the provider's key upstream."""

    def classify(self, method: str, segments: list[str]) -> tuple[str | None, bool]:
        """(metered endpoint, allowed) for a path below the provider's base, given as decoded
        segments; allowed but unmetered is a read-only endpoint such as the model list."""

    def terms(self, endpoint: str, body: dict[str, Any], default_reserve: int) -> RequestTerms:
        """Model, streaming and the completion reserve of a request body."""

    def estimate_prompt(self, endpoint: str, body: dict[str, Any], exact_chars: int) -> int:
        """Prompt tokens the provider will bill, estimated before sending (an upper bound
        beyond `exact_chars` characters of text); may raise RecursionError on deep bodies."""

    def adjust(
        self, endpoint: str, body: dict[str, Any], reserved: Usage, strict: bool = False
    ) -> dict[str, Any]:
        """Change the body (in place) so the completion fits what was reserved and a stream
        reports its usage; `strict`: a body that bounds no completion gets the dialect's own
        max-token field, set to what was reserved. Returns notes of what changed (empty: send
        the body as it came)."""

    def as_requested(self, body: dict[str, Any], notes: Mapping[str, Any]) -> None:
        """Undo, in place, what `adjust` noted it lowered: a captured request as its caller
        sent it (QA replay decides on what the caller asked for)."""

    def usage(self, payload: Any) -> Usage | None:
        """Usage reported in a complete JSON answer; None where none is reported."""

    def text(self, payload: Any) -> str:
        """Generated text of a complete JSON answer."""

    def error_body(self, message: str, type_: str, code: str | None) -> bytes:
        """An error answer in this API's own shape, so its SDKs raise their usual errors."""
