"""Voice barge-in from the command line, with no microphone.

A spoken "user" (WAVs made with espeak-ng) asks the agent about the moon over a
real turnline WebSocket, listens to the answer (played in real time into a
buffer, each frame acknowledged with `played`), and talks over it. The agent
falls silent, its turn is aborted, and the saved answer is exactly the words the
user heard; then it answers the new question.

    python examples/voice_cli.py            # prints the conversation
    python examples/voice_cli.py --out DIR  # also writes user.wav and agent.wav there

Speech recognition is scripted (the user's lines are known, since espeak-ng
speaks them); any `turnline.voice.SpeechToText` can take its place.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
from pathlib import Path
from typing import Any

import uvicorn
from websockets.asyncio.client import connect

from turnline import Agent, Turn
from turnline.agent import Runtime, RuntimeConfig
from turnline.protocol_audio import audio_in, decode_audio
from turnline.server.app import ServerConfig, create_app
from turnline.server.auth import mint
from turnline.store import open_store
from turnline.voice import ScriptedSTT, VoiceConfig, install_voice
from turnline.voice.audio import espeak_wav, frames, silence, write_wav

SECRET = "voice-example-" + "x" * 32
SESSION = "voice-demo"
QUESTION = "Tell me about the moon."
BARGE_IN = "Wait. What about Mars?"
MOON = ("The moon is about three hundred and eighty thousand kilometres away. "
        "It turns once on its axis for every trip around the Earth, so we always see the same face. "
        "Its craters are the scars of four billion years of impacts.")
MARS = "Mars is the red planet, cold and dusty, with the tallest volcano in the solar system."
BARGE_IN_AFTER_MS = 2500  # the user talks over the agent once this much of the answer has played


async def respond(turn: Turn):  # type: ignore[no-untyped-def]
    question = " ".join(p.get("text", "") for p in turn.input.parts)
    answer = MOON if "moon" in question.lower() else MARS
    for word in answer.split(" "):  # word by word, like an LLM stream
        await asyncio.sleep(0.03)
        yield word + " "


class Speaker:
    """The user's loudspeaker: plays the agent's frames in real time and
    acknowledges what it played; stops at once when told to."""

    def __init__(self, ws: Any):
        self.ws = ws
        self.queue: asyncio.Queue[Any] = asyncio.Queue()
        self.played_ms: dict[str, int] = {}
        self.heard_end: dict[str, int] = {}
        self.pcm = bytearray()
        self.stopped: set[str] = set()
        self.done: set[str] = set()  # turns whose audio was all sent
        self.finished: set[str] = set()  # …and played

    async def ack(self, turn_id: str, final: bool = False) -> None:
        await self.ws.send(json.dumps({"op": "played", "session": SESSION, "turn_id": turn_id,
                                       "ms": self.played_ms.get(turn_id, 0), "final": final}))

    async def signal(self, frame: dict[str, Any]) -> None:
        turn_id, state = frame["turn_id"], frame["state"]
        if state in ("paused", "interrupted"):
            self.stopped.add(turn_id)  # drop what is buffered; report where playback stopped
            await self.ack(turn_id, final=state == "interrupted")
        elif state == "resumed":
            self.stopped.discard(turn_id)
        elif state == "done":
            self.done.add(turn_id)

    async def play(self) -> None:
        loop = asyncio.get_running_loop()
        next_at = loop.time()
        while True:
            frame = await self.queue.get()
            if frame.turn_id in self.stopped:
                continue
            # real time: one frame every 20 ms from a steady start (restarted after running dry)
            next_at = next_at + 0.02 if next_at > loop.time() - 0.1 else loop.time() + 0.02
            await asyncio.sleep(next_at - loop.time())  # 20 ms of sound
            if frame.turn_id in self.stopped:  # stopped while this frame was "playing"
                continue
            self.pcm += frame.pcm
            self.played_ms[frame.turn_id] = frame.ms + 20
            self.heard_end[frame.turn_id] = frame.heard_end
            if frame.seq % 5 == 4:
                await self.ack(frame.turn_id)
            if frame.turn_id in self.done and self.queue.empty():
                self.finished.add(frame.turn_id)


async def microphone(ws: Any, speaker: Speaker, turns: list[str], record: bytearray) -> None:
    """The user's microphone: a stream of 20 ms frames in real time, silence
    between the lines."""
    seq = 0

    async def say(pcm: bytes) -> None:
        nonlocal seq
        loop = asyncio.get_running_loop()
        start = loop.time()
        for i, frame in enumerate(frames(pcm), 1):
            await ws.send(audio_in(SESSION, frame, seq, seq * 20))
            record.extend(frame)
            seq += 1
            await asyncio.sleep(max(0.0, start + i * 0.02 - loop.time()))

    async def quiet_until(done: Any) -> None:
        while not done():
            await say(silence(100))

    await say(silence(300) + espeak_wav(QUESTION, pitch=70))
    await quiet_until(lambda: turns and speaker.played_ms.get(turns[0], 0) >= BARGE_IN_AFTER_MS)
    await say(espeak_wav(BARGE_IN, pitch=70))
    while True:
        await say(silence(100))


async def main(out: Path | None) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    runtime = Runtime(open_store("memory://"), Agent(respond), RuntimeConfig())
    app = create_app(runtime, ServerConfig(secret=SECRET))
    install_voice(app, VoiceConfig(stt=ScriptedSTT([QUESTION, BARGE_IN])))
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    serving = asyncio.ensure_future(server.serve())
    while not server.started:
        await asyncio.sleep(0.01)
    token = mint(SECRET, "ada", {"*": ["subscribe", "publish", "cancel"]}, 600)
    try:
        async with connect(f"ws://127.0.0.1:{port}/v1/ws?token={token}") as ws:
            await ws.send(json.dumps({"op": "subscribe", "session": SESSION, "after": 0}))
            await ws.send(json.dumps({"op": "voice-start", "session": SESSION}))
            speaker = Speaker(ws)
            turns: list[str] = []
            events: list[dict[str, Any]] = []
            record = bytearray()
            tasks = [asyncio.ensure_future(speaker.play()),
                     asyncio.ensure_future(microphone(ws, speaker, turns, record)),
                     asyncio.ensure_future(receive(ws, speaker, turns, events))]
            async with asyncio.timeout(60):
                while not (len(turns) >= 2 and turns[1] in speaker.finished):  # the second answer, heard out
                    await asyncio.sleep(0.05)
            for task in tasks:
                task.cancel()
            report(events, turns, speaker)
            if out is not None:
                out.mkdir(parents=True, exist_ok=True)
                write_wav(out / "user.wav", bytes(record))
                write_wav(out / "agent.wav", bytes(speaker.pcm))
                print(f"wrote {out / 'user.wav'} and {out / 'agent.wav'}")
    finally:
        server.should_exit = True
        await serving


async def receive(ws: Any, speaker: Speaker, turns: list[str], events: list[dict[str, Any]]) -> None:
    async for raw in ws:
        if isinstance(raw, bytes):
            speaker.queue.put_nowait(decode_audio(raw))
            continue
        frame = json.loads(raw)
        if frame.get("op") == "voice":
            await speaker.signal(frame)
        elif frame.get("op") == "transcript" and frame["final"]:
            print(f"user said:    {frame['text']}")
        elif frame.get("op") in ("event", "events"):
            for ev in frame.get("events") or [frame["event"]]:
                events.append(ev)
                if ev["type"] == "turn-start":
                    turns.append(ev["turn_id"])
                elif ev["type"] == "speech-interrupted":
                    print(f"  [the agent was interrupted: {ev['reason']}, mode {ev['mode']}]")


def text_of(message: dict[str, Any]) -> str:
    return "\n".join(p["text"] for p in message["parts"] if p["type"] == "text")


def report(events: list[dict[str, Any]], turns: list[str], speaker: Speaker) -> None:
    first, second = turns[0], turns[1]
    end = next(e for e in events if e["type"] == "turn-end" and e["turn_id"] == first)
    revised = next(e for e in events if e["type"] == "turn-revised" and e["turn_id"] == first)
    generated = text_of(end["message"])
    heard = generated[: speaker.heard_end.get(first, 0)]
    print(f"agent wrote:  {generated}")
    print(f"user heard:   {heard}")
    print(f"saved:        {text_of(revised['message'])}")
    print(f"unspoken:     {revised['message']['metadata']['voice']['unspoken'].strip()}")
    print("history == what was heard:", "yes" if text_of(revised["message"]) == heard else "NO")
    answer = next(e for e in events if e["type"] == "turn-end" and e["turn_id"] == second)
    print(f"agent then:   {text_of(answer['message'])}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=None, help="write user.wav and agent.wav here")
    asyncio.run(main(parser.parse_args().out))
