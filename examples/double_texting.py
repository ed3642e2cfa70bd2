"""Double texting: the user sends a second message while the first answer streams.

The server enforces the policy, whichever client sends: run both answers side by
side (`concurrent`), queue the second (`queue`), stop the first and answer the
second (`interrupt`), refuse the second (`reject`), or stop the first and drop
that exchange from the branch (`rollback`).

    python examples/double_texting.py
"""

from __future__ import annotations

import asyncio

from _local import local_server, words

from turnline import Turn
from turnline.client import ClientTransport, TurnlineError, message_text
from turnline.protocol import TurnEnd


async def respond(turn: Turn):
    topic = turn.input.parts[0]["text"]
    async for w in words(f"Here is a short answer about {topic}, in a few words.", 0.02):
        yield w


async def demo(url: str, token: str, policy: str) -> None:
    async with ClientTransport(url, token, f"chat-{policy}") as chat:
        first = await chat.send("the weather")
        t1 = first["turn_ids"][0]
        await chat.wait_for(lambda v: v.core.turns[t1].chunks if t1 in v.core.turns else False)
        try:
            second = await chat.send("the news", policy=policy)
        except TurnlineError as exc:
            print(f"{policy:>10}: refused ({exc.code})")
            return
        counts = {k: len(v) if isinstance(v, list) else v for k, v in second.items() if k != "session"}
        print(f"{policy:>10}: ack {counts}")
        turns = [t1] + second.get("turn_ids", []) + second.get("queued", [])
        for t in turns:
            end: TurnEnd = await chat.wait_turn_end(t)
            print(f"{'':>12}{t[:13]}… {end.reason:<9} {message_text(end.message)!r}")
        if second.get("rejected"):
            print(f"{'':>12}second message rejected: {second['rejected']}")
        branch = [m.role[0] + ":" + (message_text(m) or m.parts[0].get("text", ""))[:22]
                  for m in chat.view.messages()]
        print(f"{'':>12}branch now: {branch}")


async def main() -> None:
    async with local_server(respond) as (url, token_for):
        for policy in ("concurrent", "queue", "interrupt", "reject", "rollback"):
            await demo(url, token_for("alice"), policy)


if __name__ == "__main__":
    asyncio.run(main())
