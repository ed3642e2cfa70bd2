"""Graphs that LangGraph's dev server (`langgraph dev`) runs for the benchmarks.

Each graph has one node streaming ``BENCH_TOKENS`` tokens (default 53: three
to warm up, then 50), one every ``BENCH_INTERVAL`` seconds (default 0.01),
through LangGraph's custom stream (``get_stream_writer()``, the client asks
for ``stream_mode="custom"``); each token is ``{"i": index}``. Like
bench/agents.py for turnline, each node appends one line to
``BENCH_CLOSED_LOG`` when it stops producing, for whatever reason:

    <trial> <stopped_ns> <how> <produced_ns,...>

``trial`` is the state's ``trial`` (the client's id for the run); ``how`` is
``cancelled`` (the node saw asyncio's CancelledError), ``done`` (it ran all its
tokens) or ``error``; ``produced_ns`` are the times each token was handed to
the writer. Times are ``time.monotonic_ns()`` (CLOCK_MONOTONIC, system-wide, so
comparable with the measuring process).

- ``async_tokens``: an ``async def`` node awaiting ``asyncio.sleep``;
- ``sync_tokens``: a plain ``def`` node calling ``time.sleep`` (blocking work,
  as a sync LLM client does); LangGraph runs it in a worker thread.

The log line is written from a thread of its own, so the async node does no
blocking file I/O on the server's event loop (the dev server's blockbuster
check would reject it).
"""

from __future__ import annotations

import asyncio
import os
import threading
import time
from typing import TypedDict

from langgraph.config import get_stream_writer
from langgraph.graph import END, START, StateGraph

INTERVAL = float(os.environ.get("BENCH_INTERVAL", "0.01"))
TOKENS = int(os.environ.get("BENCH_TOKENS", "53"))
CLOSED_LOG = os.environ.get("BENCH_CLOSED_LOG", "")


class State(TypedDict, total=False):
    trial: str


def _log(trial: str, how: str, produced: list[int]) -> None:
    line = f"{trial} {time.monotonic_ns()} {how} {','.join(map(str, produced)) or '-'}\n"
    if CLOSED_LOG:
        def write() -> None:
            with open(CLOSED_LOG, "a") as f:
                f.write(line)
        threading.Thread(target=write, daemon=True).start()


async def _async_node(state: State) -> State:
    write = get_stream_writer()
    produced: list[int] = []
    how = "error"
    try:
        for i in range(TOKENS):
            await asyncio.sleep(INTERVAL)
            produced.append(time.monotonic_ns())
            write({"i": i})
        how = "done"
    except asyncio.CancelledError:
        how = "cancelled"
        raise
    finally:
        _log(state.get("trial", "-"), how, produced)
    return {}


def _sync_node(state: State) -> State:
    write = get_stream_writer()
    produced: list[int] = []
    how = "error"
    try:
        for i in range(TOKENS):
            time.sleep(INTERVAL)
            produced.append(time.monotonic_ns())
            write({"i": i})
        how = "done"
    finally:
        _log(state.get("trial", "-"), how, produced)
    return {}


def _graph(node) -> object:  # type: ignore[no-untyped-def]
    g = StateGraph(State)
    g.add_node("tokens", node)
    g.add_edge(START, "tokens")
    g.add_edge("tokens", END)
    return g.compile()


async_tokens = _graph(_async_node)
sync_tokens = _graph(_sync_node)
