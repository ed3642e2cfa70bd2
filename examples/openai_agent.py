"""An agent on any OpenAI-compatible server: OpenAI, vLLM, Ollama, llama.cpp
server, LiteLLM. The model's stream goes through turnline; a stop closes the
model's HTTP response, so the server stops generating.

    OPENAI_BASE_URL=http://localhost:11434/v1 OPENAI_MODEL=llama3.2 \\
        python examples/openai_agent.py "Why is the sky blue?"

``OPENAI_API_KEY`` is sent when set (OpenAI itself needs it; local servers
usually do not). To serve this agent to browsers and other clients instead:

    turnline serve --agent examples.openai_agent:agent    # from the repository root
"""

from __future__ import annotations

import asyncio
import os
import sys

from turnline import Agent, Turn
from turnline.agent.providers import openai_chat

MODEL = os.environ.get("OPENAI_MODEL", "gpt-4o-mini")


async def respond(turn: Turn):
    # turn.history is the conversation so far, ending with the user's message;
    # the returned stream is written to the session (a cancel closes it).
    return openai_chat(model=MODEL, history=turn.history, system="You are a concise assistant.")


agent = Agent(respond, name="openai")


async def main(question: str) -> None:
    from _local import local_server

    from turnline.client import ClientTransport, message_text

    async with local_server(agent) as (url, token_for):
        async with ClientTransport(url, token_for("alice"), "chat-openai") as chat:
            ack = await chat.send(question)
            end = await chat.wait_turn_end(ack["turn_ids"][0], timeout=300)
            print(message_text(end.message))
            print(f"reason: {end.reason}", f"({end.error.code}: {end.error.message})" if end.error else "")
            usage = (end.message.metadata or {}).get("usage")
            if usage:
                print("usage:", usage)


if __name__ == "__main__":
    if not (os.environ.get("OPENAI_BASE_URL") or os.environ.get("OPENAI_API_KEY")):
        sys.exit("set OPENAI_BASE_URL (and OPENAI_API_KEY if the server needs one); see the docstring")
    asyncio.run(main(" ".join(sys.argv[1:]) or "Say hello in five words."))
