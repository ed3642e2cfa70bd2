"""Branching: regenerate an answer, edit an earlier message, and move between
the branches (‹ 1/2 ›). Nothing is overwritten: the conversation is a tree, and
every branch stays in the log.

    python examples/branching.py
"""

from __future__ import annotations

import asyncio
import itertools

from _local import local_server

from turnline import Turn
from turnline.client import ClientTransport, message_text
from turnline.protocol import MessageIn, text_part, user_message

drafts = itertools.count(1)


async def respond(turn: Turn):
    yield f"Answer #{next(drafts)} to {turn.input.parts[0]['text']!r}"


def show(chat: ClientTransport, title: str) -> None:
    print(title)
    for m in chat.view.messages():
        siblings = chat.view.siblings(m.id)
        nav = f" ‹ {siblings.index(m.id) + 1}/{len(siblings)} ›" if len(siblings) > 1 else ""
        print(f"   {m.role:>9}: {message_text(m)}{nav}")


async def main() -> None:
    async with local_server(respond) as (url, token_for):
        async with ClientTransport(url, token_for("alice"), "chat-branch") as chat:
            # A system prompt as the root; the question hangs below it, so it can be edited.
            ack = await chat.send([MessageIn(parts=[text_part("Be terse.")], role="system"),
                                   user_message("Name a colour")])
            question = ack["message_ids"][-1]
            first = await chat.wait_turn_end(ack["turn_ids"][0])
            show(chat, "after the first answer:")

            again = await chat.regenerate(first.message.id)  # a new sibling answer
            await chat.wait_turn_end(again["turn_ids"][0])
            show(chat, "after regenerate:")

            parent = chat.view.core.messages[question].parent_id
            edit = await chat.send("Name a fruit", parent_id=parent)  # an edit: a new branch
            await chat.wait_turn_end(edit["turn_ids"][0])
            show(chat, "after editing the question:")

            chat.view.select(first.message.id)  # navigate back to the first answer
            show(chat, "back on the first branch:")
            assert message_text(chat.view.messages()[-1]) == message_text(first.message)


if __name__ == "__main__":
    asyncio.run(main())
