"""Text to speech: the interface, and espeak-ng as the built-in engine.

An engine turns one clause into PCM16 mono 16 kHz and says where each word
starts in that audio (:class:`~turnline.voice.playout.Mark`). Those marks are
what makes "history equal to what was heard" exact to the word, so an engine
should give them; one that cannot returns ``marks=None`` and the playout map
shares the audio among the words by length (an estimate).

espeak-ng runs in process through its C library (``libespeak-ng.so.1``, from
Debian's ``espeak-ng`` package) because the library reports each word's audio
position as it synthesises, and the ``espeak-ng`` command does not. The
library is not thread-safe: one worker thread owns it.
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Protocol

import numpy as np

from .audio import to_mono16k
from .playout import SAMPLE_RATE, Mark, Synthesis


class TextToSpeech(Protocol):
    async def synthesize(self, text: str) -> Synthesis: ...


# -------------------------------------------------------------- libespeak-ng


class _Event(ctypes.Structure):
    _fields_ = [("type", ctypes.c_int), ("unique_identifier", ctypes.c_uint), ("text_position", ctypes.c_int),
                ("length", ctypes.c_int), ("audio_position", ctypes.c_int), ("sample", ctypes.c_int),
                ("user_data", ctypes.c_void_p), ("id", ctypes.c_char * 8)]


_CALLBACK = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int, ctypes.POINTER(_Event))
_SYNCHRONOUS = 2  # AUDIO_OUTPUT_SYNCHRONOUS
_CHARS_UTF8 = 1
_ENDPAUSE = 0x1000  # a clause's natural pause at its end
_EVENT_END = 0  # espeakEVENT_LIST_TERMINATED
_EVENT_WORD = 1
_EVENT_SENTENCE_END = 5  # espeakEVENT_END: end of a sentence or clause
_RATE, _PITCH = 1, 3  # espeak_PARAMETER


class _Espeak:
    """The process's one espeak-ng instance, used from one thread only."""

    def __init__(self) -> None:
        name = ctypes.util.find_library("espeak-ng") or "libespeak-ng.so.1"
        try:
            self.lib = ctypes.CDLL(name)
        except OSError as exc:
            raise RuntimeError(f"espeak-ng's library is not installed ({exc}); apt-get install espeak-ng") from None
        self.rate = self.lib.espeak_Initialize(_SYNCHRONOUS, 0, None, 0)
        if self.rate <= 0:
            raise RuntimeError("espeak-ng failed to initialise")
        self._pcm: list[bytes] = []
        self._marks: list[tuple[int, int]] = []  # (1-based char, sample at the engine's rate)
        self._callback = _CALLBACK(self._on_audio)  # kept alive as long as the library may call it
        self.lib.espeak_SetSynthCallback(self._callback)
        self._voice: tuple[str, int, int] | None = None

    def _on_audio(self, wav, count, events) -> int:  # type: ignore[no-untyped-def]
        if count > 0:
            self._pcm.append(ctypes.string_at(wav, count * 2))
        i = 0
        while events[i].type != _EVENT_END:
            ev = events[i]
            if ev.type in (_EVENT_WORD, _EVENT_SENTENCE_END):
                self._marks.append((ev.text_position, ev.sample))
            i += 1
        return 0

    def synthesize(self, text: str, voice: str, wpm: int, pitch: int) -> tuple[np.ndarray, list[tuple[int, int]]]:
        if self._voice != (voice, wpm, pitch):
            if self.lib.espeak_SetVoiceByName(voice.encode()) != 0:
                raise ValueError(f"espeak-ng has no voice {voice!r}")
            self.lib.espeak_SetParameter(_RATE, wpm, 0)
            self.lib.espeak_SetParameter(_PITCH, pitch, 0)
            self._voice = (voice, wpm, pitch)
        self._pcm, self._marks = [], []
        data = text.encode("utf-8")
        err = self.lib.espeak_Synth(ctypes.c_char_p(data), ctypes.c_size_t(len(data) + 1), 0, 1, 0,
                                    _CHARS_UTF8 | _ENDPAUSE, None, None)
        if err != 0:
            raise RuntimeError(f"espeak_Synth failed with {err}")
        self.lib.espeak_Synchronize()
        samples = np.frombuffer(b"".join(self._pcm), dtype="<i2")
        return samples, self._marks


_engine: _Espeak | None = None
_engine_lock = threading.Lock()
_executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="espeak-ng")


def _espeak() -> _Espeak:
    global _engine
    with _engine_lock:
        if _engine is None:
            _engine = _Espeak()
        return _engine


class EspeakTTS:
    """espeak-ng, with word marks from the synthesiser itself."""

    def __init__(self, voice: str = "en", wpm: int = 175, pitch: int = 50):
        self.voice = voice
        self.wpm = wpm
        self.pitch = pitch

    def synthesize_sync(self, text: str) -> Synthesis:
        engine = _espeak()
        samples, raw_marks = engine.synthesize(text, self.voice, self.wpm, self.pitch)
        pcm = to_mono16k(samples, engine.rate)
        total = len(pcm) // 2
        scale = SAMPLE_RATE / engine.rate
        marks = [Mark(max(pos - 1, 0), min(int(round(sample * scale)), total)) for pos, sample in raw_marks]
        return Synthesis(pcm, marks)

    async def synthesize(self, text: str) -> Synthesis:
        return await asyncio.get_running_loop().run_in_executor(_executor, self.synthesize_sync, text)
