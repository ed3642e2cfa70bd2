"""Branches in the demo chat: regenerate an answer, edit a question, and move
between the versions with ‹ i/n ›."""

from __future__ import annotations

from typing import Any

import pytest
from playwright.sync_api import expect

from browserkit import ChatPage, ChatServer, text_of, words

pytestmark = pytest.mark.browser


def test_regenerate_and_edit_make_branches_to_navigate(chat_server: ChatServer, pages: Any) -> None:
    pacer = chat_server.pacer
    chat: ChatPage = pages().open(chat_server.url())
    session = chat.session_id()
    chat.send("a first question")
    pacer.release("a", 2)
    pacer.finish("a")
    first = chat.assistant()
    expect(first).to_have_attribute("data-status", "complete")
    chat.wait_text(first, words("a", 2))
    expect(first.get_by_test_id("branch")).to_have_count(0)

    # Regenerate: a second answer to the same question.
    first.hover()
    first.get_by_test_id("regenerate").click()
    pacer.release("a", 3)
    pacer.finish("a")
    second = chat.assistant()
    expect(second).to_have_attribute("data-status", "complete")
    chat.wait_text(second, words("a", 3, version=2))
    nav = second.get_by_test_id("branch")
    expect(nav).to_have_attribute("data-index", "2")
    expect(nav).to_have_attribute("data-count", "2")
    nav.locator("[data-action=prev]").click()
    chat.wait_text(chat.assistant(), words("a", 2))
    expect(chat.assistant().get_by_test_id("branch")).to_have_attribute("data-index", "1")
    chat.assistant().locator("[data-action=next]").click()
    chat.wait_text(chat.assistant(), words("a", 3, version=2))

    # Edit the question: a second version of it, answered anew.
    question = chat.user("a first question")
    question.hover()
    question.get_by_test_id("edit").click()
    chat.page.get_by_test_id("edit-input").fill("e edited question")
    chat.page.get_by_test_id("edit-save").click()
    edited = chat.user("e edited question")
    expect(edited.get_by_test_id("branch")).to_have_attribute("data-index", "2")
    pacer.release("e", 1)
    pacer.finish("e")
    expect(chat.assistant()).to_have_attribute("data-status", "complete")
    chat.wait_text(chat.assistant(), words("e", 1))
    expect(chat.page.locator("[data-testid=message]")).to_have_count(2)

    edited.locator("[data-action=prev]").click()  # back to the original question and its newest answer
    original = chat.user("a first question")
    expect(original.get_by_test_id("branch")).to_have_attribute("data-index", "1")
    expect(original.get_by_test_id("branch")).to_have_attribute("data-count", "2")
    chat.wait_text(chat.assistant(), words("a", 3, version=2))

    # The server's history follows the newest answer: the edited branch.
    assert [text_of(m) for m in chat_server.history(session)] == ["e edited question", words("e", 1)]

    # Sending while looking at the original branch continues that branch.
    chat.send("f follow up")
    pacer.release("f", 1)
    pacer.finish("f")
    expect(chat.assistant()).to_have_attribute("data-status", "complete")
    chat.wait_text(chat.assistant(), words("f", 1))
    assert [text_of(m) for m in chat_server.history(session)] == [
        "a first question", words("a", 3, version=2), "f follow up", words("f", 1)]
