"""The binary audio frame codec (pure)."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from turnline.protocol import decode_frame
from turnline.protocol_audio import (
    AUDIO_IN, AUDIO_OUT, AudioFrame, AudioFrameError, audio_in, check_audio_in, decode_audio, encode_audio,
)

ids = st.from_regex(r"[A-Za-z0-9._:-]{1,128}", fullmatch=True)


@settings(max_examples=300, deadline=None)
@given(st.sampled_from([AUDIO_IN, AUDIO_OUT]), ids, st.one_of(st.just(""), ids), st.integers(0, 2**32 - 1),
       st.integers(0, 2**32 - 1), st.binary(max_size=200).map(lambda b: b[: len(b) // 2 * 2]),
       st.tuples(*[st.integers(0, 2**32 - 1)] * 3))
def test_frames_round_trip(kind, session, turn, seq, ms, pcm, spans) -> None:  # type: ignore[no-untyped-def]
    frame = AudioFrame(kind, session, seq, ms, pcm, turn, *(spans if kind == AUDIO_OUT else (0, 0, 0)))
    assert decode_audio(encode_audio(frame)) == frame


def test_the_documented_byte_layout() -> None:
    data = encode_audio(AudioFrame(AUDIO_OUT, "s1", 7, 140, b"\x01\x00\x02\x00", "t-9", 3, 8, 5))
    assert data == (b"\x01\x02" + struct.pack("<H", 12 + 1 + 2 + 1 + 3 + 12) + struct.pack("<II", 7, 140)
                    + b"\x02s1" + b"\x03t-9" + struct.pack("<III", 3, 8, 5) + b"\x01\x00\x02\x00")
    assert audio_in("s1", b"\x00\x00", 1, 20) == (b"\x01\x01" + struct.pack("<HII", 16, 1, 20) + b"\x02s1\x00"
                                                   + b"\x00\x00")


def test_readers_skip_header_bytes_they_do_not_know() -> None:
    data = bytearray(audio_in("s1", b"\x05\x00"))
    extended = data[:2] + struct.pack("<H", 16 + 4) + data[4:16] + b"\xff" * 4 + data[16:]
    assert decode_audio(bytes(extended)).pcm == b"\x05\x00"


@pytest.mark.parametrize("data, code", [
    (b"", "bad_frame"),
    (b"\x02\x01" + bytes(20), "bad_frame"),
    (b"\x01\x09" + bytes(20), "bad_frame"),
    (audio_in("s1", b"\x00")[:-1] + b"\x00\x00\x00", "bad_frame"),  # odd sample bytes
    (b"\x01\x01" + struct.pack("<HII", 16, 0, 0) + b"\x02!!\x00\x00\x00", "bad_id"),
    (b"\x01\x01" + struct.pack("<HII", 9, 0, 0) + b"\x02s1\x00\x00\x00", "bad_frame"),  # header too short
    (b"\x01\x01" + struct.pack("<HII", 16, 0, 0) + b"\x7fs1", "bad_frame"),  # session past the end
])
def test_bad_frames_have_stable_codes(data: bytes, code: str) -> None:
    with pytest.raises(AudioFrameError) as err:
        decode_audio(data)
    assert err.value.code == code


def test_what_a_server_accepts_from_a_client() -> None:
    assert check_audio_in(decode_audio(audio_in("s1", bytes(640)))).pcm == bytes(640)
    for frame in (AudioFrame(AUDIO_OUT, "s1", 0, 0, bytes(2), "t"), AudioFrame(AUDIO_IN, "s1", 0, 0, b""),
                  AudioFrame(AUDIO_IN, "s1", 0, 0, bytes(32_002)), AudioFrame(AUDIO_IN, "s1", 0, 0, bytes(2), "t")):
        with pytest.raises(AudioFrameError) as err:
            check_audio_in(frame)
        assert err.value.code == "bad_frame" and err.value.session == "s1"


def test_voice_ops_decode() -> None:
    f = decode_frame(b'{"op":"interrupt","session":"s","mode":"response","reason":"timeout"}', 1000)
    assert (f.mode, f.reason) == ("response", "timeout")
    f = decode_frame(b'{"op":"played","session":"s","turn_id":"t","ms":40,"final":true}', 1000)
    assert f.final is True
    f = decode_frame(b'{"op":"transcript","session":"s","text":"hi"}', 1000)
    assert f.final is True
