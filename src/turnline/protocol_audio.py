"""Binary WebSocket frames for voice audio: the codec. No I/O.

Part of the wire contract (docs/protocol.md, "Voice"), beside
:mod:`turnline.protocol`, so any layer may speak it: the server checks frames
with it, the voice pipeline and clients build them. Integers are
little-endian; audio is PCM16 LE mono 16 kHz.

    0  u8   version (1)
    1  u8   kind (1 audio-in, 2 audio-out)
    2  u16  header length H (the samples start at H; unknown header bytes are skipped)
    4  u32  seq
    8  u32  ms
    12 u8   S, then S bytes of session id
    .  u8   T, then T bytes of turn id (T = 0 in audio-in)
    .  u32 span_start, u32 span_end, u32 heard_end (audio-out only)
    H  samples
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from .protocol import ErrorCode, FrameError, is_valid_id

AUDIO_VERSION = 1
AUDIO_IN = 1
AUDIO_OUT = 2
SAMPLE_RATE = 16_000
FRAME_MS = 20
MAX_AUDIO_IN_BYTES = SAMPLE_RATE * 2  # one second
_FIXED = struct.Struct("<BBHII")  # version, kind, header length, seq, ms
_SPANS = struct.Struct("<III")
_U32 = 0xFFFF_FFFF


@dataclass(frozen=True, slots=True)
class AudioFrame:
    kind: int
    session: str
    seq: int
    ms: int
    pcm: bytes
    turn_id: str = ""
    span_start: int = 0
    span_end: int = 0
    heard_end: int = 0

    @property
    def duration_ms(self) -> float:
        return len(self.pcm) / 2 / SAMPLE_RATE * 1000


class AudioFrameError(FrameError):
    """A binary frame that cannot be accepted; ``session`` when it could be read."""

    def __init__(self, code: str, message: str, session: str | None = None):
        super().__init__(code, message)
        self.session = session


def encode_audio(frame: AudioFrame) -> bytes:
    session = frame.session.encode("ascii")
    turn = frame.turn_id.encode("ascii")
    tail = _SPANS.pack(frame.span_start, frame.span_end, frame.heard_end) if frame.kind == AUDIO_OUT else b""
    header_len = _FIXED.size + 1 + len(session) + 1 + len(turn) + len(tail)
    return b"".join((
        _FIXED.pack(AUDIO_VERSION, frame.kind, header_len, frame.seq & _U32, frame.ms & _U32),
        bytes((len(session),)), session, bytes((len(turn),)), turn, tail, frame.pcm,
    ))


def audio_in(session: str, pcm: bytes, seq: int = 0, ms: int = 0) -> bytes:
    """An audio-in frame, as a client sends it."""
    return encode_audio(AudioFrame(AUDIO_IN, session, seq, ms, pcm))


def decode_audio(data: bytes) -> AudioFrame:
    """Decode a binary frame, or raise :class:`AudioFrameError` with a stable code."""
    view = memoryview(data)
    if len(view) < _FIXED.size + 2:
        raise AudioFrameError(ErrorCode.BAD_FRAME, f"a binary frame has a header of at least {_FIXED.size + 2} "
                                                   f"bytes; got {len(view)} bytes")
    version, kind, header_len, seq, ms = _FIXED.unpack_from(view)
    if version != AUDIO_VERSION:
        raise AudioFrameError(ErrorCode.BAD_FRAME, f"binary frame version {version}; this server speaks "
                                                   f"{AUDIO_VERSION}")
    if kind not in (AUDIO_IN, AUDIO_OUT):
        raise AudioFrameError(ErrorCode.BAD_FRAME, f"unknown binary frame kind {kind}")
    pos = _FIXED.size
    s_len = view[pos]
    pos += 1
    if pos + s_len + 1 > min(header_len, len(view)):
        raise AudioFrameError(ErrorCode.BAD_FRAME, "the session id runs past the header")
    session = bytes(view[pos:pos + s_len]).decode("latin-1")
    pos += s_len
    if not is_valid_id(session):
        raise AudioFrameError(ErrorCode.BAD_ID, f"invalid session id {session!r}")
    t_len = view[pos]
    pos += 1
    tail = _SPANS.size if kind == AUDIO_OUT else 0
    if pos + t_len + tail > header_len or header_len > len(view):
        raise AudioFrameError(ErrorCode.BAD_FRAME, f"header length {header_len} does not fit the frame's fields",
                              session)
    turn_id = bytes(view[pos:pos + t_len]).decode("latin-1")
    pos += t_len
    if t_len and not is_valid_id(turn_id):
        raise AudioFrameError(ErrorCode.BAD_ID, f"invalid turn id {turn_id!r}", session)
    spans = (0, 0, 0)
    if kind == AUDIO_OUT:
        spans = _SPANS.unpack_from(view, pos)
    pcm = bytes(view[header_len:])
    if len(pcm) % 2:
        raise AudioFrameError(ErrorCode.BAD_FRAME, "PCM16 samples are 2 bytes each; the frame has an odd "
                                                   "number of sample bytes", session)
    return AudioFrame(kind, session, seq, ms, pcm, turn_id, *spans)


def check_audio_in(frame: AudioFrame) -> AudioFrame:
    """What a server accepts from a client: audio-in, 1 sample to 1 s, no turn id."""
    if frame.kind != AUDIO_IN:
        raise AudioFrameError(ErrorCode.BAD_FRAME, "clients send audio-in frames (kind 1)", frame.session)
    if frame.turn_id:
        raise AudioFrameError(ErrorCode.BAD_FRAME, "audio-in frames carry no turn id", frame.session)
    if not frame.pcm:
        raise AudioFrameError(ErrorCode.BAD_FRAME, "the frame has no samples", frame.session)
    if len(frame.pcm) > MAX_AUDIO_IN_BYTES:
        raise AudioFrameError(ErrorCode.BAD_FRAME, f"at most 1 s of audio ({MAX_AUDIO_IN_BYTES} bytes) per frame",
                              frame.session)
    return frame
