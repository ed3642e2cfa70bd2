"""Voice barge-in against a real server on loopback (docs/voice.md).

The test is the voice peer: it receives the agent's speech as binary frames,
"plays" exactly what it acknowledges with ``played``, and speaks with
espeak-ng WAVs made at test time. Order is controlled with acks, the ping
barrier (frames are decided in arrival order), a gate the agent waits at,
and the server's signals; the barge-in rules run on the input audio's own
clock, so nothing here depends on timing margins.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any, Callable

import pytest
from voicews import VoicePeer, heard_text, user_voice
from wsraw import Gate, text_of

from turnline.agent import Aborted, RuntimeConfig
from turnline.core.limits import LimitsConfig
from turnline.protocol_audio import AUDIO_OUT, AudioFrame, audio_in, encode_audio
from turnline.voice import UNINTERRUPTIBLE, ScriptedSTT, VoiceConfig, install_voice
from turnline.voice.audio import espeak_available, silence
from turnline.voice.playout import spoken_text

pytestmark = pytest.mark.skipif(not espeak_available(), reason="espeak-ng is not installed")

S = "talk-1"
STORY = ("Once upon a time there was a small robot. It liked to count the stars, one by one, every night. "
         "One night a star was missing, so the robot set out to find it. ") * 3
AFTER = "And that is the end of the story."
LOOKUP = "Let me look that up for you, it will only take a moment. "
RESULT = "It is three degrees in Oslo."


@pytest.fixture(scope="session")
def voices(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], bytes]:
    where = tmp_path_factory.mktemp("voices")
    return lambda text: user_voice(text, Path(where))


def prompt(turn: Any) -> str:
    return " ".join(p.get("text", "") for p in turn.input.parts if p.get("type") == "text")


class Agent:
    """``tell me a story``: the story, then it waits at the gate, then AFTER.
    ``weather …``: a sentence, a tool call that waits at the gate (or the
    abort), then the result. Anything else: "Okay." Records what it saw."""

    def __init__(self, gate: Gate, first: Any = None):
        self.gate = gate
        self.first = first
        self.histories: dict[str, list[str]] = {}
        self.tool_aborted: list[str] = []

    async def __call__(self, turn: Any) -> None:
        self.histories[prompt(turn)] = [text_of({"parts": m.parts}) for m in turn.history]
        if self.first is not None:
            await turn.write(self.first)
        if prompt(turn) == "tell me a story":
            await turn.stream_response(self._story())
        elif prompt(turn) == "think hard":
            await turn.stream_response(self._think())
        elif prompt(turn).startswith("weather"):
            await turn.write(LOOKUP)
            await turn.write({"type": "tool-input-available", "toolCallId": "call-1", "toolName": "weather",
                              "input": {"city": "Oslo"}})
            output = await self._weather(turn)
            await turn.write({"type": "tool-output-available", "toolCallId": "call-1", "output": output})
            await turn.write(RESULT)
        else:
            await turn.write("Okay.")

    async def _story(self) -> Any:
        yield STORY
        await self.gate.wait()
        yield AFTER

    async def _think(self) -> Any:
        await self.gate.wait()
        yield "Here is what I think."

    async def _weather(self, turn: Any) -> dict[str, Any]:
        opened = asyncio.ensure_future(self.gate.wait())
        aborted = asyncio.ensure_future(_aborted(turn))
        await asyncio.wait([opened, aborted], return_when=asyncio.FIRST_COMPLETED)
        opened.cancel()
        aborted.cancel()
        if turn.aborted:  # the tool got the turn's abort
            self.tool_aborted.append(turn.abort_signal.reason)
            raise Aborted(turn.abort_signal.reason)
        return {"celsius": 3}


async def _aborted(turn: Any) -> None:
    await turn.abort_signal


def voice_server(serve: Any, agent: Any, **config: Any) -> tuple[Any, Any]:
    # The peers here send audio as fast as the socket takes it (the rules run on
    # the audio's own clock): far above real time, so the audio limit is raised
    # (it has its own test: test_limits.py).
    srv = serve(agent=agent, config=RuntimeConfig(limits=LimitsConfig(audio_bytes_per_s=100_000_000,
                                                                      audio_burst_bytes=100_000_000)))

    async def install() -> Any:
        return install_voice(srv.server.config.app, VoiceConfig(**config))

    return srv, srv.call(install())


async def peer(srv: Any, sub: str = "alice", history: str | None = None, **options: Any) -> VoicePeer:
    ws = await VoicePeer.open(srv.ws, srv.token(sub))
    await ws.subscribe(S)
    frame: dict[str, Any] = {"op": "voice-start", "session": S}
    if history:
        frame["history"] = history
    if options:
        frame["options"] = options
    ack = await ws.ok(frame)
    assert (ack["sample_rate"], ack["frame_ms"], ack["vad"]) == (16000, 20, "webrtc")
    return ws


async def ask(ws: VoicePeer, text: str) -> str:
    """Say ``text`` as a final transcript; the turn it starts."""
    await ws.ok({"op": "transcript", "session": S, "text": text})
    msg = await ws.wait_until(lambda: next((e for e in ws.find(S, "message") if text_of(e["message"]) == text),
                                           None), 10, f"message {text!r}")
    start = await ws.wait_event(S, "turn-start", 10, input_id=msg["message"]["id"])
    return start["turn_id"]


def played(turn_id: str, ms: int, final: bool = False) -> dict[str, Any]:
    return {"op": "played", "session": S, "turn_id": turn_id, "ms": ms, "final": final}


def audio_after(ws: VoicePeer, signal: dict[str, Any], turn_id: str) -> list[AudioFrame]:
    """Audio frames of the turn that arrived after ``signal``."""
    i = ws.order.index(("signal", signal))
    return [f for kind, f in ws.order[i + 1:] if kind == "audio" and f.turn_id == turn_id]


def metric(srv: Any, name: str, **labels: str) -> float:
    return srv.runtime.metrics.registry.get_sample_value(name, labels) or 0.0


def voice_meta(rev: dict[str, Any]) -> dict[str, Any]:
    return rev["message"]["metadata"]["voice"]


# ---------------------------------------------------------------- automatic barge-in


async def test_barge_in_from_voice_stops_speech_and_history_is_the_words_played(serve, gate, voices) -> None:
    agent = Agent(gate)
    srv, _gw = voice_server(serve, agent, stt=ScriptedSTT(["stop please"]))
    ws = await peer(srv)
    turn_id = await ask(ws, "tell me a story")
    heard_frames = (await ws.audio_until(turn_id, 40))[:30]
    await ws.ok(played(turn_id, 30 * 20))

    await ws.speak(S, voices("stop please") + silence(600))  # the user talks over the agent, then waits
    await ws.barrier()  # the utterance has ended and was recognised…
    paused = await ws.signal("paused", turn_id)
    await ws.ok(played(turn_id, 30 * 20, final=True))  # …before the speaker says where it stopped
    interrupted = await ws.signal("interrupted", turn_id)

    si = await ws.wait_event(S, "speech-interrupted", turn_id=turn_id)
    assert (si["mode"], si["reason"]) == ("response", "user_speaking")
    end = await ws.turn_end(S, turn_id)
    assert end["reason"] == "cancelled"  # the LLM turn was aborted
    rev = await ws.wait_event(S, "turn-revised", turn_id=turn_id)

    # the persisted message is exactly the words the speaker played, by the frames' own labels
    spoken = spoken_text(end["message"]["parts"])
    heard = heard_text(spoken, heard_frames)
    assert 0 < len(heard) < len(spoken) and spoken.startswith(heard) and spoken[len(heard)] in " \n"
    assert text_of(rev["message"]) == heard
    assert voice_meta(rev) == {"history": "keep-heard", "heard_ms": 600, "heard_chars": len(heard),
                               "unspoken": spoken[len(heard):]}
    assert rev["reason"] == "cancelled"
    # the agent fell silent at the pause: nothing of the turn was sent after it
    assert audio_after(ws, paused, turn_id) == [] and audio_after(ws, interrupted, turn_id) == []

    # the user's words became the next message, after the revision; its turn's model input holds what was heard
    nxt = await ask_seen(ws, "stop please")
    assert nxt["seq"] > rev["seq"]
    nxt_turn = await ws.wait_event(S, "turn-start", 10, input_id=nxt["message"]["id"])
    await ws.turn_end(S, nxt_turn["turn_id"])
    assert agent.histories["stop please"] == ["tell me a story", heard, "stop please"]
    assert await history_texts(srv) == ["tell me a story", heard, "stop please", "Okay."]

    assert metric(srv, "turnline_voice_barge_in_latency_seconds_count") == 1
    assert metric(srv, "turnline_voice_interruptions_total", reason="user_speaking", mode="response") == 1
    assert metric(srv, "turnline_voice_history_revisions_total", history="keep-heard") == 1
    gate.open(srv)
    await ws.close()


async def ask_seen(ws: VoicePeer, text: str) -> dict[str, Any]:
    return await ws.wait_until(lambda: next((e for e in ws.find(S, "message") if text_of(e["message"]) == text),
                                            None), 10, f"message {text!r}")


async def history_texts(srv: Any) -> list[str]:
    async def read() -> list[str]:
        hub = await srv.runtime.hub(S)
        return [text_of({"parts": m.parts}) for m in hub.state.branch()]

    return await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(read(), srv.loop))


async def test_a_false_interruption_resumes_from_where_the_speaker_stopped(serve, gate, voices) -> None:
    srv, _gw = voice_server(serve, Agent(gate))
    ws = await peer(srv, speaking={"min_speech_ms": 10_000}, false_interruption_ms=600, end_of_speech_ms=200)
    turn_id = await ask(ws, "tell me a story")
    await ws.audio_until(turn_id, 20)
    await ws.speak(S, voices("hm"))  # voice, but too little to interrupt and no words
    paused = await ws.signal("paused", turn_id)
    await ws.ok(played(turn_id, 15 * 20))  # where the speaker stopped
    await ws.speak(S, silence(800))  # the user stays quiet: the window passes
    resumed = await ws.signal("resumed", turn_id)
    assert resumed["ms"] == 300
    again = await ws.wait_until(lambda: audio_after(ws, resumed, turn_id), 10, "audio after the resume")
    assert (again[0].seq, again[0].ms) == (15, 300)  # from the acknowledged position
    assert audio_after(ws, paused, turn_id)[0].seq == 15  # and nothing between the pause and the resume
    assert metric(srv, "turnline_voice_false_interruptions_total") == 1
    ack = await ws.ok({"op": "interrupt", "session": S, "mode": "speech"})
    assert ack["turn_id"] == turn_id
    si = await ws.wait_event(S, "speech-interrupted", turn_id=turn_id)
    assert si["reason"] == "client_request"  # the first and only interruption
    gate.open(srv)
    await ws.close()


async def test_speaking_up_while_the_agent_thinks_interrupts_the_response(serve, gate, voices) -> None:
    srv, gw = voice_server(serve, Agent(gate))
    ws = await peer(srv, thinking={"min_speech_ms": 200})
    turn_id = await ask(ws, "think hard")
    await wait_state(srv, gw, "thinking")
    await ws.speak(S, voices("no wait"))
    end = await ws.turn_end(S, turn_id)
    assert end["reason"] == "cancelled"
    si = await ws.wait_event(S, "speech-interrupted", turn_id=turn_id)
    assert (si["mode"], si["reason"], si["played_ms"]) == ("response", "user_speaking", 0)
    assert ws.turn_audio(turn_id) == [] and ws.signals == []  # nothing was playing, nothing to pause
    await ws.close()


async def wait_state(srv: Any, gw: Any, state: str) -> None:
    async def reached() -> None:
        async with asyncio.timeout(10):
            while gw.session(S).state != state:
                await asyncio.sleep(0.005)

    await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(reached(), srv.loop))


async def test_uninterruptible_speech_is_neither_paused_nor_interrupted_by_voice(serve, gate, voices) -> None:
    srv, gw = voice_server(serve, Agent(gate, first=UNINTERRUPTIBLE))
    ws = await peer(srv)
    turn_id = await ask(ws, "tell me a story")
    await ws.audio_until(turn_id, 10)
    await ws.speak(S, voices("stop please stop talking now"))
    await ws.barrier()
    assert [s["state"] for s in ws.signals] == ["speaking"]
    assert srv.call(_ignored(gw)) == "uninterruptible"
    count = len(ws.turn_audio(turn_id))
    await ws.audio_until(turn_id, count + 5)  # it goes on speaking
    ack = await ws.ok({"op": "interrupt", "session": S, "mode": "response", "reason": "user_clicked_stop"})
    assert ack["cancelled"] is True  # an explicit stop still works
    await ws.signal("interrupted", turn_id)
    await ws.close()


async def _ignored(gw: Any) -> str | None:
    return gw.session(S).rules.ignored_why


async def test_transcripts_interrupt_and_become_messages(serve, gate) -> None:
    agent = Agent(gate)
    srv, _gw = voice_server(serve, agent)
    ws = await peer(srv, speaking={"mode": "speech"})  # barge-in silences; the LLM turn runs on
    turn_id = await ask(ws, "tell me a story")
    msg = (await ask_seen(ws, "tell me a story"))["message"]
    assert msg["metadata"] == {"voice": {"transcript": True}}
    frames = await ws.audio_until(turn_id, 20)
    await ws.ok(played(turn_id, 10 * 20))
    await ws.ok({"op": "transcript", "session": S, "text": "wait", "final": False})  # an interim transcript
    await ws.signal("interrupted", turn_id)
    si = await ws.wait_event(S, "speech-interrupted", turn_id=turn_id)
    assert (si["mode"], si["reason"]) == ("speech", "user_speaking")
    # the final transcript: the running turn is cancelled and persisted as heard before the message is sent
    await ws.ok({"op": "transcript", "session": S, "text": "wait a second"})
    await ws.wait_until(lambda: len(ws.find(S, "speech-interrupted", turn_id=turn_id)) == 2, 10, "the response")
    assert ws.find(S, "speech-interrupted", turn_id=turn_id)[1]["mode"] == "response"
    await ws.ok(played(turn_id, 10 * 20, final=True))
    end = await ws.turn_end(S, turn_id)
    assert end["reason"] == "cancelled"
    rev = await ws.wait_event(S, "turn-revised", turn_id=turn_id)
    assert text_of(rev["message"]) == heard_text(spoken_text(end["message"]["parts"]), frames[:10])
    nxt = await ask_seen(ws, "wait a second")
    assert nxt["seq"] > rev["seq"]
    await ws.wait_until(lambda: "wait a second" in agent.histories, 10, "the next turn")
    await ws.close()


# ---------------------------------------------------------------- the two interruptions


async def test_interrupt_speech_keeps_the_llm_turn_streaming(serve, gate) -> None:
    srv, _gw = voice_server(serve, Agent(gate))
    ws = await peer(srv)
    turn_id = await ask(ws, "tell me a story")
    frames = await ws.audio_until(turn_id, 25)
    await ws.ok(played(turn_id, 20 * 20))
    ack = await ws.ok({"op": "interrupt", "session": S, "mode": "speech", "reason": "user_clicked_stop"})
    assert (ack["turn_id"], ack["mode"], ack["played_ms"]) == (turn_id, "speech", 400)
    interrupted = await ws.signal("interrupted", turn_id)
    await ws.ok(played(turn_id, 20 * 20, final=True))
    si = await ws.wait_event(S, "speech-interrupted", turn_id=turn_id)
    assert (si["mode"], si["reason"], si["played_ms"]) == ("speech", "user_clicked_stop", 400)

    gate.open(srv)  # the LLM goes on: its text still streams for display
    end = await ws.turn_end(S, turn_id)
    assert end["reason"] == "complete" and text_of(end["message"]).endswith(AFTER)
    after = [e for e in ws.find(S, "chunk", turn_id=turn_id) if e["seq"] > si["seq"]]
    assert any(AFTER in e["chunk"].get("delta", "") for e in after)
    rev = await ws.wait_event(S, "turn-revised", turn_id=turn_id)
    spoken = spoken_text(end["message"]["parts"])
    assert rev["reason"] == "complete"
    assert text_of(rev["message"]) == heard_text(spoken, frames[:20])
    assert voice_meta(rev)["unspoken"].endswith(AFTER)
    assert audio_after(ws, interrupted, turn_id) == []  # never spoken
    await ws.close()


async def test_interrupt_response_aborts_the_turn_and_its_tool(serve, gate) -> None:
    agent = Agent(gate)
    srv, _gw = voice_server(serve, agent)
    ws = await peer(srv)
    turn_id = await ask(ws, "weather in Oslo")
    frames = await ws.audio_until(turn_id, 20)
    await ws.wait_until(lambda: any(e["chunk"].get("type") == "tool-input-available"
                                    for e in ws.find(S, "chunk", turn_id=turn_id)), 10, "the tool call")
    await ws.ok(played(turn_id, 15 * 20))
    ack = await ws.ok({"op": "interrupt", "session": S, "mode": "response", "reason": "timeout"})
    assert (ack["turn_id"], ack["cancelled"]) == (turn_id, True)
    await ws.signal("interrupted", turn_id)
    await ws.ok(played(turn_id, 15 * 20, final=True))
    end = await ws.turn_end(S, turn_id)
    assert end["reason"] == "cancelled"
    assert agent.tool_aborted == ["cancelled"]  # the tool in flight got the abort
    si = await ws.wait_event(S, "speech-interrupted", turn_id=turn_id)
    assert (si["mode"], si["reason"]) == ("response", "timeout")
    rev = await ws.wait_event(S, "turn-revised", turn_id=turn_id)
    tool = [p for p in rev["message"]["parts"] if p["type"] == "tool-weather"]
    assert tool == [{"type": "tool-weather", "toolCallId": "call-1", "state": "output-error",
                     "input": {"city": "Oslo"}, "errorText": "cancelled"}]  # its state, visible in the turn
    assert text_of(rev["message"]) == heard_text(spoken_text(end["message"]["parts"]), frames[:15])
    await ws.close()


async def test_a_tool_result_after_the_interruption_is_never_spoken(serve, gate) -> None:
    srv, _gw = voice_server(serve, Agent(gate))
    ws = await peer(srv)
    turn_id = await ask(ws, "weather in Oslo")
    frames = await ws.audio_until(turn_id, 20)
    await ws.ok(played(turn_id, 20 * 20))
    await ws.ok({"op": "interrupt", "session": S, "mode": "speech"})
    interrupted = await ws.signal("interrupted", turn_id)
    await ws.ok(played(turn_id, 20 * 20, final=True))
    gate.open(srv)  # the tool returns; the agent announces the result
    end = await ws.turn_end(S, turn_id)
    assert end["reason"] == "complete" and text_of(end["message"]).endswith(RESULT)
    rev = await ws.wait_event(S, "turn-revised", turn_id=turn_id)
    parts = rev["message"]["parts"]
    assert [p["type"] for p in parts if p["type"] != "step-start"] == ["text", "tool-weather"]
    assert parts[-1]["state"] == "output-available"  # the result is in the turn…
    assert RESULT in voice_meta(rev)["unspoken"]  # …but was never announced
    assert text_of(rev["message"]) == heard_text(spoken_text(end["message"]["parts"]), frames[:20])
    assert audio_after(ws, interrupted, turn_id) == []
    await ws.close()


async def test_keep_generated_keeps_the_parts_and_records_what_was_heard(serve, gate) -> None:
    srv, _gw = voice_server(serve, Agent(gate))
    ws = await peer(srv, history="keep-generated")
    turn_id = await ask(ws, "tell me a story")
    frames = await ws.audio_until(turn_id, 20)
    await ws.ok(played(turn_id, 20 * 20, final=True))
    await ws.ok({"op": "interrupt", "session": S, "mode": "response"})
    end = await ws.turn_end(S, turn_id)
    rev = await ws.wait_event(S, "turn-revised", turn_id=turn_id)
    assert rev["message"]["parts"] == end["message"]["parts"]
    heard = heard_text(spoken_text(end["message"]["parts"]), frames[:20])
    assert voice_meta(rev) == {"history": "keep-generated", "heard_ms": 400, "heard_chars": len(heard),
                               "unspoken": spoken_text(end["message"]["parts"])[len(heard):]}
    await ws.close()


# ---------------------------------------------------------------- disconnects


async def test_a_dropped_peer_clears_speech_and_the_turn_runs_on(serve, gate) -> None:
    srv, _gw = voice_server(serve, Agent(gate))
    watcher = await VoicePeer.open(srv.ws, srv.token("bob"))
    await watcher.subscribe(S)
    ws = await peer(srv)
    turn_id = await ask(ws, "tell me a story")
    frames = await ws.audio_until(turn_id, 20)
    await ws.ok(played(turn_id, 12 * 20))
    await ws.abort()  # the network drops
    si = await watcher.wait_event(S, "speech-interrupted", turn_id=turn_id)
    assert (si["mode"], si["reason"], si["played_ms"]) == ("speech", "disconnected", 240)
    gate.open(srv)
    end = await watcher.turn_end(S, turn_id)
    assert end["reason"] == "complete"  # a dropped connection cancels nothing
    rev = await watcher.wait_event(S, "turn-revised", turn_id=turn_id)
    assert text_of(rev["message"]) == heard_text(spoken_text(end["message"]["parts"]), frames[:12])
    # the session's voice is free again
    again = await peer(srv, sub="alice")
    await again.close()
    await watcher.close()


async def test_an_utterance_not_yet_sent_is_rejected_when_the_peer_goes(serve, gate) -> None:
    srv, gw = voice_server(serve, Agent(gate), ack_timeout_s=60)  # the send waits for the final ack
    ws = await peer(srv)
    turn_id = await ask(ws, "tell me a story")
    await ws.audio_until(turn_id, 10)
    await ws.ok({"op": "transcript", "session": S, "text": "actually never mind"})
    # the send first interrupts the turn and waits until it is persisted as heard…
    await ws.wait_event(S, "speech-interrupted", turn_id=turn_id)
    await ws.turn_end(S, turn_id)
    await ws.close()  # …and the peer leaves before it acknowledged its playback
    rev = await wait_revised(srv, turn_id)
    assert rev is not None
    assert metric(srv, "turnline_voice_inputs_rejected_total") == 1
    texts = await history_texts(srv)
    assert "actually never mind" not in texts  # rejected, never sent
    assert gw.session(S) is None


async def wait_revised(srv: Any, turn_id: str) -> Any:
    async def revised() -> Any:
        hub = await srv.runtime.hub(S)
        async with asyncio.timeout(10):
            while not hub.state.turns[turn_id].revised:
                await asyncio.sleep(0.01)
        return hub.state.turns[turn_id]

    return await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(revised(), srv.loop))


# ---------------------------------------------------------------- bad input, rights


def header(version: int = 1, kind: int = 1, session: bytes = S.encode(), turn: bytes = b"",
           header_len: int | None = None) -> bytes:
    import struct

    body = bytes((len(session),)) + session + bytes((len(turn),)) + turn
    h = header_len if header_len is not None else 12 + len(body)
    return struct.pack("<BBHII", version, kind, h, 0, 0) + body


@pytest.mark.parametrize("frame, code", [
    (b"\x01\x01", "bad_frame"),  # shorter than the header
    (header(version=2) + bytes(640), "bad_frame"),
    (header(kind=7) + bytes(640), "bad_frame"),
    (encode_audio(AudioFrame(AUDIO_OUT, S, 0, 0, bytes(640), "turn-1")), "bad_frame"),  # audio-out from a client
    (header() + bytes(641), "bad_frame"),  # odd number of sample bytes
    (header(), "bad_frame"),  # no samples
    (header() + bytes(32_002), "bad_frame"),  # over one second
    (header(header_len=2000) + bytes(640), "bad_frame"),  # header length past the frame's end
    (header(header_len=14) + bytes(640), "bad_frame"),  # header length short of its own fields
    (header(session=b"bad id!") + bytes(640), "bad_id"),
    (header(session=b"other-session") + bytes(640), "conflict"),  # voice not started there
    (header(session=b"forbidden-1") + bytes(640), "forbidden"),
    (header() + bytes(300_000), "too_large"),
])
async def test_bad_binary_frames_get_error_codes_and_the_connection_stays_usable(serve, gate, frame, code) -> None:
    srv, _gw = voice_server(serve, Agent(gate))
    ws = await VoicePeer.open(srv.ws, srv.token("alice", {S: ["subscribe", "publish", "cancel"],
                                                          "other-session": ["publish"],
                                                          "forbidden-1": ["subscribe"]}))
    await ws.subscribe(S)
    await ws.ok({"op": "voice-start", "session": S})
    await ws.send_raw(frame)
    err = await ws.next_error(0)
    assert err["code"] == code and err["id"] is None and err["message"], err
    await ws.send_raw(audio_in(S, silence(20)))  # good audio still goes through
    await ws.ping()
    assert len(ws.errors) == 1
    assert await ws.ok({"op": "transcript", "session": S, "text": "hello"})
    await ws.close()


async def test_voice_ops_answer_errors_with_stable_codes(serve, gate) -> None:
    srv, _gw = voice_server(serve, Agent(gate))
    ws = await VoicePeer.open(srv.ws, srv.token("alice"))
    other = await VoicePeer.open(srv.ws, srv.token("mallory"))
    reader = await VoicePeer.open(srv.ws, srv.token("eve", {"*": ["subscribe"]}))
    await ws.subscribe(S)
    await ws.fails({"op": "transcript", "session": S, "text": "hi"}, "conflict")  # no voice-start yet
    await ws.fails({"op": "interrupt", "session": S}, "conflict")
    await ws.fails({"op": "voice-start", "session": S, "options": {"speaking": {"min_speech_ms": -1}}}, "bad_frame")
    await ws.fails({"op": "voice-start", "session": S, "options": {"volume": 11}}, "bad_frame")
    await ws.fails({"op": "voice-start", "session": S, "history": "keep-all"}, "bad_frame")
    await ws.fails({"op": "interrupt", "session": S, "mode": "everything"}, "bad_frame")
    await ws.fails({"op": "interrupt", "session": S, "reason": "x" * 65}, "bad_frame")
    await reader.fails({"op": "voice-start", "session": S}, "forbidden")
    await ws.ok({"op": "voice-start", "session": S})
    await other.fails({"op": "voice-start", "session": S}, "conflict")  # one voice peer per session
    await other.fails({"op": "transcript", "session": S, "text": "hi"}, "conflict")
    turn_id = await ask(ws, "tell me a story")
    await ws.audio_until(turn_id, 5)
    await other.fails({"op": "played", "session": S, "turn_id": turn_id, "ms": 10}, "conflict")
    await ws.fails({"op": "played", "session": S, "turn_id": "turn-nope", "ms": 10}, "not_found")
    await other.fails({"op": "interrupt", "session": S, "mode": "speech"}, "forbidden")  # not its voice
    await other.fails({"op": "interrupt", "session": S, "mode": "response"}, "forbidden")
    await reader.fails({"op": "interrupt", "session": S}, "forbidden")  # no cancel capability
    assert (await ws.ok({"op": "voice-stop", "session": S}))["session"] == S
    await ws.fails({"op": "voice-stop", "session": S}, "conflict")
    for c in (ws, other, reader):
        await c.close()


async def test_a_server_without_voice_answers_voice_ops_with_conflict(serve) -> None:
    srv = serve(agent=lambda turn: "hi")
    ws = await VoicePeer.open(srv.ws, srv.token("alice"))
    await ws.subscribe(S)
    await ws.fails({"op": "voice-start", "session": S}, "conflict")
    await ws.fails({"op": "interrupt", "session": S}, "conflict")
    await ws.send_raw(audio_in(S, silence(20)))
    assert (await ws.next_error(2))["code"] == "bad_frame"
    await ws.close()
