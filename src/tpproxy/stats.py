"""Traffic counters kept as plain integers on the hot path.

Relays add to these attributes directly (no locks, no label look-ups per chunk); the Prometheus
collector in `tpproxy.metrics` reads them only when `/metrics` is scraped.
"""

from __future__ import annotations

from bisect import bisect_left
from dataclasses import dataclass, field


@dataclass(slots=True, eq=False)
class TrafficStats:
    """Counters for one (listener port, route, target) combination."""

    port: int
    route: str
    target: str
    connections_total: int = 0
    connections_open: int = 0
    connect_errors: int = 0
    resets: int = 0
    joined: int = 0
    bytes_to_target: int = 0
    bytes_to_client: int = 0


class StatsBook:
    """All counters of an engine: one `TrafficStats` per (port, route, target)."""

    __slots__ = ("_entries", "_http")

    def __init__(self) -> None:
        self._entries: dict[tuple[int, str, str], TrafficStats] = {}
        self._http: dict[int, HttpStats] = {}

    def http(self, port: int) -> HttpStats:
        """The HTTP counters of a port, kept for the life of the engine."""
        stats = self._http.get(port)
        if stats is None:
            stats = self._http[port] = HttpStats(port, {}, [0] * (len(LATENCY_BUCKETS) + 1))
        return stats

    def http_entries(self) -> list[HttpStats]:
        """A snapshot of every port that has served HTTP."""
        return list(self._http.values())

    def entry(self, port: int, route: str, target: str) -> TrafficStats:
        """The counters for this combination, kept for the life of the engine."""
        key = (port, route, target)
        stats = self._entries.get(key)
        if stats is None:
            stats = self._entries[key] = TrafficStats(port, route, target)
        return stats

    def entries(self) -> list[TrafficStats]:
        """A snapshot of every combination seen so far."""
        return list(self._entries.values())


LATENCY_BUCKETS = (
    0.00001,
    0.000025,
    0.00005,
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.01,
    0.1,
    1.0,
)


@dataclass(slots=True, eq=False)
class HttpStats:
    """Per-port HTTP counters: requests by (route, outcome) and the latency the proxy adds.

    The added latency of a request is the time from its head being complete to its first byte
    being handed to the target's connection (parsing, routing and, for a new upstream
    connection, connecting).
    """

    port: int
    requests: dict[tuple[str, str], int]
    latency_counts: list[int]
    latency_sum: float = 0.0
    latency_count: int = 0
    ticks: int = 0  # requests seen, for sampling the added latency
    forwarded: dict[str, int] = field(default_factory=dict)  # by route: the hot counter

    def count(self, route: str, outcome: str) -> None:
        key = (route, outcome)
        self.requests[key] = self.requests.get(key, 0) + 1

    def outcomes(self) -> dict[tuple[str, str], int]:
        """Every (route, outcome) count, `forwarded` included."""
        merged = dict(self.requests)
        for route, count in list(self.forwarded.items()):
            merged[(route, "forwarded")] = count
        return merged

    def observe(self, seconds: float) -> None:
        self.latency_sum += seconds
        self.latency_count += 1
        self.latency_counts[bisect_left(LATENCY_BUCKETS, seconds)] += 1  # last slot: +Inf
