"""The interface every API dialect implements, and the types it shares with the gate."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple, Protocol

from ..limiter import LimitStatus, Usage


def answered_model(payload: Any, wrapper: str) -> str | None:
    """The model an answer names, or the answer a stream event wraps under `wrapper` names."""
    if not isinstance(payload, dict):
        return None
    model = payload.get("model")
    if isinstance(model, str) and model:
        return model
    wrapped = payload.get(wrapper)
    return answered_model(wrapped, wrapper) if isinstance(wrapped, dict) else None


class BodyRefused(ValueError):
    """A readable body the API itself would refuse (a required field missing): the gate answers
    400 with this message before it costs anything."""


@dataclass(frozen=True, kw_only=True)
class RequestTerms:
    """What a request body asks the provider for, in the gate's terms."""

    model: str | None
    stream: bool
    completion_reserve: int  # tokens the completion(s) may use, to reserve before sending
    # The model the answer names, where it names one, replaces `model` once the call is over
    # (an Azure deployment not named in `deployments`: its own name until then).
    model_from_answer: bool = False
    completions: int = 1  # how many completions share it (`n`): each needs a token at least
    service_tier: str | None = None  # the tier asked for, priced apart (`flex`, `priority`)


class Endpoint(NamedTuple):
    """What a request path asks of the provider, as the dialect reads it."""

    name: str | None  # the metered endpoint, or None
    allowed: bool  # metered, or read-only (the model list); anything else is refused
    deployment: str | None = None  # a deployment the path names (Azure), mapped to a model


class InvalidSetting(ValueError):
    """A provider's dialect setting in quotas.yaml is wrong: which one, and why."""

    def __init__(self, setting: str, reason: str) -> None:
        super().__init__(reason)
        self.setting = setting


class StreamEvents(Protocol):
    """What a dialect reads from one parsed event of a streamed answer."""

    def usage(self, payload: Any, so_far: Usage | None) -> Usage | None:
        """Usage known after this event (reported figures only), given what was known before."""

    def final(self, payload: Any) -> bool:
        """The usage this event reports is the whole answer's; before such an event, a stream
        cut short is charged the reported prompt plus the tokenizer count of what streamed."""

    def text(self, payload: Any) -> str:
        """Generated text the event carries (counted when the provider reports no usage)."""

    def model(self, payload: Any) -> str | None:
        """The model the event names, if it names one."""

    def ends(self, data: str, payload: Any) -> str | None:
        """'before' when the event ends the stream and the gate's trailer goes before it,
        'after' when it goes after it, None for any other event."""

    def gate_only(self, payload: Any) -> bool:
        """An event the gate asked for (a usage-only chunk) that the caller did not."""


class Dialect(Protocol):
    name: str
    served: str  # what the gate serves of this API, in words (the 403's message names it)
    # The prompt estimate already carries a margin for a tokenizer the gate does not have (no
    # cold margin is added on top until the provider's counts are learned).
    estimate_has_margin: bool
    # Headers a caller may put its gate key in; all are removed before the request leaves.
    credential_headers: tuple[str, ...]
    stream: StreamEvents

    def caller_key(self, headers: Mapping[str, str]) -> str | None:
        """The caller's key; raises ConflictingKeys when two credentials disagree."""

    def provider_auth(self, api_key: str) -> dict[str, str]:
        """Headers that carry the provider's key upstream."""

    def classify(self, method: str, segments: list[str]) -> Endpoint:
        """What a path below the provider's base asks, given as decoded segments; allowed but
        unmetered is a read-only endpoint such as the model list."""

    def terms(
        self,
        endpoint: str,
        body: dict[str, Any],
        default_reserve: int,
        deployment: str | None = None,
    ) -> RequestTerms:
        """Model (for limits and prices), streaming and the completion reserve of a request,
        from its body and the deployment its path named (see `classify`); raises BodyRefused
        for a body the API would refuse."""

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

    def model(self, payload: Any) -> str | None:
        """The model a complete JSON answer names, if it names one."""

    def error_body(self, message: str, type_: str, code: str | None) -> bytes:
        """An error answer in this API's own shape, so its SDKs raise their usual errors."""

    def ratelimit_headers(self, statuses: Sequence[LimitStatus], now: float) -> dict[str, str]:
        """The API's own rate-limit headers for the gate's limits, beside the gate's."""


@dataclass(frozen=True)
class Kind:
    """A dialect as quotas.yaml's `kind:` names it: the provider fields it reads beyond the
    common ones, and how a provider's entry makes it (`make(**settings)`, which raises
    InvalidSetting for a bad one)."""

    make: Callable[..., Dialect]
    settings: tuple[str, ...] = ()
