"""OpenTelemetry: each turn is a span in your app's trace (docs/observability.md).

The "app" starts a span and passes its W3C traceparent on `send`; the server's
span of the turn becomes its child. A second answer is stopped mid-stream: its
span records the cancel received and the abort fired (and, when the `seen`
cursor cut chunks the screen never showed from the saved message, how many).
Spans print on the console, one line each (drop the formatter for the SDK's
full JSON); in production point an OTLP exporter at your collector instead.
Provider calls (turnline.agent.providers) would show as `chat {model}` child
spans with the GenAI attributes.

    pip install 'turnline[otel]'
    python examples/otel_console.py
"""

from __future__ import annotations

import asyncio

from _local import local_server, words
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import ConsoleSpanExporter, SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from turnline import Agent, Turn
from turnline.agent import RuntimeConfig
from turnline.agent.tracing import OtelTracing
from turnline.client import ClientTransport, message_text


def one_line(span: ReadableSpan) -> str:
    parent = f" parent={span.parent.span_id:016x}" if span.parent else ""
    attrs = {k: v for k, v in (span.attributes or {}).items() if k.startswith(("turnline.turn", "gen_ai.op"))}
    events = [e.name for e in span.events]
    return f"span {span.name!r} trace={span.context.trace_id:032x}{parent} {attrs} events={events}\n"


provider = TracerProvider()
provider.add_span_processor(SimpleSpanProcessor(ConsoleSpanExporter(formatter=one_line)))
finished = InMemorySpanExporter()  # to check below what the console shows
provider.add_span_processor(SimpleSpanProcessor(finished))
tracer = provider.get_tracer("my-app")


async def respond(turn: Turn):
    async for w in words("Traces show where the time of a turn went: waiting, first token, the stream."):
        yield w


def turn_span(turn_id: str) -> ReadableSpan:
    return next(s for s in finished.get_finished_spans() if (s.attributes or {}).get("turnline.turn.id") == turn_id)


async def main() -> None:
    config = RuntimeConfig(tracing=OtelTracing(provider))
    async with local_server(Agent(respond, name="explainer"), config=config) as (url, token_for):
        async with ClientTransport(url, token_for("alice"), "chat-otel") as chat:
            with tracer.start_as_current_span("app: user asks") as app_span:
                carrier: dict[str, str] = {}
                TraceContextTextMapPropagator().inject(carrier)  # the current span as a traceparent
                ack = await chat.send("What do traces show?", traceparent=carrier["traceparent"])
                await chat.wait_turn_end(ack["turn_ids"][0])
            # The turn's span ended before its turn-end reached this client.
            span = turn_span(ack["turn_ids"][0])
            app = app_span.get_span_context()
            joined = span.context.trace_id == app.trace_id and span.parent and span.parent.span_id == app.span_id
            print("turn joined the app's trace:", "yes" if joined else "no")

            ack = await chat.send("And a long answer, please.")
            turn_id = ack["turn_ids"][0]

            def shown() -> str:
                reply = chat.view.core.turns[turn_id].message_id if turn_id in chat.view.core.turns else None
                return next((message_text(m) for m in chat.view.messages() if m.id == reply), "")

            await chat.wait_for(lambda view: len(shown().split()) >= 4)
            await chat.cancel()  # seen = what this view shows; the rest is cut from the saved message
            end = await chat.wait_turn_end(turn_id)
            events = [e.name for e in turn_span(turn_id).events]
            print("second turn:", end.reason, "| its span's events:", ", ".join(events))
    provider.shutdown()


if __name__ == "__main__":
    asyncio.run(main())
