"""The wire contract of PROTOCOL.md as msgspec types. No I/O.

Events are what a session's log holds; frames are what travels on a WebSocket.
Everything here is validated by msgspec at decode time, so the rest of the
code can trust the shapes it receives.
"""

from __future__ import annotations

import re
import time
from typing import Annotated, Any, Literal, Union

import msgspec

PROTOCOL_VERSION = 1

# ``\Z``, not ``$``: ``$`` also matches before a trailing newline ("chat-1\n").
ID_PATTERN = r"^[A-Za-z0-9._:-]{1,128}\Z"
Id = Annotated[str, msgspec.Meta(pattern=ID_PATTERN)]
SEQ_MAX = 2**63 - 1  # a seq is a signed 64-bit integer in every store
Seq = Annotated[int, msgspec.Meta(ge=0, le=SEQ_MAX)]
_ID_RE = re.compile(ID_PATTERN)


def is_valid_id(value: object) -> bool:
    return isinstance(value, str) and _ID_RE.match(value) is not None


def now_ms() -> int:
    return time.time_ns() // 1_000_000


class ErrorCode:
    """Stable error codes. Clients switch on these strings; never rename one."""

    BAD_JSON = "bad_json"
    BAD_FRAME = "bad_frame"
    UNKNOWN_OP = "unknown_op"
    TOO_LARGE = "too_large"
    BAD_ID = "bad_id"
    UNAUTHORIZED = "unauthorized"
    FORBIDDEN = "forbidden"
    NOT_FOUND = "not_found"
    BUSY = "busy"
    RATE_LIMITED = "rate_limited"
    CONFLICT = "conflict"
    INTERNAL = "internal"
    # Codes carried by events rather than error frames.
    QUEUE_FULL = "queue_full"
    WORKER_LOST = "worker_lost"
    AGENT_ERROR = "agent_error"
    # A turn ended by its LLM provider (turnline.agent.providers; docs/providers.md).
    PROVIDER_AUTH = "provider_auth"
    PROVIDER_RATE_LIMITED = "provider_rate_limited"
    PROVIDER_BAD_REQUEST = "provider_bad_request"
    PROVIDER_ERROR = "provider_error"
    PROVIDER_STREAM_BROKEN = "provider_stream_broken"
    PROVIDER_UNREACHABLE = "provider_unreachable"


ALL_ERROR_CODES = (
    "bad_json", "bad_frame", "unknown_op", "too_large", "bad_id", "unauthorized",
    "forbidden", "not_found", "busy", "rate_limited", "conflict", "internal",
)

Reason = Literal["complete", "cancelled", "error"]
Role = Literal["user", "assistant", "system"]
Policy = Literal["concurrent", "queue", "interrupt", "reject", "rollback"]
POLICIES: tuple[str, ...] = ("concurrent", "queue", "interrupt", "reject", "rollback")
PresenceState = Literal["idle", "thinking", "streaming", "offline"]


class Message(msgspec.Struct, omit_defaults=True):
    """An AI SDK ``UIMessage`` plus its place in the conversation tree."""

    id: Id
    role: Role
    parts: list[dict[str, Any]]
    parent_id: Id | None
    metadata: dict[str, Any] | None = None


class ErrorInfo(msgspec.Struct):
    code: str
    message: str


class CancelFilter(msgspec.Struct, omit_defaults=True, forbid_unknown_fields=True):
    """Exactly one of the four scopes. An empty filter means ``own``."""

    own: bool = False
    turn_id: Id | None = None
    client_id: Id | None = None
    all: bool = False

    def normalized(self) -> CancelFilter:
        chosen = [self.own, self.turn_id is not None, self.client_id is not None, self.all]
        if sum(chosen) > 1:
            raise ValueError("a cancel filter names exactly one of own, turn_id, client_id, all")
        if not any(chosen):
            return CancelFilter(own=True)
        return self


# ---------------------------------------------------------------- events


class Event(msgspec.Struct, tag_field="type", omit_defaults=True, kw_only=True, gc=False):
    """Base of every log event. ``seq`` is assigned by the store at append time.

    Untracked by the cycle collector (``gc=False``): an event holds JSON data
    only, so it cannot be part of a cycle, and a live turn keeps every chunk
    event; tracked, they made each full collection walk them all (tens of ms
    a pause in a busy worker)."""

    seq: int = 0
    ts: int = 0
    client_id: str = ""


class MessageEvent(Event, tag="message"):
    message: Message


class TurnStart(Event, tag="turn-start"):
    turn_id: Id
    owner: str
    input_id: Id
    message_id: Id


class ChunkEvent(Event, tag="chunk"):
    turn_id: Id
    chunk: dict[str, Any]
    # Extension: written by the agent's on_abort hook after the abort fired.
    # Such chunks are kept in the persisted message even past a ``seen`` cursor.
    final: bool = False


class TurnEnd(Event, tag="turn-end"):
    turn_id: Id
    reason: Reason
    message: Message
    error: ErrorInfo | None = None


class CancelEvent(Event, tag="cancel"):
    request_id: Id
    filter: CancelFilter
    seen: int | None = None


class CancelResult(Event, tag="cancel-result", omit_defaults=False):
    request_id: Id
    cancelled: list[str] = []
    rejected: list[str] = []
    pending: list[str] = []
    # Extension: messages a ``rollback`` send took off the active branch.
    rolled_back: list[str] = []


class Queued(Event, tag="queued"):
    message_id: Id
    position: int
    # Extensions: the turn id reserved for it, and the queued messages
    # themselves, which join the tree (as ``message`` events) when that turn
    # starts, after the reply they waited for.
    turn_id: str | None = None
    messages: list[Message] = []


class Rejected(Event, tag="rejected"):
    message_id: Id
    code: str


class Presence(Event, tag="presence", omit_defaults=False):
    state: PresenceState
    turns: list[str] = []


class SpeechInterrupted(Event, tag="speech-interrupted", omit_defaults=False):
    turn_id: Id
    reason: str
    mode: Literal["speech", "response"]
    played_ms: int = 0


class TurnRevised(Event, tag="turn-revised"):
    """Extension: a stop that raced the end of the turn and lost the race on the
    server, but not on the client's screen. The turn had already ended
    ``complete``; the client's ``seen`` cursor says it showed less, so the
    persisted message is replaced by the fold up to ``seen``. Old clients may
    ignore it; history and new clients use the revised message."""

    turn_id: Id
    reason: Reason
    message: Message


class Compacted(Event, tag="compacted"):
    """Extension: stands for the events ``first``..``seq`` that retention
    removed from the log (chunks of turns that ended long ago; each such turn's
    ``turn-end`` holds its folded message). Never stored: a store's read puts
    one where the log has a hole, so a reader can tell compaction from loss."""

    first: int


AnyEvent = Union[
    MessageEvent, TurnStart, ChunkEvent, TurnEnd, CancelEvent, CancelResult,
    Queued, Rejected, Presence, SpeechInterrupted, TurnRevised, Compacted,
]

# ---------------------------------------------------------------- client frames


class ClientFrame(msgspec.Struct, tag_field="op", omit_defaults=True, kw_only=True):
    id: str | int | None = None


class MessageIn(msgspec.Struct, omit_defaults=True):
    """A message as a client sends it; the server fills in what is missing."""

    parts: list[dict[str, Any]]
    id: Id | None = None
    role: Literal["user", "system"] = "user"
    metadata: dict[str, Any] | None = None


class Subscribe(ClientFrame, tag="subscribe"):
    session: Id
    after: Seq | None = None


class Unsubscribe(ClientFrame, tag="unsubscribe"):
    session: Id


class Send(ClientFrame, tag="send"):
    session: Id
    messages: Annotated[list[MessageIn], msgspec.Meta(min_length=1, max_length=64)]
    policy: Policy | None = None
    parent_id: Id | None = None
    steer: Id | None = None
    # Extension: for ``interrupt``/``rollback``, the sender's view cursor; the
    # turns the send cancels are persisted as of it, as with ``cancel.seen``.
    seen: Seq | None = None
    # Extension: the sender's W3C trace context; with tracing on, the turn's
    # span is its child (an invalid one is ignored, as W3C says). Not stored.
    traceparent: Annotated[str, msgspec.Meta(max_length=512)] | None = None


class Regenerate(ClientFrame, tag="regenerate"):
    session: Id
    message_id: Id


class Cancel(ClientFrame, tag="cancel"):
    session: Id
    filter: CancelFilter | None = None
    seen: Seq | None = None


class Played(ClientFrame, tag="played"):
    session: Id
    turn_id: Id
    ms: Seq
    # Extension: playback of this turn stopped here for good (after an ``interrupted`` signal).
    final: bool = False


# Voice extensions (docs/protocol.md, "Voice"). Reasons are free strings.
SpeechReason = Annotated[str, msgspec.Meta(min_length=1, max_length=64)]
HistoryPolicy = Literal["keep-heard", "keep-generated"]


class VoiceStart(ClientFrame, tag="voice-start"):
    session: Id
    history: HistoryPolicy | None = None
    options: dict[str, Any] | None = None


class VoiceStop(ClientFrame, tag="voice-stop"):
    session: Id


class Transcript(ClientFrame, tag="transcript"):
    session: Id
    text: Annotated[str, msgspec.Meta(max_length=16_384)]
    final: bool = True


class Interrupt(ClientFrame, tag="interrupt"):
    session: Id
    mode: Literal["speech", "response"] = "speech"
    reason: SpeechReason = "client_request"


class Ping(ClientFrame, tag="ping"):
    pass


VOICE_FRAMES = (Played, VoiceStart, VoiceStop, Transcript, Interrupt)
AnyClientFrame = Union[Subscribe, Unsubscribe, Send, Regenerate, Cancel, Played, Ping,
                       VoiceStart, VoiceStop, Transcript, Interrupt]
CLIENT_OPS = ("subscribe", "unsubscribe", "send", "regenerate", "cancel", "played", "ping",
              "voice-start", "voice-stop", "transcript", "interrupt")

# ---------------------------------------------------------------- codecs

_encoder = msgspec.json.Encoder()
_event_decoder = msgspec.json.Decoder(AnyEvent)
_frame_decoder = msgspec.json.Decoder(AnyClientFrame)
_any_decoder = msgspec.json.Decoder()


def encode(obj: Any) -> bytes:
    return _encoder.encode(obj)


def decode_event(data: bytes | str) -> AnyEvent:
    return _event_decoder.decode(data)


def decode_events(data: bytes | str) -> list[AnyEvent]:
    return msgspec.json.decode(data, type=list[AnyEvent])


class FrameError(Exception):
    """A client frame that cannot be accepted; ``code`` is an :class:`ErrorCode`."""

    def __init__(self, code: str, message: str, frame_id: Any = None):
        super().__init__(message)
        self.code = code
        self.message = message
        self.frame_id = frame_id


MAX_NESTING = 64
_JSON_STRING = re.compile(rb'"(?:[^"\\]|\\.)*"', re.DOTALL)
_NOT_BRACKETS = bytes(b for b in range(256) if b not in b"[]{}")


def nesting_exceeds(data: bytes | str, limit: int = MAX_NESTING) -> bool:
    """Whether JSON nests deeper than ``limit``. Accepted input must decode
    again wherever it is read: msgspec's depth limit is the Python stack's, so
    a frame one server barely decoded could make the session unreadable to
    another (or to the same one after a restart)."""
    if isinstance(data, str):
        data = data.encode()
    if data.count(b"[") + data.count(b"{") <= limit:
        return False
    depth = 0
    for b in _JSON_STRING.sub(b'""', data).translate(None, _NOT_BRACKETS):
        depth += 1 if b in b"[{" else -1
        if depth > limit:
            return True
    return False


def decode_frame(data: bytes | str, max_size: int) -> AnyClientFrame:
    """Decode one client frame, or raise :class:`FrameError` with a stable code.

    The fast path is one typed decode; only a failing frame pays for the slow
    classification that picks the right code and recovers the frame's ``id``.
    """
    if len(data) > max_size:
        raise FrameError(ErrorCode.TOO_LARGE, f"frame is {len(data)} bytes; the limit is {max_size}")
    try:
        frame = _frame_decoder.decode(data)
    except msgspec.DecodeError as typed_error:
        detail = str(typed_error)
    except (RecursionError, UnicodeDecodeError) as exc:  # nested too deeply; bytes that are not UTF-8
        raise FrameError(ErrorCode.BAD_JSON, f"malformed JSON: {exc}") from None
    else:
        if nesting_exceeds(data):
            raise FrameError(ErrorCode.BAD_FRAME, f"JSON nested deeper than {MAX_NESTING} levels", frame.id)
        return frame
    try:
        raw = _any_decoder.decode(data)
    except (msgspec.DecodeError, RecursionError, UnicodeDecodeError) as exc:
        raise FrameError(ErrorCode.BAD_JSON, f"malformed JSON: {exc}") from None
    if not isinstance(raw, dict):
        raise FrameError(ErrorCode.BAD_FRAME, "a frame is a JSON object")
    frame_id = raw.get("id")
    if not isinstance(frame_id, (str, int)) or isinstance(frame_id, bool):
        frame_id = None
    op = raw.get("op")
    if op not in CLIENT_OPS:
        raise FrameError(ErrorCode.UNKNOWN_OP, f"unknown op {op!r}", frame_id)
    if "matching regex" in detail or "must match" in detail:
        raise FrameError(ErrorCode.BAD_ID, f"invalid id ({ID_PATTERN}): {detail}", frame_id)
    raise FrameError(ErrorCode.BAD_FRAME, detail, frame_id)


def event_frame(session: str, event_json: bytes) -> bytes:
    """``{"op":"event",...}`` built from an already encoded event (no re-encode)."""
    return b'{"op":"event","session":"' + session.encode() + b'","event":' + event_json + b"}"


def events_frame(session: str, events_json: list[bytes]) -> bytes:
    return (
        b'{"op":"events","session":"' + session.encode() + b'","events":['
        + b",".join(events_json) + b"]}"
    )


def ack_frame(frame_id: Any, **fields: Any) -> bytes:
    return _encoder.encode({"op": "ack", "id": frame_id, **fields})


def error_frame(frame_id: Any, code: str, message: str, **fields: Any) -> bytes:
    return _encoder.encode({"op": "error", "id": frame_id, "code": code, "message": message, **fields})


def pong_frame(frame_id: Any) -> bytes:
    """``{"op":"pong"}``, quoting the ping's ``id`` when it had one."""
    return b'{"op":"pong"}' if frame_id is None else _encoder.encode({"op": "pong", "id": frame_id})


def text_part(text: str) -> dict[str, Any]:
    return {"type": "text", "text": text}


def user_message(text: str, id: str | None = None) -> MessageIn:
    return MessageIn(parts=[text_part(text)], id=id)
