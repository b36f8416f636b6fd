"""Azure OpenAI: OpenAI's API behind deployments. Requests and answers are OpenAI's (read by the
OpenAI dialect); what differs is the path, the key's header and which model a call is for.

Paths, with or without the leading `openai/` (the SDK's `azure_endpoint` adds it, a base URL
ending in `/openai` does not): `deployments/{deployment}/{chat/completions|completions|
embeddings}?api-version=…`, where the deployment names the model, and the v1 API (`v1/…`, and
`responses` with an `api-version`), where the body's `model` is a deployment name. The caller's
key comes in `api-key` (what the SDK's `AzureOpenAI` sends) or as a Bearer token; the provider's
key goes upstream in `api-key`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from ..limiter import LimitStatus, Usage
from .base import Endpoint, InvalidSetting, RequestTerms
from .openai import OPENAI

DEPLOYMENT_ENDPOINTS = ("chat/completions", "completions", "embeddings")


def _deployments(value: Any) -> dict[str, str]:
    """`deployments:` as written in quotas.yaml: deployment name -> model."""
    if value is None:
        return {}
    if not isinstance(value, Mapping) or not all(
        isinstance(name, str) and name and isinstance(model, str) and model
        for name, model in value.items()
    ):
        raise InvalidSetting(
            "deployments", "deployments must map deployment names to model names (text)"
        )
    return dict(value)


@dataclass(frozen=True)
class Azure:
    """One Azure provider's dialect: its deployments, each named for the model it serves."""

    deployments: Mapping[str, str] = field(default_factory=dict, hash=False)

    name = "azure"
    estimate_has_margin = False
    served = (
        "a deployment's chat/completions, completions and embeddings, the v1 API's "
        "chat/completions, completions, embeddings and responses, and the model list"
    )
    credential_headers = OPENAI.credential_headers
    stream = OPENAI.stream

    def __post_init__(self) -> None:
        object.__setattr__(self, "deployments", _deployments(self.deployments))

    def caller_key(self, headers: Mapping[str, str]) -> str | None:
        return OPENAI.caller_key(headers)

    def provider_auth(self, api_key: str) -> dict[str, str]:
        return {"api-key": api_key}

    def classify(self, method: str, segments: list[str]) -> Endpoint:
        if segments[:1] == ["openai"]:
            segments = segments[1:]
        if segments[:1] != ["deployments"]:
            return OPENAI.classify(method, segments)
        name = "/".join(segments[2:])
        if method == "POST" and len(segments) > 2 and name in DEPLOYMENT_ENDPOINTS:
            return Endpoint(name, True, segments[1])
        return Endpoint(None, False)

    def terms(
        self,
        endpoint: str,
        body: dict[str, Any],
        default_reserve: int,
        deployment: str | None = None,
    ) -> RequestTerms:
        """The model from the path's deployment, else from the body's `model` (on the v1 API,
        a deployment name too): as `deployments` names it, else the model the answer names,
        else the deployment's own name."""
        asked = OPENAI.terms(endpoint, body, default_reserve)
        named = deployment or asked.model
        return replace(
            asked,
            model=self.deployments.get(named, named) if named else None,
            model_from_answer=bool(named) and named not in self.deployments,
        )

    def estimate_prompt(self, endpoint: str, body: dict[str, Any], exact_chars: int) -> int:
        return OPENAI.estimate_prompt(endpoint, body, exact_chars)

    def adjust(
        self, endpoint: str, body: dict[str, Any], reserved: Usage, strict: bool = False
    ) -> dict[str, Any]:
        return OPENAI.adjust(endpoint, body, reserved, strict)

    def as_requested(self, body: dict[str, Any], notes: Mapping[str, Any]) -> None:
        OPENAI.as_requested(body, notes)

    def usage(self, payload: Any) -> Usage | None:
        return OPENAI.usage(payload)

    def text(self, payload: Any) -> str:
        return OPENAI.text(payload)

    def model(self, payload: Any) -> str | None:
        return OPENAI.model(payload)

    def error_body(self, message: str, type_: str, code: str | None) -> bytes:
        return OPENAI.error_body(message, type_, code)

    def ratelimit_headers(self, statuses: Sequence[LimitStatus], now: float) -> dict[str, str]:
        return OPENAI.ratelimit_headers(statuses, now)
