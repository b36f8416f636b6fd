"""quotas.yaml: the policy users write, validated strictly so mistakes stop the gateway early.

Every error names the file, the line and the reason (see `yamlsource.ConfigError`).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field, replace
from decimal import Decimal, InvalidOperation
from fnmatch import fnmatchcase
from fractions import Fraction
from functools import cached_property
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from .dialects import DEFAULT as DEFAULT_DIALECT
from .dialects import DIALECTS, OPENAI, Dialect, InvalidSetting
from .keys import KeyRing, StoredKey, parse_timestamp
from .limiter import BUDGET, MICRO_USD, REQUESTS, TOKEN_DIMENSIONS, Limit
from .prices import Price, PriceBook, PriceError, parse_price, usd_text
from .yamlsource import Document, Where, load_document

SCOPES = ("key", "proxy")
FAIL_MODES = ("closed", "open")
STORE_KINDS = ("sqlite", "memory", "redis")
DEFAULT_STORE_PATH = ".state/tokengate.sqlite3"  # beside the quotas file
DEFAULT_RESERVATION_TIMEOUT = 600  # seconds before a crashed process's reservation is settled
DEFAULT_COMPLETION_RESERVE = 256
_DURATION = re.compile(r"^([1-9][0-9]*)(s|m|h|d)$")
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
_SHA256_HEX = re.compile(r"^[0-9a-f]{64}$")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_HOST = re.compile(r"^[A-Za-z0-9.:\[\]-]+$")
# A model glob (fnmatch): printable, no spaces, every `[` closed by a `]`.
_GLOB = re.compile(r"^(?:[^\s\[\]]|\[!?\]?[^\]\s]*\])+$")
MAX_BUDGET_SECONDS = 31 * 86400  # a budget's window: up to a month
WEIGHTS = ("cached_prompt_tokens",)


@dataclass(frozen=True)
class Provider:
    name: str
    base_url: str
    api_key: str | None = field(repr=False)  # None: keyless (nothing is set upstream)
    hosts: tuple[str, ...]
    dialect: Dialect = OPENAI  # the API it speaks (`kind:`)

    @property
    def base_path(self) -> str:
        return urlsplit(self.base_url).path.rstrip("/")


@dataclass(frozen=True)
class Proxy:
    name: str
    version: str | None
    context: str
    provider: Provider
    scope: str
    limits: tuple[Limit, ...]
    completion_reserve: int
    keys: KeyRing
    fail: str = "closed"  # what callers get while the store is down: 503, or admitted unmetered
    queue_wait: int = 0  # seconds a request held back by in-flight reservations may wait
    models: tuple[str, ...] = ()  # the models callers may use (globs); () = any
    strict: bool = False  # always bound the completion to what was reserved (a hard cap)

    @property
    def dialect(self) -> Dialect:
        return self.provider.dialect

    @property
    def budgeted(self) -> bool:
        """Whether a limit of this proxy counts money (its requests then need a price)."""
        return any(limit.dimension == BUDGET for limit in self.limits)

    def allows(self, model: str | None) -> bool:
        """Whether the allow-list lets `model` through (a request naming none is the
        provider's to refuse)."""
        return not self.models or model is None or any(fnmatchcase(model, p) for p in self.models)


@dataclass(frozen=True)
class StoreSpec:
    """The `store:` entry: which store keeps the usage, and where."""

    kind: str  # memory | sqlite | redis
    path: Path | None = None  # sqlite: the database file
    url: str | None = field(default=None, repr=False)  # redis: may carry a password
    reservation_timeout: float = DEFAULT_RESERVATION_TIMEOUT  # unsettled past this: spent
    cluster: bool = False  # redis: the URL is a seed of a Redis Cluster
    cluster_nodes: tuple[tuple[str, int], ...] = ()  # redis cluster: more seeds (host, port)

    @property
    def place(self) -> tuple:
        """Where the usage lives: a reload that keeps it keeps the store."""
        return (self.kind, self.path, self.url, self.cluster, self.cluster_nodes)


@dataclass(frozen=True)
class Config:
    path: Path
    providers: dict[str, Provider]
    proxies: dict[str, Proxy]
    store: StoreSpec
    prices: dict[str, Price] = field(default_factory=dict)  # `prices:`, by model name or glob

    @property
    def budgeted(self) -> bool:
        """Whether a proxy has a budget: only then is the bundled price table loaded."""
        return any(proxy.budgeted for proxy in self.proxies.values())

    @cached_property
    def price_book(self) -> PriceBook:
        """`prices:` first, then the bundled table (one book per configuration: a reload
        resolves each model again, with the prices it now names)."""
        return PriceBook(self.prices)

    def summary(self, replay: bool = False) -> str:
        """One short line per proxy, for the log at start and after a reload; `replay`: for QA
        replay, which evaluates on a memory store of its own and leaves the configured one."""
        parts = []
        for proxy in self.proxies.values():
            limits = ", ".join(f"{amount(lim)} {lim.name}" for lim in proxy.limits) or "no limits"
            parts.append(
                f"{proxy.name} ({proxy.context} -> {proxy.provider.name}, scope {proxy.scope}, "
                f"{limits}, {plural(len(proxy.keys), 'key')}, fail {proxy.fail})"
            )
        if replay:
            store = f"replay store memory (its own; the {self.store.kind} store is not used)"
        else:
            store = f"store {self.store.kind}"
        return "; ".join(parts) + f"; {store}"


def amount(limit: Limit, value: int | None = None) -> str:
    """A limit's count (or `value` in its unit) as people read it: `$5.000000` for a budget."""
    value = limit.count if value is None else value
    return usd_text(value) if limit.dimension == BUDGET else str(value)


def plural(count: int, noun: str) -> str:
    """`1 key`, `2 keys`: counts in log lines read as written English."""
    return f"{count} {noun}" if count == 1 else f"{count} {noun}s"


def parse_duration(text: Any) -> int:
    """'30s' / '1m' / '1h' / '1d' -> seconds; anything else raises ValueError."""
    match = _DURATION.match(str(text)) if isinstance(text, (str, int)) else None
    if not match:
        raise ValueError(
            f"bad duration {text!r}: use a whole number and one of s, m, h, d (e.g. 1m)"
        )
    return int(match.group(1)) * _UNIT_SECONDS[match.group(2)]


class _Reader:
    """Walks a Document, checking shapes and turning mistakes into ConfigErrors."""

    def __init__(self, doc: Document, check_credentials: bool = True) -> None:
        self.doc = doc
        self.check_credentials = check_credentials  # read the secrets the file points to

    def mapping(
        self, value: Any, where: Where, allowed: set[str], required: set[str] = frozenset()
    ):
        if not isinstance(value, dict):
            raise self.doc.error(where, f"{self._name(where)} must be a mapping")
        for key in value:
            if key not in allowed:
                known = ", ".join(sorted(allowed))
                raise self.doc.error((*where, key), f"unknown field {key!r} (known: {known})")
        for key in sorted(required):
            if key not in value:
                raise self.doc.error(where, f"{self._name(where)} needs {key!r}")
        return value

    def entries(self, value: Any, where: Where) -> dict:
        """A mapping of user-chosen names (providers, proxies, keys)."""
        if value is None:
            return {}
        return self.mapping(value, where, set(value) if isinstance(value, dict) else set())

    def string(self, value: Any, where: Where) -> str:
        if not isinstance(value, str) or not value.strip():
            raise self.doc.error(where, f"{self._name(where)} must be a non-empty string")
        return value

    def environment(self, value: Any, where: Where) -> str:
        """The value of the environment variable named at `where` (secrets stay out of files)."""
        variable = self.string(value, where)
        found = os.environ.get(variable, "").strip()
        if not found:
            raise self.doc.error(where, f"environment variable {variable} is not set or empty")
        return found

    def count(self, value: Any, where: Where, minimum: int) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise self.doc.error(where, f"{self._name(where)} must be a whole number >= {minimum}")
        return value

    def name(self, value: Any, where: Where) -> str:
        if not isinstance(value, str) or not _NAME.match(value):
            raise self.doc.error(
                where, f"bad name {value!r}: letters, digits, '.', '_', '-' (at most 64)"
            )
        return value

    @staticmethod
    def _name(where: Where) -> str:
        return ".".join(str(part) for part in where) or "the file"


def _provider(reader: _Reader, name: str, raw: Any) -> Provider:
    where: Where = ("providers", name)
    reader.name(name, where)
    kind = raw.get("kind", DEFAULT_DIALECT) if isinstance(raw, dict) else DEFAULT_DIALECT
    if not isinstance(kind, str) or kind not in DIALECTS:
        raise reader.doc.error(
            (*where, "kind"), f"kind must be one of {', '.join(DIALECTS)}, not {kind!r}"
        )
    settings = DIALECTS[kind].settings
    fields = {"kind", "base_url", "api_key_env", "api_key_file", "hosts", *settings}
    reader.mapping(raw, where, fields, {"base_url"})
    try:
        dialect = DIALECTS[kind].make(**{s: raw[s] for s in settings if s in raw})
    except InvalidSetting as e:
        raise reader.doc.error((*where, e.setting), str(e)) from e
    base_url = reader.string(raw["base_url"], (*where, "base_url"))
    parts = urlsplit(base_url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise reader.doc.error((*where, "base_url"), f"base_url {base_url!r} is not an http(s) URL")
    if "api_key_env" in raw and "api_key_file" in raw:
        raise reader.doc.error(
            where, f"provider {name!r} takes one of api_key_env, api_key_file (none: keyless)"
        )
    if "api_key_env" not in raw and "api_key_file" not in raw:
        api_key = None  # a keyless server (a local model): nothing is set upstream
    elif not reader.check_credentials:
        api_key = ""
    elif "api_key_env" in raw:
        api_key = reader.environment(raw["api_key_env"], (*where, "api_key_env"))
    else:
        key_path = Path(reader.string(raw["api_key_file"], (*where, "api_key_file")))
        if not key_path.is_absolute():
            key_path = reader.doc.path.parent / key_path
        try:
            api_key = key_path.read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as e:
            raise reader.doc.error(
                (*where, "api_key_file"), f"cannot read key file {key_path}: {e}"
            ) from e
        if not api_key:
            raise reader.doc.error((*where, "api_key_file"), f"key file {key_path} is empty")
    hosts_raw = raw.get("hosts", [parts.hostname])
    if not isinstance(hosts_raw, list) or not hosts_raw:
        raise reader.doc.error((*where, "hosts"), "hosts must be a non-empty list of host names")
    hosts = []
    for index, host in enumerate(hosts_raw):
        host = reader.string(host, (*where, "hosts", index))
        if not _HOST.match(host):
            raise reader.doc.error((*where, "hosts", index), f"bad host name {host!r}")
        hosts.append(host.lower())
    return Provider(
        name=name,
        base_url=base_url.rstrip("/"),
        api_key=api_key,
        hosts=tuple(hosts),
        dialect=dialect,
    )


def _globs(reader: _Reader, raw: Any, where: Where) -> tuple[str, ...]:
    """`models:`: a non-empty list of model names or globs (`gpt-4o*`)."""
    if not isinstance(raw, list) or not raw:
        raise reader.doc.error(where, "models must be a non-empty list of model names or globs")
    for index, pattern in enumerate(raw):
        if not isinstance(pattern, str) or not _GLOB.match(pattern):
            raise reader.doc.error(
                (*where, index),
                f"bad glob {pattern!r}: a model name with * ? or [...], no spaces, every [ closed",
            )
    return tuple(raw)


def _usd(reader: _Reader, value: Any, where: Where) -> int:
    """`usd:` as whole micro-dollars, exactly."""
    micro = None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        try:
            micro = Decimal(str(value)) * MICRO_USD
        except InvalidOperation:
            micro = None
    if micro is None or not micro.is_finite() or micro <= 0:
        raise reader.doc.error(where, f"usd must be a positive number of dollars, not {value!r}")
    if micro != micro.to_integral_value():
        raise reader.doc.error(where, f"usd {value!r} is finer than a micro-dollar (0.000001)")
    return int(micro)


def _limit_list(
    reader: _Reader, raw: Any, where: Where, dimension: str, weight: Fraction = Fraction(1)
) -> list[Limit]:
    """One dimension's limits: `{count, duration}` (a budget: `{usd, duration}`), each with
    an optional `models:` filter and `scope:`; ranked by duration, then place in the file."""
    unit = "usd" if dimension == BUDGET else "count"
    if not isinstance(raw, list) or not raw:
        raise reader.doc.error(
            where, f"{where[-1]} must be a non-empty list of {{{unit}, duration}}"
        )
    limits: list[Limit] = []
    for index, item in enumerate(raw):
        item_where = (*where, index)
        reader.mapping(item, item_where, {unit, "duration", "models", "scope"}, {unit, "duration"})
        if dimension == BUDGET:
            count = _usd(reader, item[unit], (*item_where, unit))
        else:
            count = reader.count(item[unit], (*item_where, unit), 1)
        try:
            seconds = parse_duration(item["duration"])
        except ValueError as e:
            raise reader.doc.error((*item_where, "duration"), str(e)) from None
        if dimension == BUDGET and seconds > MAX_BUDGET_SECONDS:
            raise reader.doc.error(
                (*item_where, "duration"),
                f"a budget's duration is at most 31d, not {item['duration']}",
            )
        models = _globs(reader, item["models"], (*item_where, "models")) if "models" in item else ()
        scope = item.get("scope")
        if scope is not None and scope not in SCOPES:
            raise reader.doc.error(
                (*item_where, "scope"), f"scope must be one of {', '.join(SCOPES)}, not {scope!r}"
            )
        limit = Limit(dimension, count, seconds, str(item["duration"]), None, models, scope)
        if dimension in TOKEN_DIMENSIONS:
            limit = replace(limit, cached_weight=weight)
        if any(
            (other.seconds, other.models, other.scope) == (seconds, models, scope)
            for other in limits
        ):
            raise reader.doc.error(
                (*item_where, "duration"),
                f"a second {dimension} limit per {item['duration']} of the same models and "
                f"scope: keep one (the lower {unit})",
            )
        limits.append(limit)
    ranked = sorted(range(len(limits)), key=lambda i: limits[i].seconds)
    for rank, index in enumerate(ranked):
        limits[index] = replace(limits[index], rank=rank)
    return limits


def _weights(reader: _Reader, raw: Any, where: Where) -> Fraction:
    """`weights:`: what a cached prompt token counts in token limits, 0 to 1 (default 1)."""
    reader.mapping(raw, where, set(WEIGHTS))
    value = raw.get("cached_prompt_tokens", 1)
    weight_where = (*where, "cached_prompt_tokens")
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:
        raise reader.doc.error(
            weight_where, f"cached_prompt_tokens must be a number from 0 to 1, not {value!r}"
        )
    return Fraction(Decimal(str(value)))


def _timestamp(reader: _Reader, value: Any, where: Where) -> float | None:
    if value is None:
        return None
    try:
        return parse_timestamp(value)
    except ValueError as e:
        raise reader.doc.error(where, str(e)) from None


def _proxy(
    reader: _Reader,
    name: str,
    raw: Any,
    providers: dict[str, Provider],
    seen_keys: dict[str, tuple[str, str]],
) -> Proxy:
    where: Where = ("proxies", name)
    reader.name(name, where)
    reader.mapping(
        raw,
        where,
        {
            "version",
            "context",
            "provider",
            "scope",
            "token_limits",
            "request_limits",
            "completion_reserve",
            "keys",
            "fail",
            "queue_wait",
            "models",
            "strict",
            "budgets",
            "weights",
        },
        {"context", "provider"},
    )
    context = reader.string(raw["context"], (*where, "context")).rstrip("/")
    if not context.startswith("/") or "?" in context or "#" in context:
        raise reader.doc.error(
            (*where, "context"), f"context {raw['context']!r} must be a path like /my-proxy"
        )
    provider_name = reader.string(raw["provider"], (*where, "provider"))
    if provider_name not in providers:
        known = ", ".join(sorted(providers)) or "none defined"
        raise reader.doc.error(
            (*where, "provider"), f"provider {provider_name!r} is not defined (providers: {known})"
        )
    scope = raw.get("scope", "key")
    if scope not in SCOPES:
        raise reader.doc.error(
            (*where, "scope"), f"scope must be one of {', '.join(SCOPES)}, not {scope!r}"
        )
    weight = _weights(reader, raw["weights"], (*where, "weights")) if "weights" in raw else 1
    limits: list[Limit] = []
    token_limits = raw.get("token_limits", {})
    if not isinstance(token_limits, dict):
        raise reader.doc.error((*where, "token_limits"), f"{name}.token_limits must be a mapping")
    for dimension, items in token_limits.items():
        dimension_where = (*where, "token_limits", dimension)
        if dimension not in TOKEN_DIMENSIONS:
            raise reader.doc.error(
                dimension_where,
                f"unknown dimension {dimension!r} (known: {', '.join(TOKEN_DIMENSIONS)})",
            )
        limits += _limit_list(reader, items, dimension_where, dimension, Fraction(weight))
    if "request_limits" in raw:
        limits += _limit_list(reader, raw["request_limits"], (*where, "request_limits"), REQUESTS)
    if "budgets" in raw:
        limits += _limit_list(reader, raw["budgets"], (*where, "budgets"), BUDGET)
    models = _globs(reader, raw["models"], (*where, "models")) if "models" in raw else ()
    strict = raw.get("strict", False)
    if not isinstance(strict, bool):
        raise reader.doc.error((*where, "strict"), f"strict must be true or false, not {strict!r}")
    fail = raw.get("fail", "closed")
    if fail not in FAIL_MODES:
        raise reader.doc.error(
            (*where, "fail"), f"fail must be one of {', '.join(FAIL_MODES)}, not {fail!r}"
        )
    reserve = raw.get("completion_reserve", DEFAULT_COMPLETION_RESERVE)
    reserve = reader.count(reserve, (*where, "completion_reserve"), 0)
    queue_wait = 0
    if "queue_wait" in raw:
        try:
            queue_wait = parse_duration(raw["queue_wait"])
        except ValueError as e:
            raise reader.doc.error((*where, "queue_wait"), str(e)) from None
    version = raw.get("version")
    if version is not None:
        version = str(version)
    keys_raw = raw.get("keys")
    if keys_raw is None:  # absent, or `keys:` left with comments only (every key revoked)
        keys_raw = {}
    reader.mapping(
        keys_raw, (*where, "keys"), set(keys_raw) if isinstance(keys_raw, dict) else set()
    )
    keys = []
    for key_name, entry in keys_raw.items():
        key_where = (*where, "keys", key_name)
        reader.name(key_name, key_where)
        reader.mapping(entry, key_where, {"sha256", "created", "expires"}, {"sha256"})
        digest = entry["sha256"]
        if not isinstance(digest, str) or not _SHA256_HEX.match(digest):
            raise reader.doc.error(
                (*key_where, "sha256"),
                "sha256 must be 64 lowercase hex digits (scripts/keys.py writes it)",
            )
        if digest in seen_keys:
            other_proxy, other_name = seen_keys[digest]
            raise reader.doc.error(
                key_where,
                f"key {key_name!r} has the same secret as key {other_name!r} "
                f"of proxy {other_proxy!r}",
            )
        seen_keys[digest] = (name, key_name)
        created, expires = (
            _timestamp(reader, entry.get(field), (*key_where, field))
            for field in ("created", "expires")
        )
        keys.append(StoredKey(key_name, digest, created=created, expires=expires))
    return Proxy(
        name=name,
        version=version,
        context=context,
        provider=providers[provider_name],
        scope=scope,
        limits=tuple(limits),
        completion_reserve=reserve,
        keys=KeyRing(keys),
        fail=fail,
        queue_wait=queue_wait,
        models=models,
        strict=strict,
    )


def _store(reader: _Reader, raw: Any) -> StoreSpec:
    """The `store:` entry; SQLite beside the quotas file when absent."""
    where: Where = ("store",)
    if raw is None:
        raw = {"kind": "sqlite"}
    fields = {"kind", "path", "url", "url_env", "cluster", "cluster_nodes", "reservation_timeout"}
    reader.mapping(raw, where, fields, {"kind"})
    kind = raw["kind"]
    if kind not in STORE_KINDS:
        raise reader.doc.error(
            (*where, "kind"), f"kind must be one of {', '.join(STORE_KINDS)}, not {kind!r}"
        )
    redis_fields = {"url", "url_env", "cluster", "cluster_nodes"}
    allowed = {"sqlite": {"path"}, "redis": redis_fields, "memory": set()}[kind]
    for field_name in ("path", *sorted(redis_fields)):
        if field_name in raw and field_name not in allowed:
            raise reader.doc.error((*where, field_name), f"{field_name} does not apply to {kind}")
    timeout = DEFAULT_RESERVATION_TIMEOUT
    if "reservation_timeout" in raw:
        try:
            timeout = parse_duration(raw["reservation_timeout"])
        except ValueError as e:
            raise reader.doc.error((*where, "reservation_timeout"), str(e)) from None
    if kind == "memory":
        return StoreSpec("memory", reservation_timeout=timeout)
    if kind == "sqlite":
        path = Path(reader.string(raw.get("path", DEFAULT_STORE_PATH), (*where, "path")))
        if not path.is_absolute():
            path = reader.doc.path.parent / path
        return StoreSpec("sqlite", path=path, reservation_timeout=timeout)
    if ("url" in raw) == ("url_env" in raw):
        raise reader.doc.error(where, "a redis store needs exactly one of url, url_env")
    cluster = _cluster(reader, raw, where)
    if "url_env" in raw:
        if not reader.check_credentials:
            reader.string(raw["url_env"], (*where, "url_env"))
            return StoreSpec("redis", reservation_timeout=timeout, **cluster)
        url = reader.environment(raw["url_env"], (*where, "url_env"))
    else:
        url = reader.string(raw["url"], (*where, "url"))
    url_where = (*where, "url_env" if "url_env" in raw else "url")
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 (parsing it is the check)
    except ValueError:
        # Not the URL itself: it may hold a password. A password with :/?#@ must be %-encoded.
        raise reader.doc.error(
            url_where, "the redis URL does not parse (percent-encode special characters in it)"
        ) from None
    if parts.scheme not in ("redis", "rediss", "unix"):
        raise reader.doc.error(
            url_where, "the redis URL must start with redis://, rediss:// or unix://"
        )
    if cluster["cluster"] and parts.scheme == "unix":
        raise reader.doc.error(url_where, "a Redis Cluster is reached over redis:// or rediss://")
    if cluster["cluster"] and parts.path not in ("", "/", "/0"):
        raise reader.doc.error(url_where, "a Redis Cluster has only database 0 (end the URL /0)")
    return StoreSpec("redis", url=url, reservation_timeout=timeout, **cluster)


def _cluster(reader: _Reader, raw: dict, where: Where) -> dict:
    """`cluster: true` and its extra seeds `cluster_nodes` ("host:port"), as StoreSpec fields.

    The URL is a seed and says how to reach every node (password, TLS); `cluster_nodes` are
    more seeds, as redis-py's `startup_nodes`: the slot map is read from any that answers.
    """
    cluster = raw.get("cluster", False)
    if not isinstance(cluster, bool):
        raise reader.doc.error((*where, "cluster"), "cluster must be true or false")
    if "cluster_nodes" not in raw:
        return {"cluster": cluster}
    nodes_where = (*where, "cluster_nodes")
    if not cluster:
        raise reader.doc.error(nodes_where, "cluster_nodes needs cluster: true")
    listed = raw["cluster_nodes"]
    if not isinstance(listed, list) or not listed:
        raise reader.doc.error(nodes_where, "cluster_nodes must be a list of host:port")
    nodes = []
    for i, node in enumerate(listed):
        text = reader.string(node, (*nodes_where, i))
        try:
            parts = urlsplit(f"//{text}")
            port = parts.port
        except ValueError:
            port = None
        if not port or not parts.hostname or parts.netloc != text or "@" in text:
            raise reader.doc.error((*nodes_where, i), f"{text!r} is not host:port")
        nodes.append((parts.hostname, port))
    return {"cluster": True, "cluster_nodes": tuple(nodes)}


def _prices(reader: _Reader, raw: Any) -> dict[str, Price]:
    """The `prices:` entry: USD per 1M tokens by model name (or glob), before the bundled table."""
    prices = {}
    for model, entry in reader.entries(raw, ("prices",)).items():
        where: Where = ("prices", model)
        reader.string(model, where)
        try:
            prices[model] = parse_price(entry)
        except PriceError as e:
            raise reader.doc.error((*where, e.field) if e.field else where, str(e)) from None
    return prices


def load_config(path: Path | str, check_credentials: bool = True) -> Config:
    """Read and validate a quotas file; raises ConfigError naming file, line and reason.

    `check_credentials=False` skips reading secrets (provider keys, a Redis URL from the
    environment): tools that edit the file (the key script) validate it where the gate's
    environment variables need not be set.
    """
    doc = load_document(path)
    reader = _Reader(doc, check_credentials)
    top = reader.mapping(
        doc.data, (), {"providers", "proxies", "store", "prices"}, {"providers", "proxies"}
    )
    providers = {
        name: _provider(reader, name, raw)
        for name, raw in reader.entries(top["providers"], ("providers",)).items()
    }
    _one_dialect_per_host(doc, providers)
    seen_keys: dict[str, tuple[str, str]] = {}
    proxies = {
        name: _proxy(reader, name, raw, providers, seen_keys)
        for name, raw in reader.entries(top["proxies"], ("proxies",)).items()
    }
    contexts: dict[str, str] = {}
    for proxy in proxies.values():
        for other_context, other in contexts.items():
            if _path_prefix(proxy.context, other_context) or _path_prefix(
                other_context, proxy.context
            ):
                raise doc.error(
                    ("proxies", proxy.name, "context"),
                    f"context {proxy.context} overlaps {other_context} of proxy {other!r}",
                )
        contexts[proxy.context] = proxy.name
    store = _store(reader, top.get("store"))
    prices = _prices(reader, top.get("prices"))
    return Config(Path(path), providers, proxies, store, prices)


def _one_dialect_per_host(doc: Document, providers: dict[str, Provider]) -> None:
    """Regular mode reads a host's traffic in the dialect of its first proxy: providers that
    share a host must speak the same API."""
    speakers: dict[str, Provider] = {}
    for provider in providers.values():
        for index, host in enumerate(provider.hosts):
            other = speakers.setdefault(host, provider)
            if other.dialect.name != provider.dialect.name:
                raise doc.error(
                    ("providers", provider.name, "hosts", index),
                    f"host {host} is also a host of provider {other.name!r}, which speaks "
                    f"{other.dialect.name}, not {provider.dialect.name}: a host's traffic is "
                    "read in one API",
                )


def _path_prefix(prefix: str, path: str) -> bool:
    return path == prefix or path.startswith(prefix + "/")
