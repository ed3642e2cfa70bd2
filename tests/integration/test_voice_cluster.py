"""Voice on a Redis gateway, the turns on a worker in another process (docs/voice.md, "On many nodes").

The gateway is ``turnline serve --store redis://… --voice`` with no agent; the
worker is ``turnline worker --agent tests.cluster_agents:gated``, whose every
token waits for the test to push to a Redis list. The test is the voice peer
over a real WebSocket: it "plays" exactly what it acknowledges with
``played``, and speaks an espeak-ng WAV. Order is set by the gated tokens, the
acks, the ping barrier and the server's signals, never by sleeping.

One voice peer per session holds across gateways: two voice gateways on one
Redis prefix; a second peer's ``voice-start`` on the other gateway is refused
(``conflict``) until the first stops, or until a killed gateway's claim on the
session's voice expires in Redis (polled, not slept for).

In-process (two workers on one store, their loops not started): the ``record``
command a gateway sends for the voice events appends nothing twice when it is
retried on another worker, and appends nothing but those two kinds of event.
"""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import httpx
import pytest
from test_cluster import SECRET, TURNLINE, Cluster, Node, deltas, say, send_command, two_workers
from voicews import VoicePeer, heard_text, user_voice
from wsraw import text_of

from servers import free_port
from turnline.voice.audio import espeak_available, silence
from turnline.voice.playout import spoken_text

S = "voice-on-a-gateway"
# 60 gated tokens ("w0 " … "w59 ") are 230 characters: more than one clause
# (cut at the last space before 200), so speech starts while the turn runs on.
TOKENS = 60
PLAYED = 75  # audio frames of 20 ms the speaker plays before the user talks
TIMEOUT = 10.0


@pytest.fixture(scope="module")
def voices(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], bytes]:
    where = tmp_path_factory.mktemp("voices")
    return lambda text: user_voice(text, Path(where))


def voice_gateway(tmp_path: Path, cluster: Cluster, name: str = "gateway") -> Node:
    """``turnline serve --store redis://… --voice`` with no agent (not yet ready)."""
    port = free_port()
    node = Node(tmp_path, name, [TURNLINE, "serve", "--store", cluster.store, "--secret", SECRET, "--no-dev",
                                 "--voice", "--port", str(port), "--log-level", "warning",
                                 # audio sent far above real time: the audio limit is raised (test_limits.py)
                                 "--audio-bytes-per-s", "100000000", "--audio-burst-bytes", "100000000"],
                cluster.env, port)
    cluster.nodes.append(node)
    return node


def worker_node(tmp_path: Path, cluster: Cluster) -> Node:
    node = Node(tmp_path, "worker", [TURNLINE, "worker", "--store", cluster.store, "--agent",
                                     "tests.cluster_agents:gated", "--lease-ms", "1000", "--reaper-ms", "200",
                                     "--log-level", "warning"], cluster.env)
    cluster.nodes.append(node)
    return node


@pytest.fixture
def voice_cluster(tmp_path: Path, redis_url: str, redis_prefix: str) -> Iterator[tuple[Cluster, Node, Node]]:
    """A voice gateway (no worker in it) and one worker process."""
    cluster = Cluster(tmp_path, redis_url, redis_prefix)
    try:
        gateway = voice_gateway(tmp_path, cluster)
        worker = worker_node(tmp_path, cluster)
        gateway.wait_ready()
        worker.wait_ready()
        yield cluster, gateway, worker
    finally:
        cluster.stop()


@pytest.fixture
def two_voice_gateways(tmp_path: Path, redis_url: str, redis_prefix: str) -> Iterator[tuple[Cluster, Node, Node]]:
    """Two voice gateways on one Redis prefix, and one worker process."""
    cluster = Cluster(tmp_path, redis_url, redis_prefix)
    try:
        nodes = [voice_gateway(tmp_path, cluster, "gateway-a"), voice_gateway(tmp_path, cluster, "gateway-b"),
                 worker_node(tmp_path, cluster)]
        for node in nodes:
            node.wait_ready()
        yield cluster, nodes[0], nodes[1]
    finally:
        cluster.stop()


def played(turn_id: str, ms: int, final: bool = False) -> dict[str, Any]:
    return {"op": "played", "session": S, "turn_id": turn_id, "ms": ms, "final": final}


@pytest.mark.skipif(not espeak_available(), reason="espeak-ng is not installed")
async def test_barge_in_on_a_gateway_stops_the_workers_turn_and_keeps_what_was_heard(
        voice_cluster: tuple[Cluster, Node, Node], voices: Callable[[str], bytes]) -> None:
    cluster, gateway, worker = voice_cluster
    r = cluster.redis()
    token = cluster.token()
    async with asyncio.timeout(90):
        ws = await VoicePeer.open(gateway.ws, token)
        await ws.subscribe(S)
        await ws.ok({"op": "voice-start", "session": S})
        turn = (await ws.ok(say(S, "tell me a story")))["turn_ids"][0]
        await cluster.release(r, turn, TOKENS)  # the turn then waits at its gate: it runs until stopped
        await ws.wait_until(lambda: len(deltas(ws, S, turn)) == TOKENS, TIMEOUT, "the tokens")
        # espeak-ng spells the tokens out slowly: the 1.5 s the speaker plays say "w0 w1"
        heard_frames = (await ws.audio_until(turn, PLAYED + 10))[:PLAYED]
        await ws.ok(played(turn, PLAYED * 20))

        await ws.speak(S, voices("stop please") + silence(600))  # the user talks over the agent
        await ws.barrier()
        await ws.signal("interrupted", turn)
        await ws.ok(played(turn, PLAYED * 20, final=True))  # where the speaker stopped

        si = await ws.wait_event(S, "speech-interrupted", TIMEOUT, turn_id=turn)
        assert (si["mode"], si["reason"], si["played_ms"]) == ("response", "user_speaking", PLAYED * 20)
        end = await ws.turn_end(S, turn, TIMEOUT)
        assert end["reason"] == "cancelled"  # the LLM turn was stopped, on the worker that ran it
        assert await cluster.ran(r, turn) == [worker.pid]
        assert await cluster.aborted(r, turn) == [f"{worker.pid} cancelled"]
        (cancel,) = ws.find(S, "cancel")
        assert si["seq"] < cancel["seq"]  # as on one node: speech-interrupted, then the cancel
        rev = await ws.wait_event(S, "turn-revised", TIMEOUT, turn_id=turn)

        # The persisted message is exactly the words the speaker played, by the frames' own labels.
        spoken = spoken_text(end["message"]["parts"])
        heard = heard_text(spoken, heard_frames)
        assert 0 < len(heard) < len(spoken) and spoken.startswith(heard)
        assert text_of(rev["message"]) == heard and rev["reason"] == "cancelled"
        assert rev["message"]["metadata"]["voice"] == {"history": "keep-heard", "heard_ms": PLAYED * 20,
                                                       "heard_chars": len(heard), "unspoken": spoken[len(heard):]}
        async with httpx.AsyncClient() as http:
            got = await http.get(f"http://127.0.0.1:{gateway.port}/v1/sessions/{S}/messages",
                                 headers={"Authorization": f"Bearer {token}"})
        assert [text_of(m) for m in got.json()["messages"]] == ["tell me a story", heard]

        # Each voice event is in the log once (the stream, as the workers wrote it).
        log = [json.loads(fields[b"d"]) for _, fields in await r.xrange(f"{cluster.prefix}:{{{S}}}:log")]
        assert [e["type"] for e in log if e["type"] in ("speech-interrupted", "turn-revised")] == [
            "speech-interrupted", "turn-revised"]
        await ws.close()
    await r.aclose()


# ---------------------------------------------------------------- one voice peer per session, across gateways

CLAIMED = "voice-claimed"
CLAIM_EXPIRY_TIMEOUT = 30.0  # the default claim TTL is 10 s; generous for a busy machine


def voice_start(session: str = CLAIMED) -> dict[str, Any]:
    return {"op": "voice-start", "session": session}


async def test_a_second_gateway_refuses_voice_on_a_session_until_the_first_stops(
        two_voice_gateways: tuple[Cluster, Node, Node]) -> None:
    cluster, gateway_a, gateway_b = two_voice_gateways
    token = cluster.token()
    async with asyncio.timeout(60):
        peer_1 = await VoicePeer.open(gateway_a.ws, token)
        peer_2 = await VoicePeer.open(gateway_b.ws, token)
        await peer_1.ok(voice_start())
        refused = await peer_2.fails(voice_start(), "conflict")
        assert "another gateway" in refused["message"], refused
        await peer_1.ok(voice_start())  # a restart on the same connection keeps the session's voice
        await peer_2.fails(voice_start(), "conflict")

        await peer_1.ok({"op": "voice-stop", "session": CLAIMED})
        await peer_2.ok(voice_start())
        await peer_1.fails(voice_start(), "conflict")  # now gateway A is the other one
        await peer_1.close()
        await peer_2.close()


async def test_a_killed_gateways_voice_claim_expires_and_another_gateway_takes_the_session(
        two_voice_gateways: tuple[Cluster, Node, Node]) -> None:
    cluster, gateway_a, gateway_b = two_voice_gateways
    r = cluster.redis()
    claim = f"{cluster.prefix}:{{{CLAIMED}}}:voice"
    token = cluster.token()
    async with asyncio.timeout(90):
        peer_1 = await VoicePeer.open(gateway_a.ws, token)
        peer_2 = await VoicePeer.open(gateway_b.ws, token)
        await peer_1.ok(voice_start())
        await peer_2.fails(voice_start(), "conflict")

        gateway_a.kill()  # no release: the claim outlives it until its TTL runs out
        deadline = time.monotonic() + CLAIM_EXPIRY_TIMEOUT
        while await r.exists(claim):
            assert time.monotonic() < deadline, f"the dead gateway's claim {claim} did not expire"
            await asyncio.sleep(0.1)
        await peer_2.ok(voice_start())
        assert await r.exists(claim)  # gateway B's claim now
        await peer_1.abort()
        await peer_2.close()
    await r.aclose()


# ---------------------------------------------------------------- the record command


def record(rid: str, session: str, events: list[dict[str, Any]], after: int = 0) -> Any:
    from turnline.agent.cluster import Command

    return Command(rid=rid, gw="gw-test", session=session, op="record", args={"events": events, "after": after})


async def test_a_retried_record_appends_nothing_twice_and_records_only_voice_events(
        redis_url: str, redis_prefix: str) -> None:
    import msgspec

    from turnline.protocol import ErrorCode, Message, MessageEvent, SpeechInterrupted, TurnRevised

    gate = asyncio.Event()

    async def agent(turn: Any) -> Any:
        yield "Once upon a time. "
        await gate.wait()
        yield "The end."

    session = "record-retry"
    async with two_workers(redis_url, redis_prefix, agent) as (store, wa, wb), asyncio.timeout(30):
        assert (await wa.handle(send_command("req-1", session, "m1", "turn-1"))).result["started"] == ["turn-1"]
        hub_a = wa.runtime.loaded(session)
        assert hub_a is not None
        after = hub_a.state.last_seq
        cut = msgspec.to_builtins(SpeechInterrupted(turn_id="turn-1", reason="user_speaking", mode="response",
                                                    played_ms=400, client_id="alice"))
        revision = msgspec.to_builtins(TurnRevised(turn_id="turn-1", reason="complete", client_id="agent",
                                                   message=msgspec.structs.replace(
                                                       hub_a.state.messages["m1"], id="nope")))

        # A turn-revised of a running turn is refused, and so is anything but the voice events.
        refused = await wa.handle(record("req-r0", session, [revision]))
        assert refused.error is not None and refused.error.code == ErrorCode.CONFLICT, refused
        message = msgspec.to_builtins(MessageEvent(message=Message(id="m9", role="user", parts=[], parent_id=None)))
        refused = await wa.handle(record("req-r1", session, [message]))
        assert refused.error is not None and refused.error.code == ErrorCode.FORBIDDEN, refused

        first = await wa.handle(record("req-r2", session, [cut], after))
        assert first is not None and first.error is None and first.result == {"appended": 1}, first
        gate.set()
        await asyncio.gather(*hub_a._tasks.values())  # the turn ran to its end
        ended = hub_a.state.turns["turn-1"]
        heard = msgspec.to_builtins(TurnRevised(turn_id="turn-1", reason="complete", client_id="agent",
                                                message=msgspec.structs.replace(
                                                    hub_a.state.messages[ended.message_id],
                                                    parts=[{"type": "text", "text": "Once upon"}])))
        revised = await wa.handle(record("req-r3", session, [heard]))
        assert revised is not None and revised.result == {"appended": 1}, revised

        # A dies before its answers reach the gateway; B takes the session and
        # the gateway, unsure, sends both again: B appends nothing.
        await wa.bus.redis.delete(store.key(session, "lease"))
        again = await wb.handle(record("req-r2", session, [cut], after))
        assert again is not None and again.result == {"appended": 0}, again
        again = await wb.handle(record("req-r3", session, [heard]))
        assert again is not None and again.result == {"appended": 0}, again

        log = [json.loads(rec.data) for rec in await store.read(session)]
        assert [e["type"] for e in log if e["type"] in ("speech-interrupted", "turn-revised")] == [
            "speech-interrupted", "turn-revised"]
        assert not any(e["type"] == "message" and e["message"]["id"] == "m9" for e in log)
        hub_b = wb.runtime.loaded(session)
        assert hub_b is not None
        assert text_of(msgspec.to_builtins(hub_b.state.messages[ended.message_id])) == "Once upon"
