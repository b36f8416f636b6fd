"""Charges in a SQLite file (WAL mode): spent budget survives a restart of mitmdump.

Per bucket, a `window.Window` kept in rows: one `windows` row (its head: running `used` and
`reserved`, the newest stamp, and lower bounds on the oldest stamp and the oldest pending one),
settled charges merged into at most SLOTS + 1 `slots` rows per duration, and one `pending` row
per reservation in flight. This module only reads and writes those rows: the window's rules
(pruning, slot merging, stale reservations, admission) are `window.py`'s, as in the memory
store. A decision reads the `windows` rows of all its buckets in one statement; the slots and
pending rows are only read when something may have left the window or gone stale (the lower
bounds say when), by a release (the newest stamp may go back) and by a refused request (to tell
when it will fit); a settle reads the one slot it merges into. All sqlite work runs on
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
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from ..limiter import Bucket, Charge, Decision, Demand, LimitStatus, Usage, charged
from . import STALE_AFTER, Reservation, StoreUnavailable
from .window import SlotKey, Window, admit, slot_key, statuses

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
CREATE TABLE IF NOT EXISTS learned (  -- learned estimates (estimates.py), one row per key
    key TEXT PRIMARY KEY,
    record TEXT NOT NULL
) WITHOUT ROWID;
"""

SLOT_ROWS = "SELECT span, slot, stamp, amount FROM slots WHERE bucket = ?"
PENDING_ROWS = "SELECT rid, stamp, amount FROM pending WHERE bucket = ? ORDER BY stamp"
ONE_SLOT = (
    "SELECT bucket, span, slot, stamp, amount FROM slots WHERE bucket = ? AND span = ? AND slot = ?"
)
WRITE_SLOT = "INSERT OR REPLACE INTO slots VALUES (?, ?, ?, ?, ?)"
WRITE_HEAD = "INSERT OR REPLACE INTO windows VALUES (?, ?, ?, ?, ?, ?)"


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


def head_row(key: str, window: Window) -> tuple:
    """A window's `windows` row."""
    return (key, window.used, window.reserved, window.newest, window.oldest, window.since)


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
        windows, so an upgrade keeps the spent budget: each row is held again in stamp order,
        and a settled one settled at once."""
        if not db.execute("SELECT 1 FROM sqlite_master WHERE name = 'charges'").fetchone():
            return
        rows = db.execute("SELECT rid, bucket, stamp, expires, amount, settled FROM charges")
        windows: dict[str, Window] = {}
        for rid, key, stamp, expires, amount, settled in sorted(rows, key=lambda row: row[2]):
            window = windows.setdefault(key, Window.opened(stamp))
            window.hold(rid, Charge(stamp, amount, False))
            if settled:
                window.settle(rid, amount, round(expires - stamp))
        db.execute("DROP TABLE charges")
        db.execute("DROP TABLE IF EXISTS totals")
        for key, window in windows.items():
            SqliteStore._save(db, key, window, {}, set())

    @staticmethod
    def _read(db: sqlite3.Connection, key: str, window: Window) -> Window:
        """The window with every record of its bucket restored into it."""
        slots = db.execute(SLOT_ROWS, (key,))
        pending = db.execute(PENDING_ROWS, (key,))
        window.restore(
            (((span, slot), Charge(stamp, amount, True)) for span, slot, stamp, amount in slots),
            ((rid, Charge(stamp, amount, False)) for rid, stamp, amount in pending),
        )
        return window

    @staticmethod
    def _save(
        db: sqlite3.Connection,
        key: str,
        window: Window,
        slots: dict[SlotKey, Charge],
        pending: set[str],
    ) -> None:
        """Write what changed in a window since its records were `slots` and `pending`; an
        empty window leaves no row."""
        db.executemany(
            "DELETE FROM slots WHERE bucket = ? AND span = ? AND slot = ?",
            [(key, *slot) for slot in slots if slot not in window.slots],
        )
        db.executemany(
            WRITE_SLOT,
            [
                (key, *slot, charge.stamp, charge.amount)
                for slot, charge in window.slots.items()
                if slots.get(slot) is not charge
            ],
        )
        db.executemany(
            "DELETE FROM pending WHERE bucket = ? AND rid = ?",
            [(key, rid) for rid in pending if rid not in (window.pending or ())],
        )
        db.executemany(
            "INSERT INTO pending VALUES (?, ?, ?, ?)",
            [
                (key, rid, charge.stamp, charge.amount)
                for rid, charge in (window.pending or {}).items()
                if rid not in pending
            ],
        )
        if window.empty:
            db.execute("DELETE FROM windows WHERE bucket = ?", (key,))
        else:
            db.execute(WRITE_HEAD, head_row(key, window))

    def _pruned(
        self, db: sqlite3.Connection, bucket: Bucket, window: Window, now: float
    ) -> Window | None:
        """The window pruned (`Window.prune`) and saved; None when nothing is left."""
        self._read(db, bucket.key, window)
        slots, pending = dict(window.slots), set(window.pending or ())
        alive = window.prune(bucket.limit.seconds, now, self.stale_after)
        self._save(db, bucket.key, window, slots, pending)
        return window if alive else None

    def _windows(
        self, db: sqlite3.Connection, buckets: tuple[Bucket, ...], now: float
    ) -> list[Window | None]:
        """The buckets' windows from their heads in one statement, each pruned first when
        something may be due."""
        rows = db.execute(
            f"SELECT bucket, used, reserved, newest, oldest, since FROM windows "
            f"WHERE bucket IN ({marks(buckets)})",
            [b.key for b in buckets],
        )
        found = {key: Window(*head) for key, *head in rows}
        windows = []
        for bucket in buckets:
            window = found.get(bucket.key)
            if window is not None and window.due(bucket.limit.seconds, now, self.stale_after):
                window = self._pruned(db, bucket, window, now)
            windows.append(window)
        return windows

    @staticmethod
    def _write(
        db: sqlite3.Connection, buckets: tuple[Bucket, ...], windows: list[Window | None]
    ) -> None:
        db.executemany(
            WRITE_HEAD,
            [head_row(b.key, w) for b, w in zip(buckets, windows, strict=True) if w is not None],
        )

    def _reserve(
        self,
        db: sqlite3.Connection,
        now: float,
        reservation_id: str,
        buckets: tuple[Bucket, ...],
        demand: Demand,
    ) -> tuple[Decision, Reservation | None]:
        windows = self._windows(db, buckets, now)
        decision, reservation = admit(
            reservation_id,
            buckets,
            windows,
            demand,
            now,
            lambda i: self._read(db, buckets[i].key, windows[i]).charges(),
        )
        if reservation is None:
            return decision, None
        held = [window.pending[reservation_id] for window in windows]
        db.executemany(
            "INSERT INTO pending VALUES (?, ?, ?, ?)",
            [
                (bucket.key, reservation_id, charge.stamp, charge.amount)
                for bucket, charge in zip(buckets, held, strict=True)
            ],
        )
        self._write(db, buckets, windows)
        return decision, reservation

    def _replace(
        self, db: sqlite3.Connection, now: float, reservation: Reservation, usage: Usage | None
    ) -> tuple[LimitStatus, ...]:
        buckets = reservation.buckets
        windows = self._windows(db, buckets, now)
        held = db.execute(
            f"DELETE FROM pending WHERE bucket IN ({marks(buckets)}) AND rid = ? "
            "RETURNING bucket, stamp, amount",
            [*(b.key for b in buckets), reservation.id],
        ).fetchall()
        if not held:  # settled or released already, or stale: nothing changes
            return statuses(buckets, windows, now)
        index_of = {bucket.key: index for index, bucket in enumerate(buckets)}
        if usage is not None:  # the slots the reservation merges into
            keys = [
                (key, *slot_key(stamp, buckets[index_of[key]].limit.seconds))
                for key, stamp, _ in held
            ]
            rows = db.execute(
                " UNION ALL ".join([ONE_SLOT] * len(keys)), [part for key in keys for part in key]
            )
            for key, span, slot, stamp, amount in rows:
                windows[index_of[key]].restore([((span, slot), Charge(stamp, amount, True))], ())
        slots = []
        for key, stamp, amount in held:
            index = index_of[key]
            window, limit = windows[index], buckets[index].limit
            if usage is None:  # the newest stamp may go back: the rule needs every record
                self._read(db, key, window)
            window.restore((), [(reservation.id, Charge(stamp, amount, False))])
            settled = None if usage is None else charged(limit, usage)
            slot = window.settle(reservation.id, settled, limit.seconds)
            if slot is not None:
                slots.append((key, *slot, window.slots[slot].stamp, window.slots[slot].amount))
            elif window.empty:
                db.execute("DELETE FROM windows WHERE bucket = ?", (key,))
                windows[index] = None
        db.executemany(WRITE_SLOT, slots)
        self._write(db, buckets, windows)
        return statuses(buckets, windows, now)

    def _status(
        self, db: sqlite3.Connection, now: float, buckets: tuple[Bucket, ...]
    ) -> tuple[LimitStatus, ...]:
        return statuses(buckets, self._windows(db, buckets, now), now)

    @staticmethod
    def _learned(db: sqlite3.Connection, now: float) -> dict[str, str]:
        return dict(db.execute("SELECT key, record FROM learned"))

    @staticmethod
    def _learn(
        db: sqlite3.Connection, now: float, updates: Mapping[str, Callable[[str | None], str]]
    ) -> dict[str, str]:
        for key, update in updates.items():
            row = db.execute("SELECT record FROM learned WHERE key = ?", (key,)).fetchone()
            record = update(row[0] if row else None)
            db.execute("INSERT OR REPLACE INTO learned VALUES (?, ?)", (key, record))
        return SqliteStore._learned(db, now)

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

    async def learned(self) -> dict[str, str]:
        return await self._run(self._learned)

    async def learn(self, updates: Mapping[str, Callable[[str | None], str]]) -> dict[str, str]:
        return await self._run(self._learn, updates)

    async def close(self) -> None:
        """Close the database; call once at shutdown (a second call does nothing)."""
        if self._closed:
            return
        self._closed = True
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self._worker, self._drop_connection)  # after queued work
        self._worker.shutdown(wait=True)
