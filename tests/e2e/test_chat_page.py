"""The demo chat in a real browser: stop, reload, a second tab, and a network
that goes away mid-answer.

The agent (``Pacer``) writes a word per permit the test gives, so the test
knows how far an answer has streamed. "What you saw" is read from the page in
the same task that presses stop, so the assertion is exact whatever the race
between the click and the stream.
"""

from __future__ import annotations

from typing import Any

import pytest
from playwright.sync_api import expect

from browserkit import ChatPage, ChatServer, text_of, words

pytestmark = pytest.mark.browser


def test_stop_mid_stream_then_reload_shows_exactly_what_was_shown(chat_server: ChatServer, pages: Any) -> None:
    pacer = chat_server.pacer
    chat: ChatPage = pages().open(chat_server.url())
    session = chat.session_id()
    presence = chat.page.get_by_test_id("presence")

    chat.send("a tell me a story")
    reply = chat.assistant()
    expect(presence).to_have_attribute("data-state", "thinking")
    expect(chat.send_button).to_have_attribute("data-mode", "stop")  # the send button became a stop button
    pacer.release("a", 5)
    chat.wait_text(reply, words("a", 5))
    expect(presence).to_have_attribute("data-state", "streaming")
    expect(reply).to_have_attribute("data-status", "streaming")

    # Press stop while the answer races on. The server holds its decision on
    # the stop meanwhile, so more of the answer reaches the page after the click.
    pacer.hold_cancels()
    pacer.release("a", 40)
    shown = chat.stop_now()
    assert shown["mode"] == "stop"
    assert shown["text"].startswith(words("a", 5)), shown
    assert pacer.cancel_waiting.wait(10)
    pacer.release("a", 3)
    pacer.wait_written("a", 48)
    chat.wait_rendered(chat_server.last_seq(session))
    stopped = chat.message(shown["id"])
    assert chat.text_of(stopped) == shown["text"]  # frozen at what was shown, the tail received but not shown
    expect(stopped).to_have_attribute("data-status", "stopping")

    pacer.let_cancels_through()
    expect(stopped).to_have_attribute("data-status", "cancelled")
    expect(stopped.get_by_test_id("interrupted-chip")).to_have_text("Stopped")
    assert chat.text_of(stopped) == shown["text"]
    expect(presence).to_have_attribute("data-state", "idle")
    expect(chat.send_button).to_have_attribute("data-mode", "send")

    saved = chat_server.history(session)[-1]
    assert saved["id"] == shown["id"]
    assert text_of(saved) == shown["text"]
    assert saved["metadata"]["interrupted"]["seen"] is not None

    chat.page.reload()
    reloaded = chat.message(shown["id"])
    expect(reloaded).to_have_attribute("data-status", "cancelled")
    assert chat.text_of(reloaded) == shown["text"]
    expect(chat.user("a tell me a story")).to_have_count(1)


def test_a_second_tab_sees_the_stream_live_and_can_stop_it(chat_server: ChatServer, pages: Any) -> None:
    pacer = chat_server.pacer
    first = pages().open(chat_server.url())
    session = first.session_id()
    first.send("b what is new")
    pacer.release("b", 3)
    chat_first = first.assistant()
    first.wait_text(chat_first, words("b", 3))

    second = pages().open(first.page.url)  # the same user in another tab
    chat_second = second.assistant()
    second.wait_text(chat_second, words("b", 3))  # caught up from the log
    pacer.release("b", 2)
    second.wait_text(chat_second, words("b", 5))  # and follows live
    first.wait_text(chat_first, words("b", 5))
    expect(second.send_button).to_have_attribute("data-mode", "stop")

    pacer.hold_cancels()
    pacer.release("b", 40)
    shown = second.stop_now()
    assert shown["mode"] == "stop" and shown["text"].startswith(words("b", 5)), shown
    assert pacer.cancel_waiting.wait(10)
    pacer.release("b", 3)
    pacer.wait_written("b", 48)
    second.wait_rendered(chat_server.last_seq(session))
    assert second.text_of(second.message(shown["id"])) == shown["text"]  # the stopping tab froze at the click
    pacer.let_cancels_through()

    for tab in (first, second):
        row = tab.message(shown["id"])
        expect(row).to_have_attribute("data-status", "cancelled")
        assert tab.text_of(row) == shown["text"], tab.console
        expect(tab.send_button).to_have_attribute("data-mode", "send")
    assert text_of(chat_server.history(session)[-1]) == shown["text"]

    first.page.reload()
    row = first.message(shown["id"])
    expect(row).to_have_attribute("data-status", "cancelled")
    assert first.text_of(row) == shown["text"]


def test_offline_then_online_mid_stream_loses_and_repeats_nothing(chat_server: ChatServer, pages: Any,
                                                                  context: Any) -> None:
    pacer = chat_server.pacer
    chat = pages().open(chat_server.url())
    session = chat.session_id()
    chat.send("c go on")
    reply = chat.assistant()
    pacer.release("c", 3)
    chat.wait_text(reply, words("c", 3))

    context.set_offline(True)
    expect(chat.banner).to_have_attribute("data-state", "reconnecting")
    expect(chat.banner).to_contain_text("offline")
    pacer.release("c", 4)
    pacer.finish("c")
    pacer.wait_done("c")  # the answer went on, and ended, while the page was offline
    assert chat.text_of(reply) == words("c", 3)

    context.set_offline(False)
    expect(reply).to_have_attribute("data-status", "complete")
    assert chat.text_of(reply) == words("c", 7)
    expect(chat.banner).to_have_attribute("data-state", "recovered")

    # A message sent while offline is shown at once, then sent once when back.
    context.set_offline(True)
    expect(chat.banner).to_have_attribute("data-state", "reconnecting")
    chat.send("d sent while offline")
    mine = chat.user("d sent while offline")
    expect(mine.get_by_test_id("sending-chip")).to_be_visible()
    context.set_offline(False)
    expect(mine.get_by_test_id("sending-chip")).to_have_count(0)
    pacer.release("d", 2)
    pacer.finish("d")
    expect(chat.assistant()).to_have_attribute("data-status", "complete")
    chat.wait_text(chat.assistant(), words("d", 2))

    history = chat_server.history(session)
    assert [(m["role"], text_of(m)) for m in history] == [
        ("user", "c go on"), ("assistant", words("c", 7)),
        ("user", "d sent while offline"), ("assistant", words("d", 2)),
    ]
    expect(chat.page.locator("[data-testid=message]")).to_have_count(4)


def test_a_dropped_connection_resumes_from_the_last_event(chat_server: ChatServer, pages: Any,
                                                         flaky_network: Any) -> None:
    """The network drops the socket under the page (no offline event): the
    page notices, shows it, retries with backoff, and resumes where it was."""
    pacer = chat_server.pacer
    chat = pages().open(f"{flaky_network.url}/#chat-drop-1")
    chat.send("e keep going")
    reply = chat.assistant()
    pacer.release("e", 3)
    chat.wait_text(reply, words("e", 3))

    flaky_network.go_down()
    expect(chat.banner).to_have_attribute("data-state", "reconnecting")
    expect(chat.banner).to_contain_text("Reconnecting")
    pacer.release("e", 5)
    pacer.finish("e")
    pacer.wait_done("e")
    assert chat.text_of(reply) == words("e", 3)

    flaky_network.come_back()
    chat.page.get_by_test_id("retry").click()  # or wait for the next attempt
    expect(reply).to_have_attribute("data-status", "complete")
    assert chat.text_of(reply) == words("e", 8)
    expect(chat.banner).to_have_attribute("data-state", "recovered")
    assert chat.page.evaluate("() => window.turnlineDemo.conn.reconnects") >= 1
    history = chat_server.history("chat-drop-1")
    assert [text_of(m) for m in history] == ["e keep going", words("e", 8)]


def test_new_chat_starts_an_empty_session_and_lists_the_old_one(chat_server: ChatServer, pages: Any) -> None:
    pacer = chat_server.pacer
    chat = pages().open(chat_server.url())
    first_session = chat.session_id()
    chat.send("g first chat")
    pacer.release("g", 1)
    pacer.finish("g")
    expect(chat.assistant()).to_have_attribute("data-status", "complete")

    chat.page.get_by_test_id("new-chat").click()
    chat.page.wait_for_function("(old) => window.turnlineDemo.chat.id !== old", arg=first_session)
    second_session = chat.session_id()
    assert chat.page.url.endswith(f"#{second_session}")
    expect(chat.page.locator("[data-testid=message]")).to_have_count(0)
    expect(chat.page.get_by_role("heading", name="What can I help with?")).to_be_visible()
    old = chat.page.locator(f'.chat-link[href="#{first_session}"]')
    expect(old).to_have_text("g first chat")

    old.click()  # back to the first chat, from its log
    expect(chat.user("g first chat")).to_be_visible()
    chat.wait_text(chat.assistant(), words("g", 1))
