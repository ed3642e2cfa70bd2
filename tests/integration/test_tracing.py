"""OpenTelemetry tracing (docs/observability.md) in a real server on loopback,
its spans collected by the SDK's own InMemorySpanExporter:

- a turn is one span with its session, turn, owner, policy and end reason,
  and a ``first_chunk`` event;
- a cancelled turn's span has the ``cancel_received`` and ``abort_fired``
  events, and ``seen_truncated`` when the saved message was cut to the
  requester's ``seen`` cursor;
- each provider call (the fake providers, over HTTP in each one's wire format)
  is a CLIENT child span named ``chat {model}`` with the GenAI attributes;
  a failing call is an error span, a cancelled one is marked stopped;
- a ``traceparent`` on ``send`` (WebSocket frame field, HTTP header on
  ``/v1/sessions/{id}/messages`` and ``/api/chat``, through a Redis gateway to
  its worker, and held for a queued turn) makes the turn's span its child;
  an invalid one is ignored, an over-long frame field is a bad frame;
- with tracing off (the default) OpenTelemetry is never imported.

The server runs in a thread of this process, so its spans end in the
exporter the test gave it; a turn's span ends before its ``turn-end`` is
stored, so it is there once the client has seen the turn end.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import threading
import time
import uuid
from typing import Any, Iterator

import httpx
import pytest
import uvicorn
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from fakes.providers import FakeProviders, Script, running_fake
from servers import SECRET, free_port
from turnline.agent import Runtime, RuntimeConfig, as_agent
from turnline.agent.providers import anthropic_messages, openai_chat, openai_responses
from turnline.agent.tracing import OtelTracing
from turnline.server.app import ServerConfig, create_app
from turnline.server.auth import mint
from wsraw import RawWS, text_of

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT_ID = "00f067aa0ba902b7"
TRACEPARENT = f"00-{TRACE_ID}-{PARENT_ID}-01"
KEY = "sk-test-key"


class Spans:
    """A tracer provider whose finished spans are kept in memory."""

    def __init__(self) -> None:
        self.exporter = InMemorySpanExporter()
        self.provider = TracerProvider()
        self.provider.add_span_processor(SimpleSpanProcessor(self.exporter))

    def tracing(self, **kw: Any) -> OtelTracing:
        return OtelTracing(self.provider, **kw)

    def finished(self) -> list[Any]:
        return list(self.exporter.get_finished_spans())

    def turn(self, turn_id: str) -> Any:
        (span,) = [s for s in self.finished() if s.attributes.get("turnline.turn.id") == turn_id]
        return span

    def children(self, parent: Any) -> list[Any]:
        return [s for s in self.finished() if s.parent is not None and s.parent.span_id == parent.context.span_id]


@pytest.fixture
def spans() -> Iterator[Spans]:
    s = Spans()
    yield s
    s.provider.shutdown()


def events(span: Any) -> list[str]:
    return [e.name for e in span.events]


def event(span: Any, name: str) -> Any:
    (found,) = [e for e in span.events if e.name == name]
    return found


async def client(srv: Any, sub: str = "alice") -> tuple[RawWS, str]:
    ws = await RawWS.open(srv.ws, srv.token(sub))
    session = f"otel-{uuid.uuid4().hex[:8]}"
    await ws.subscribe(session)
    return ws, session


async def started(ws: RawWS, session: str, text: str, **fields: Any) -> str:
    ack = await ws.say(session, text, **fields)
    assert ack["op"] == "ack", ack
    (turn_id,) = ack["turn_ids"]
    return turn_id


def hex_ids(span: Any) -> tuple[str, str | None]:
    """The span's trace id and its parent's span id, as hex."""
    parent = span.parent
    return format(span.context.trace_id, "032x"), format(parent.span_id, "016x") if parent else None


# ---------------------------------------------------------------- the turn span


async def test_a_turn_is_a_span_with_its_attributes(serve: Any, spans: Spans) -> None:
    async def agent(turn: Any):
        yield "hello "
        yield "world"

    srv = serve(agent=agent, config=RuntimeConfig(tracing=spans.tracing()))
    ws, session = await client(srv)
    turn_id = await started(ws, session, "hi", policy="queue")
    end = await ws.turn_end(session, turn_id)
    assert end["reason"] == "complete"
    span = spans.turn(turn_id)
    assert span.name == "invoke_agent agent" and span.kind == SpanKind.INTERNAL
    assert dict(span.attributes) == {
        "gen_ai.operation.name": "invoke_agent", "gen_ai.agent.name": "agent", "gen_ai.conversation.id": session,
        "turnline.session.id": session, "turnline.turn.id": turn_id, "turnline.turn.owner": "alice",
        "turnline.turn.policy": "queue", "turnline.turn.end_reason": "complete",
    }
    assert events(span) == ["turnline.first_chunk"]
    assert span.parent is None and span.status.status_code == StatusCode.UNSET
    await ws.close()


async def test_a_cancelled_turn_records_cancel_abort_and_the_seen_cut(serve: Any, spans: Spans) -> None:
    async def agent(turn: Any) -> None:
        for word in ("one ", "two ", "three "):
            await turn.write(word)
        await turn.abort_signal  # until the cancel

    srv = serve(agent=agent, config=RuntimeConfig(tracing=spans.tracing()))
    ws, session = await client(srv)
    turn_id = await started(ws, session, "go")
    deltas = await ws.wait_until(lambda: (d := ws.find(session, "chunk", turn_id=turn_id)) and
                                 [e for e in d if e["chunk"]["type"] == "text-delta"][2:] and
                                 [e for e in d if e["chunk"]["type"] == "text-delta"], what="three deltas")
    seen = deltas[0]["seq"]  # the client showed only "one "
    await ws.ok({"op": "cancel", "session": session, "seen": seen})
    end = await ws.turn_end(session, turn_id)
    assert end["reason"] == "cancelled" and text_of(end["message"]) == "one "
    span = spans.turn(turn_id)
    assert events(span) == ["turnline.first_chunk", "turnline.cancel_received", "turnline.abort_fired",
                            "turnline.seen_truncated"]
    assert dict(event(span, "turnline.cancel_received").attributes) == {
        "turnline.cancel.requester": "alice", "turnline.cancel.seen": seen}
    assert dict(event(span, "turnline.abort_fired").attributes) == {"turnline.abort.reason": "cancelled"}
    # "two " and "three " were streamed but not saved
    assert dict(event(span, "turnline.seen_truncated").attributes) == {"turnline.seen": seen,
                                                                      "turnline.chunks_dropped": 2}
    assert span.attributes["turnline.turn.end_reason"] == "cancelled"
    await ws.close()


async def test_a_failed_turn_is_an_error_span(serve: Any, spans: Spans) -> None:
    async def agent(turn: Any) -> None:
        raise ValueError("no luck")

    srv = serve(agent=agent, config=RuntimeConfig(tracing=spans.tracing()))
    ws, session = await client(srv)
    turn_id = await started(ws, session, "go")
    assert (await ws.turn_end(session, turn_id))["reason"] == "error"
    span = spans.turn(turn_id)
    assert span.status.status_code == StatusCode.ERROR and "no luck" in span.status.description
    assert span.attributes["error.type"] == "agent_error"
    assert span.attributes["turnline.turn.end_reason"] == "error"
    await ws.close()


# ---------------------------------------------------------------- provider calls


@pytest.fixture(scope="module")
def fake_server() -> Iterator[FakeProviders]:
    with running_fake() as f:
        yield f


@pytest.fixture
def fake(fake_server: FakeProviders) -> FakeProviders:
    fake_server.reset()
    fake_server.scripts.update({"short": Script(text="Sure, here it is."), "gated": Script(tokens=1000, gated=True),
                                "limited": Script(status=429, retry_after="3")})
    return fake_server


def provider_agent(fake: FakeProviders) -> Any:
    async def respond(turn: Any) -> None:
        adapter, model = text_of({"parts": turn.input.parts}).split()
        if adapter == "openai_chat":
            step = openai_chat(model=model, history=turn.history, base_url=fake.openai_url, api_key=KEY,
                               temperature=0.5)
        elif adapter == "openai_responses":
            step = openai_responses(model=model, history=turn.history, base_url=fake.openai_url, api_key=KEY)
        else:
            step = anthropic_messages(model=model, history=turn.history, base_url=fake.anthropic_url, api_key=KEY,
                                      max_tokens=256)
        await turn.stream_response(step)

    return respond


@pytest.mark.parametrize("adapter,provider", [("openai_chat", "openai"), ("openai_responses", "openai"),
                                              ("anthropic", "anthropic")])
async def test_a_provider_call_is_a_genai_client_span(serve: Any, spans: Spans, fake: FakeProviders,
                                                      adapter: str, provider: str) -> None:
    srv = serve(agent=provider_agent(fake), config=RuntimeConfig(tracing=spans.tracing()))
    ws, session = await client(srv)
    turn_id = await started(ws, session, f"{adapter} short")
    end = await ws.turn_end(session, turn_id)
    assert end["reason"] == "complete"
    turn = spans.turn(turn_id)
    (call,) = spans.children(turn)
    assert call.context.trace_id == turn.context.trace_id
    assert call.name == "chat short" and call.kind == SpanKind.CLIENT
    attrs = dict(call.attributes)
    usage = end["message"]["metadata"]["usage"]
    assert {k: attrs[k] for k in ("gen_ai.operation.name", "gen_ai.provider.name", "gen_ai.request.model",
                                  "gen_ai.response.model", "gen_ai.usage.input_tokens",
                                  "gen_ai.usage.output_tokens")} == {
        "gen_ai.operation.name": "chat", "gen_ai.provider.name": provider, "gen_ai.request.model": "short",
        "gen_ai.response.model": "short", "gen_ai.usage.input_tokens": usage["inputTokens"],
        "gen_ai.usage.output_tokens": usage["outputTokens"]}
    assert usage["outputTokens"] > 0
    assert attrs["gen_ai.response.finish_reasons"] == ("stop",)
    assert attrs["server.address"] == "127.0.0.1" and attrs["server.port"] == httpx.URL(fake.openai_url).port
    if adapter == "openai_chat":
        assert attrs["gen_ai.request.temperature"] == 0.5
    if adapter == "anthropic":
        assert attrs["gen_ai.request.max_tokens"] == 256
    assert "error.type" not in attrs and "turnline.call.stopped" not in attrs
    assert call.start_time >= turn.start_time and call.end_time <= turn.end_time
    await ws.close()


async def test_a_failed_provider_call_is_an_error_span(serve: Any, spans: Spans, fake: FakeProviders) -> None:
    srv = serve(agent=provider_agent(fake), config=RuntimeConfig(tracing=spans.tracing()))
    ws, session = await client(srv)
    turn_id = await started(ws, session, "openai_chat limited")
    end = await ws.turn_end(session, turn_id)
    assert end["reason"] == "error" and end["error"]["code"] == "provider_rate_limited"
    turn = spans.turn(turn_id)
    (call,) = spans.children(turn)
    assert call.attributes["error.type"] == "provider_rate_limited"
    assert call.status.status_code == StatusCode.ERROR and "HTTP 429" in call.status.description
    assert turn.attributes["error.type"] == "provider_rate_limited"
    await ws.close()


async def test_a_cancelled_provider_call_is_marked_stopped(serve: Any, spans: Spans, fake: FakeProviders) -> None:
    srv = serve(agent=provider_agent(fake), config=RuntimeConfig(tracing=spans.tracing(), abort_grace_s=60))
    ws, session = await client(srv)
    turn_id = await started(ws, session, "anthropic gated")
    rec = await fake.request(0)
    fake.allow(rec, 2)
    await ws.wait_until(lambda: sum(e["chunk"]["type"] == "text-delta"
                                    for e in ws.find(session, "chunk", turn_id=turn_id)) == 2, what="two deltas")
    await ws.ok({"op": "cancel", "session": session})
    assert (await ws.turn_end(session, turn_id))["reason"] == "cancelled"
    turn = spans.turn(turn_id)
    (call,) = spans.children(turn)
    assert call.attributes["turnline.call.stopped"] is True
    assert call.status.status_code == StatusCode.UNSET and "error.type" not in call.attributes
    assert "turnline.abort_fired" in events(turn)
    await ws.close()


# ---------------------------------------------------------------- traceparent


async def test_traceparent_on_the_frame_makes_the_turn_a_child(serve: Any, spans: Spans) -> None:
    srv = serve(agent=lambda turn: "ok", config=RuntimeConfig(tracing=spans.tracing()))
    ws, session = await client(srv)
    joined = await started(ws, session, "a", traceparent=TRACEPARENT)
    invalid = await started(ws, session, "b", traceparent="00-not-a-trace-01")
    await ws.turn_end(session, joined)
    await ws.turn_end(session, invalid)
    assert hex_ids(spans.turn(joined)) == (TRACE_ID, PARENT_ID)
    trace_id, parent = hex_ids(spans.turn(invalid))  # W3C: an invalid traceparent is ignored
    assert parent is None and trace_id != TRACE_ID
    long = await ws.request({"op": "send", "session": session, "messages": [{"parts": [{"type": "text", "text": "c"}]}],
                             "traceparent": "0" * 513})
    assert long["op"] == "error" and long["code"] == "bad_frame", long
    await ws.close()


async def test_traceparent_is_ignored_when_not_accepted(serve: Any, spans: Spans) -> None:
    srv = serve(agent=lambda turn: "ok", config=RuntimeConfig(tracing=spans.tracing(accept_traceparent=False)))
    ws, session = await client(srv)
    turn_id = await started(ws, session, "a", traceparent=TRACEPARENT)
    await ws.turn_end(session, turn_id)
    trace_id, parent = hex_ids(spans.turn(turn_id))
    assert parent is None and trace_id != TRACE_ID
    await ws.close()


async def test_traceparent_header_on_http_sends(serve: Any, spans: Spans) -> None:
    srv = serve(agent=lambda turn: "ok", config=RuntimeConfig(tracing=spans.tracing()))
    token = srv.token()
    ws, session = await client(srv)
    headers = {"authorization": f"Bearer {token}", "traceparent": TRACEPARENT}
    async with httpx.AsyncClient(base_url=srv.http, timeout=5) as http:
        r = await http.post(f"/v1/sessions/{session}/messages", headers=headers,
                            json={"messages": [{"parts": [{"type": "text", "text": "hi"}]}]})
        assert r.status_code == 200, r.text
        (turn_id,) = r.json()["turn_ids"]
        await ws.turn_end(session, turn_id)
        assert hex_ids(spans.turn(turn_id)) == (TRACE_ID, PARENT_ID)

        chat = f"chat-{uuid.uuid4().hex[:8]}"
        other = f"00-{'ab' * 16}-{'cd' * 8}-01"
        body = {"id": chat, "trigger": "submit-message",
                "messages": [{"id": "u1", "role": "user", "parts": [{"type": "text", "text": "hi"}]}]}
        async with http.stream("POST", "/api/chat", json=body, headers={**headers, "traceparent": other}) as r:
            assert r.status_code == 200
            raw = b"".join([piece async for piece in r.aiter_bytes()])
        assert b'"type":"finish"' in raw.replace(b" ", b"")
    (chat_turn,) = [s for s in spans.finished() if s.attributes.get("turnline.session.id") == chat]
    assert hex_ids(chat_turn) == ("ab" * 16, "cd" * 8)
    await ws.close()


async def test_a_queued_turn_keeps_its_traceparent(serve: Any, spans: Spans, gate: Any) -> None:
    async def agent(turn: Any):
        if text_of({"parts": turn.input.parts}) == "hold":
            await gate.wait()
        yield "ok"

    srv = serve(agent=agent, config=RuntimeConfig(tracing=spans.tracing(), default_policy="queue"))
    ws, session = await client(srv)
    first = await started(ws, session, "hold")
    ack = await ws.say(session, "next", traceparent=TRACEPARENT)
    (queued,) = ack["queued"]
    gate.open(srv)
    await ws.turn_end(session, first)
    await ws.turn_end(session, queued)
    span = spans.turn(queued)
    assert hex_ids(span) == (TRACE_ID, PARENT_ID)
    assert span.attributes["turnline.turn.policy"] == "queue"
    assert hex_ids(spans.turn(first))[1] is None
    await ws.close()


async def test_traceparent_travels_from_a_redis_gateway_to_its_worker(spans: Spans, redis_url: str,
                                                                      redis_prefix: str) -> None:
    from turnline.agent.cluster import ClusterConfig, ClusterWorker
    from turnline.server.gateway import RemoteRuntime
    from turnline.store import open_store

    store = open_store(f"{redis_url}?prefix={redis_prefix}")
    config = RuntimeConfig(tracing=spans.tracing())
    worker = ClusterWorker(Runtime(store, as_agent(lambda turn: "ok"), config), store, ClusterConfig())
    runtime = RemoteRuntime(store, ClusterConfig(), config=config, worker=worker)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(runtime, ServerConfig(secret=SECRET)), host="127.0.0.1",
                                           port=port, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=lambda: asyncio.run(server.serve()), daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "the gateway did not start"
        await asyncio.sleep(0.01)
    try:
        ws = await RawWS.open(f"ws://127.0.0.1:{port}/v1/ws",
                              mint(SECRET, "alice", {"*": ["subscribe", "publish", "cancel"]}, 600))
        session = f"otel-{uuid.uuid4().hex[:8]}"
        await ws.subscribe(session)
        turn_id = await started(ws, session, "hi", traceparent=TRACEPARENT)
        assert (await ws.turn_end(session, turn_id))["reason"] == "complete"
        assert hex_ids(spans.turn(turn_id)) == (TRACE_ID, PARENT_ID)
        await ws.close()
    finally:
        server.should_exit = True
        thread.join(10)


# ---------------------------------------------------------------- off by default


def test_with_tracing_off_opentelemetry_is_never_imported() -> None:
    script = """
import asyncio, sys
from turnline.agent import Runtime, as_agent
from turnline.agent.providers import openai_chat
from turnline.protocol import MessageIn
from turnline.server.app import create_app, ServerConfig
from turnline.store import open_store

async def main():
    runtime = Runtime(open_store("memory://"), as_agent(lambda turn: "ok"))
    create_app(runtime, ServerConfig(secret="x" * 64))
    hub = await runtime.hub("s")
    outcome, durable = await hub.send("alice", [MessageIn(parts=[{"type": "text", "text": "hi"}])],
                                      traceparent="00-%s-%s-01")
    await durable
    turn = hub.turns[outcome.started[0]]
    await asyncio.wait_for(turn.ended.wait(), 5)
    assert hub.state.turns[turn.turn_id].reason == "complete"
    loaded = sorted(m for m in sys.modules if m.startswith("opentelemetry"))
    assert not loaded, loaded
    print("ok")

asyncio.run(main())
""" % (TRACE_ID, PARENT_ID)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


# ---------------------------------------------------------------- turnline serve --otel


def _serve_otel(env: dict[str, str]) -> tuple[str, str]:
    """Run ``turnline serve --otel`` with ``env``, send one message with a
    traceparent, stop it (SIGINT: spans still batched are exported at exit);
    returns (its stdout, the turn id)."""
    import os
    import signal

    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "turnline.cli", "serve", "--otel", "--store", "memory://",
                             "--port", str(port), "--secret", SECRET, "--log-level", "warning"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, **env})
    try:
        deadline = time.monotonic() + 10
        while True:  # until it listens
            try:
                r = httpx.post(f"http://127.0.0.1:{port}/v1/sessions/cli/messages", timeout=5,
                               headers={"authorization": f"Bearer {mint(SECRET, 'alice', {'*': ['publish']}, 60)}",
                                        "traceparent": TRACEPARENT},
                               json={"messages": [{"parts": [{"type": "text", "text": "hi"}]}]})
                break
            except httpx.ConnectError:
                assert time.monotonic() < deadline and proc.poll() is None, "the server did not listen"
                time.sleep(0.05)
        assert r.status_code == 200, r.text
        (turn_id,) = r.json()["turn_ids"]
    finally:
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=20)
    assert out.startswith("turnline serving"), out
    return out, turn_id


def test_serve_otel_exports_spans_from_the_environment() -> None:
    out, turn_id = _serve_otel({"OTEL_TRACES_EXPORTER": "console", "OTEL_SERVICE_NAME": "chat-svc"})
    assert "otel:   a span per turn" in out
    # the console exporter's JSON: the turn's span, in the sender's trace, under its service name
    assert '"name": "invoke_agent demo"' in out and f'"turnline.turn.id": "{turn_id}"' in out
    assert f'"trace_id": "0x{TRACE_ID}"' in out and f'"parent_id": "0x{PARENT_ID}"' in out
    assert '"service.name": "chat-svc"' in out


def test_serve_otel_is_off_with_otel_sdk_disabled() -> None:
    out, _ = _serve_otel({"OTEL_TRACES_EXPORTER": "console", "OTEL_SDK_DISABLED": "true"})
    assert "otel:" not in out and "invoke_agent" not in out


def test_serve_otel_exports_over_otlp_by_default() -> None:
    # A collector on loopback: OTLP/HTTP, protobuf bodies at /v1/traces.
    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
        ExportTraceServiceRequest, ExportTraceServiceResponse,
    )
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import Response
    from starlette.routing import Route

    received: list[tuple[str, bytes]] = []

    async def traces(request: Request) -> Response:
        received.append((request.headers.get("content-type", ""), await request.body()))
        return Response(ExportTraceServiceResponse().SerializeToString(), media_type="application/x-protobuf")

    port = free_port()
    collector = uvicorn.Server(uvicorn.Config(Starlette(routes=[Route("/v1/traces", traces, methods=["POST"])]),
                                              host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=lambda: asyncio.run(collector.serve()), daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not collector.started:
        assert time.monotonic() < deadline and thread.is_alive(), "the collector did not start"
        time.sleep(0.01)
    try:
        _, turn_id = _serve_otel({"OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{port}",
                                  "OTEL_SERVICE_NAME": "chat-svc"})
    finally:
        collector.should_exit = True
        thread.join(10)
    assert received and all(ctype == "application/x-protobuf" for ctype, _ in received)
    spans = []
    for _, body in received:
        request = ExportTraceServiceRequest()
        request.ParseFromString(body)
        for resource in request.resource_spans:
            service = {a.key: a.value.string_value for a in resource.resource.attributes}["service.name"]
            spans += [(service, span) for scope in resource.scope_spans for span in scope.spans]
    ((service, span),) = [(svc, s) for svc, s in spans
                          if any(a.key == "turnline.turn.id" and a.value.string_value == turn_id for a in s.attributes)]
    assert service == "chat-svc" and span.name == "invoke_agent demo"
    assert span.trace_id.hex() == TRACE_ID and span.parent_span_id.hex() == PARENT_ID
