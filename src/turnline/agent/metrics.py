"""Prometheus metrics, one registry per runtime (so tests and embedders never clash)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None):
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.turns_started = Counter("turnline_turns_started", "Turns started", registry=r)
        self.turns_ended = Counter("turnline_turns_ended", "Turns ended, by reason", ["reason"], registry=r)
        self.late_chunks = Counter(
            "turnline_late_chunks_dropped", "Chunks an agent wrote after its turn ended (dropped)", registry=r)
        self.cancels = Counter("turnline_cancel_requests", "Cancel requests, by outcome", ["outcome"], registry=r)
        self.abort_latency = Histogram(
            "turnline_abort_latency_seconds", "Cancel received to abort signal fired",
            buckets=(0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.05, 0.25, 1.0), registry=r)
        self.events_appended = Counter("turnline_events_appended", "Events appended to session logs", registry=r)
        self.active_turns = Gauge("turnline_active_turns", "Turns running now", registry=r)
        self.connections = Gauge("turnline_ws_connections", "Open WebSocket connections", registry=r)
        self.frame_errors = Counter("turnline_frame_errors", "Error frames sent, by code", ["code"], registry=r)
        self.store_errors = Counter("turnline_store_errors", "Failed appends", registry=r)
        self.limit_refusals = Counter("turnline_limit_refusals", "Requests refused rate_limited, by limit "
                                      "(docs/limits.md)", ["limit"], registry=r)
