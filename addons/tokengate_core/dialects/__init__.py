"""API dialects: everything that depends on the shape of a provider's API, behind one interface.

The quota service, the stores and the addons speak of requests, demands, usage and answers; a
dialect says how one API writes them: which paths are metered, where the caller's key travels
and how the provider's key is set, how a request body is estimated and bounded, where usage sits
in a JSON answer or an event stream, how a stream is asked to report usage, and what an error
body looks like. A new provider API is one module implementing `Dialect`, plus one line in
`DIALECTS`; a provider picks its dialect with `kind:` in quotas.yaml. A dialect with settings of
its own (Azure's deployments) is made for each provider from its entry.
"""

from __future__ import annotations

from .anthropic import ANTHROPIC
from .azure import Azure
from .base import Dialect, Endpoint, InvalidSetting, Kind, RequestTerms, StreamEvents
from .openai import OPENAI

__all__ = [
    "DEFAULT",
    "DIALECTS",
    "OPENAI",
    "Dialect",
    "Endpoint",
    "InvalidSetting",
    "RequestTerms",
    "StreamEvents",
]

DIALECTS: dict[str, Kind] = {
    "openai": Kind(lambda: OPENAI),
    "anthropic": Kind(lambda: ANTHROPIC),
    "azure": Kind(Azure, ("deployments",)),
}
DEFAULT = "openai"
