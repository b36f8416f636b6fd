"""Caller keys: generated once, stored only as SHA-256, looked up without comparing secrets.

A caller key is 32 random bytes, so an unsalted SHA-256 is as strong as the key itself (this is
how GitHub and Stripe store API tokens). Lookup hashes the presented key first and then compares
digests with `hmac.compare_digest`: the secret itself is never compared, and timing can reveal
nothing useful about a digest of a high-entropy key.
"""

from __future__ import annotations

import datetime
import hashlib
import hmac
import secrets
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

KEY_PREFIX = "tg-"
# Where callers send a key: the OpenAI SDK (Bearer), curl users (X-API-Key), Azure's SDK (api-key).
CREDENTIAL_HEADERS = ("authorization", "x-api-key", "api-key")


@dataclass(frozen=True)
class StoredKey:
    name: str
    sha256: str
    created: float | None = None  # epoch seconds, as written by scripts/keys.py
    expires: float | None = None  # epoch seconds; from then on the key gets 401

    def expired(self, now: float) -> bool:
        return self.expires is not None and now >= self.expires


def parse_timestamp(value: object) -> float:
    """An ISO 8601 timestamp (a string, or the datetime YAML makes of an unquoted one) -> epoch.

    A timestamp without a zone is taken as UTC, so a file means the same on every machine.
    """
    if isinstance(value, datetime.datetime):
        moment = value
    elif isinstance(value, str):
        try:
            moment = datetime.datetime.fromisoformat(value.strip())
        except ValueError:
            raise ValueError(
                f"bad timestamp {value!r}: use ISO 8601, e.g. 2026-12-31T23:59:00Z"
            ) from None
    else:
        raise ValueError(f"bad timestamp {value!r}: use ISO 8601, e.g. 2026-12-31T23:59:00Z")
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=datetime.UTC)
    return moment.timestamp()


def format_timestamp(epoch: float) -> str:
    """Epoch seconds as the ISO 8601 UTC text the key script writes (second precision)."""
    moment = datetime.datetime.fromtimestamp(epoch, datetime.UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


def hash_key(secret: str) -> str:
    return hashlib.sha256(secret.encode("utf-8", "surrogateescape")).hexdigest()


def generate_key() -> str:
    """A new caller key: recognisable prefix plus 256 bits of randomness."""
    return KEY_PREFIX + secrets.token_urlsafe(32)


class KeyRing:
    """The keys of one proxy, indexed by digest."""

    def __init__(self, keys: list[StoredKey]) -> None:
        self._by_digest = {key.sha256: key for key in keys}

    def __len__(self) -> int:
        return len(self._by_digest)

    def __iter__(self) -> Iterator[StoredKey]:
        return iter(self._by_digest.values())

    def find(self, secret: str) -> StoredKey | None:
        digest = hash_key(secret)
        candidate = self._by_digest.get(digest)
        if candidate is not None and hmac.compare_digest(candidate.sha256, digest):
            return candidate
        return None


class ConflictingKeys(ValueError):
    """A request carries two different caller keys: which one speaks for the caller is unknown,
    so neither does."""

    def __init__(self, headers: list[str]) -> None:
        super().__init__(f"different keys in {', '.join(headers)}")
        self.headers = headers  # as the caller would write them, e.g. "X-API-Key"


def _presented(headers: Mapping[str, str]) -> Iterator[tuple[str, str]]:
    """(header as written, key) for each header that carries a caller key."""
    for name, written in (("x-api-key", "X-API-Key"), ("api-key", "api-key")):
        if value := headers.get(name, "").strip():
            yield written, value
    scheme, _, token = headers.get("authorization", "").strip().partition(" ")
    if scheme.lower() == "bearer" and token.strip():
        yield "Authorization: Bearer", token.strip()


def caller_key(headers: Mapping[str, str]) -> str | None:
    """The caller's key from `X-API-Key`, `Authorization: Bearer` (the OpenAI SDK's form) or
    `api-key` (Azure's); the same key in several of them is fine, different keys raise
    ConflictingKeys."""
    presented = list(_presented(headers))
    if len({key for _, key in presented}) > 1:
        raise ConflictingKeys([written for written, _ in presented])
    return presented[0][1] if presented else None
