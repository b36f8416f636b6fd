"""Limits, buckets and a hand-moved clock for the limiter and store tests."""

from __future__ import annotations

from tokengate_core.config import Limit
from tokengate_core.limiter import Bucket

T0 = 1_000.0


class FakeClock:
    """A clock the test moves by hand; the store calls it for `now`."""

    def __init__(self, now: float = T0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds

    def at(self, when: float) -> None:
        self.now = when


def limit(dimension: str, count: int, seconds: int, label: str | None = None) -> Limit:
    return Limit(dimension, count, seconds, label or f"{seconds}s")


def total(count: int, seconds: int = 60) -> Limit:
    return limit("total_tokens", count, seconds)


def buckets(*limits: Limit, scope: str = "k") -> tuple[Bucket, ...]:
    return tuple(Bucket(f"p:{scope}:{lim.name}", lim) for lim in limits)
