"""What the metrics page reads when Prometheus asks, on the server's thread: levels rather than
events (reservations in flight, requests waiting, the store up, ledger lines lost, each limit
and what each key has left of it). A flow pays nothing for them.

Everything here is read, never changed, from the event loop's objects: counters and lengths,
the configuration in force (replaced whole by a reload) and a copy of the standing per key.
"""

from __future__ import annotations

import heapq
import threading
from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from .audit import LedgerWriter

if TYPE_CHECKING:
    from .metrics import Metrics


class Levels(Collector):
    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics
        self._ledger = LedgerCount()

    def collect(self) -> Iterator[Metric]:
        metrics = self.metrics
        quota = metrics.quota
        yield GaugeMetricFamily(
            "tokengate_reservations_in_flight",
            "Reservations held by admitted requests not settled yet.",
            value=quota.in_flight,
        )
        yield GaugeMetricFamily(
            "tokengate_queue_waiting",
            "Requests waiting for in-flight reservations now (queue_wait).",
            value=quota.waiting,
        )
        up = GaugeMetricFamily(
            "tokengate_store_up", "1 while the usage store answers, 0 while it is down.",
            labels=("store",),
        )  # fmt: skip
        config = metrics.gate.config
        if config is not None:
            up.add_metric((config.store.kind,), int(quota.accounting.down_since is None))
        yield up
        yield CounterMetricFamily(
            "tokengate_ledger_lines_dropped",
            "Ledger lines lost (disk full or not keeping up).",
            value=self.ledger_lost(),
        )
        yield from self._quotas()

    def _quotas(self) -> Iterator[Metric]:
        """Each limit's count, and what each key has left of it: for the `max_keys` keys with
        the least left. A window whose duration has passed since the key's last answer is
        whole again."""
        metrics = self.metrics
        config = metrics.gate.config
        limits = GaugeMetricFamily(
            "tokengate_quota_limit", "Each limit's count.", labels=("proxy", "limit")
        )
        remaining = GaugeMetricFamily(
            "tokengate_quota_remaining",
            "What a key (or a shared proxy, key '*') has left of each limit, as of its last "
            "answer.",
            labels=("proxy", "key", "limit"),
        )
        windows = {}
        for proxy in config.proxies.values() if config else ():
            windows[proxy.name] = {limit.name: limit for limit in proxy.limits}
            for limit in proxy.limits:
                limits.add_metric((proxy.name, limit.name), limit.count)
        now = metrics.gate.clock()
        rows = []
        for (proxy, who), (when, left) in metrics.standing.copy().items():
            figures = [
                (name, limit.count if now - when >= limit.seconds else left[name], limit.count)
                for name, limit in windows.get(proxy, {}).items()
                if name in left
            ]
            if figures:
                share = min(value / count if count else 0.0 for _, value, count in figures)
                rows.append((share, proxy, who, figures))
        bound = metrics.max_keys
        for _, proxy, who, figures in heapq.nsmallest(bound, rows, key=lambda row: row[0]):
            for name, value, _ in figures:
                remaining.add_metric((proxy, who, name), value)
        yield limits
        yield remaining
        yield GaugeMetricFamily(
            "tokengate_quota_keys_omitted",
            "Keys whose remaining gauge is not exported (beyond tokengate_metrics_keys).",
            value=max(0, len(rows) - bound),
        )

    def ledger_lost(self) -> int:
        return self._ledger.total(self.metrics.reporting.writer)


class LedgerCount:
    """Ledger lines lost since start, across the writers an option change replaces (a writer
    replaced between two scrapes is read once more, whole, at the next)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()  # scrapes may run at once
        self._writer: LedgerWriter | None = None
        self._before = 0  # lost by the writers replaced

    def total(self, writer: LedgerWriter | None) -> int:
        with self._lock:
            if writer is not self._writer:
                if self._writer is not None:
                    self._before += self._writer.lost
                self._writer = writer
            return self._before + (writer.lost if writer else 0)
