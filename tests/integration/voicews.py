"""A raw WebSocket voice peer for the voice tests: :class:`RawWS` plus binary
audio frames and the ``voice``/``transcript`` signals, and a "speaker" that
plays audio only when the test says so (by acknowledging it)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from wsraw import RawWS

from turnline.protocol_audio import AudioFrame, audio_in, decode_audio
from turnline.voice.audio import espeak_wav, frames, silence


class VoicePeer(RawWS):
    def __init__(self, conn: Any):
        self.audio: list[AudioFrame] = []  # audio-out frames, in arrival order
        self.signals: list[dict[str, Any]] = []  # {"op":"voice"} and {"op":"transcript"} frames
        self.order: list[tuple[str, Any]] = []  # ("audio", frame) / ("signal", frame), as they came
        self._seq = 0
        super().__init__(conn)

    def _receive(self, raw: str | bytes) -> None:
        if isinstance(raw, bytes):
            frame = decode_audio(raw)
            self.audio.append(frame)
            self.order.append(("audio", frame))
            return
        super()._receive(raw)
        frame = self.frames[-1]
        if frame.get("op") in ("voice", "transcript"):
            self.signals.append(frame)
            self.order.append(("signal", frame))

    # ------------------------------------------------------------ audio

    def turn_audio(self, turn_id: str) -> list[AudioFrame]:
        return [f for f in self.audio if f.turn_id == turn_id]

    async def audio_until(self, turn_id: str, count: int) -> list[AudioFrame]:
        await self.wait_until(lambda: len(self.turn_audio(turn_id)) >= count, 30, f"{count} audio frames")
        return self.turn_audio(turn_id)

    async def signal(self, state: str, turn_id: str | None = None, timeout: float = 10) -> dict[str, Any]:
        def found() -> dict[str, Any] | None:
            return next((s for s in self.signals if s.get("state") == state
                         and (turn_id is None or s.get("turn_id") == turn_id)), None)

        return await self.wait_until(found, timeout, f"voice signal {state}")

    async def speak(self, session: str, pcm: bytes) -> None:
        """Send PCM as 20 ms audio-in frames (as fast as the socket takes them:
        the server's rules run on the audio's own clock)."""
        for f in frames(pcm, 20):
            await self.send_raw(audio_in(session, f, self._seq, self._seq * 20))
            self._seq += 1

    async def barrier(self) -> None:
        """Every frame sent before has been decided (frames are decided in order)."""
        await self.ping()


def heard_text(spoken: str, frames_played: list[AudioFrame]) -> str:
    """What a listener heard, by the frames' own labels: the text up to the
    ``heard_end`` of the last frame played through."""
    return spoken[: frames_played[-1].heard_end] if frames_played else ""


_cache: dict[str, bytes] = {}


def user_voice(text: str, tmp: Path) -> bytes:
    """``text`` spoken by espeak-ng (the command), as a WAV under ``tmp``, then
    as 16 kHz PCM; with 200 ms of silence before and after."""
    if text not in _cache:
        path = tmp / f"user-{abs(hash(text))}.wav"
        _cache[text] = silence(200) + espeak_wav(text, path, voice="en-us", pitch=70) + silence(200)
    return _cache[text]
