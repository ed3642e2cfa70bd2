"""Speech to text: the pluggable interface and two built-ins.

The voice session opens a :class:`Transcriber` per user utterance (as the
barge-in rules segment it), feeds it the utterance's audio, frame by frame,
and asks for the final text when the utterance ends. ``feed`` may return an
interim transcript, which the barge-in rules count words in.

Built-ins:

- :class:`TranscriptPassthrough` (default): no recognition on the server; the
  client sends its own transcripts as ``transcript`` frames.
- :class:`ScriptedSTT`: deterministic, for tests and demos: the n-th utterance
  is heard as the n-th scripted text, its words revealed one per
  ``ms_per_word`` of voiced audio.
"""

from __future__ import annotations

from typing import Protocol, Sequence


class Transcriber(Protocol):
    async def feed(self, pcm: bytes, voiced: bool) -> str | None:
        """Audio of the utterance (PCM16 mono 16 kHz); an interim transcript, or None."""
        ...

    async def finish(self) -> str:
        """The utterance ended: its final transcript ("" for none)."""
        ...


class SpeechToText(Protocol):
    def open(self) -> Transcriber: ...


class _Nothing:
    async def feed(self, pcm: bytes, voiced: bool) -> str | None:
        return None

    async def finish(self) -> str:
        return ""


class TranscriptPassthrough:
    """Recognises nothing: transcripts come from the client."""

    def open(self) -> Transcriber:
        return _Nothing()


class _Scripted:
    def __init__(self, text: str, ms_per_word: int):
        self.words = text.split()
        self.ms_per_word = ms_per_word
        self.voiced_ms = 0.0
        self.shown = 0

    async def feed(self, pcm: bytes, voiced: bool) -> str | None:
        if voiced:
            self.voiced_ms += len(pcm) / 32
        n = min(int(self.voiced_ms // self.ms_per_word), len(self.words))
        if n > self.shown:
            self.shown = n
            return " ".join(self.words[:n])
        return None

    async def finish(self) -> str:
        return " ".join(self.words)


class ScriptedSTT:
    """Hears the n-th utterance as ``texts[n]`` (then nothing: "")."""

    def __init__(self, texts: Sequence[str], ms_per_word: int = 200):
        self.texts = list(texts)
        self.ms_per_word = ms_per_word
        self.opened = 0

    def open(self) -> Transcriber:
        text = self.texts[self.opened] if self.opened < len(self.texts) else ""
        self.opened += 1
        return _Scripted(text, self.ms_per_word)
