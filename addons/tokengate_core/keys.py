"""Caller keys: generated once, stored only as SHA-256, looked up without comparing secrets.

A caller key is 32 random bytes, so an unsalted SHA-256 is as strong as the key itself (this is
how GitHub and Stripe store API tokens). Lookup hashes the presented key first and then compares
digests with `hmac.compare_digest`: the secret itself is never compared, and timing can reveal
nothing useful about a digest of a high-entropy key.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

KEY_PREFIX = "tg-"


@dataclass(frozen=True)
class StoredKey:
    name: str
    sha256: str


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


def caller_key(headers: Mapping[str, str]) -> str | None:
    """The caller's key from `X-API-Key` or `Authorization: Bearer`, as the OpenAI SDK sends it."""
    explicit = headers.get("x-api-key", "").strip()
    if explicit:
        return explicit
    scheme, _, token = headers.get("authorization", "").strip().partition(" ")
    if scheme.lower() == "bearer" and token.strip():
        return token.strip()
    return None
