"""Charges in a SQLite file (WAL mode): spent budget survives a restart of mitmdump.

Per bucket: one `windows` row (running `used` and `reserved`, the newest stamp, and lower
bounds on the oldest stamp and the oldest pending one), settled charges merged into at most
SLOTS + 1 `slots` rows per duration (`limiter.slot_of`), and one `pending` row per reservation
in flight. A decision reads the `windows` rows of all its buckets in one statement; the slots
and pending rows are only read when something may have left the window or gone stale (the lower
bounds say when) and by a refused request (to tell when it will fit). All sqlite work runs on
one dedicated thread that owns the connection: the event loop never waits on the disk. The
operations queued while that thread is busy run together in its next `BEGIN IMMEDIATE`
transaction, each in a savepoint of its own: each is atomic, several processes on one file stay
atomic, and under concurrency one commit serves many requests.

A reservation left unsettled for `stale_after` seconds (its process died, or its settle never
came) counts as settled at its reserved amount: never lost, and a late settle finds it settled
and changes nothing, so it is never charged twice.
"""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from ..config import Limit
from ..limiter import Bucket, Charge, Decision, Demand, LimitStatus, Usage, decide_on, slot_of
from . import STALE_AFTER, Reservation, StoreUnavailable

BUSY_TIMEOUT = 2.0  # seconds to wait for another process's transaction before giving up

SCHEMA = """
CREATE TABLE IF NOT EXISTS windows (
    bucket TEXT PRIMARY KEY,
    used INTEGER NOT NULL,
    reserved INTEGER NOT NULL,
    newest REAL NOT NULL,  -- the newest stamp held: the window is whole again at newest + duration
    oldest REAL NOT NULL,  -- no stamp held is older: nothing leaves before oldest + duration
    since REAL             -- no pending stamp is older; NULL when nothing is pending
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS slots (
    bucket TEXT NOT NULL,
    span INTEGER NOT NULL,  -- the window's duration when the slot was made (slot width: span/SLOTS)
    slot INTEGER NOT NULL,
    stamp REAL NOT NULL,    -- the newest stamp merged in: the slot leaves the window with it
    amount INTEGER NOT NULL,
    PRIMARY KEY (bucket, span, slot)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS pending (
    bucket TEXT NOT NULL,
    rid TEXT NOT NULL,
    stamp REAL NOT NULL,
    amount INTEGER NOT NULL,
    PRIMARY KEY (bucket, rid)  -- no second index: each write touches one page fewer
) WITHOUT ROWID;
"""

MERGE = (
    "INSERT INTO slots (bucket, span, slot, stamp, amount) VALUES (?, ?, ?, ?, ?) "
    "ON CONFLICT (bucket, span, slot) DO UPDATE "
    "SET stamp = max(stamp, excluded.stamp), amount = amount + excluded.amount"
)
CHARGES = """
SELECT stamp, amount, 1 AS settled FROM slots WHERE bucket = :bucket
UNION ALL SELECT stamp, amount, 0 FROM pending WHERE bucket = :bucket
"""
# used, reserved, newest, oldest, oldest pending, records: a window's head, from its rows.
HEAD = f"""
SELECT TOTAL(amount * settled), TOTAL(amount * (1 - settled)), MAX(stamp), MIN(stamp),
       MIN(CASE WHEN settled = 0 THEN stamp END), COUNT(*)
FROM ({CHARGES})
"""


Job = tuple[Callable, tuple, "asyncio.Future"]  # an operation, its arguments, its answer


def _answer(answers: list[asyncio.Future], outcomes: list[tuple[bool, object]]) -> None:
    """On the event loop: hand each queued operation its result or its exception."""
    for answer, (ok, value) in zip(answers, outcomes, strict=True):
        if answer.done():  # its caller was cancelled
            continue
        if ok:
            answer.set_result(value)
        else:
            answer.set_exception(value)


@dataclass(slots=True)
class Head:
    """A `windows` row while a transaction works on it."""

    used: int
    reserved: int
    newest: float
    oldest: float
    since: float | None

    def row(self, key: str) -> tuple:
        return (key, self.used, self.reserved, self.newest, self.oldest, self.since)

    def status(self, limit: Limit) -> LimitStatus:
        return LimitStatus(limit, self.used, self.reserved, self.newest + limit.seconds)

    def due(self, seconds: int, stale_after: float, now: float) -> bool:
        """Whether something may have left the window or gone stale by `now`."""
        return self.oldest + seconds <= now or (
            self.since is not None and self.since + stale_after <= now
        )


def marks(buckets: tuple[Bucket, ...]) -> str:
    """Placeholders for the buckets' keys in an `IN (...)`."""
    return ", ".join("?" * len(buckets))


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
        self._closed = False
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tokengate-sqlite")
        self._queue: deque[Job] = deque()  # appended on the event loop, taken on the worker
        self._drain_due = False  # a drain is submitted and has not yet started taking the queue

    # -- the worker thread -------------------------------------------------------------------

    def _connection(self) -> sqlite3.Connection:
        if self._db is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            db = sqlite3.connect(self.path, timeout=self.busy_timeout, isolation_level=None)
            try:
                self._use_wal(db)
                # With WAL, NORMAL survives a crash of the process (not of the machine's power).
                db.execute("PRAGMA synchronous=NORMAL")
                db.executescript(f"BEGIN IMMEDIATE; {SCHEMA}")
                self._migrate(db)
                db.execute("COMMIT")
            except BaseException:
                db.close()
                raise
            self._db = db
        return self._db

    def _batch(self, jobs: list[Job]) -> list[tuple[bool, object]]:
        """Run queued operations in one write transaction (a savepoint each, so one that fails
        leaves the others), and return (ok, result or exception) for each, once committed."""
        try:
            db = self._connection()
            db.execute("BEGIN IMMEDIATE")
            try:
                outcomes = [self._one(db, function, args) for function, args, _ in jobs]
                db.execute("COMMIT")
                return outcomes
            except BaseException:
                if db.in_transaction:
                    db.execute("ROLLBACK")
                raise
        except (OSError, sqlite3.DatabaseError) as e:
            self._drop_connection()  # reconnect on the next call, e.g. once the disk is back
            return [(False, StoreUnavailable(f"sqlite store {self.path}: {e}"))] * len(jobs)

    def _one(self, db: sqlite3.Connection, function: Callable, args: tuple) -> tuple[bool, object]:
        db.execute("SAVEPOINT operation")
        try:
            result = function(db, self.clock(), *args)
        except Exception as e:
            db.execute("ROLLBACK TO operation")
            db.execute("RELEASE operation")
            if isinstance(e, (OSError, sqlite3.DatabaseError)):
                e = StoreUnavailable(f"sqlite store {self.path}: {e}")
            return False, e
        db.execute("RELEASE operation")
        return True, result

    def _drain(self, loop: asyncio.AbstractEventLoop) -> None:
        """Take every operation queued so far and answer each on the event loop."""
        self._drain_due = False  # before taking: what is queued from now on needs another drain
        jobs: list[Job] = []
        while self._queue:
            jobs.append(self._queue.popleft())
        if not jobs:
            return
        try:
            outcomes = self._batch(jobs)
        except BaseException as e:  # nothing may leave a caller waiting forever
            outcomes = [(False, e)] * len(jobs)
        loop.call_soon_threadsafe(_answer, [job[2] for job in jobs], outcomes)

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

    def _drop_connection(self) -> None:
        if self._db is not None:
            try:
                self._db.close()
            finally:
                self._db = None

    @staticmethod
    def _migrate(db: sqlite3.Connection) -> None:
        """Fold a file written before slots (one `charges` row per reservation and bucket) into
        slots and pending rows, so an upgrade keeps the spent budget."""
        if not db.execute("SELECT 1 FROM sqlite_master WHERE name = 'charges'").fetchone():
            return
        rows = db.execute("SELECT rid, bucket, stamp, expires, amount, settled FROM charges")
        buckets = set()
        for rid, bucket, stamp, expires, amount, settled in rows.fetchall():
            buckets.add(bucket)
            if settled:
                span = round(expires - stamp)
                db.execute(MERGE, (bucket, span, slot_of(stamp, span), stamp, amount))
            else:
                db.execute("INSERT INTO pending VALUES (?, ?, ?, ?)", (bucket, rid, stamp, amount))
        db.execute("DROP TABLE charges")
        db.execute("DROP TABLE IF EXISTS totals")
        for bucket in buckets:
            SqliteStore._rebuild(db, bucket)

    @staticmethod
    def _rebuild(db: sqlite3.Connection, key: str) -> Head | None:
        """Write a bucket's `windows` row anew from its slots and pending rows; None if empty."""
        used, reserved, newest, oldest, since, records = db.execute(
            HEAD, {"bucket": key}
        ).fetchone()
        if not records:
            db.execute("DELETE FROM windows WHERE bucket = ?", (key,))
            return None
        head = Head(int(used), int(reserved), newest, oldest, since)
        db.execute("INSERT OR REPLACE INTO windows VALUES (?, ?, ?, ?, ?, ?)", head.row(key))
        return head

    def _prune(self, db: sqlite3.Connection, bucket: Bucket, head: Head, now: float) -> Head | None:
        """Drop what left the window, count stale reservations as settled (as memory.Window
        does); only called when the head's lower bounds say something may be due."""
        seconds, key = bucket.limit.seconds, bucket.key
        if head.oldest + seconds <= now:
            where = "WHERE bucket = :b AND stamp <= :cut AND stamp + :s <= :now"
            bounds = {"b": key, "s": seconds, "now": now, "cut": now - seconds + 1}
            db.execute(f"DELETE FROM slots {where}", bounds)
            db.execute(f"DELETE FROM pending {where}", bounds)
        stale = db.execute(
            "DELETE FROM pending WHERE bucket = :b AND stamp <= :cut AND stamp + :s <= :now "
            "RETURNING stamp, amount",
            {"b": key, "s": self.stale_after, "now": now, "cut": now - self.stale_after + 1},
        ).fetchall()
        merges = [(key, seconds, slot_of(stamp, seconds), stamp, amount) for stamp, amount in stale]
        db.executemany(MERGE, merges)
        return self._rebuild(db, key)

    def _heads(
        self, db: sqlite3.Connection, buckets: tuple[Bucket, ...], now: float
    ) -> list[Head | None]:
        """The buckets' heads in one statement, each pruned first when something may be due."""
        rows = db.execute(
            f"SELECT bucket, used, reserved, newest, oldest, since FROM windows "
            f"WHERE bucket IN ({marks(buckets)})",
            [b.key for b in buckets],
        )
        found = {key: Head(*head) for key, *head in rows}
        heads = []
        for bucket in buckets:
            head = found.get(bucket.key)
            if head is not None and head.due(bucket.limit.seconds, self.stale_after, now):
                head = self._prune(db, bucket, head, now)
            heads.append(head)
        return heads

    @staticmethod
    def _write(db: sqlite3.Connection, buckets: tuple[Bucket, ...], heads: list) -> None:
        db.executemany(
            "INSERT OR REPLACE INTO windows VALUES (?, ?, ?, ?, ?, ?)",
            [head.row(b.key) for b, head in zip(buckets, heads, strict=True) if head is not None],
        )

    @staticmethod
    def _statuses(
        buckets: tuple[Bucket, ...], heads: list[Head | None], now: float
    ) -> tuple[LimitStatus, ...]:
        return tuple(
            LimitStatus(bucket.limit, 0, 0, now) if head is None else head.status(bucket.limit)
            for bucket, head in zip(buckets, heads, strict=True)
        )

    @staticmethod
    def _charges(db: sqlite3.Connection, bucket: Bucket) -> list[Charge]:
        rows = db.execute(CHARGES, {"bucket": bucket.key})
        return [Charge(stamp, amount, bool(settled)) for stamp, amount, settled in rows]

    def _reserve(
        self,
        db: sqlite3.Connection,
        now: float,
        reservation_id: str,
        buckets: tuple[Bucket, ...],
        demand: Demand,
    ) -> tuple[Decision, Reservation | None]:
        heads = self._heads(db, buckets, now)
        statuses = self._statuses(buckets, heads, now)
        decision = decide_on(statuses, lambda i: self._charges(db, buckets[i]), demand, now)
        if not decision.admitted:
            return decision, None
        # Stamps never go backwards in a window, even if a clock does (as in memory.py).
        stamp = max([now, *(head.newest for head in heads if head is not None)])
        amounts = decision.reserved
        pending = []
        for index, bucket in enumerate(buckets):
            amount = amounts.amount(bucket.limit.dimension)
            pending.append((bucket.key, reservation_id, stamp, amount))
            head = heads[index] = heads[index] or Head(0, 0, stamp, stamp, None)
            head.reserved += amount
            head.newest = stamp
            if head.since is None:
                head.since = stamp
        db.executemany("INSERT INTO pending VALUES (?, ?, ?, ?)", pending)
        self._write(db, buckets, heads)
        held = Decision(True, self._statuses(buckets, heads, now), reserved=amounts)
        return held, Reservation(reservation_id, stamp, buckets, amounts)

    def _replace(
        self, db: sqlite3.Connection, now: float, reservation: Reservation, usage: Usage | None
    ) -> tuple[LimitStatus, ...]:
        buckets = reservation.buckets
        heads = self._heads(db, buckets, now)
        held = db.execute(
            f"DELETE FROM pending WHERE bucket IN ({marks(buckets)}) AND rid = ? "
            "RETURNING bucket, stamp, amount",
            [*(b.key for b in buckets), reservation.id],
        ).fetchall()
        if not held:  # settled or released already, or stale: nothing changes
            return self._statuses(buckets, heads, now)
        index_of = {bucket.key: index for index, bucket in enumerate(buckets)}
        merges = []
        for key, stamp, amount in held:
            index = index_of[key]
            if usage is None:  # the newest stamp may go back: read the window anew
                heads[index] = self._rebuild(db, key)
                continue
            limit = buckets[index].limit
            settled = usage.amount(limit.dimension)
            merges.append((key, limit.seconds, slot_of(stamp, limit.seconds), stamp, settled))
            heads[index].used += settled
            heads[index].reserved -= amount
        if merges:
            db.executemany(MERGE, merges)
            self._write(db, buckets, heads)
        return self._statuses(buckets, heads, now)

    def _status(
        self, db: sqlite3.Connection, now: float, buckets: tuple[Bucket, ...]
    ) -> tuple[LimitStatus, ...]:
        return self._statuses(buckets, self._heads(db, buckets, now), now)

    # -- the Store interface (event loop side) -----------------------------------------------

    async def _run(self, function: Callable, *args):
        """Queue `function(db, now, *args)` for the worker thread. Operations queued while it
        is busy run together in its next transaction: under concurrency, one commit serves many
        requests (each still atomic, in a savepoint of its own)."""
        loop = asyncio.get_running_loop()
        answer = loop.create_future()
        self._queue.append((function, args, answer))
        if not self._drain_due:  # else the drain already submitted takes this one too
            self._drain_due = True
            try:
                self._worker.submit(self._drain, loop)
            except BaseException:
                self._drain_due = False
                raise
        return await answer

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
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self._worker, self._drop_connection)  # after queued work
        self._worker.shutdown(wait=True)
