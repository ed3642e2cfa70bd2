"""Agents written with other frameworks, served as turnline agents.

- :func:`langgraph_agent`: a compiled LangGraph graph (``turnline[langgraph]``);
- :func:`pydantic_ai_agent`: a PydanticAI agent (``turnline[pydantic-ai]``).

:func:`as_agent` (what ``turnline serve --agent module:attr`` uses) wraps
either one when given it directly. The frameworks are imported only when one
of their objects is served, so turnline runs without them. See
docs/frameworks.md.
"""

from __future__ import annotations

from typing import Any

from ..turn import Agent
from .langgraph import is_langgraph, langgraph_agent
from .pydantic_ai import is_pydantic_ai, pydantic_ai_agent


def as_agent(obj: Any) -> Agent:
    """An :class:`Agent`, a bare handler function, a compiled LangGraph
    graph or a PydanticAI agent, as an :class:`Agent`."""
    if isinstance(obj, Agent):
        return obj
    if is_langgraph(obj):
        return langgraph_agent(obj)
    if is_pydantic_ai(obj):
        return pydantic_ai_agent(obj)
    if callable(obj):
        return Agent(obj)
    raise TypeError(f"not an agent: {obj!r} (expected turnline.Agent, a function taking a Turn, "
                    "a compiled LangGraph graph or a PydanticAI agent)")


__all__ = ["as_agent", "is_langgraph", "is_pydantic_ai", "langgraph_agent", "pydantic_ai_agent"]
