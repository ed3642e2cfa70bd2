"""providers: what turnline adds between a client and an LLM provider, and what
a stop leaves running upstream. Per adapter (OpenAI Chat Completions, OpenAI
Responses, Anthropic Messages), against the fake providers of
tests/fakes/providers.py in their own process (real HTTP, real wire formats):

(a) time to first token. The fake holds every first token for a fixed 20 ms.
    Direct: this process POSTs to the fake and times the first text delta.
    Via turnline: a WebSocket client sends a message to a `turnline serve`
    subprocess (SQLite store) whose agent calls the fake through the adapter,
    timed from the send to the first `text-delta` chunk. Both are measured in
    the same run, alternating; the overhead is via-turnline minus direct.

(b) upstream tokens generated after a stop. The fake streams 50 tokens, one
    every 5 ms, and records when it generated each one. The client stops after
    3 tokens. turnline: a `cancel` on the session (the adapter closes the
    provider's HTTP response). Peer: the AI SDK route-handler pattern
    (bench/peers/aisdk_fetch_abort.py) where stop aborts only the client's fetch,
    and the same route with the request's abort signal wired to the model call.

    python -m bench providers [--quick]
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid
from typing import Any

import httpx
import websockets

from bench._common import frame_events, pct, print_table, save, token, turnline_server
from bench.peers._harness import SSEReader, peer_server
from turnline import Agent, Turn
from turnline.agent.providers import anthropic_messages, openai_chat, openai_responses

ADAPTERS = ["openai_chat", "openai_responses", "anthropic"]
FIRST_TOKEN_S = 0.02
TTFT_SCRIPT = f"fake:tokens=5,first={FIRST_TOKEN_S},delay=0.001"
STOP_SCRIPT = "fake:tokens=50,delay=0.005"
STOP_AFTER = 3  # text deltas the client sees before it stops
PATHS = {"openai_chat": "/v1/chat/completions", "openai_responses": "/v1/responses", "anthropic": "/v1/messages"}


# ---------------------------------------------------------------- the agent (runs in `turnline serve`)


def provider_call(adapter: str, model: str, base: str, tag: str, history: Any) -> Any:
    """One adapter call to the fake; ``tag`` names the request in the fake's records."""
    headers = {"x-fake-tag": tag}
    if adapter == "openai_chat":
        return openai_chat(model=model, history=history, base_url=f"{base}/v1", api_key="bench", headers=headers)
    if adapter == "openai_responses":
        return openai_responses(model=model, history=history, base_url=f"{base}/v1", api_key="bench",
                                headers=headers)
    return anthropic_messages(model=model, history=history, base_url=base, api_key="bench", headers=headers)


async def _respond(turn: Turn) -> Any:
    """The user's text is ``<adapter> <script> <tag> <fake provider URL>``."""
    adapter, model, tag, fake = " ".join(p.get("text", "") for p in turn.input.parts).split()
    return provider_call(adapter, model, fake, tag, [turn.input])


agent = Agent(_respond, name="bench-providers")


# ---------------------------------------------------------------- direct calls


def _is_text_delta(adapter: str, data: str) -> bool:
    obj = json.loads(data) if data.startswith("{") else {}
    if adapter == "openai_chat":
        return any((c.get("delta") or {}).get("content") for c in obj.get("choices") or [])
    if adapter == "openai_responses":
        return obj.get("type") == "response.output_text.delta"
    return obj.get("type") == "content_block_delta" and (obj.get("delta") or {}).get("type") == "text_delta"


def _direct_body(adapter: str) -> dict[str, Any]:
    if adapter == "openai_chat":
        return openai_chat(model=TTFT_SCRIPT, messages=[{"role": "user", "content": "hi"}]).body
    if adapter == "openai_responses":
        return openai_responses(model=TTFT_SCRIPT, input="hi").body
    return anthropic_messages(model=TTFT_SCRIPT, messages=[{"role": "user", "content": "hi"}]).body


async def direct_ttft(client: httpx.AsyncClient, fake: str, adapter: str) -> float:
    t0 = time.perf_counter()
    first = None
    async with client.stream("POST", fake + PATHS[adapter], json=_direct_body(adapter)) as r:
        reader = SSEReader(r)
        while (data := await reader.next_event()) is not None:
            if first is None and _is_text_delta(adapter, data):
                first = time.perf_counter()
    assert first is not None, "no text delta"
    return (first - t0) * 1000


# ---------------------------------------------------------------- via turnline


class Session:
    """One WebSocket to `turnline serve`, a fresh session per trial."""

    def __init__(self, ws: Any):
        self.ws = ws
        self.ids = iter(range(1, 10**9))

    async def fresh(self) -> str:
        session = f"b-{uuid.uuid4().hex[:12]}"
        await self.request({"op": "subscribe", "session": session})
        return session

    async def request(self, frame: dict[str, Any]) -> dict[str, Any]:
        fid = next(self.ids)
        await self.ws.send(json.dumps({**frame, "id": fid}))
        while True:
            reply = json.loads(await self.ws.recv())
            if reply.get("op") in ("ack", "error") and reply.get("id") == fid:
                assert reply["op"] == "ack", reply
                return reply

    async def events(self, session: str) -> Any:
        while True:
            frame = json.loads(await self.ws.recv())
            for ev in frame_events(frame):
                yield ev

    async def done(self, session: str) -> None:
        await self.request({"op": "unsubscribe", "session": session})


async def turnline_ttft(s: Session, adapter: str, fake: str) -> float:
    session = await s.fresh()
    t0 = time.perf_counter()
    await s.ws.send(json.dumps({"op": "send", "session": session, "id": "send",
                                "messages": [{"parts": [{"type": "text", "text": f"{adapter} {TTFT_SCRIPT} t {fake}"}]}]}))
    first = None
    async for ev in s.events(session):
        if ev["type"] == "chunk" and ev["chunk"]["type"] == "text-delta" and first is None:
            first = time.perf_counter()
        elif ev["type"] == "turn-end":
            assert ev["reason"] == "complete", ev
            break
    await s.done(session)
    assert first is not None
    return (first - t0) * 1000


async def turnline_stop(s: Session, adapter: str, fake: str, http: httpx.AsyncClient) -> dict[str, Any]:
    session = await s.fresh()
    tag = uuid.uuid4().hex
    await s.ws.send(json.dumps({"op": "send", "session": session, "id": "send",
                                "messages": [{"parts": [{"type": "text", "text": f"{adapter} {STOP_SCRIPT} {tag} {fake}"}]}]}))
    seen = 0
    async for ev in s.events(session):
        if ev["type"] == "chunk" and ev["chunk"]["type"] == "text-delta":
            seen += 1
            if seen == STOP_AFTER:
                break
    t_stop = time.monotonic_ns()
    await s.ws.send(json.dumps({"op": "cancel", "session": session, "id": "cancel"}))
    async for ev in s.events(session):
        if ev["type"] == "turn-end":
            assert ev["reason"] == "cancelled", ev
            break
    await s.done(session)
    return await _upstream_after(http, fake, tag, t_stop)


# ---------------------------------------------------------------- the peer


async def peer_stop(http: httpx.AsyncClient, peer: str, adapter: str, fake: str, wire_abort: bool) -> dict[str, Any]:
    tag = uuid.uuid4().hex
    request = http.build_request("POST", f"{peer}/chat", json={"provider": adapter, "model": STOP_SCRIPT, "tag": tag,
                                                               "upstream": fake, "wire_abort": wire_abort})
    response = await http.send(request, stream=True)
    reader = SSEReader(response)
    seen = 0
    try:
        while seen < STOP_AFTER:
            data = await reader.next_event()
            assert data is not None, "the peer's stream ended early"
            seen += json.loads(data).get("type") == "text-delta" if data.startswith("{") else 0
        t_stop = time.monotonic_ns()  # stop: abort the fetch (close the connection)
    finally:
        await reader.aclose()
        await response.aclose()
    return await _upstream_after(http, fake, tag, t_stop)


async def _upstream_after(http: httpx.AsyncClient, fake: str, tag: str, t_stop: int) -> dict[str, Any]:
    """Once the fake's stream for ``tag`` has ended: tokens it generated after
    the stop, and how long after the stop it saw the client go."""
    deadline = time.monotonic() + 10
    while True:
        (rec,) = (await http.get(f"{fake}/_fake/records", params={"tag": tag})).json() or [None]
        if rec is not None and rec["finished_ns"] is not None:
            break
        if time.monotonic() > deadline:
            raise TimeoutError(f"the fake's stream {tag} did not end")
        await asyncio.sleep(0.005)
    after = sum(1 for t in rec["token_ns"] if t > t_stop)
    gone_ms = (rec["disconnect_ns"] - t_stop) / 1e6 if rec["disconnect_ns"] else None
    return {"after": after, "generated": rec["generated"], "disconnect_ms": gone_ms, "end": rec["end"]}


# ---------------------------------------------------------------- the run


def _stop_row(rows: list[dict[str, Any]]) -> dict[str, Any]:
    after = [r["after"] for r in rows]
    gone = [r["disconnect_ms"] for r in rows if r["disconnect_ms"] is not None]
    return {"trials": len(rows), "after_mean": sum(after) / len(after), "after_max": max(after),
            "generated_mean": sum(r["generated"] for r in rows) / len(rows),
            "disconnect_p50": pct(gone, 50), "disconnect_p99": pct(gone, 99),
            "never_disconnected": len(rows) - len(gone)}


async def run(ttft_trials: int, stop_trials: int, peer_trials: int) -> dict[str, Any]:
    results: dict[str, Any] = {"first_token_s": FIRST_TOKEN_S, "stop_script": STOP_SCRIPT, "stop_after": STOP_AFTER,
                               "ttft": {}, "stop": {}}
    async with contextlib.AsyncExitStack() as stack:
        # the three processes start side by side; the fake's URL travels in each request
        fake, peer, port = await asyncio.gather(
            stack.enter_async_context(peer_server("tests.fakes.providers:app")),
            stack.enter_async_context(peer_server("bench.peers.aisdk_fetch_abort:app")),
            asyncio.to_thread(stack.enter_context, turnline_server("bench.providers:agent")))
        http = await stack.enter_async_context(httpx.AsyncClient(timeout=30))
        s = Session(await stack.enter_async_context(websockets.connect(
            f"ws://127.0.0.1:{port}/v1/ws", additional_headers={"Authorization": f"Bearer {token()}"},
            max_size=None)))
        for adapter in ADAPTERS:
            await direct_ttft(http, fake, adapter)  # warm both paths' connections
            await turnline_ttft(s, adapter, fake)
            direct, via = [], []
            for _ in range(ttft_trials):
                direct.append(await direct_ttft(http, fake, adapter))
                via.append(await turnline_ttft(s, adapter, fake))
            results["ttft"][adapter] = {
                "trials": ttft_trials, "direct_p50": pct(direct, 50), "direct_p99": pct(direct, 99),
                "turnline_p50": pct(via, 50), "turnline_p99": pct(via, 99),
                "overhead_p50": pct(via, 50) - pct(direct, 50), "overhead_p99": pct(via, 99) - pct(direct, 99)}
        for adapter in ADAPTERS:
            stop = results["stop"][adapter] = {}
            stop["turnline cancel"] = _stop_row(
                [await turnline_stop(s, adapter, fake, http) for _ in range(stop_trials)])
            stop["peer: AI SDK, fetch abort only"] = _stop_row(
                [await peer_stop(http, peer, adapter, fake, False) for _ in range(peer_trials)])
            stop["peer: AI SDK, abortSignal wired"] = _stop_row(
                [await peer_stop(http, peer, adapter, fake, True) for _ in range(stop_trials)])
    return results


def table(results: dict[str, Any]) -> None:
    cols = ["adapter", "trials", "direct p50 ms", "p99 ms", "via turnline p50 ms", "p99 ms",
            "overhead p50 ms", "overhead p99 ms"]
    rows = [[a, r["trials"], r["direct_p50"], r["direct_p99"], r["turnline_p50"], r["turnline_p99"],
             r["overhead_p50"], r["overhead_p99"]] for a, r in results["ttft"].items()]
    print_table(f"providers (a): time to first token, fake provider holds the first token "
                f"{results['first_token_s'] * 1000:.0f} ms", cols, rows)
    cols = ["adapter", "system", "trials", "upstream tokens after stop (mean / max)",
            "stop→upstream closed p50 / p99 ms", "never closed"]
    rows = []
    for adapter, systems in results["stop"].items():
        for name, r in systems.items():
            closed = "—" if r["never_disconnected"] == r["trials"] else \
                f"{r['disconnect_p50']:.2f} / {r['disconnect_p99']:.2f}"
            rows.append([adapter, name, r["trials"], f"{r['after_mean']:.1f} / {r['after_max']}", closed,
                         r["never_disconnected"]])
    print_table(f"providers (b): upstream tokens generated after a stop ({results['stop_script']}, "
                f"stop after {results['stop_after']} tokens)", cols, rows)


def bench(quick: bool) -> None:
    results = asyncio.run(run(ttft_trials=6 if quick else 200, stop_trials=3 if quick else 50,
                              peer_trials=1 if quick else 20))
    table(results)
    print(f"written {save('providers', results)}")


if __name__ == "__main__":
    import sys

    bench("--quick" in sys.argv)
