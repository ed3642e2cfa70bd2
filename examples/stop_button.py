"""A stop button: the saved answer is exactly what the user saw.

The client stops the answer mid-stream. Its cancel carries `seen`, the last
event its screen rendered, so the persisted message equals the screen, to the
character, even though the agent had produced more by the time the stop arrived.

    python examples/stop_button.py
"""

from __future__ import annotations

import asyncio

from _local import local_server, words

from turnline import Agent, Turn
from turnline.client import ClientTransport, message_text

ANSWER = ("Streaming feels fast only when the stream can be stopped just as fast. "
          "A session log with sequence numbers gives you both: resume after a dropped "
          "connection without losing a word, and a stop that is exact to the token you saw.")


async def respond(turn: Turn):
    async for w in words(ANSWER):
        yield w


async def main() -> None:
    async with local_server(Agent(respond)) as (url, token_for):
        async with ClientTransport(url, token_for("alice"), "chat-stop") as chat:
            ack = await chat.send("Why does the stop button matter?")
            turn_id = ack["turn_ids"][0]

            def screen() -> str:
                return message_text(next((m for m in chat.view.messages() if m.role == "assistant"), None))

            await chat.wait_for(lambda view: len(screen().split()) >= 8)
            print("on screen when stop was pressed:", repr(screen()))
            await chat.cancel()  # own turns; sends seen = what this view applied
            shown = screen()
            end = await chat.wait_turn_end(turn_id)
            print("turn ended:", end.reason, "| interrupted:", end.message.metadata["interrupted"])
            print("persisted:", repr(message_text(end.message)))
            assert message_text(end.message) == shown, "history must equal what the user saw"
            print("history == screen: yes")


if __name__ == "__main__":
    asyncio.run(main())
