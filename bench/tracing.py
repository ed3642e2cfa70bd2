"""tracing: what the tracing hooks cost a turn, off (the default) and on.

In-process, no sockets: a Runtime on the memory store runs N turns of C text
chunks each, one after another, and each turn is timed from ``send`` to its
end. Three runs: tracing off (``NO_TRACING``), and ``OtelTracing`` on an SDK
tracer provider whose exporter drops the spans (what recording them costs,
without an exporter's I/O), each with and without a cancel (the cancel
received / abort fired events). ``python -m bench tracing``.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from bench._common import pct, print_table, save

from turnline.agent import Runtime, RuntimeConfig, as_agent
from turnline.protocol import CancelFilter, MessageIn
from turnline.store import open_store


def _otel() -> Any:
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor, SpanExporter, SpanExportResult

    from turnline.agent.tracing import OtelTracing

    class Drop(SpanExporter):
        def export(self, spans: Any) -> SpanExportResult:
            return SpanExportResult.SUCCESS

    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(Drop()))
    return OtelTracing(provider)


async def _run(tracing: Any, turns: int, chunks: int, cancel: bool) -> list[float]:
    release = asyncio.Event()

    async def agent(turn: Any):
        for i in range(chunks):
            yield f"w{i} "
        if cancel:
            await release.wait()

    config = RuntimeConfig(idle_evict_s=None) if tracing is None else RuntimeConfig(tracing=tracing, idle_evict_s=None)
    runtime = Runtime(open_store("memory://"), as_agent(agent), config)
    await runtime.store.open()
    hub = await runtime.hub("bench")
    times: list[float] = []
    message = [MessageIn(parts=[{"type": "text", "text": "go"}])]
    for _ in range(turns):
        t0 = time.perf_counter()
        outcome, durable = await hub.send("alice", message)
        turn = hub.turns[outcome.started[0]]
        if cancel:
            while len(hub.state.active[turn.turn_id].chunks) < chunks + 2:  # start, text-start, deltas
                await asyncio.sleep(0)
            await hub.cancel("alice", CancelFilter(own=True), hub.state.last_seq - 1)
        await turn.ended.wait()
        times.append(time.perf_counter() - t0)
    await runtime.close()
    await runtime.store.close()
    return times[turns // 10:]  # without the warm-up


def bench(quick: bool) -> None:
    turns, chunks = (300, 20) if quick else (2000, 20)
    rows = []
    results: dict[str, Any] = {"turns": turns, "chunks_per_turn": chunks}
    for cancel in (False, True):
        for name, make in (("off", lambda: None), ("otel, spans dropped", _otel)):
            times = asyncio.run(_run(make(), turns, chunks, cancel))
            label = f"{name}{' + cancel' if cancel else ''}"
            results[label] = {"p50_us": pct(times, 50) * 1e6, "p99_us": pct(times, 99) * 1e6}
            rows.append([label, pct(times, 50) * 1e6, pct(times, 99) * 1e6])
    print_table(f"tracing: one turn of {chunks} chunks, send to end, in-process (µs)",
                ["tracing", "p50", "p99"], rows)
    print(f"written {save('tracing', results)}")
