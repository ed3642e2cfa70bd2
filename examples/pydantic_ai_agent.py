"""A PydanticAI agent served by turnline: its text and tool calls stream to
every client, a stop cancels the run (the model stream is closed, a running
async tool cancelled), and the history kept is what the user saw.

Offline it runs PydanticAI's own ``TestModel`` (no key, no network), which
calls the ``weather`` tool and then answers:

    python examples/pydantic_ai_agent.py "Weather in Paris?"

With a real model (``pip install 'pydantic-ai-slim[openai]'``, or your provider's extra):

    PYDANTIC_AI_MODEL=openai:gpt-4o-mini OPENAI_API_KEY=... python examples/pydantic_ai_agent.py "Weather in Paris?"

To serve the agent to browsers and other clients (from the repository root):

    turnline serve --agent examples.pydantic_ai_agent:agent
"""

from __future__ import annotations

import asyncio
import os
import sys

from pydantic_ai import Agent
from pydantic_ai.models.test import TestModel

model = os.environ.get("PYDANTIC_AI_MODEL") or TestModel()
agent = Agent(model, instructions="You are a concise assistant. Use the weather tool for weather questions.")


@agent.tool_plain
async def weather(city: str) -> dict[str, str]:
    """The current weather in a city."""
    return {"city": city, "forecast": "14°C, light rain"}


async def main(question: str) -> None:
    from _local import local_server

    from turnline.client import ClientTransport

    async with local_server(agent) as (url, token_for):  # the PydanticAI agent as it is
        async with ClientTransport(url, token_for("alice"), "chat-pydantic-ai") as chat:
            ack = await chat.send(question)
            end = await chat.wait_turn_end(ack["turn_ids"][0], timeout=300)
            for part in end.message.parts:
                if part["type"] == "text":
                    print(part["text"])
                elif part["type"].startswith("tool-"):
                    print(f"[{part['type'][5:]}({part.get('input')}) -> {part.get('output')}]")
            print(f"reason: {end.reason}", f"({end.error.code}: {end.error.message})" if end.error else "")


if __name__ == "__main__":
    asyncio.run(main(" ".join(sys.argv[1:]) or "Weather in Paris?"))
