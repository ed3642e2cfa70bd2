"""turnline.js as a library, in the browser, against a real server (no demo UI):
the stop cursor follows what the page says it rendered, a send whose answer
was lost in flight is settled from the log without a duplicate, and a refused
token closes the connection with a clear error."""

from __future__ import annotations

from typing import Any

import pytest
from playwright.sync_api import Page

from browserkit import WAIT_MS, ChatServer, new_session, text_of, words

pytestmark = pytest.mark.browser

SETUP = """async ([session, user]) => {
    window.tl = await import('/turnline.js');
    const getToken = async () => (await (await fetch(`/v1/dev/token?sub=${user}`, {method: 'POST'})).json()).token;
    window.conn = tl.connect({url: '/v1/ws', getToken, initialBackoffMs: 50});
    window.s = conn.session(session);
}"""


def library_page(pages: Any, origin: str, session: str) -> Page:
    page = pages().page
    page.goto(f"{origin}/healthz")  # any page of the server's origin
    page.evaluate(SETUP, [session, "lib-user"])
    page.wait_for_function("() => window.s.state === 'live'", timeout=WAIT_MS)
    return page


def test_cancel_sends_the_rendered_cursor_and_freezes_there(chat_server: ChatServer, pages: Any) -> None:
    session = new_session()
    page = library_page(pages, chat_server.http, session)
    page.evaluate("() => { window.sent = s.send('a go'); }")
    chat_server.pacer.release("a", 5)
    page.wait_for_function("(t) => s.view.messages().some((m) => tl.messageText(m) === t)", arg=words("a", 5),
                           timeout=WAIT_MS)

    # The page says it has drawn only up to the chunk with "a2 ": a stop saves that much.
    result = page.evaluate("""async () => {
        const turn = [...s.view.core.active.values()][0];
        const cursor = turn.chunks.find((c) => c.chunk.delta === 'a2 ').seq;
        s.markRendered(cursor);
        const stopping = s.cancel();
        const shown = tl.messageText(s.view.message(turn.messageId));
        const ack = await stopping;
        return {cursor, shown, ack, messageId: turn.messageId};
    }""")
    assert result["shown"] == words("a", 3)  # frozen at the cursor the moment stop is asked
    assert result["ack"]["cancelled"], result
    page.wait_for_function("(id) => s.view.status(id) === 'cancelled'", arg=result["messageId"], timeout=WAIT_MS)
    assert page.evaluate("(id) => tl.messageText(s.view.message(id))", result["messageId"]) == words("a", 3)
    saved = chat_server.history(session)[-1]
    assert text_of(saved) == words("a", 3)
    assert saved["metadata"]["interrupted"]["seen"] == result["cursor"]


def test_a_send_whose_ack_was_lost_is_settled_from_the_log(chat_server: ChatServer, pages: Any,
                                                          flaky_network: Any) -> None:
    session = new_session()
    page = library_page(pages, flaky_network.url, session)
    flaky_network.mute()  # from now on the page hears nothing: not the events, not the ack
    message_id = page.evaluate("""() => {
        window.outcome = null;
        s.send('b hello').then((ack) => { outcome = {ack}; }, (err) => { outcome = {error: err.code}; });
        return s.view.optimistic[0];
    }""")
    chat_server.pacer.release("b", 1)
    chat_server.pacer.wait_written("b", 1)  # the server took the message and answers it

    flaky_network.go_down()
    page.wait_for_function("() => conn.state === 'reconnecting'", timeout=WAIT_MS)
    flaky_network.come_back()
    page.evaluate("() => conn.retryNow()")
    page.wait_for_function("() => window.outcome !== null", timeout=WAIT_MS)
    outcome = page.evaluate("() => window.outcome")
    assert "error" not in outcome, outcome
    ack = outcome["ack"]
    assert ack["resent"] is True and ack["message_ids"] == [message_id] and len(ack["turn_ids"]) == 1, ack

    chat_server.pacer.finish("b")
    page.wait_for_function("() => s.view.activeTurns().length === 0 && s.view.messages().length === 2",
                           timeout=WAIT_MS)
    assert [text_of(m) for m in chat_server.history(session)] == ["b hello", words("b", 1)]
    assert page.evaluate("() => s.view.messages().map((m) => tl.messageText(m))") == ["b hello", words("b", 1)]


def test_a_refused_fixed_token_closes_with_unauthorized(chat_server: ChatServer, pages: Any) -> None:
    page = pages().page
    page.goto(f"{chat_server.http}/healthz")
    page.evaluate("""async () => {
        window.tl = await import('/turnline.js');
        window.conn = tl.connect({url: '/v1/ws', token: 'not-a-token'});
        window.s = conn.session('chat-refused');
        window.failed = s.send('hello').catch((err) => err.code);
    }""")
    page.wait_for_function("() => conn.state === 'closed'", timeout=WAIT_MS)
    assert page.evaluate("() => conn.error.code") == "unauthorized"
    assert page.evaluate("() => window.failed") == "unauthorized"


def test_send_passes_a_traceparent_to_the_turns_span(serve: Any, pages: Any) -> None:
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    from turnline.agent import RuntimeConfig
    from turnline.agent.tracing import OtelTracing

    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    srv = serve(agent=lambda turn: "ok", config=RuntimeConfig(tracing=OtelTracing(provider)),
                server_config={"dev": True})
    page = library_page(pages, srv.http, new_session())
    trace_id, parent_id = "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"
    turn_id = page.evaluate("""async (tp) => {
        const ack = await s.send('hi', {traceparent: tp});
        const turnId = ack.turn_ids[0];
        await new Promise((done) => { const t = setInterval(() => {
            if (s.view.core.turns.get(turnId)?.reason) { clearInterval(t); done(); } }, 10); });
        return turnId;
    }""", f"00-{trace_id}-{parent_id}-01")
    (span,) = [s for s in exporter.get_finished_spans() if s.attributes.get("turnline.turn.id") == turn_id]
    assert format(span.context.trace_id, "032x") == trace_id and format(span.parent.span_id, "016x") == parent_id
    provider.shutdown()
