"""A LangGraph graph served by turnline: its tokens stream to every client, a
stop cancels the graph's run (sync nodes too, at their model's next token),
and the history kept is what the user saw.

Offline it runs LangChain's own fake chat model (no key, no network):

    python examples/langgraph_agent.py "Hi there"

With a real model (``pip install langchain langchain-openai``, or the
integration of your provider) the graph is a tool-calling agent with a
``weather`` tool:

    LANGGRAPH_MODEL=openai:gpt-4o-mini OPENAI_API_KEY=... python examples/langgraph_agent.py "Weather in Paris?"

To serve the graph to browsers and other clients (from the repository root):

    turnline serve --agent examples.langgraph_agent:graph
"""

from __future__ import annotations

import asyncio
import itertools
import os
import sys
from typing import Any

from langchain_core.tools import tool
from langgraph.graph import START, MessagesState, StateGraph
from langgraph.prebuilt import ToolNode, tools_condition


@tool
def weather(city: str) -> dict[str, str]:
    """The current weather in a city."""
    return {"city": city, "forecast": "14°C, light rain"}


def make_model() -> Any:
    name = os.environ.get("LANGGRAPH_MODEL")
    if name:
        from langchain.chat_models import init_chat_model  # pip install langchain langchain-<provider>

        return init_chat_model(name).bind_tools([weather])
    from langchain_core.language_models.fake_chat_models import GenericFakeChatModel

    # streams its answer word by word, as a real model does
    return GenericFakeChatModel(messages=itertools.cycle([
        "Hello from LangGraph! This answer streams through turnline one token at a time; "
        "press stop and the graph's run is cancelled where it is."]))


model = make_model()


def agent(state: MessagesState) -> dict[str, Any]:
    # A sync node: LangGraph runs it in a worker thread; turnline stops it at
    # its model's next token after a cancel.
    return {"messages": [model.invoke(state["messages"])]}


builder = StateGraph(MessagesState)
builder.add_node("agent", agent)
builder.add_node("tools", ToolNode([weather]))
builder.add_edge(START, "agent")
builder.add_conditional_edges("agent", tools_condition)
builder.add_edge("tools", "agent")
graph = builder.compile()  # `turnline serve --agent` takes the compiled graph as it is


async def main(question: str) -> None:
    from _local import local_server

    from turnline.client import ClientTransport, message_text

    async with local_server(graph) as (url, token_for):
        async with ClientTransport(url, token_for("alice"), "chat-langgraph") as chat:
            ack = await chat.send(question)
            end = await chat.wait_turn_end(ack["turn_ids"][0], timeout=300)
            print(message_text(end.message))
            print(f"reason: {end.reason}", f"({end.error.code}: {end.error.message})" if end.error else "")


if __name__ == "__main__":
    asyncio.run(main(" ".join(sys.argv[1:]) or "Hi there"))
