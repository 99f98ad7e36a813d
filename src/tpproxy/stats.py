"""Traffic counters kept as plain integers on the hot path.

Relays add to these attributes directly (no locks, no label look-ups per chunk); the Prometheus
collector in `tpproxy.metrics` reads them only when `/metrics` is scraped.
"""

from __future__ import annotations

from dataclasses import dataclass


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
    bytes_to_target: int = 0
    bytes_to_client: int = 0


class StatsBook:
    """All counters of an engine: one `TrafficStats` per (port, route, target)."""

    __slots__ = ("_entries",)

    def __init__(self) -> None:
        self._entries: dict[tuple[int, str, str], TrafficStats] = {}

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
