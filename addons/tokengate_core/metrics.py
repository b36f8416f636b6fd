"""The Metrics addon: Prometheus metrics of what the gate decided, metered, spent and waited for.

With `tokengate_metrics` set to HOST:PORT, prometheus-client serves them at `/metrics` from a
registry of its own, on its own thread: a scrape never waits for the event loop, and a flow
never waits for a scrape. The hooks read the typed flow notes once a flow ends; the quota
service tells its store calls and queue waits through the gate's probes; what is a level rather
than an event (reservations in flight, requests waiting, the store up, ledger lines lost, what
each key has left) is read when Prometheus asks (`metrics_levels`).

Per flow the work is one dict lookup (the series of that combination of labels, bound once)
and a few increments. Keys with series of their own are bounded (`tokengate_metrics_keys`), so
are model names, and the series of a key that is no longer valid (revoked, removed, expired, its
proxy removed) are dropped `EXPIRY_SECONDS` after the gate noticed.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import threading
import time
from dataclasses import dataclass, field
from wsgiref.simple_server import WSGIServer

from mitmproxy import ctx, exceptions, http
from mitmproxy.utils import asyncio_utils
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Histogram,
    disable_created_metrics,
    start_http_server,
)

from . import notes
from .audit import decision_of
from .gate import Gate
from .metrics_levels import Levels
from .notes import Notes
from .probes import Probes
from .quota import QuotaService
from .reporting import Reporting

log = logging.getLogger("tokengate")

OPTION = "tokengate_metrics"
DEFAULT_MAX_KEYS = 1000  # keys with series of their own; the gauge: those with least left
OTHER = "_other"  # the key (or model) label of whatever is beyond the bounds
MAX_MODELS = 100  # distinct model names with series of their own (callers choose the name)
MAX_MODEL_CHARS = 100
EXPIRY_SECONDS = 600.0  # a key no longer valid keeps its series this long, then they go
SWEEP_SECONDS = 30.0  # how often keys are checked against the configuration in force
STOP_SECONDS = 2.0  # a server being replaced on the same port is waited for this long

# OpenTelemetry's GenAI conventions: gen_ai.operation.name by endpoint, gen_ai.provider.name
# by dialect where it differs from the dialect's name, the token histogram's explicit bucket
# boundaries.
OPERATIONS = {
    "chat/completions": "chat",
    "responses": "chat",
    "messages": "chat",  # Anthropic's Messages API
    "completions": "text_completion",
    "embeddings": "embeddings",
}
PROVIDER_NAMES = {"azure": "azure.ai.openai"}
TOKEN_BUCKETS = tuple(4.0**n for n in range(14))  # 1, 4, 16, ... 67108864
OVERHEAD_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
STORE_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1)
QUEUE_BUCKETS = (0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
RATIO_BUCKETS = (0.5, 0.8, 0.9, 0.95, 0.99, 1.01, 1.05, 1.1, 1.25, 1.5, 2, 4)

PER_KEY = ("proxy", "key", "model")
GENAI = ("gen_ai_operation_name", "gen_ai_provider_name", "gen_ai_request_model")


def parse_address(text: str) -> tuple[str, int] | None:
    """`HOST:PORT` (`[::1]:9464` for IPv6; port 0: any free port); empty: None (off)."""
    if not text:
        return None
    host, colon, port = text.rpartition(":")
    host = host.removeprefix("[").removesuffix("]")
    if not (colon and host and port.isdigit() and int(port) <= 65535):
        raise exceptions.OptionsError(
            f"{OPTION}: {text!r} is not HOST:PORT (e.g. 127.0.0.1:9464; empty: off)"
        )
    return host, int(port)


class Instruments:
    """The metrics a flow, a store call or a queue wait adds to."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.requests = Counter(
            "tokengate_requests",
            "Governed requests by outcome: decision (the ledger's), the limit that refused, "
            "who answered (gate, provider, none).",
            (*PER_KEY, "endpoint", "status", "decision", "limit", "source"),
            registry=registry,
        )
        self.tokens = Counter(
            "tokengate_tokens",
            "Tokens charged, by dimension and whether the provider reported them.",
            (*PER_KEY, "dimension", "usage_source"),
            registry=registry,
        )
        self.spend = Counter(
            "tokengate_spend_usd", "What the calls cost, in US dollars.", PER_KEY, registry=registry
        )
        self.token_usage = Histogram(
            "gen_ai_client_token_usage",
            "Input and output tokens per call (OpenTelemetry GenAI gen_ai.client.token.usage).",
            (*GENAI, "gen_ai_token_type"),
            buckets=TOKEN_BUCKETS,
            registry=registry,
        )
        self.estimate = Histogram(
            "tokengate_prompt_estimate_ratio",
            "Prompt tokens the provider reported divided by the gate's estimate, per call.",
            GENAI[1:],
            buckets=RATIO_BUCKETS,
            registry=registry,
        )
        self.overhead = Histogram(
            "tokengate_overhead_seconds",
            "Time the gate adds to a request, the provider's time excluded.",
            ("proxy", "source"),
            buckets=OVERHEAD_BUCKETS,
            registry=registry,
        )
        self.store_calls = Histogram(
            "tokengate_store_call_seconds",
            "Calls to the usage store, by operation and whether the store answered.",
            ("operation", "outcome"),
            buckets=STORE_BUCKETS,
            registry=registry,
        )
        self.queue_waits = Histogram(
            "tokengate_queue_wait_seconds",
            "How long requests waited for in-flight reservations (queue_wait), by outcome.",
            ("outcome",),
            buckets=QUEUE_BUCKETS,
            registry=registry,
        )


class RecordingProbes(Probes):
    """The quota service's reports, into the instruments (children bound once)."""

    def __init__(self, instruments: Instruments) -> None:
        self._calls = {
            (operation, answered): instruments.store_calls.labels(
                operation, "ok" if answered else "unavailable"
            )
            for operation in ("reserve", "settle", "release")
            for answered in (True, False)
        }
        self._waits = {
            admitted: instruments.queue_waits.labels("admitted" if admitted else "refused")
            for admitted in (True, False)
        }

    def store_call(self, operation: str, seconds: float, answered: bool) -> None:
        self._calls[operation, answered].observe(seconds)

    def queue_wait(self, seconds: float, admitted: bool) -> None:
        self._waits[admitted].observe(seconds)


@dataclass(slots=True)
class Series:
    """The children one combination of a flow's labels adds to, bound at its first flow."""

    pair: tuple[str, str]  # (proxy, key name) as noted: what the sweep matches
    labels: tuple[str, str, str]  # proxy, key, model as exported
    own: bool  # the key has series of its own (not OTHER): they go when the key goes
    requests: Counter
    overhead: Histogram
    prompt: Counter | None = None
    completion: Counter | None = None
    input: Histogram | None = None
    output: Histogram | None = None
    estimate: Histogram | None = None
    spend: Counter | None = None
    removals: list[tuple[Counter, tuple[str, ...]]] = field(default_factory=list)


@dataclass
class Server:
    """prometheus-client's HTTP server on its own daemon thread."""

    address: tuple[str, int]  # as asked (port 0: any)
    httpd: WSGIServer
    thread: threading.Thread

    @classmethod
    def start(cls, address: tuple[str, int], registry: CollectorRegistry) -> Server:
        httpd, thread = start_http_server(address[1], address[0], registry)
        return cls(address, httpd, thread)

    @property
    def url(self) -> str:
        host, port = self.httpd.server_address[:2]
        return f"http://{f'[{host}]' if ':' in host else host}:{port}/metrics"

    def stop(self) -> None:
        """Blocks until the serving loop notices (up to half a second): call it off the loop."""
        self.httpd.shutdown()
        self.httpd.server_close()

    def stop_behind(self) -> threading.Thread:
        stopper = threading.Thread(target=self.stop, name="tokengate metrics stop", daemon=True)
        stopper.start()
        return stopper


class Metrics:
    """Declares `tokengate_metrics` and `tokengate_metrics_keys`; while on, serves the metrics
    and counts every governed flow once it ends."""

    def __init__(self, gate: Gate, quota: QuotaService, reporting: Reporting) -> None:
        self.gate = gate
        self.quota = quota
        self.reporting = reporting
        # `_created` series double the page and Prometheus' text format has no use for them.
        disable_created_metrics()
        self.registry = CollectorRegistry(auto_describe=False)
        self.instruments = Instruments(self.registry)
        self.levels = Levels(self)
        self.registry.register(self.levels)
        self.probes = RecordingProbes(self.instruments)
        self.max_keys = DEFAULT_MAX_KEYS
        self.server: Server | None = None
        self._stopping: threading.Thread | None = None  # the server replaced last, stopping
        self._series: dict[tuple, Series] = {}
        self._own_keys: set[tuple[str, str]] = set()  # keys with series of their own
        self._models: set[str] = set()  # model names with series of their own
        # (proxy, key or "*") -> (when, what was left by limit name) at its last answer
        self.standing: dict[tuple[str, str], tuple[float, dict[str, int]]] = {}
        self._gone: dict[tuple[str, str], float] = {}  # keys no longer valid, since when
        self._forwarded: dict[str, float] = {}  # flow id -> when its request left the hooks
        self._sweeper: asyncio.Task | None = None
        self._running = False

    def load(self, loader) -> None:
        loader.add_option(
            OPTION,
            str,
            "",
            "Serve Prometheus metrics at http://HOST:PORT/metrics (e.g. 127.0.0.1:9464; port 0: "
            "any free port, logged); empty: off.",
        )
        loader.add_option(
            "tokengate_metrics_keys",
            int,
            DEFAULT_MAX_KEYS,
            "Most caller keys with metric series of their own: the first seen for the counters "
            "(later ones count as key '_other'), those with least left for the remaining gauge.",
        )

    def configure(self, updated: set[str]) -> None:
        if "tokengate_metrics_keys" in updated:
            if ctx.options.tokengate_metrics_keys < 0:
                raise exceptions.OptionsError("tokengate_metrics_keys must be 0 or more")
            self.max_keys = ctx.options.tokengate_metrics_keys
        if OPTION not in updated:
            return
        try:
            self._serve(parse_address(ctx.options.tokengate_metrics))
        except exceptions.OptionsError as e:
            if self._running:
                raise
            # At start-up, one clear line (mitmdump then exits with status 1), as for quotas.yaml.
            log.error("tokengate: refusing to start: %s", e)

    def _serve(self, address: tuple[str, int] | None) -> None:
        old = self.server
        if old is not None and old.address == address:
            return
        self.server = None
        if old is not None:
            self._stopping = old.stop_behind()
        if address is None:
            self.gate.probes = Probes()
            return
        try:
            try:
                server = Server.start(address, self.registry)
            except OSError as e:
                stopping = self._stopping
                if not (stopping and stopping.is_alive() and e.errno == errno.EADDRINUSE):
                    raise
                stopping.join(STOP_SECONDS)  # the old one holds this port: let it go first
                server = Server.start(address, self.registry)
        except OSError as e:
            self.gate.probes = Probes()
            raise exceptions.OptionsError(f"{OPTION}: cannot listen on {address}: {e}") from e
        self.server = server
        self.gate.probes = self.probes
        log.info("tokengate: metrics at %s", server.url)
        if self._running:
            self._start_sweeping()

    def running(self) -> None:
        self._running = True
        if self.server is not None:
            self._start_sweeping()

    def _start_sweeping(self) -> None:
        if self._sweeper is None:
            self._sweeper = asyncio_utils.create_task(
                self._sweep_forever(), name="tokengate metrics sweeper", keep_ref=True
            )

    async def _sweep_forever(self) -> None:
        while True:
            await asyncio.sleep(SWEEP_SECONDS)
            try:
                self.sweep()
            except Exception:  # a bug must not end the sweeping: later sweeps still count
                log.exception("tokengate: sweeping the metrics of gone keys failed")

    async def done(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        server, self.server = self.server, None
        self.gate.probes = Probes()
        if server is not None:
            await asyncio.to_thread(server.stop)

    # --- flows ----------------------------------------------------------------------------

    def request(self, flow: http.HTTPFlow) -> None:
        if self.server is not None and notes.pending(flow) is not None:
            self._forwarded[flow.id] = time.time()  # the last hook: it leaves for the provider

    def response(self, flow: http.HTTPFlow) -> None:
        self._ended(flow)

    def error(self, flow: http.HTTPFlow) -> None:
        self._ended(flow)

    def _ended(self, flow: http.HTTPFlow) -> None:
        forwarded = self._forwarded.pop(flow.id, None)  # also when metrics went off meanwhile
        if self.server is not None and (note := notes.of(flow)) is not None:
            self.count(flow, note, forwarded)

    def count(self, flow: http.HTTPFlow, note: Notes, forwarded: float | None) -> None:
        """Once per flow (a stream its caller cuts may end in `error` after `response`);
        `forwarded`: when its request left for the provider."""
        if note.get("measured"):
            return
        note["measured"] = True
        response = flow.response
        usage = note.get("usage")
        index = (
            note.get("proxy") or _only(note.get("candidates", ())),
            note.get("key", ""),
            self._model_label(note.get("model")),  # bounded: the caller names the model
            note.get("endpoint"),
            response.status_code if response is not None else 0,
            note.get("answered_by_gate"),
            note.get("refused_by"),
            usage["source"] if usage else None,
        )
        series = self._series.get(index) or self._bind(index)
        series.requests.inc()
        if usage:
            prompt, completion = usage["prompt_tokens"], usage["completion_tokens"]
            series.prompt.inc(prompt)
            series.completion.inc(completion)
            if series.input is not None:
                series.input.observe(prompt)
                series.output.observe(completion)
            estimate = note.get("prompt_estimate")
            if series.estimate is not None and estimate and prompt:
                series.estimate.observe(prompt / estimate)
        if cost := note.get("cost_micro_usd"):
            self._spend(series).inc(cost / 1_000_000)
        if response is not None:
            now = time.time()
            if note.get("answered_by_gate"):
                series.overhead.observe(now - (flow.request.timestamp_end or now))
            elif forwarded is not None and response.timestamp_end:
                began = flow.request.timestamp_end or forwarded
                series.overhead.observe(forwarded - began + now - response.timestamp_end)
        if (remaining := note.get("remaining")) is not None:
            self._stand(series.pair, remaining)

    def _stand(self, pair: tuple[str, str], remaining: dict[str, int]) -> None:
        """What is left of each limit, under whose window it is: the key's, or (key "*") the
        one its proxy's keys share, by the limit's scope or else the proxy's."""
        proxy = self.gate.proxy(pair[0])
        if proxy is None:
            return
        now = self.gate.clock()
        split: dict[str, dict[str, int]] = {}
        for limit in proxy.limits:
            if limit.name in remaining:
                who = "*" if (limit.scope or proxy.scope) == "proxy" else pair[1]
                split.setdefault(who, {})[limit.name] = remaining[limit.name]
        for who, left in split.items():
            self.standing[(pair[0], who)] = (now, left)

    def _bind(self, index: tuple) -> Series:
        proxy_name, key, model_label, endpoint, status, answered, limit, usage_source = index
        proxy = self.gate.proxy(proxy_name)
        key_label = self._key_label(proxy_name, key)
        labels = (proxy_name, key_label, model_label)
        source = "gate" if answered else "provider" if status else "none"
        decision = decision_of(answered) if answered or status else "error"
        outcome = (endpoint or "", str(status) if status else "none", decision, limit or "")
        instruments = self.instruments
        series = Series(
            pair=(proxy_name, key),
            labels=labels,
            own=key_label != OTHER,
            requests=instruments.requests.labels(*labels, *outcome, source),
            overhead=instruments.overhead.labels(proxy_name, source),
        )
        self._remember(series, instruments.requests, (*labels, *outcome, source))
        if usage_source:
            series.prompt = self._tokens(series, "prompt", usage_source)
            series.completion = self._tokens(series, "completion", usage_source)
            operation = OPERATIONS.get(endpoint or "")
            dialect = proxy.provider.dialect.name if proxy else ""
            provider = PROVIDER_NAMES.get(dialect, dialect)
            if operation:
                usage = instruments.token_usage
                series.input = usage.labels(operation, provider, model_label, "input")
                series.output = usage.labels(operation, provider, model_label, "output")
            if usage_source == "reported":
                series.estimate = instruments.estimate.labels(provider, model_label)
        self._series[index] = series
        return series

    def _tokens(self, series: Series, dimension: str, usage_source: str) -> Counter:
        labels = (*series.labels, dimension, usage_source)
        self._remember(series, self.instruments.tokens, labels)
        return self.instruments.tokens.labels(*labels)

    def _spend(self, series: Series) -> Counter:
        if series.spend is None:
            labels = series.labels
            self._remember(series, self.instruments.spend, labels)
            series.spend = self.instruments.spend.labels(*labels)
        return series.spend

    @staticmethod
    def _remember(series: Series, metric: Counter, labels: tuple[str, ...]) -> None:
        if series.own:
            series.removals.append((metric, labels))

    def _key_label(self, proxy: str, key: str) -> str:
        pair = (proxy, key)
        if not key or pair in self._own_keys:
            return key
        if len(self._own_keys) < self.max_keys:
            self._own_keys.add(pair)
            return key
        return OTHER

    def _model_label(self, model: str | None) -> str:
        if not model:
            return ""
        if model in self._models:
            return model
        if len(self._models) < MAX_MODELS and len(model) <= MAX_MODEL_CHARS:
            self._models.add(model)
            return model
        return OTHER

    # --- keys that are gone ---------------------------------------------------------------

    def sweep(self) -> None:
        """Drop the series of keys no longer valid for EXPIRY_SECONDS (revoked, removed,
        expired, or their proxy removed by a reload)."""
        now = self.gate.clock()
        valid = self._valid_pairs(now)
        pairs = {series.pair for series in self._series.values()} | set(self.standing)
        for pair in pairs:
            if pair in valid or (pair[0] in valid and pair[1] in ("", "*")):
                self._gone.pop(pair, None)
            elif now - self._gone.setdefault(pair, now) >= EXPIRY_SECONDS:
                self._drop(pair)

    def _valid_pairs(self, now: float) -> set:
        """(proxy, key name) of every valid key, and every proxy's name."""
        config = self.gate.config
        valid: set = set()
        for proxy in config.proxies.values() if config else ():
            valid.add(proxy.name)
            valid.update((proxy.name, key.name) for key in proxy.keys if not key.expired(now))
        return valid

    def _drop(self, pair: tuple[str, str]) -> None:
        for index in [index for index, series in self._series.items() if series.pair == pair]:
            for metric, labels in self._series.pop(index).removals:
                metric.remove(*labels)
        self.standing.pop(pair, None)
        self._own_keys.discard(pair)
        self._gone.pop(pair, None)


def _only(candidates: list[str]) -> str:
    """A refused caller's proxy when its route names one (an unknown key names none)."""
    return candidates[0] if len(candidates) == 1 else ""
