"""Prometheus exposition of the engine's counters, read only when `/metrics` is scraped."""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import ProcessCollector
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
)
from prometheus_client.registry import Collector, CollectorRegistry

from tpproxy.engine import Engine
from tpproxy.stats import LATENCY_BUCKETS

_LABELS = ["port", "route", "target"]


class EngineCollector(Collector):
    """Turns an engine's `StatsBook` into metric families at scrape time."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def collect(
        self,
    ) -> Iterator[CounterMetricFamily | GaugeMetricFamily | HistogramMetricFamily]:
        opened = GaugeMetricFamily(
            "tpproxy_connections_open", "Connections accepted and not yet closed.", labels=_LABELS
        )
        total = CounterMetricFamily("tpproxy_connections", "Connections accepted.", labels=_LABELS)
        errors = CounterMetricFamily(
            "tpproxy_connect_errors",
            "Connections closed because their target could not be reached.",
            labels=_LABELS,
        )
        resets = CounterMetricFamily(
            "tpproxy_connection_resets", "Connections ended by a reset on one side.", labels=_LABELS
        )
        joined = CounterMetricFamily(
            "tpproxy_spliced_connections",
            "TCP connections that moved bulk data and were joined in the kernel with splice(2).",
            labels=_LABELS,
        )
        sent = CounterMetricFamily(
            "tpproxy_bytes",
            "Bytes forwarded, by direction (to_target: from clients; to_client: from targets).",
            labels=[*_LABELS, "direction"],
        )
        for s in self.engine.stats.entries():
            labels = [str(s.port), s.route, s.target]
            opened.add_metric(labels, s.connections_open)
            total.add_metric(labels, s.connections_total)
            errors.add_metric(labels, s.connect_errors)
            resets.add_metric(labels, s.resets)
            joined.add_metric(labels, s.joined)
            sent.add_metric([*labels, "to_target"], s.bytes_to_target)
            sent.add_metric([*labels, "to_client"], s.bytes_to_client)
        requests = CounterMetricFamily(
            "tpproxy_http_requests",
            "HTTP requests and HTTP/2 streams by port, route (intercept id, app, or - when "
            "refused before routing) and outcome (forwarded, fallback, unreachable, "
            "upstream_error, bad_request, too_large, timeout, reset).",
            labels=["port", "route", "outcome"],
        )
        latency = HistogramMetricFamily(
            "tpproxy_http_added_latency_seconds",
            "Time from a request head being complete to its first byte being handed to the "
            "target's connection (parsing, routing, and connecting a new connection if needed).",
            labels=["port"],
        )
        for h in self.engine.stats.http_entries():
            for (route, outcome), count in h.outcomes().items():
                requests.add_metric([str(h.port), route, outcome], count)
            cumulative, buckets = 0, []
            for bound, count in zip(LATENCY_BUCKETS, h.latency_counts, strict=False):
                cumulative += count
                buckets.append((repr(bound), cumulative))
            buckets.append(("+Inf", cumulative + h.latency_counts[-1]))
            latency.add_metric([str(h.port)], buckets, h.latency_sum)
        yield from (requests, latency)
        listening = GaugeMetricFamily(
            "tpproxy_listeners", "Ports the engine listens on.", value=len(self.engine.ports)
        )
        generation = GaugeMetricFamily(
            "tpproxy_config_generation",
            "How many route tables have been applied.",
            value=self.engine.generation,
        )
        yield from (opened, total, errors, resets, joined, sent, listening, generation)


def engine_registry(engine: Engine) -> CollectorRegistry:
    """A registry holding just this engine's metrics (no process-global state, one per engine)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(EngineCollector(engine))
    ProcessCollector(registry=registry)
    return registry
