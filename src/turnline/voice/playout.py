"""The playout map: a turn's audio, cut in frames, each mapped to the text it
speaks; and the message as heard. Pure, no I/O.

Offsets are into the turn's *spoken text*: its ``text`` parts, in order,
joined with ``"\\n"`` (:func:`spoken_text`), counted in code points. Audio is
counted in samples at 16 kHz. A word is *heard* once its audio has played to
its end, so the text heard at a playout position is a prefix of the spoken
text that ends at a word's end: "to the word", from the audio itself, never
from a clock.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass
from typing import Any, Sequence

from ..protocol import Message
from .text import words

SAMPLE_RATE = 16_000
SAMPLE_BYTES = 2


@dataclass(frozen=True, slots=True)
class Mark:
    """The text from clause offset ``char`` on is spoken from audio sample ``sample`` on
    (a TTS engine's word events)."""

    char: int
    sample: int


@dataclass(slots=True)
class Synthesis:
    """A clause as speech: PCM16 LE mono 16 kHz, and where its words start.
    ``marks`` is None for an engine without word timings: the audio is then
    shared among the words by their length (an estimate, and said so)."""

    pcm: bytes
    marks: list[Mark] | None = None

    @property
    def samples(self) -> int:
        return len(self.pcm) // SAMPLE_BYTES


@dataclass(frozen=True, slots=True)
class Word:
    start: int  # spoken-text offsets
    end: int
    audio_start: int  # turn-audio samples
    audio_end: int


@dataclass(frozen=True, slots=True)
class OutFrame:
    """One frame of a turn's audio and the text it carries."""

    seq: int
    ms: int  # position of its first sample in the turn's audio
    span_start: int  # the words its audio speaks (empty in a pause)
    span_end: int
    heard_end: int  # text heard, to the word, once this frame has played
    pcm: bytes


def align_words(text: str, offset: int, audio_offset: int, synthesis: Synthesis) -> list[Word]:
    """Give each word of ``text`` (a clause at spoken-text ``offset``, whose
    audio starts at turn sample ``audio_offset``) the audio that speaks it.

    A word's audio starts at the last mark at or before its first character
    and ends at the first mark at or after its end (the next word's start, or
    the end-of-clause mark), else at the end of the clause's audio. Engines
    may merge words ("I am" as one event): they then share that audio and are
    heard together."""
    total = synthesis.samples
    spans = words(text)
    marks = synthesis.marks
    if marks is None:  # no timings: share the audio by characters
        n = max(len(text), 1)
        marks = [Mark(s, total * s // n) for s, _ in spans] + [Mark(len(text), total)]
    marks = sorted((m for m in marks if 0 <= m.char <= len(text)), key=lambda m: (m.char, m.sample))
    chars = [m.char for m in marks]
    out: list[Word] = []
    last_end = 0
    for s, e in spans:
        i = bisect.bisect_right(chars, s) - 1
        a0 = marks[i].sample if i >= 0 else 0
        j = bisect.bisect_left(chars, e)
        a1 = marks[j].sample if j < len(marks) else total
        a1 = min(max(a1, a0, last_end), total)  # monotone, inside the clause
        a0 = min(a0, a1)
        last_end = a1
        out.append(Word(offset + s, offset + e, audio_offset + a0, audio_offset + a1))
    return out


class PlayoutMap:
    """A turn's audio as it is synthesised, clause by clause, and the map from
    playout position to text heard."""

    def __init__(self, frame_ms: int = 20, sample_rate: int = SAMPLE_RATE):
        self.frame_ms = frame_ms
        self.sample_rate = sample_rate
        self.frame_samples = sample_rate * frame_ms // 1000
        self._pcm = bytearray()
        self.words: list[Word] = []
        self._word_ends: list[int] = []  # audio_end of each word, for bisect
        self.finished = False

    # -- building

    def add(self, offset: int, text: str, synthesis: Synthesis) -> None:
        """Append a clause at spoken-text ``offset`` and its audio."""
        if self.finished:
            raise RuntimeError("the turn's audio is finished")
        if self.words and offset < self.words[-1].end:
            raise ValueError("clauses are added in text order")
        start = self.samples
        self._pcm += synthesis.pcm[: synthesis.samples * SAMPLE_BYTES]
        for w in align_words(text, offset, start, synthesis):
            self.words.append(w)
            self._word_ends.append(w.audio_end)

    def finish(self) -> None:
        """No more audio: pad the last frame with silence."""
        if not self.finished:
            rest = self.samples % self.frame_samples
            if rest:
                self._pcm += bytes((self.frame_samples - rest) * SAMPLE_BYTES)
            self.finished = True

    # -- reading

    @property
    def samples(self) -> int:
        return len(self._pcm) // SAMPLE_BYTES

    @property
    def frames(self) -> int:
        """Complete frames available."""
        return self.samples // self.frame_samples

    @property
    def total_ms(self) -> int:
        return self.samples * 1000 // self.sample_rate

    def ms_of(self, frame: int) -> int:
        return frame * self.frame_ms

    def frame(self, index: int) -> OutFrame:
        if not 0 <= index < self.frames:
            raise IndexError(f"frame {index} is not available ({self.frames} are)")
        a = index * self.frame_samples
        b = a + self.frame_samples
        heard = self.heard_end_at(b)
        # the words whose audio overlaps [a, b)
        first = bisect.bisect_right(self._word_ends, a)
        last = first
        while last < len(self.words) and self.words[last].audio_start < b:
            last += 1
        if last > first:
            span = (self.words[first].start, self.words[last - 1].end)
        else:
            span = (heard, heard)
        return OutFrame(index, index * self.frame_ms, span[0], span[1], heard,
                        bytes(self._pcm[a * SAMPLE_BYTES:b * SAMPLE_BYTES]))

    def heard_end_at(self, sample: int) -> int:
        """Spoken-text offset heard once playout reached ``sample``."""
        i = bisect.bisect_right(self._word_ends, sample)
        return self.words[i - 1].end if i else 0

    def heard_end(self, played_ms: int) -> int:
        """Spoken-text offset heard once ``played_ms`` of the turn's audio has played."""
        return self.heard_end_at(max(played_ms, 0) * self.sample_rate // 1000)


# ---------------------------------------------------------------- messages


def _text_parts(parts: Sequence[dict[str, Any]]) -> list[str]:
    return [p.get("text", "") for p in parts if p.get("type") == "text"]


def spoken_text(parts: Sequence[dict[str, Any]]) -> str:
    """The text a turn speaks: its text parts in order, joined with a newline."""
    return "\n".join(_text_parts(parts))


def heard_message(message: Message, heard_chars: int, heard_ms: int, history: str = "keep-heard") -> Message:
    """``message`` as persisted after its speech was interrupted.

    ``keep-heard``: text parts cut at ``heard_chars`` of the spoken text (parts
    wholly unheard dropped; other parts, e.g. tools, kept). ``keep-generated``:
    parts unchanged. Either way ``metadata.voice`` records what was heard and
    the unspoken remainder."""
    full = spoken_text(message.parts)
    heard_chars = max(0, min(heard_chars, len(full)))
    parts: list[dict[str, Any]] = []
    if history == "keep-heard":
        offset = 0
        for part in message.parts:
            if part.get("type") != "text":
                parts.append(part)
                continue
            text = part.get("text", "")
            if heard_chars >= offset + len(text):
                parts.append(part)
            elif heard_chars > offset:
                parts.append({**part, "text": text[: heard_chars - offset], "state": "done"})
            offset += len(text) + 1
    elif history == "keep-generated":
        parts = list(message.parts)
    else:
        raise ValueError(f"history is keep-heard or keep-generated, not {history!r}")
    metadata = dict(message.metadata or {})
    voice = dict(metadata.get("voice") or {})
    voice.update({"history": history, "heard_ms": heard_ms, "heard_chars": heard_chars,
                  "unspoken": full[heard_chars:]})
    metadata["voice"] = voice
    return Message(id=message.id, role=message.role, parts=parts, parent_id=message.parent_id, metadata=metadata)
