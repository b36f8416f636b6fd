"""The AdmissionControl addon: whether a governed request may reach the provider, decided first.

requestheaders: route (flows of no configured proxy pass untouched), the caller's key (401),
the endpoint (403), the declared body size (413), the gate's own usage endpoint (answered here);
request: the body (400, 413) and the quota (429, or 503 while the store is down), through the
quota service. A refusal is answered by the gate and never forwarded; an admitted request's body
is adjusted by its dialect (lowered max tokens, a stream asked for usage).

With mitmproxy's `stream_large_bodies` set, the body may leave before `request` runs, so the
quota is decided at requestheaders on what is left, and the body is read on its way.
"""

from __future__ import annotations

import json
import logging
import math
import traceback
from collections.abc import Sequence
from dataclasses import replace

from mitmproxy import ctx, exceptions, http

from . import answers, notes
from .config import Config, Proxy
from .dialects import OPENAI, Dialect, RequestTerms
from .estimates import MAX_RATIO
from .gate import Gate
from .intake import Reader, Unreadable
from .keys import ConflictingKeys, format_timestamp
from .limiter import Decision, Demand
from .notes import Notes
from .quota import DEFAULT_QUEUE_LIMIT, Admission, Ask, QuotaService, Refusal
from .routing import USAGE_ENDPOINT, Route, is_reverse, route, route_saved, stray_credential
from .stores import StoreUnavailable
from .usage import BoundedBuffer

log = logging.getLogger("tokengate")


def note_decision(note: Notes, outcome: Admission | Refusal) -> None:
    """What a reserve decided, for the ledger and the flow's comment: the limit that refused,
    or what was held, and every window as it stood."""
    decision: Decision | None = outcome.decision
    if decision is not None:
        notes.note_windows(note, decision.statuses)
    if isinstance(outcome, Refusal):
        blocking = decision.blocking if decision else None
        note["refused_by"] = blocking.limit.name if blocking else None
    elif outcome.reservation is None:
        note["accounting"] = "degraded"  # admitted unmetered: the response says so
    else:
        amounts = outcome.reservation.amounts
        note["reserved"] = {
            "prompt_tokens": amounts.prompt,
            "completion_tokens": amounts.completion,
        }


class AdmissionControl:
    def __init__(self, gate: Gate, quota: QuotaService) -> None:
        self.gate = gate
        self.quota = quota
        self._bodies: dict[str, BoundedBuffer] = {}  # request bodies streamed upstream
        self.passthrough: tuple[str, ...] = ()  # reverse-mode prefixes forwarded untouched

    def load(self, loader) -> None:
        loader.add_option(
            "tokengate_queue_limit",
            int,
            DEFAULT_QUEUE_LIMIT,
            "Most requests that wait at once for in-flight reservations (proxies with "
            "queue_wait); beyond it, requests get 429 at once.",
        )
        loader.add_option(
            "tokengate_passthrough",
            Sequence[str],
            [],
            "Reverse mode: path prefixes outside every proxy's context that are forwarded "
            "untouched even with a credential (elsewhere such a request gets 404).",
        )
        policy = self.gate.estimates.policy
        loader.add_option(
            "tokengate_estimate_margin",
            str,  # a number (mitmproxy options have no float type)
            f"{policy.margin:g}",
            "Cold start: the prompt estimate of a model counted with the fallback encoding is "
            "reserved times at least this, until the provider's counts for it are learned "
            "(docs/estimates.md).",
        )
        loader.add_option(
            "tokengate_estimate_warmup",
            int,
            policy.warmup,
            "Answers of a provider and model seen before the learned correction of the prompt "
            "estimate replaces the cold start's margin.",
        )

    def configure(self, updated: set[str]) -> None:
        if "tokengate_queue_limit" in updated:
            if ctx.options.tokengate_queue_limit < 0:
                raise exceptions.OptionsError("tokengate_queue_limit must be 0 or more")
            self.quota.queue_limit = ctx.options.tokengate_queue_limit
        if "tokengate_passthrough" in updated:
            prefixes = ctx.options.tokengate_passthrough
            if not all(prefix.startswith("/") for prefix in prefixes):
                raise exceptions.OptionsError("tokengate_passthrough: each prefix starts with /")
            self.passthrough = tuple(prefix.rstrip("/") or "/" for prefix in prefixes)
        if "tokengate_estimate_margin" in updated:
            text = ctx.options.tokengate_estimate_margin
            try:
                margin = float(text)
            except ValueError:
                margin = math.nan
            if not 1 <= margin <= MAX_RATIO:  # NaN included
                raise exceptions.OptionsError(
                    f"tokengate_estimate_margin must be a number from 1 to {MAX_RATIO:g}, "
                    f"not {text!r}"
                )
            self.gate.estimates.policy.margin = margin
        if "tokengate_estimate_warmup" in updated:
            if ctx.options.tokengate_estimate_warmup < 0:
                raise exceptions.OptionsError("tokengate_estimate_warmup must be 0 or more")
            self.gate.estimates.policy.warmup = ctx.options.tokengate_estimate_warmup

    # An unexpected error while admitting must not let the request go upstream unmetered
    # (mitmproxy would log it and run the next addons): the gate answers 500 itself and releases
    # what the flow holds, whatever the proxy's `fail:` (which is about the store alone).

    async def requestheaders(self, flow: http.HTTPFlow) -> None:
        try:
            await self._requestheaders(flow)
        except Exception as error:
            self._failed(flow, error, sent=False)

    async def request(self, flow: http.HTTPFlow) -> None:
        try:
            await self._request(flow)
        except Exception as error:
            # A body streamed upstream (stream_large_bodies) has left by the time this runs.
            self._failed(flow, error, sent=bool(flow.request.stream))

    async def _requestheaders(self, flow: http.HTTPFlow) -> None:
        # A flow loaded from a file may carry the notes of the run that saved it; they must not
        # make the addons act on it now.
        saved = flow.metadata.pop(notes.META, None)
        # Flows loaded from a file or replayed by the server already carry a response.
        config = self.gate.config
        if config is None or flow.response is not None or not flow.live:
            return
        reverse = is_reverse(flow)
        found = route(config, flow.request, reverse)
        if found is None and saved and flow.is_replay == "request":
            found = route_saved(config, flow.request, saved)
        if found is None:
            if reverse and stray_credential(config, flow.request, self.passthrough):
                self._refuse_stray(flow, config)
            return
        note = notes.start(
            flow,
            candidates=[proxy.name for proxy in found.candidates],
            upstream_path=found.upstream_path,
            endpoint=found.endpoint,
            allowed=found.allowed,
            deployment=found.deployment,
        )
        refusal = self._caller(flow, found, note) or await self._headers(flow, note)
        if refusal is not None:
            notes.answer(flow, refusal)

    async def _request(self, flow: http.HTTPFlow) -> None:
        note = notes.pending(flow)
        if note is None or note["endpoint"] is None:
            return
        proxy = self.gate.proxy(note["proxy"])
        if proxy is None:  # removed by a reload since its headers were admitted
            return
        refusal = await self._body(flow, proxy, note)
        if refusal is not None:
            notes.answer(flow, refusal)

    def _failed(self, flow: http.HTTPFlow, error: Exception, sent: bool) -> None:
        """Answer 500 in the caller's dialect (or, failing even that, kill the flow), release
        the flow's reservation (charge it where a streamed body had already left), and log
        where it failed by code location only: an exception's message may quote the request,
        keys included."""
        if not flow.live:
            raise error  # read from a file: nothing can go upstream
        note = notes.of(flow) or notes.start(
            flow, candidates=[], upstream_path=None, endpoint=None, allowed=False
        )
        try:
            if not notes.answered_by_gate(flow):
                notes.answer(flow, answers.gate_error(self._dialect_of(note)))
        except Exception:
            flow.kill()  # not even an answer: the request still never leaves
        self._bodies.pop(flow.id, None)
        held = self.quota.holding(flow.id)
        self.quota.settle(
            flow.id, held.reservation.amounts if held and held.reservation and sent else None
        )
        frames = traceback.extract_tb(error.__traceback__)
        where = " < ".join(
            f"{frame.filename.rsplit('/', 1)[-1]}:{frame.lineno} {frame.name}"
            for frame in reversed(frames)
        )
        log.error(
            "tokengate: unexpected error in admission, flow %s (%s/%s): %s at %s; answered 500, %s",
            flow.id,
            note.get("proxy", "-"),
            note.get("key", "-"),
            type(error).__name__,
            where,
            "its streamed body had left: charged" if sent else "nothing forwarded",
        )

    def _dialect_of(self, note: Notes) -> Dialect:
        """The dialect of the flow's proxy, or of the first it may belong to (OpenAI's when the
        error came before routing)."""
        for name in (note.get("proxy"), *note.get("candidates", ())):
            proxy = self.gate.proxy(name) if name else None
            if proxy is not None:
                return proxy.dialect
        return OPENAI

    def _refuse_stray(self, flow: http.HTTPFlow, config: Config) -> None:
        """404: a typo'd path must not carry the caller's key (or any key, to a provider)
        upstream, and the caller learns where the proxies are."""
        notes.start(flow, candidates=[], upstream_path=None, endpoint=None, allowed=False)
        contexts = sorted(proxy.context for proxy in config.proxies.values())
        # Only the proxies' dialects name credential headers, so there is at least one proxy.
        dialect = next(iter(config.proxies.values())).dialect
        notes.answer(flow, answers.unknown_context(dialect, flow.request.path, contexts))

    def _caller(self, flow: http.HTTPFlow, found: Route, note: Notes) -> http.Response | None:
        """The caller's key among the routed proxies' keys (401 otherwise), then the endpoint
        (403 for what the gate cannot meter: callers may not use the provider account for it).
        """
        dialect = found.candidates[0].dialect
        try:
            secret = dialect.caller_key(flow.request.headers)
        except ConflictingKeys as e:
            return answers.conflicting_keys(dialect, e.headers)
        if secret is None:
            return answers.missing_key(dialect)
        for proxy in found.candidates:
            key = proxy.keys.find(secret)
            if key is None:
                continue
            note.update(proxy=proxy.name, key=key.name, key_fp=key.sha256[:16])
            if key.expired(self.gate.clock()):
                return answers.expired_key(dialect, key.name, format_timestamp(key.expires))
            if not found.allowed:
                return answers.endpoint_not_allowed(dialect, flow.request.method, flow.request.path)
            return None
        return answers.unauthorized(dialect, "Incorrect API key provided.")

    async def _headers(self, flow: http.HTTPFlow, note: Notes) -> http.Response | None:
        proxy = self.gate.proxy(note["proxy"])
        assert proxy is not None, "authenticated in this configuration, in this same hook"
        if note["endpoint"] == USAGE_ENDPOINT:
            return await self._usage(proxy, note)
        declared = flow.request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > self.gate.max_body:
            return answers.too_large(proxy.dialect, self.gate.max_body)
        if note["endpoint"] is None:
            return None
        # The gate must read what the provider sends, so it asks for it uncompressed.
        flow.request.headers["accept-encoding"] = "identity"
        if not self.gate.stream_request_bodies:
            flow.request.stream = False  # buffer: the whole body is estimated before it leaves
            return None
        # The body may leave before `request` runs: decide now, on what is left.
        demand = Demand(0, proxy.completion_reserve)
        refusal = await self._admit(flow, proxy, note, demand)
        if refusal is not None:
            flow.request.stream = False
            return refusal
        body = self._bodies[flow.id] = BoundedBuffer(self.gate.max_body)
        flow.request.stream = body.passing
        return None

    async def _usage(self, proxy: Proxy, note: Notes) -> http.Response:
        """`GET <context>/tokengate/usage`: the caller's own standing, never forwarded."""
        try:
            statuses = await self.quota.standing(proxy, note["key"])
        except StoreUnavailable:
            return answers.usage_unavailable(proxy.dialect)
        notes.note_windows(note, statuses)
        return answers.usage_report(proxy, note["key"], statuses, self.gate.clock())

    async def _body(self, flow: http.HTTPFlow, proxy: Proxy, note: Notes) -> http.Response | None:
        streamed = self._bodies.pop(flow.id, None)
        raw = streamed.data if streamed else flow.request.get_content(strict=False) or b""
        if streamed is None and len(raw) > self.gate.max_body:  # chunked, no content-length
            return answers.too_large(proxy.dialect, self.gate.max_body)
        endpoint = note["endpoint"]
        reader = Reader(
            proxy.dialect,
            self.gate.exact_prompt_chars,
            proxy.completion_reserve,
            note.get("deployment"),
        )
        read = await reader.read(raw, endpoint)
        admitted = self.quota.holding(flow.id)
        if isinstance(read, Unreadable):
            # Not sent yet: refuse it rather than guess its cost.
            if admitted:
                return None
            if read.parsed:
                return answers.invalid_body(proxy.dialect, read.reason)
            return answers.unreadable_body(proxy.dialect, read.reason)
        terms = read.terms
        note.update(model=terms.model, stream=terms.stream, prompt_estimate=read.prompt)
        if terms.model_from_answer:
            note["model_from_answer"] = True
        if admitted is not None:  # admitted at requestheaders; now its estimate is known
            return None
        if not proxy.allows(terms.model):
            return answers.model_not_allowed(proxy.dialect, terms.model, proxy)
        prompt = self.gate.estimates.prompt(
            proxy.provider.name, terms.model, read.prompt, proxy.dialect.estimate_has_margin
        )
        demand = Demand(prompt, terms.completion_reserve)
        refusal = await self._admit(flow, proxy, note, demand, terms)
        admitted = self.quota.holding(flow.id)
        if refusal is None and admitted is not None:
            amounts = admitted.reservation.amounts
            changed = proxy.dialect.adjust(endpoint, read.body, amounts, strict=proxy.strict)
            if changed:
                # ASCII escapes: always valid JSON, even for a lone surrogate such as "\ud800".
                flow.request.content = json.dumps(read.body).encode()
                note.update(changed)  # type: ignore[typeddict-item]
        return refusal

    async def _admit(
        self,
        flow: http.HTTPFlow,
        proxy: Proxy,
        note: Notes,
        demand: Demand,
        terms: RequestTerms | None = None,
    ) -> http.Response | None:
        """Ask the quota service; `terms` None: the body is not read yet (its model unknown)."""
        connected = lambda: flow.client_conn.connected  # noqa: E731
        ask = Ask(flow.id, proxy, note["key"], demand, proxy.dialect, connected)
        if terms is not None:
            ask = replace(
                ask,
                model=terms.model,
                completions=terms.completions,
                service_tier=terms.service_tier,
            )
        outcome = await self.quota.admit(ask)
        if outcome is None:
            return None
        note_decision(note, outcome)
        return outcome.answer if isinstance(outcome, Refusal) else None

    def error(self, flow: http.HTTPFlow) -> None:
        self._bodies.pop(flow.id, None)  # a streamed request body that never completed
