"""The agent of the multi-node tests, run by `turnline worker` subprocesses
(``--agent tests.cluster_agents:gated``). The test steers it through Redis,
the one thing every process shares, with keys under ``TURNLINE_TEST_PREFIX``:

- ``<prefix>:ran:<turn id>``   a list: the pid of every process that ran the turn;
- ``<prefix>:gate:<turn id>``  a list the agent pops before each token: the test
  pushes ``go`` to release one token, ``end`` to finish the turn;
- ``<prefix>:aborted:<turn id>`` a list: ``<pid> <reason>`` once its abort fired
  (written by on_abort, so before the turn-end).

A prompt starting with ``quick`` is answered at once (``quick answer``).
With ``TURNLINE_TEST_REDIS_CLUSTER=1`` the URL is a node of a Redis Cluster
(every key above is used alone, so each call goes to one node).
"""

from __future__ import annotations

import os
from typing import Any, AsyncIterator

import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster

from turnline import Agent

_client: Any = None


async def _redis() -> tuple[Any, str]:
    global _client
    if _client is None:
        url = os.environ["TURNLINE_TEST_REDIS"]
        _client = RedisCluster.from_url(url) if os.environ.get("TURNLINE_TEST_REDIS_CLUSTER") else \
            aioredis.Redis.from_url(url)
    if isinstance(_client, RedisCluster):
        await _client.initialize()  # (before the first commands: until then redis-py routes them to one node)
    return _client, os.environ["TURNLINE_TEST_PREFIX"]


def _prompt(turn: Any) -> str:
    return " ".join(p.get("text", "") for p in turn.input.parts if p.get("type") == "text")


async def _gated(turn: Any) -> AsyncIterator[str]:
    r, prefix = await _redis()
    await r.rpush(f"{prefix}:ran:{turn.turn_id}", os.getpid())
    if _prompt(turn).startswith("quick"):
        yield "quick answer"
        return
    i = 0
    while True:
        got = await r.blpop([f"{prefix}:gate:{turn.turn_id}"], timeout=2)  # (the client's socket times out at 5 s)
        if got is None:
            continue
        if got[1] == b"end":
            return
        yield f"w{i} "
        i += 1


async def _aborted(_write: Any, turn: Any) -> None:
    # on_abort runs before the turn-end is appended: a client that sees the
    # turn-end finds this record.
    r, prefix = await _redis()
    await r.rpush(f"{prefix}:aborted:{turn.turn_id}", f"{os.getpid()} {turn.abort_signal.reason}")


gated = Agent(_gated, on_abort=_aborted)
