"""The voice engines on real inputs: espeak-ng (library and command), webrtcvad,
Silero (when installed: onnxruntime and the silero-vad wheel without torch)."""

from __future__ import annotations

import asyncio

import pytest

from turnline.voice.audio import espeak_available, espeak_wav, frames, parse_wav, read_wav, silence, write_wav
from turnline.voice.playout import PlayoutMap, align_words
from turnline.voice.text import words
from turnline.voice.tts import EspeakTTS
from turnline.voice.vad import SileroVad, WebRtcVad, make_vad, silero_available

pytestmark = pytest.mark.skipif(not espeak_available(), reason="espeak-ng is not installed")


def test_espeak_gives_a_mark_for_every_word_and_they_follow_the_audio() -> None:
    text = "Héllo wörld, how are you today? I am fine. "
    synth = asyncio.run(EspeakTTS().synthesize(text))
    seconds = len(synth.pcm) / 32_000
    assert 1.5 < seconds < 6
    assert synth.marks is not None
    starts = {m.char for m in synth.marks}
    assert {s for s, _ in words(text)} - starts <= {text.index("am")}  # espeak speaks "I am" as one word
    aligned = align_words(text, 0, 0, synth)
    assert [text[w.start:w.end] for w in aligned] == text.split()
    assert all(a.audio_end <= b.audio_end for a, b in zip(aligned, aligned[1:]))
    assert aligned[0].audio_end > 0 and aligned[-1].audio_end <= len(synth.pcm) // 2
    m = PlayoutMap()
    m.add(0, text, synth)
    m.finish()
    assert text[: m.heard_end(m.total_ms)] == text.rstrip()
    assert m.heard_end(0) == 0


def test_the_library_and_the_command_speak_the_same_length() -> None:
    text = "The quick brown fox jumps over the lazy dog."
    lib = asyncio.run(EspeakTTS().synthesize(text))
    cmd = espeak_wav(text)
    assert abs(len(lib.pcm) - len(cmd)) / len(cmd) < 0.25  # the library adds the clause's end pause


def test_wav_round_trip_and_espeaks_streamed_header(tmp_path) -> None:  # type: ignore[no-untyped-def]
    pcm = espeak_wav("one two three", tmp_path / "a.wav")
    assert read_wav(tmp_path / "a.wav") == pcm
    write_wav(tmp_path / "b.wav", pcm[:640])
    samples, rate = parse_wav((tmp_path / "b.wav").read_bytes())
    assert rate == 16_000 and samples.tobytes() == pcm[:640]


@pytest.mark.parametrize("frame_ms", [10, 20, 30])
def test_webrtcvad_hears_speech_and_not_silence(frame_ms: int) -> None:
    vad = WebRtcVad(3, frame_ms)
    speech = espeak_wav("please stop talking for a moment")
    voiced = [vad.is_speech(f) for f in frames(speech, frame_ms)]
    assert sum(voiced) > len(voiced) // 2
    assert not any(vad.is_speech(f) for f in frames(silence(500), frame_ms))
    with pytest.raises(ValueError):
        WebRtcVad(3, 25)
    with pytest.raises(ValueError):
        make_vad("nope")


@pytest.mark.skipif(not silero_available(), reason="Silero needs: pip install onnxruntime && "
                                                   "pip install --no-deps silero-vad")
def test_silero_hears_speech_and_not_silence() -> None:
    vad = make_vad("silero")
    assert isinstance(vad, SileroVad) and vad.frame_ms == 32
    speech = espeak_wav("please stop talking for a moment")
    voiced = [vad.is_speech(f) for f in frames(speech, 32)[:-1]]
    assert sum(voiced) > len(voiced) // 3
    quiet = make_vad("silero")
    assert not any(quiet.is_speech(f) for f in frames(silence(640), 32))
