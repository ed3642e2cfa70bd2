"""Steering: a message sent into a running turn, without starting a new one.

The agent checks its inbox between words (`turn.has_input()`), and takes the
user's correction into the answer it is already writing.

    python examples/steering.py
"""

from __future__ import annotations

import asyncio

from _local import local_server

from turnline import Turn
from turnline.client import ClientTransport, message_text


async def respond(turn: Turn):
    topic = turn.input.parts[0]["text"]
    for i in range(40):
        if turn.has_input():
            for note in turn.take_inputs():
                topic = note.parts[0]["text"]
            yield f"[switching to {topic}] "
        yield f"{topic}-{i} "
        await asyncio.sleep(0.02)


async def main() -> None:
    async with local_server(respond) as (url, token_for):
        async with ClientTransport(url, token_for("alice"), "chat-steer") as chat:
            ack = await chat.send("cats")
            turn_id = ack["turn_ids"][0]
            await chat.wait_for(lambda v: "cats-3" in message_text(v.messages()[-1]))
            await chat.send("dogs, please", steer=turn_id)  # into the running turn
            end = await chat.wait_turn_end(turn_id)
            text = message_text(end.message)
            print(text[:160] + "…")
            assert "[switching to dogs, please]" in text
            print("turns started:", len(chat.view.core.turns), "(the steer started none)")


if __name__ == "__main__":
    asyncio.run(main())
