"""Charges in a SQLite file (WAL mode): spent budget survives a restart of mitmdump.

One row per (reservation, bucket). Triggers keep a running total per bucket exact on every
insert, update and delete, so a decision reads two numbers and the newest charge instead of
summing a window; only a refused request reads its windows' charges (to tell when it will fit).
Every operation is one `BEGIN IMMEDIATE` transaction, so several processes on one file stay
atomic. All sqlite work runs on one dedicated thread that owns the connection: the event loop
never waits on the disk.

A reservation left unsettled for `stale_after` seconds (its process died, or its settle never
came) counts as settled at its reserved amount: never lost, and a late settle finds it settled
and changes nothing, so it is never charged twice.
"""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from ..limiter import Bucket, Charge, Decision, Demand, LimitStatus, Usage, decide_on
from . import STALE_AFTER, Reservation, StoreUnavailable

BUSY_TIMEOUT = 2.0  # seconds to wait for another process's transaction before giving up

SCHEMA = """
CREATE TABLE IF NOT EXISTS charges (
    rid TEXT NOT NULL,
    bucket TEXT NOT NULL,
    stamp REAL NOT NULL,
    expires REAL NOT NULL,  -- stamp + the bucket's window: when it leaves the window
    amount INTEGER NOT NULL,
    settled INTEGER NOT NULL,
    UNIQUE (rid, bucket)
);
CREATE INDEX IF NOT EXISTS charges_by_bucket ON charges (bucket, stamp);
CREATE INDEX IF NOT EXISTS charges_by_expiry ON charges (expires);
CREATE INDEX IF NOT EXISTS pending_by_stamp ON charges (stamp) WHERE settled = 0;
CREATE TABLE IF NOT EXISTS totals (
    bucket TEXT PRIMARY KEY,
    used INTEGER NOT NULL DEFAULT 0,
    reserved INTEGER NOT NULL DEFAULT 0
);
CREATE TRIGGER IF NOT EXISTS charge_added AFTER INSERT ON charges BEGIN
    INSERT OR IGNORE INTO totals (bucket) VALUES (NEW.bucket);
    UPDATE totals SET used = used + NEW.amount * NEW.settled,
                      reserved = reserved + NEW.amount * (1 - NEW.settled)
    WHERE bucket = NEW.bucket;
END;
CREATE TRIGGER IF NOT EXISTS charge_changed AFTER UPDATE ON charges BEGIN
    INSERT OR IGNORE INTO totals (bucket) VALUES (NEW.bucket);
    UPDATE totals SET used = used - OLD.amount * OLD.settled + NEW.amount * NEW.settled,
                      reserved = reserved - OLD.amount * (1 - OLD.settled)
                                          + NEW.amount * (1 - NEW.settled)
    WHERE bucket = NEW.bucket;
END;
CREATE TRIGGER IF NOT EXISTS charge_removed AFTER DELETE ON charges BEGIN
    UPDATE totals SET used = used - OLD.amount * OLD.settled,
                      reserved = reserved - OLD.amount * (1 - OLD.settled)
    WHERE bucket = OLD.bucket;
    DELETE FROM totals WHERE bucket = OLD.bucket AND used = 0 AND reserved = 0;
END;
"""

WINDOW = """
SELECT (SELECT used FROM totals WHERE bucket = :bucket),
       (SELECT reserved FROM totals WHERE bucket = :bucket),
       (SELECT MAX(stamp) FROM charges WHERE bucket = :bucket)
"""


class SqliteStore:
    """The embedded default store; see the module docstring for how it keeps its books."""

    def __init__(
        self,
        path: Path,
        clock: Callable[[], float] = time.time,
        stale_after: float = STALE_AFTER,
        busy_timeout: float = BUSY_TIMEOUT,
    ) -> None:
        self.path = Path(path)
        self.clock = clock
        self.stale_after = stale_after
        self.busy_timeout = busy_timeout
        self._db: sqlite3.Connection | None = None  # used only on the worker thread
        self._seconds: dict[str, int] = {}  # bucket -> the duration its rows expire by
        self._closed = False
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tokengate-sqlite")

    # -- the worker thread -------------------------------------------------------------------

    def _connection(self) -> sqlite3.Connection:
        if self._db is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            db = sqlite3.connect(self.path, timeout=self.busy_timeout, isolation_level=None)
            try:
                self._use_wal(db)
                # With WAL, NORMAL survives a crash of the process (not of the machine's power).
                db.execute("PRAGMA synchronous=NORMAL")
                db.executescript(f"BEGIN IMMEDIATE; {SCHEMA} COMMIT;")
            except BaseException:
                db.close()
                raise
            self._db = db
        return self._db

    def _transaction(
        self, buckets: tuple[Bucket, ...], work: Callable[[sqlite3.Connection, float], object]
    ):
        """Run `work(db, now)` in one write transaction, after expiring and settling stale rows."""
        try:
            db = self._connection()
            db.execute("BEGIN IMMEDIATE")
            try:
                now = self.clock()
                fitted = self._fit_windows(db, buckets)
                db.execute("DELETE FROM charges WHERE expires <= ?", (now,))
                # The first bound lets the partial index find the rows; the second is the exact
                # test, written as the other stores write it (stamp + stale_after <= now).
                db.execute(
                    "UPDATE charges SET settled = 1 WHERE settled = 0 AND stamp <= :cut "
                    "AND stamp + :stale <= :now",
                    {"cut": now - self.stale_after + 1, "stale": self.stale_after, "now": now},
                )
                result = work(db, now)
                db.execute("COMMIT")
                self._seconds.update(fitted)
                return result
            except BaseException:
                if db.in_transaction:
                    db.execute("ROLLBACK")
                raise
        except (OSError, sqlite3.DatabaseError) as e:
            self._drop_connection()  # reconnect on the next call, e.g. once the disk is back
            raise StoreUnavailable(f"sqlite store {self.path}: {e}") from e

    def _use_wal(self, db: sqlite3.Connection) -> None:
        """Switch the file to WAL. Another process opening a new file at the same moment makes
        the switch fail with "locked" at once (SQLite's busy handler does not cover it), so
        look again until the busy timeout, as for any other lock."""
        deadline = time.monotonic() + self.busy_timeout
        while True:
            try:
                db.execute("PRAGMA journal_mode=WAL")
                return
            except sqlite3.OperationalError as e:
                if "locked" not in str(e) or time.monotonic() >= deadline:
                    raise
            time.sleep(0.01)  # on the store's worker thread, never the event loop

    def _fit_windows(self, db: sqlite3.Connection, buckets: tuple[Bucket, ...]) -> dict:
        """Give a bucket's rows the duration its limit has now (a reload may have changed it),
        so a window is read with its current duration, as the other stores read it. Done once
        per bucket and duration in this process; returns what to remember after the commit."""
        fitted = {}
        for bucket in buckets:
            seconds = bucket.limit.seconds
            if self._seconds.get(bucket.key) != seconds:
                db.execute(
                    "UPDATE charges SET expires = stamp + :s WHERE bucket = :b "
                    "AND expires <> stamp + :s",
                    {"s": seconds, "b": bucket.key},
                )
                fitted[bucket.key] = seconds
        return fitted

    def _drop_connection(self) -> None:
        if self._db is not None:
            try:
                self._db.close()
            finally:
                self._db = None

    @staticmethod
    def _windows(db: sqlite3.Connection, buckets: tuple[Bucket, ...]) -> list[tuple]:
        """(used, reserved, newest stamp) per bucket; None where the window is empty."""
        return [db.execute(WINDOW, {"bucket": b.key}).fetchone() for b in buckets]

    @staticmethod
    def _statuses(
        buckets: tuple[Bucket, ...], windows: list[tuple], now: float
    ) -> tuple[LimitStatus, ...]:
        return tuple(
            LimitStatus(
                bucket.limit,
                used or 0,
                reserved or 0,
                now if last is None else last + bucket.limit.seconds,
            )
            for bucket, (used, reserved, last) in zip(buckets, windows, strict=True)
        )

    @staticmethod
    def _charges(db: sqlite3.Connection, bucket: Bucket) -> list[Charge]:
        rows = db.execute(
            "SELECT stamp, amount, settled FROM charges WHERE bucket = ? ORDER BY stamp",
            (bucket.key,),
        )
        return [Charge(stamp, amount, bool(settled)) for stamp, amount, settled in rows]

    def _reserve(
        self, reservation_id: str, buckets: tuple[Bucket, ...], demand: Demand
    ) -> tuple[Decision, Reservation | None]:
        def work(db: sqlite3.Connection, now: float):
            rows = self._windows(db, buckets)
            statuses = self._statuses(buckets, rows, now)
            decision = decide_on(statuses, lambda i: self._charges(db, buckets[i]), demand, now)
            if not decision.admitted:
                return decision, None
            # Stamps never go backwards in a window, even if a clock does (as in memory.py).
            stamp = max([now, *(last for _, _, last in rows if last is not None)])
            amounts = decision.reserved
            db.executemany(
                "INSERT INTO charges (rid, bucket, stamp, expires, amount, settled) "
                "VALUES (?, ?, ?, ?, ?, 0)",
                [
                    (
                        reservation_id,
                        b.key,
                        stamp,
                        stamp + b.limit.seconds,
                        amounts.amount(b.limit.dimension),
                    )
                    for b in buckets
                ],
            )
            after = self._statuses(buckets, self._windows(db, buckets), now)
            held = Decision(True, after, reserved=amounts)
            return held, Reservation(reservation_id, stamp, buckets, amounts)

        return self._transaction(buckets, work)

    def _replace(self, reservation: Reservation, usage: Usage | None) -> tuple[LimitStatus, ...]:
        def work(db: sqlite3.Connection, now: float):
            for bucket in reservation.buckets:
                where = (reservation.id, bucket.key)
                if usage is None:
                    db.execute(
                        "DELETE FROM charges WHERE rid = ? AND bucket = ? AND settled = 0", where
                    )
                else:
                    db.execute(
                        "UPDATE charges SET amount = ?, settled = 1 "
                        "WHERE rid = ? AND bucket = ? AND settled = 0",
                        (usage.amount(bucket.limit.dimension), *where),
                    )
            return self._statuses(reservation.buckets, self._windows(db, reservation.buckets), now)

        return self._transaction(reservation.buckets, work)

    def _status(self, buckets: tuple[Bucket, ...]) -> tuple[LimitStatus, ...]:
        return self._transaction(
            buckets, lambda db, now: self._statuses(buckets, self._windows(db, buckets), now)
        )

    # -- the Store interface (event loop side) -----------------------------------------------

    async def _run(self, function, *args):
        return await asyncio.get_running_loop().run_in_executor(self._worker, function, *args)

    async def reserve(
        self, reservation_id: str, buckets: tuple[Bucket, ...], demand: Demand
    ) -> tuple[Decision, Reservation | None]:
        return await self._run(self._reserve, reservation_id, buckets, demand)

    async def settle(self, reservation: Reservation, usage: Usage) -> tuple[LimitStatus, ...]:
        return await self._run(self._replace, reservation, usage)

    async def release(self, reservation: Reservation) -> tuple[LimitStatus, ...]:
        return await self._run(self._replace, reservation, None)

    async def status(self, buckets: tuple[Bucket, ...]) -> tuple[LimitStatus, ...]:
        return await self._run(self._status, buckets)

    async def close(self) -> None:
        """Close the database; call once at shutdown (a second call does nothing)."""
        if self._closed:
            return
        self._closed = True
        await self._run(self._drop_connection)
        self._worker.shutdown(wait=True)
