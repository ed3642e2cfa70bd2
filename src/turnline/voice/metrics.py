"""Prometheus metrics of the voice pipeline, on the runtime's registry (served at /metrics)."""

from __future__ import annotations

import weakref

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram


class VoiceMetrics:
    def __init__(self, registry: CollectorRegistry):
        r = registry
        self.barge_in_latency = Histogram(
            "turnline_voice_barge_in_latency_seconds",
            "Automatic barge-in: the input frame with the user's speech onset received, to the agent's audio stopped",
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.1, 0.2, 0.5, 1.0, 2.5), registry=r)
        self.interruptions = Counter("turnline_voice_interruptions", "Speech interruptions, by reason and mode",
                                     ["reason", "mode"], registry=r)
        self.false_interruptions = Counter(
            "turnline_voice_false_interruptions", "Paused speech resumed: the user's voice carried no words",
            registry=r)
        self.sessions = Gauge("turnline_voice_sessions", "Voice sessions running", registry=r)
        self.inputs_rejected = Counter(
            "turnline_voice_inputs_rejected", "User utterances not sent because the voice session ended first",
            registry=r)
        self.revisions = Counter("turnline_voice_history_revisions",
                                 "Interrupted turns persisted as heard (turn-revised), by history policy",
                                 ["history"], registry=r)


_by_registry: weakref.WeakKeyDictionary[CollectorRegistry, VoiceMetrics] = weakref.WeakKeyDictionary()


def voice_metrics(registry: CollectorRegistry) -> VoiceMetrics:
    """One set per registry (a registry refuses a metric registered twice)."""
    found = _by_registry.get(registry)
    if found is None:
        found = _by_registry[registry] = VoiceMetrics(registry)
    return found
