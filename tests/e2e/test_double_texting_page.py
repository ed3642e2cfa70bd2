"""Double texting in the demo chat: a second message while the first answer
streams, under each of the five policies, as the page shows it and as the
server keeps it."""

from __future__ import annotations

from typing import Any

import pytest
from playwright.sync_api import expect

from browserkit import ChatPage, ChatServer, text_of, words

pytestmark = pytest.mark.browser


def first_answer_streaming(chat_server: ChatServer, pages: Any) -> tuple[ChatPage, str]:
    chat: ChatPage = pages().open(chat_server.url())
    chat.send("a first question", policy="concurrent")
    chat_server.pacer.release("a", 2)
    chat.wait_text(chat.assistant(), words("a", 2))
    return chat, chat.session_id()


def roles_and_texts(history: list[dict[str, Any]]) -> list[tuple[str, str]]:
    return [(m["role"], text_of(m)) for m in history]


def test_concurrent_answers_stream_side_by_side(chat_server: ChatServer, pages: Any) -> None:
    pacer = chat_server.pacer
    chat, session = first_answer_streaming(chat_server, pages)
    chat.send("b second question", policy="concurrent")

    lanes = chat.page.get_by_test_id("lane")
    expect(lanes).to_have_count(2)
    expect(lanes.nth(0)).to_contain_text("a first question")
    expect(lanes.nth(1)).to_contain_text("b second question")
    pacer.release("b", 3)
    pacer.release("a", 1)
    chat.wait_text(lanes.nth(1).locator("[data-role=assistant]"), words("b", 3))
    chat.wait_text(lanes.nth(0).locator("[data-role=assistant]"), words("a", 3))

    pacer.finish("a")
    expect(lanes.nth(0).locator("[data-role=assistant]")).to_have_attribute("data-status", "complete")
    expect(lanes).to_have_count(2)  # side by side while either answer runs
    pacer.finish("b")
    expect(lanes).to_have_count(0)

    # Both answers are kept, as two branches of the conversation.
    question = chat.user("b second question")
    expect(question.get_by_test_id("branch")).to_have_attribute("data-index", "2")
    expect(question.get_by_test_id("branch")).to_have_attribute("data-count", "2")
    question.locator("[data-action=prev]").click()
    other = chat.user("a first question")
    expect(other.get_by_test_id("branch")).to_have_attribute("data-index", "1")
    chat.wait_text(chat.assistant(), words("a", 3))
    assert roles_and_texts(chat_server.history(session)) == [("user", "b second question"),
                                                            ("assistant", words("b", 3))]


def test_queue_holds_the_message_until_the_answer_ends(chat_server: ChatServer, pages: Any) -> None:
    pacer = chat_server.pacer
    chat, session = first_answer_streaming(chat_server, pages)
    chat.send("b queued question", policy="queue")

    queued = chat.user("b queued question")
    expect(queued.get_by_test_id("queued-chip")).to_have_text("Queued")
    expect(queued).to_have_attribute("data-status", "queued")
    pacer.release("a", 1)
    chat.wait_text(chat.assistant(), words("a", 3))  # the first answer goes on
    pacer.finish("a")

    expect(queued.get_by_test_id("queued-chip")).to_have_count(0)
    pacer.release("b", 2)
    pacer.finish("b")
    expect(chat.assistant()).to_have_attribute("data-status", "complete")
    chat.wait_text(chat.assistant(), words("b", 2))
    rows = chat.page.locator("[data-testid=message]")
    expect(rows).to_have_count(4)
    assert [chat.text_of(rows.nth(i)) for i in range(4)] == [
        "a first question", words("a", 3), "b queued question", words("b", 2)]
    assert roles_and_texts(chat_server.history(session)) == [
        ("user", "a first question"), ("assistant", words("a", 3)),
        ("user", "b queued question"), ("assistant", words("b", 2))]


def test_interrupt_stops_the_answer_where_it_was_shown(chat_server: ChatServer, pages: Any) -> None:
    pacer = chat_server.pacer
    chat, session = first_answer_streaming(chat_server, pages)
    pacer.release("a", 40)  # still streaming when the second message goes
    shown = chat.send_now("b never mind, this instead", "interrupt")
    assert shown["text"].startswith(words("a", 2))

    interrupted = chat.message(shown["id"])
    expect(interrupted).to_have_attribute("data-status", "cancelled")
    expect(interrupted.get_by_test_id("interrupted-chip")).to_have_text("Interrupted")
    assert chat.text_of(interrupted) == shown["text"]
    pacer.release("b", 1)
    pacer.finish("b")
    expect(chat.assistant()).to_have_attribute("data-status", "complete")
    chat.wait_text(chat.assistant(), words("b", 1))
    history = chat_server.history(session)
    assert roles_and_texts(history) == [
        ("user", "a first question"), ("assistant", shown["text"]),
        ("user", "b never mind, this instead"), ("assistant", words("b", 1))]
    assert history[1]["metadata"]["interrupted"]["reason"] == "cancelled"


def test_reject_refuses_the_message_and_says_so(chat_server: ChatServer, pages: Any) -> None:
    pacer = chat_server.pacer
    chat, session = first_answer_streaming(chat_server, pages)
    chat.send("b are you there", policy="reject")

    notice = chat.page.get_by_test_id("rejected")
    expect(notice).to_contain_text("b are you there")
    expect(notice.get_by_test_id("rejected-chip")).to_contain_text("Not sent")
    expect(chat.page.locator("[data-testid=message][data-role=user]", has_text="b are you there")).to_have_count(0)
    pacer.release("a", 1)
    chat.wait_text(chat.assistant(), words("a", 3))  # the first answer was not disturbed
    pacer.finish("a")
    expect(chat.assistant()).to_have_attribute("data-status", "complete")
    assert roles_and_texts(chat_server.history(session)) == [("user", "a first question"),
                                                            ("assistant", words("a", 3))]


def test_rollback_replaces_the_question_and_keeps_it_as_a_hidden_branch(chat_server: ChatServer,
                                                                      pages: Any) -> None:
    pacer = chat_server.pacer
    chat, session = first_answer_streaming(chat_server, pages)
    chat.send("b let me rephrase", policy="rollback")

    expect(chat.user("a first question")).to_have_count(0)  # rolled back: off the conversation
    replacement = chat.user("b let me rephrase")
    expect(replacement.get_by_test_id("branch")).to_have_attribute("data-index", "2")
    pacer.release("b", 2)
    pacer.finish("b")
    expect(chat.assistant()).to_have_attribute("data-status", "complete")
    chat.wait_text(chat.assistant(), words("b", 2))
    assert roles_and_texts(chat_server.history(session)) == [("user", "b let me rephrase"),
                                                            ("assistant", words("b", 2))]

    replacement.locator("[data-action=prev]").click()  # the rolled-back branch is still there to see
    old = chat.user("a first question")
    expect(old.get_by_test_id("rolled-back-chip")).to_be_visible()
    expect(old.get_by_test_id("branch")).to_have_attribute("data-index", "1")
    stopped = chat.assistant()
    expect(stopped).to_have_attribute("data-status", "cancelled")
    assert chat.text_of(stopped) == words("a", 2)
