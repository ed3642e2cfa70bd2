"""barge_in: how fast the agent falls silent when the user talks over it.

A real `turnline serve --voice` (espeak-ng speech, webrtcvad) runs the agent
`storyteller` (a minute of speech, its turn open until aborted). The user is
"no no no wait" spoken by espeak-ng, after digital silence: its speech onset
is the first sample at or above 1 % of full scale, known to the sample.

(a) Server side, over a real WebSocket. A Python peer streams the microphone
    in real time (a 20 ms audio-in frame every 20 ms: silence, then, at a
    random moment while the agent speaks, the user's voice, with the onset at a
    random sample of its frame) and plays the agent like a speaker (frames
    played in real time behind a 40 ms jitter buffer, `played` every 100 ms,
    the position frozen and acknowledged at the stop signal, `final` at
    `interrupted`). Latency: from sending the audio-in frame that holds the
    onset to receiving the first `paused`/`interrupted` signal, after which the
    server sends no audio of that turn (counted: "audio after stop"). Also the
    server's own histogram (`turnline_voice_barge_in_latency_seconds`: arrival
    of the frame holding the detector's onset → audio stopped), as a mean.
(b) At the browser's playback: the voice page (src/turnline/web/voice.html) in
    chromium with a fake microphone playing the user's WAV in a loop, muted
    until a silent gap. Latency on the AudioContext's clock: from the onset
    marker entering the audio graph (the first 16 kHz sample at or above 1 %
    after 300 ms below it, timed by the capture worklet) to the page stopping
    the turn's scheduled sources and dropping its queue (`currentTime` then:
    no audio of the turn is rendered after it). Chromium's capture buffering
    before the worklet is not included; the output latency (what is rendered
    reaches the speakers that much later) is reported beside it. The same on
    the page's performance.now() clock (the onset timed when its frame reached
    the main thread) is saved as `latency_page_clock_ms`.

Both run the same pipeline with turnline's default rules and with the anchors'
defaults mapped onto the rules engine (docs/voice-page.md cites them): LiveKit
Agents `min_interruption_duration=0.5` (audio stops once the VAD has counted
0.5 s of speech) and Pipecat `VADParams.start_secs=0.2` (the user is speaking,
and the bot is interrupted, after 0.2 s of consecutive voiced frames); each is
`debounce_ms` = `min_speech_ms` = that duration. Every trial also checks that the
persisted answer holds exactly the words played (the text up to the
`heard_end` of the last frame played): "words persisted = played".

`python -m bench barge_in [--quick]`.
"""

from __future__ import annotations

import asyncio
import json
import random
import re
import time
import urllib.parse
import uuid
from pathlib import Path
from typing import Any

from bench._common import pct, print_table, save, token, turnline_server

USER_SAYS = "no no no wait"  # voiced from its first frame for over 0.9 s at every VAD frame size
STORY = ("Once upon a time there was a small robot who lived in a lighthouse by the sea. "
         "Every night it climbed the stairs, polished the great lamp, and counted the ships as they passed. ") * 6
MARKER = 328  # 1 % of full scale: the onset is the first sample at or above it
LIVEKIT = {"speaking": {"debounce_ms": 500, "min_speech_ms": 500}}
PIPECAT = {"speaking": {"debounce_ms": 200, "min_speech_ms": 200}}
CONFIGS: list[tuple[str, str, dict[str, Any]]] = [
    ("default", "turnline defaults (no debounce, interrupt after 300 ms)", {}),
    ("vad10", "turnline defaults, 10 ms VAD frames", {"vad_frame_ms": 10}),
    ("vad30", "turnline defaults, 30 ms VAD frames", {"vad_frame_ms": 30}),
    ("livekit", "LiveKit defaults (min_interruption_duration 0.5 s)", LIVEKIT),
    ("pipecat", "Pipecat defaults (VAD start_secs 0.2 s)", PIPECAT),
]


async def storyteller(turn: Any) -> None:
    """The agent (`turnline serve --agent bench.barge_in:storyteller`)."""
    await turn.write(STORY)
    await turn.abort_signal


def _spoken(parts: list[dict[str, Any]]) -> str:
    return "\n".join(p.get("text", "") for p in parts if p.get("type") == "text")


def _text(message: dict[str, Any]) -> str:
    return "".join(p.get("text", "") for p in message["parts"] if p.get("type") == "text")


def _user_voice() -> tuple[bytes, int]:
    """The user's words as PCM16 16 kHz, and the onset's sample."""
    import numpy as np

    from turnline.voice.audio import espeak_wav

    pcm = espeak_wav(USER_SAYS, voice="en-us", pitch=70)
    samples = np.frombuffer(pcm, dtype="<i2")
    return pcm, int(np.argmax(np.abs(samples.astype(np.int32)) >= MARKER))


# ---------------------------------------------------------------- (a) server side


class _Peer:
    """A voice peer on one WebSocket: a real-time microphone and a virtual speaker."""

    JITTER_S = 0.04

    def __init__(self, ws: Any, session: str):
        self.ws = ws
        self.session = session
        self.audio: dict[str, list[tuple[float, Any]]] = {}  # turn → [(recv time, frame)]
        self.signals: list[tuple[float, dict[str, Any]]] = []
        self.events: list[dict[str, Any]] = []
        self.acks: dict[int, dict[str, Any]] = {}
        self.changed = asyncio.Event()
        self.frozen: dict[str, int] = {}  # turn → frames played when its audio was stopped
        self.ids = 0

    async def read(self) -> None:
        from turnline.protocol_audio import decode_audio

        async for raw in self.ws:
            now = time.perf_counter()
            if isinstance(raw, bytes):
                f = decode_audio(raw)
                self.audio.setdefault(f.turn_id, []).append((now, f))
            else:
                frame = json.loads(raw)
                op = frame.get("op")
                if op == "voice":
                    self.signals.append((now, frame))
                    if frame["state"] in ("paused", "interrupted"):
                        await self._stopped(frame["turn_id"], now, final=frame["state"] == "interrupted")
                elif op == "event":
                    self.events.append(frame["event"])
                elif op == "events":
                    self.events.extend(frame["events"])
                elif op in ("ack", "error") and isinstance(frame.get("id"), int):
                    self.acks[frame["id"]] = frame
            self.changed.set()

    async def until(self, pred: Any, timeout: float = 10) -> Any:
        async with asyncio.timeout(timeout):
            while True:
                got = pred()
                if got:
                    return got
                self.changed.clear()
                await self.changed.wait()

    async def request(self, frame: dict[str, Any]) -> dict[str, Any]:
        self.ids += 1
        fid = self.ids
        await self.ws.send(json.dumps({**frame, "id": fid}))
        ack = await self.until(lambda: self.acks.get(fid))
        if ack["op"] == "error":
            raise RuntimeError(f"{frame['op']}: {ack}")
        return ack

    def played(self, turn: str, now: float) -> int:
        """Frames the virtual speaker has played to their end by ``now``."""
        if turn in self.frozen:
            return self.frozen[turn]
        frames = self.audio.get(turn, [])
        if not frames:
            return 0
        start = frames[0][0] + self.JITTER_S
        return min(len(frames), max(0, int((now - start) / 0.02)))

    async def _stopped(self, turn: str, now: float, final: bool) -> None:
        self.frozen.setdefault(turn, self.played(turn, now))
        await self.ws.send(json.dumps({"op": "played", "session": self.session, "turn_id": turn,
                                       "ms": self.frozen[turn] * 20, "final": final}))

    async def speaker(self) -> None:
        """`played` every 100 ms for the turns still playing."""
        last: dict[str, int] = {}
        while True:
            await asyncio.sleep(0.1)
            now = time.perf_counter()
            for turn in list(self.audio):
                n = self.played(turn, now)
                if turn not in self.frozen and n > last.get(turn, 0):
                    last[turn] = n
                    await self.ws.send(json.dumps({"op": "played", "session": self.session, "turn_id": turn,
                                                   "ms": n * 20}))

    async def microphone(self, user: list[bytes], onset_frame: int, speak: asyncio.Event,
                         out: dict[str, float]) -> None:
        """A frame every 20 ms, on an absolute schedule: silence, then ``user`` once ``speak`` is set."""
        from turnline.protocol_audio import audio_in

        quiet = bytes(640)
        t0 = time.perf_counter()
        n = 0
        k: int | None = None
        while True:
            delay = t0 + (n + 1) * 0.02 - time.perf_counter()  # frame n is sent once it has been "captured"
            if delay > 0:
                await asyncio.sleep(delay)
            if k is None and speak.is_set():
                k = 0
            pcm = quiet
            if k is not None and k < len(user):
                pcm = user[k]
            await self.ws.send(audio_in(self.session, pcm, n, n * 20))
            if k is not None:
                if k == onset_frame:
                    out["onset_sent"] = time.perf_counter()
                k += 1
            n += 1


async def _server_trial(port: int, options: dict[str, Any], user_pcm: bytes, onset: int,
                        rng: random.Random) -> dict[str, Any]:
    import websockets

    from turnline.voice.audio import frames

    session = f"barge-{uuid.uuid4().hex[:10]}"
    phase = rng.randrange(320)  # the onset falls anywhere in its frame
    lead = bytes(2 * (1600 + phase))  # 100 ms of silence, then the phase
    user = frames(lead + user_pcm, 20)
    onset_frame = (1600 + phase + onset) // 320
    async with websockets.connect(f"ws://127.0.0.1:{port}/v1/ws", max_size=None,
                                  additional_headers={"Authorization": f"Bearer {token()}"}) as ws:
        peer = _Peer(ws, session)
        tasks = [asyncio.ensure_future(peer.read())]
        try:
            await peer.request({"op": "subscribe", "session": session, "after": 0})
            ack = await peer.request({"op": "voice-start", "session": session, "options": options})
            speak = asyncio.Event()
            out: dict[str, float] = {}
            tasks += [asyncio.ensure_future(peer.microphone(user, onset_frame, speak, out)),
                      asyncio.ensure_future(peer.speaker())]
            await peer.request({"op": "transcript", "session": session, "text": "tell me a story"})
            turn = await peer.until(lambda: next(iter(peer.audio), None))
            await asyncio.sleep(rng.uniform(0.2, 0.6))  # the agent speaks a while
            speak.set()
            t_stop, stop = await peer.until(lambda: next(((t, s) for t, s in peer.signals
                                                           if s["state"] in ("paused", "interrupted")), None))
            await peer.until(lambda: any(s["state"] == "interrupted" for _, s in peer.signals))
            end = await peer.until(lambda: next((e for e in peer.events if e["type"] == "turn-end"
                                                 and e["turn_id"] == turn), None))
            revised = await peer.until(lambda: next((e for e in peer.events if e["type"] == "turn-revised"
                                                     and e["turn_id"] == turn), None))
            played = peer.frozen[turn]
            spoken = _spoken(end["message"]["parts"])
            heard = spoken[: peer.audio[turn][played - 1][1].heard_end] if played else ""
            persisted = _text(revised["message"])
            after = sum(1 for t, f in peer.audio[turn] if t > t_stop)
            await peer.request({"op": "voice-stop", "session": session})
        finally:
            for task in tasks:
                task.cancel()
    return {"latency_ms": (t_stop - out["onset_sent"]) * 1000, "first_signal": stop["state"],
            "vad_frame_ms": ack["vad_frame_ms"], "audio_after_stop": after, "words_played": len(heard.split()),
            "words_persisted": len(persisted.split()), "equal": heard == persisted}


async def _server_side(port: int, trials: int, seed: int) -> dict[str, Any]:
    import httpx

    user_pcm, onset = _user_voice()
    rng = random.Random(seed)
    out: dict[str, Any] = {}
    for key, _label, options in CONFIGS:
        before = _metric(httpx.get(f"http://127.0.0.1:{port}/metrics").text)
        rows = [await _server_trial(port, options, user_pcm, onset, rng) for _ in range(trials)]
        after = _metric(httpx.get(f"http://127.0.0.1:{port}/metrics").text)
        count = after[1] - before[1]
        out[key] = {"trials": rows, "server_metric_mean_ms": (after[0] - before[0]) / count * 1000 if count else None}
    return out


def _metric(text: str) -> tuple[float, float]:
    def value(name: str) -> float:
        m = re.search(rf"^{name} ([0-9.e+-]+)$", text, re.M)
        return float(m.group(1)) if m else 0.0

    return (value("turnline_voice_barge_in_latency_seconds_sum"),
            value("turnline_voice_barge_in_latency_seconds_count"))


# ---------------------------------------------------------------- (b) in the browser


CHROMIUM = "/usr/bin/chromium"  # Debian's; with the flags of tests/e2e/conftest.py and a fake microphone
CHROMIUM_ARGS = ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--use-fake-ui-for-media-stream", "--use-fake-device-for-media-stream"]


def _browser_side(port: int, trials: int, wav: Path, configs: tuple[str, ...]) -> dict[str, Any]:
    import httpx
    from playwright.sync_api import sync_playwright

    tok = token("bench-page")
    out: dict[str, Any] = {}
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM,
                                    args=[*CHROMIUM_ARGS, f"--use-file-for-fake-audio-capture={wav}"])
        try:
            for key, _label, options in CONFIGS:
                if key not in configs:
                    continue
                session = f"barge-page-{uuid.uuid4().hex[:10]}"
                query = urllib.parse.urlencode({"token": tok, "raw-mic": "1", "voice-options": json.dumps(options)})
                page = browser.new_page()
                page.goto(f"http://127.0.0.1:{port}/voice.html?{query}#{session}")
                page.wait_for_function("() => window.voicePage.conn.state === 'connected'", timeout=20_000)
                page.evaluate("() => window.voicePage.setMuted(true)")
                page.get_by_test_id("start").click()
                page.wait_for_function("() => window.voicePage.voice.live && window.voicePage.voice.mic.active",
                                       timeout=20_000)
                rows = []
                for _ in range(trials):
                    rows.append(_page_trial(page, httpx, port, session, tok))
                out[key] = {"trials": rows, "output_latency_ms": page.evaluate(OUTPUT_LATENCY_JS)}
                page.close()
        finally:
            browser.close()
    return out


OUTPUT_LATENCY_JS = ("() => { const c = window.voicePage.voice.ctx; "
                     "return 1000 * (c.baseLatency + (c.outputLatency || 0)); }")


def _wait(page: Any, expression: str, arg: Any = None, timeout: int = 30_000) -> Any:
    return page.wait_for_function(expression, arg=arg, timeout=timeout).json_value()


def _page_trial(page: Any, httpx: Any, port: int, session: str, tok: str) -> dict[str, Any]:
    t0 = page.evaluate("() => { window.voicePage.say('tell me a story'); return performance.now(); }")
    playing = _wait(page, "(t0) => window.voicePage.events('playing').find((e) => e.at > t0)", t0)
    turn = playing["turnId"]
    # unmute in the silent gap right after an utterance of the looping voice went by
    _wait(page, "(t) => window.voicePage.events('offset').find((e) => e.at > t)", playing["at"])
    unmuted = page.evaluate("() => { window.voicePage.setMuted(false); return performance.now(); }")
    drop = _wait(page, "(t) => window.voicePage.events('drop').find((d) => d.turnId === t)", turn)
    onset = next(e for e in page.evaluate("() => window.voicePage.events('onset')") if e["at"] > unmuted)
    final = _wait(page, "(t) => window.voicePage.events('final').find((e) => e.turnId === t)", turn)
    page.evaluate("() => window.voicePage.setMuted(true)")  # not before: a pause with no more voice resumes
    _wait(page, """(t) => { const v = window.voicePage.chat.view; const turn = v.core.turns.get(t);
                            return turn && turn.revised; }""", turn)
    history = httpx.get(f"http://127.0.0.1:{port}/v1/sessions/{session}/messages",
                        headers={"authorization": f"Bearer {tok}"}).json()["messages"]
    message_id = page.evaluate("(t) => window.voicePage.chat.view.core.turns.get(t).messageId", turn)
    persisted = _text(next(m for m in history if m["id"] == message_id))
    heard = final["heardText"]
    return {"latency_ms": (drop["atContext"] - onset["onsetContext"]) * 1000,
            "latency_page_clock_ms": drop["at"] - onset["onset"], "first_drop": drop["state"],
            "dropped": drop["dropped"], "words_played": len(heard.split()), "words_persisted": len(persisted.split()),
            "equal": heard == persisted}


# ---------------------------------------------------------------- the table


def run(trials: int, browser_trials: int, browser_configs: tuple[str, ...], seed: int = 1) -> dict[str, Any]:
    import tempfile

    from turnline.voice.audio import silence, write_wav

    results: dict[str, Any] = {"trials": trials, "browser_trials": browser_trials, "configs": {}}
    with turnline_server("bench.barge_in:storyteller", extra=["--voice"]) as port:
        server = asyncio.run(_server_side(port, trials, seed))
        browser: dict[str, Any] = {}
        if browser_trials and Path(CHROMIUM).exists():
            with tempfile.TemporaryDirectory() as tmp:
                wav = Path(tmp) / "user.wav"
                user_pcm, _onset = _user_voice()
                write_wav(wav, silence(300) + user_pcm + silence(900))  # chromium loops it
                browser = _browser_side(port, browser_trials, wav, browser_configs)
        elif browser_trials:
            results["browser_skipped"] = "chromium is not installed (scripts/ensure-system-deps)"
    for key, label, options in CONFIGS:
        results["configs"][key] = {"label": label, "options": options, "server": server[key],
                                   "browser": browser.get(key)}
    return results


def table(results: dict[str, Any]) -> None:
    cols = ["rules", "VAD frame", "server: onset frame → stop, p50/p99 ms", "server metric mean ms",
            "browser: onset → queue dropped, p50/p99 ms", "audio after stop", "words persisted = played"]
    rows = []
    for key, label, _ in CONFIGS:
        c = results["configs"][key]
        srv = c["server"]["trials"]
        lat = [r["latency_ms"] for r in srv]
        b = c["browser"]
        blat = [r["latency_ms"] for r in b["trials"]] if b else []
        checks = srv + (b["trials"] if b else [])
        mean = c["server"]["server_metric_mean_ms"]
        rows.append([label, f"{srv[0]['vad_frame_ms']} ms webrtcvad",
                     f"{pct(lat, 50):.1f} / {pct(lat, 99):.1f} (n={len(lat)})",
                     f"{mean:.1f}" if mean is not None else "—",
                     f"{pct(blat, 50):.1f} / {pct(blat, 99):.1f} (n={len(blat)})" if blat else "—",
                     sum(r["audio_after_stop"] for r in srv),
                     f"{sum(r['equal'] for r in checks)}/{len(checks)}"])
    print_table("barge_in (loopback; real-time audio; espeak-ng user over espeak-ng agent)", cols, rows)
    out_lat = next((c["browser"]["output_latency_ms"] for c in results["configs"].values() if c["browser"]), None)
    if out_lat is not None:
        print(f"browser audio output latency after the drop (AudioContext base + output): {out_lat:.1f} ms")
    print("per trial, words played → persisted:")
    for key, _label, _ in CONFIGS:
        c = results["configs"][key]
        pairs = [f"{r['words_played']}→{r['words_persisted']}" for r in c["server"]["trials"]]
        if c["browser"]:
            pairs += [f"page {r['words_played']}→{r['words_persisted']}" for r in c["browser"]["trials"]]
        print(f"  {key}: {' '.join(pairs)}")


def bench(quick: bool) -> None:
    if quick:
        results = run(trials=3, browser_trials=2, browser_configs=("default",))
    else:
        results = run(trials=30, browser_trials=12, browser_configs=("default", "livekit", "pipecat"))
    table(results)
    print(f"written {save('barge_in-quick' if quick else 'barge_in', results)}")


if __name__ == "__main__":
    import sys

    bench("--quick" in sys.argv)
