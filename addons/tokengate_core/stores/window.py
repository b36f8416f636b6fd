"""One bucket's rolling window, the rule every Python store applies to its charges.

The memory store keeps one `Window` per bucket for good; the SQLite store builds one per
operation from its `windows` row, `restore`s into it the records the rule needs (all of them when
it prunes or releases, the one slot a settle merges into), and writes back what changed. Redis
applies the same rule in Lua (lua/window.lua), and the conformance suite holds all three to it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

from ..limiter import (
    Bucket,
    Charge,
    Decision,
    Demand,
    Limit,
    LimitStatus,
    charged,
    decide_on,
    merged,
    slot_of,
)
from . import Reservation

SlotKey = tuple[int, int]  # (the duration the slot was made for, the slot: `limiter.slot_of`)


def slot_key(stamp: float, seconds: int) -> SlotKey:
    """The slot a charge stamped `stamp` settles into, in a window of `seconds`. Keyed by the
    duration too: after a duration edit the old slots keep their own width and leave the window
    by their stamp and the new duration."""
    return seconds, slot_of(stamp, seconds)


class Window:
    """A bucket's charges: settled ones merged into slots, reservations in flight one by one,
    with running totals (`used`, `reserved`) so a check is O(1).

    `pending` keeps stamp order (stamps never go backwards in a window: a clock that does is
    clamped to the newest stamp), so what left the window or went stale is found from the front;
    it is None while nothing is in flight, to save the empty dict of idle keys. `oldest` and
    `since` are lower bounds on the oldest stamp and the oldest pending one (None: nothing
    pending): until one of them is due (`due`), nothing can have left or gone stale, so most
    checks skip pruning. `newest` is the newest stamp: the window is whole again at newest +
    duration.
    """

    __slots__ = ("newest", "oldest", "pending", "reserved", "since", "slots", "used")

    def __init__(
        self, used: int, reserved: int, newest: float, oldest: float, since: float | None
    ) -> None:
        self.used = used
        self.reserved = reserved
        self.newest = newest
        self.oldest = oldest
        self.since = since
        self.slots: dict[SlotKey, Charge] = {}
        self.pending: dict[str, Charge] | None = None

    @classmethod
    def opened(cls, stamp: float) -> Window:
        """An empty window for a first charge stamped `stamp`."""
        return cls(0, 0, stamp, stamp, None)

    def restore(
        self, slots: Iterable[tuple[SlotKey, Charge]], pending: Iterable[tuple[str, Charge]]
    ) -> None:
        """Put records read from storage into the window (its totals already count them);
        `pending` in stamp order."""
        self.slots.update(slots)
        for reservation_id, charge in pending:
            if self.pending is None:
                self.pending = {}
            self.pending[reservation_id] = charge

    def due(self, seconds: int, now: float, stale_after: float) -> bool:
        """Whether something may have left the window or gone stale by `now`."""
        return self.oldest + seconds <= now or (
            self.since is not None and self.since + stale_after <= now
        )

    def prune(self, seconds: int, now: float, stale_after: float) -> bool:
        """Drop what left the window; count reservations older than `stale_after` as settled at
        their reserved amount. Needs every record of the window. False when nothing is left."""
        if self.oldest + seconds <= now:
            kept = {key: slot for key, slot in self.slots.items() if slot.stamp + seconds > now}
            if len(kept) != len(self.slots):
                self.slots = kept
                self.used = sum(slot.amount for slot in kept.values())
            while self.pending:
                reservation_id, oldest = next(iter(self.pending.items()))
                if oldest.stamp + seconds > now:
                    break
                del self.pending[reservation_id]
                self.reserved -= oldest.amount
            self.pending = self.pending or None
            if self.empty:
                return False
            self.oldest = min(charge.stamp for charge in self.charges())
        while self.pending:
            reservation_id, oldest = next(iter(self.pending.items()))
            if oldest.stamp + stale_after > now:
                break
            self.settle(reservation_id, oldest.amount, seconds)
        self.since = next(iter(self.pending.values())).stamp if self.pending else None
        return True

    def hold(self, reservation_id: str, charge: Charge) -> None:
        """Hold a reservation; its stamp is the newest (see `admit`)."""
        if self.pending is None:
            self.pending = {}
        self.pending[reservation_id] = charge
        self.reserved += charge.amount
        self.newest = charge.stamp
        if self.since is None:
            self.since = charge.stamp

    def settle(self, reservation_id: str, amount: int | None, seconds: int) -> SlotKey | None:
        """Merge a pending charge into its slot at `amount`, or drop it when `amount` is None
        (which needs every record: the newest stamp may go back). The key of the slot that
        changed, if one did."""
        held = self.pending.pop(reservation_id, None) if self.pending else None
        if held is None:
            return None
        self.pending = self.pending or None
        self.reserved -= held.amount
        if amount is None:
            if held.stamp == self.newest and not self.empty:
                self.newest = max(charge.stamp for charge in self.charges())
            return None
        key = slot_key(held.stamp, seconds)
        self.slots[key] = merged(self.slots.get(key), held.stamp, amount)
        self.used += amount
        return key

    @property
    def empty(self) -> bool:
        return not self.slots and not self.pending

    def charges(self) -> list[Charge]:
        return [*self.slots.values(), *(self.pending or {}).values()]

    def status(self, limit: Limit) -> LimitStatus:
        return LimitStatus(limit, self.used, self.reserved, self.newest + limit.seconds)


def statuses(
    buckets: Sequence[Bucket], windows: Sequence[Window | None], now: float
) -> tuple[LimitStatus, ...]:
    """The buckets' windows as a caller sees them; a bucket without a window is whole."""
    return tuple(
        [
            LimitStatus(bucket.limit, 0, 0, now) if window is None else window.status(bucket.limit)
            for bucket, window in zip(buckets, windows, strict=True)
        ]
    )


def admit(
    reservation_id: str,
    buckets: tuple[Bucket, ...],
    windows: list[Window | None],
    demand: Demand,
    now: float,
    charges_of: Callable[[int], Sequence[Charge]],
) -> tuple[Decision, Reservation | None]:
    """Decide `demand` on the buckets' pruned windows (`limiter.decide_on`) and, if admitted,
    hold the reservation in every one; a bucket without a window gets a new one, put in
    `windows`. `charges_of(i)` gives window i's charges when it refuses (to tell when it will
    fit). Reported statuses include the reservation."""
    decision = decide_on(
        statuses(buckets, windows, now),
        lambda index: [] if windows[index] is None else charges_of(index),
        demand,
        now,
    )
    if not decision.admitted:
        return decision, None
    # Stamps never go backwards in a window, even if a clock does.
    stamp = max([now, *[window.newest for window in windows if window is not None]])
    amounts = decision.reserved
    for index, bucket in enumerate(buckets):
        window = windows[index]
        if window is None:
            window = windows[index] = Window.opened(stamp)
        window.hold(reservation_id, Charge(stamp, charged(bucket.limit, amounts), False))
    held = Decision(True, statuses(buckets, windows, now), reserved=amounts)
    return held, Reservation(reservation_id, stamp, buckets, amounts)
