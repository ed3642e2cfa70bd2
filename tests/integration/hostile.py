"""Hostile input for any turnline server: hypothesis strategies for WebSocket
frames and HTTP requests, and the checks every answer must pass.

Nothing here starts a server. A :class:`Target` names a base URL, a way to
mint tokens and the server's frame limit, so the same checks run against the
single-node test server (``test_fuzz.py``) or against any gateway of a
multi-node deployment.

The properties (invariant 8: bad input is answered, not absorbed):

- every WebSocket frame gets exactly one answer: an ``error`` with a code from
  the stable list (``ALL_ERROR_CODES``), never ``internal``, quoting the frame's
  ``id`` when it could be read; or the ``ack``/``pong`` of a frame that happens
  to be valid;
- the connection stays usable: a ping sent after each frame gets its pong;
- every HTTP answer is a success, or an error status below 500 with the body
  ``{"error": {"code", "message"}}`` and a stable code.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import string
from dataclasses import dataclass
from typing import Any, Callable, NamedTuple
from urllib.parse import quote

import httpx
from hypothesis import strategies as st

from turnline.protocol import ALL_ERROR_CODES, CLIENT_OPS, MAX_NESTING, SEQ_MAX, is_valid_id
from wsraw import RawWS

TIMEOUT = 10.0
__all__ = ["SEQ_MAX"]


@dataclass
class Target:
    http: str  # e.g. http://127.0.0.1:8787
    token: Callable[..., str]  # token(sub, caps) -> JWT the target accepts
    max_frame_bytes: int
    dev: bool = False  # whether /v1/dev/token is served

    @property
    def ws(self) -> str:
        return self.http.replace("http", "ws", 1) + "/v1/ws"


# ---------------------------------------------------------------- ids


ID_ALPHABET = string.ascii_letters + string.digits + "._:-"

# Strings that look like ids to a human, a regex with ``$``, or a terminal.
TRICKY_IDS = [
    "", " ", "chat-1\n", "chat-1\r\n", "\nchat-1", "chat-1 ", " chat-1", "chat\t1", "chat-1\x00", "\x00",
    "chat\u200b1",  # zero-width space
    "\u0441hat-1",  # Cyrillic 'с'
    "\uff43\uff48\uff41\uff54",  # full-width 'chat'
    "chat-\u0661",  # Arabic-Indic digit one
    "e\u0301",  # combining accent
    "\u202echat-1",  # right-to-left override
    "chat/1", "../chat-1", "chat%2F1", "chat?1", "chat#1", "chat\\1", 'chat"1', "chat'1", "chat<1>",
    "chat*", "*", "chat-\U0001f600", "\ud7ff", "a" * 129, "b" * 1000,
]


def valid_ids(prefix: str = "") -> st.SearchStrategy[str]:
    return st.text(ID_ALPHABET, min_size=1, max_size=128 - len(prefix)).map(lambda s: prefix + s)


def invalid_ids() -> st.SearchStrategy[str]:
    return st.one_of(st.sampled_from(TRICKY_IDS), st.text(max_size=200)).filter(lambda s: not is_valid_id(s))


# ---------------------------------------------------------------- JSON values


def json_values(max_leaves: int = 12) -> st.SearchStrategy[Any]:
    scalars = st.one_of(
        st.none(), st.booleans(), st.integers(), st.integers(min_value=2**63 - 2, max_value=2**70),
        st.integers(max_value=-(2**63) + 2, min_value=-(2**70)),
        st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=40), st.sampled_from(TRICKY_IDS))
    return st.recursive(scalars, lambda inner: st.one_of(
        st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=10), inner, max_size=4)),
        max_leaves=max_leaves)


# ---------------------------------------------------------------- frames


class Hostile(NamedTuple):
    """A payload for one WebSocket frame and what must answer it.

    ``quoted``: the id the answer must quote (``None``: no id can be read; a
    tuple: any one of these, for frames whose id is read only if the decoder
    copes with their nesting, which depends on the Python stack).
    ``codes``: the error codes allowed; ``None`` allows any stable code but
    ``internal``, or the ack (pong) of a frame that happens to be valid.
    """

    payload: str | bytes
    quoted: Any
    codes: frozenset[str] | None
    kind: str


def text(s: str) -> dict[str, Any]:
    return {"parts": [{"type": "text", "text": s}]}


def base_frames(session: str) -> dict[str, dict[str, Any]]:
    """One valid frame per op, on ``session``."""
    return {
        "subscribe": {"op": "subscribe", "session": session, "after": 0},
        "unsubscribe": {"op": "unsubscribe", "session": session},
        "send": {"op": "send", "session": session, "messages": [{**text("hi"), "id": "m-1"}],
                 "policy": "queue", "parent_id": "m-0", "steer": "turn-1", "seen": 3},
        "regenerate": {"op": "regenerate", "session": session, "message_id": "m-1"},
        "cancel": {"op": "cancel", "session": session, "filter": {"turn_id": "turn-1"}, "seen": 1},
        "played": {"op": "played", "session": session, "turn_id": "turn-1", "ms": 10},
        "send-plain": {"op": "send", "session": session, "messages": [text("plain")]},
        "ping": {"op": "ping"},
    }


# Paths (into the base frames) of every field that must be an id.
ID_FIELDS = [
    ("subscribe", ("session",)), ("unsubscribe", ("session",)), ("send", ("session",)),
    ("send", ("messages", 0, "id")), ("send", ("parent_id",)), ("send", ("steer",)),
    ("regenerate", ("session",)), ("regenerate", ("message_id",)), ("cancel", ("session",)),
    ("cancel", ("filter", "turn_id")), ("played", ("session",)), ("played", ("turn_id",)),
]


def _field_paths(value: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    out = []
    if isinstance(value, dict):
        for k, v in value.items():
            if prefix == () and k == "op":
                continue
            out.append(prefix + (k,))
            out += _field_paths(v, prefix + (k,))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            out.append(prefix + (i,))
            out += _field_paths(v, prefix + (i,))
    return out


def with_field(frame: Any, path: tuple[Any, ...], value: Any) -> Any:
    frame = json.loads(json.dumps(frame))
    node = frame
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    return frame


def _quotable(value: Any) -> Any:
    return value if isinstance(value, (str, int)) and not isinstance(value, bool) else None


def quoted_id(raw: str) -> Any:
    """The ``id`` an answer to ``raw`` quotes (the last one of duplicated keys)."""
    try:
        value = json.loads(raw)
    except (ValueError, RecursionError):
        return None
    return _quotable(value.get("id")) if isinstance(value, dict) else None


_ids = itertools.count(1)


def fresh_id() -> str:
    return f"fz{next(_ids)}"


@st.composite
def hostile_frames(draw: Any, sessions: st.SearchStrategy[str], max_frame_bytes: int) -> Hostile:
    kind = draw(st.sampled_from(["bytes", "text", "json", "nested", "wrong-type", "bad-id", "size",
                                 "duplicate-keys", "numbers", "frame-id", "unknown-op"]))
    session = draw(sessions)
    fid = fresh_id()
    if kind == "bytes":
        return Hostile(draw(st.binary(max_size=2048)), None, frozenset({"bad_frame"}), kind)
    if kind == "text":
        s = draw(st.text(max_size=512))
        try:
            json.loads(s)
        except ValueError:
            return Hostile(s, None, frozenset({"bad_json"}), kind)
        return Hostile(s, quoted_id(s), None, kind)
    if kind == "json":
        value = draw(json_values())
        codes = None if isinstance(value, dict) else frozenset({"bad_frame"})
        return Hostile(json.dumps(value), _quotable(value.get("id")) if isinstance(value, dict) else None,
                       codes, kind)
    if kind == "nested":
        depth = draw(st.one_of(st.integers(1, 200), st.integers(200, 3000), st.just(40_000)))
        opener, closer = draw(st.sampled_from([("[", "]"), ('{"a":', "}")]))
        nest = opener * depth + "1" + closer * depth
        where = draw(st.sampled_from(["top", "part", "metadata", "id"]))
        if where == "top":
            if len(nest) > max_frame_bytes:
                return Hostile(nest, None, frozenset({"too_large"}), kind)
            return Hostile(nest, None, frozenset({"bad_json", "bad_frame", "unknown_op"}), kind)
        frame = {"op": "send", "id": fid, "session": session, "messages": [text("deep")]}
        raw = json.dumps(frame)
        marker = {"part": '"deep"}', "metadata": '"deep"}'}.get(where)
        if where == "part":
            raw = raw.replace(marker, '"deep", "nest": ' + nest + "}")
        elif where == "metadata":
            raw = raw.replace('"parts"', '"metadata": {"x": ' + nest + '}, "parts"')
        else:
            raw = raw.replace(f'"id": "{fid}"', f'"id": "{fid}", "junk": ' + nest)
        if len(raw.encode()) > max_frame_bytes:
            # The id of a frame too large to parse is read by a quick decode
            # that gives up on (and does not quote through) deep nesting.
            return Hostile(raw, fid if depth < 200 else (fid, None), frozenset({"too_large"}), kind)
        if depth + {"part": 5, "metadata": 4, "id": 1}[where] > MAX_NESTING:
            # Refused even when the decoder copes: stored, it must decode again anywhere.
            if depth < 200:
                return Hostile(raw, fid, frozenset({"bad_frame"}), kind)
            return Hostile(raw, (fid, None), frozenset({"bad_frame", "bad_json"}), kind)
        return Hostile(raw, fid, None, kind)
    if kind in ("wrong-type", "bad-id"):
        op = draw(st.sampled_from(sorted(base_frames(session))))
        frame = {**base_frames(session)[op], "id": fid}
        if kind == "bad-id":
            op, path = draw(st.sampled_from(ID_FIELDS))
            frame = with_field({**base_frames(session)[op], "id": fid}, path, draw(invalid_ids()))
            return Hostile(json.dumps(frame), fid, frozenset({"bad_id"}), kind)
        paths = [p for p in _field_paths(frame) if p != ("id",)] or [("extra",)]
        frame = with_field(frame, draw(st.sampled_from(paths)), draw(json_values(6)))
        raw = json.dumps(frame)
        return Hostile(raw, fid, frozenset({"too_large"}) if len(raw.encode()) > max_frame_bytes else None, kind)
    if kind == "size":
        # A valid send padded to within a few bytes of the limit, either side,
        # with one- to four-byte characters (the limit is on bytes).
        char = draw(st.sampled_from(["x", "\u00e9", "\u20ac", "\U0001f600"]))
        target = max_frame_bytes + draw(st.one_of(st.integers(-8, 8), st.integers(9, 4 * max_frame_bytes)))
        frame = {"op": "send", "id": fid, "session": session, "messages": [text("")]}
        empty = len(json.dumps(frame, ensure_ascii=False).encode())
        n = max(0, (target - empty) // len(char.encode()))
        frame["messages"][0]["parts"][0]["text"] = char * n
        raw = json.dumps(frame, ensure_ascii=False)
        over = len(raw.encode()) > max_frame_bytes
        return Hostile(raw, fid, frozenset({"too_large"}) if over else None, kind)
    if kind == "duplicate-keys":
        good = json.dumps({"op": "subscribe", "session": session, "id": fid})[1:-1]
        extra = draw(st.sampled_from(['"op": "launch"', '"op": "send"', '"session": "a b"', '"session": 5',
                                      f'"id": "{fid}x"', '"after": -1', '"op": null']))
        order = draw(st.booleans())
        raw = "{" + (f"{good}, {extra}" if order else f"{extra}, {good}") + "}"
        return Hostile(raw, quoted_id(raw), None, kind)
    if kind == "numbers":
        field = draw(st.sampled_from([("subscribe", "after"), ("send", "seen"), ("cancel", "seen"),
                                      ("played", "ms")]))
        number = draw(st.sampled_from(["-1", "1e400", "-1e400", "1.5", "0.0", "1e3", "9223372036854775807",
                                       "9223372036854775808", "18446744073709551616", "-9223372036854775809",
                                       "1" + "0" * 200, "-0", "NaN", "Infinity"]))
        frame = {**base_frames(session)[field[0]], "id": fid}
        frame[field[1]] = "@@"
        raw = json.dumps(frame).replace('"@@"', number)
        if number in ("1e400", "-1e400", "NaN", "Infinity"):  # not a number a JSON decoder can hold
            return Hostile(raw, None, frozenset({"bad_json"}), kind)
        return Hostile(raw, fid, None, kind)
    if kind == "frame-id":
        value = draw(json_values(4))
        quoted = _quotable(value)
        if quoted is not None:
            value = quoted = f"{fid}:{value}" if isinstance(value, str) else value
        op = draw(st.sampled_from(["ping", "subscribe", "launch"]))
        frame = {**base_frames(session).get(op, {"op": op}), "id": value}
        return Hostile(json.dumps(frame), quoted, None, kind)
    op = draw(st.text(max_size=20).filter(lambda o: o not in CLIENT_OPS))
    return Hostile(json.dumps({"op": op, "id": fid, "session": session}), fid, frozenset({"unknown_op"}), kind)


# ---------------------------------------------------------------- the WebSocket check


def _is_answer(frame: dict[str, Any]) -> bool:
    return frame.get("op") in ("ack", "error", "pong")


_probes = itertools.count(1)


async def answer(ws: RawWS, payload: str | bytes, quoted: Any, timeout: float = TIMEOUT) -> dict[str, Any]:
    """Send one frame, then a ping; return the one answer to the frame.

    Errors are pushed as the frame is decided, so any error the frame caused
    arrives before the ping's pong; an ack waits until durable, so a valid
    frame's ack may come after it (and always quotes its id).
    """
    ids = quoted if isinstance(quoted, tuple) else (quoted,)
    start = len(ws.frames)
    probe = f"probe-{next(_probes)}"
    await ws.send_raw(payload)
    await ws.send_raw(json.dumps({"op": "ping", "id": probe}))
    done = {"op": "pong", "id": probe}
    await ws.wait_until(lambda: done in ws.frames[start:], timeout, "the probe's pong")
    answers = [f for f in ws.frames[start:] if _is_answer(f) and f != done and
               (f.get("id") in ids or f["op"] == "error" and f.get("id") is None)]
    if not answers and ids != (None,):
        await ws.wait_until(lambda: any(_is_answer(f) and f.get("id") in ids for f in ws.frames[start:]),
                            timeout, f"the answer to {quoted!r}")
        answers = [f for f in ws.frames[start:] if _is_answer(f) and f.get("id") in ids]
    assert len(answers) == 1, f"{len(answers)} answers to one frame: {answers}"
    return answers[0]


def check_answer(reply: dict[str, Any], hostile: Hostile) -> None:
    ids = hostile.quoted if isinstance(hostile.quoted, tuple) else (hostile.quoted,)
    assert reply.get("id") in ids, (reply, hostile.kind)
    if reply["op"] == "error":
        assert reply["code"] in ALL_ERROR_CODES, reply
        assert reply["code"] != "internal", reply
        assert isinstance(reply["message"], str) and reply["message"], reply
        if hostile.codes is not None:
            assert reply["code"] in hostile.codes, (reply, hostile.kind, sorted(hostile.codes))
    else:
        assert hostile.codes is None, (f"{hostile.kind} frame accepted, expected one of {sorted(hostile.codes)}",
                                       reply)


def assert_no_internal_error(ws: RawWS) -> None:
    internal = [e for e in ws.errors if e.get("code") == "internal"]
    assert not internal, internal


# ---------------------------------------------------------------- HTTP


class Call(NamedTuple):
    method: str
    path: str
    params: dict[str, str]
    headers: dict[str, str]
    content: bytes | None


SESSION_ROUTES = [("POST", "messages"), ("GET", "messages"), ("POST", "cancel"), ("GET", "events"),
                  ("GET", "tree")]
WRONG_METHODS = [("PUT", "messages"), ("DELETE", "cancel"), ("PATCH", "tree"), ("POST", "events")]
OTHER_ROUTES = [("GET", "/healthz"), ("GET", "/metrics"), ("POST", "/healthz"), ("GET", "/v1/dev/token"),
                ("POST", "/v1/dev/token"), ("GET", "/v1/ws"), ("GET", "/"), ("GET", "/v1"),
                ("GET", "/v1/sessions"), ("GET", "/v1/sessions//messages"), ("POST", "/api/chat"),
                ("POST", "/api/chat"), ("GET", "/api/chat/fz-a/stream"), ("POST", "/api/chat/fz-a/stop"),
                ("POST", "/api/chat/fz-b/stop")]
QUERY_KEYS = ["after", "limit", "leaf", "before", "include_hidden", "token", "sub", "cancel_on_disconnect"]
# Values and bodies that are hostile to an integer parser, an id check or a JSON decoder.
NASTY = ["-1", "0", "1e3", "+5", " 7 ", "1_000", "\u0661\u0662", "0x10", "9223372036854775807",
         "9223372036854775808", "1" * 30, "9" * 5000, "", "null", "true", "nope", "chat-1\n", "a b", "%00", "\u00e9"]
BODIES = [b"", b"{", b"[]", b"null", b'"x"', b"1e400", b"\xff\xfe", b'{"messages": "\xff"}',
          b'{"messages":[{"parts":[{"type":"text","text":"\xed\xa0\x80"}]}]}',
          b'{"messages":[{"parts":[]}], "messages": 5}', b"[" * 5000 + b"]" * 5000,
          b'{"messages":[{"parts":[' + b"[" * 3000 + b"]" * 3000 + b"]}]}",
          b'{"filter": {"all": true, "own": true}}', b'{"filter": {"turn_id": "x\\n"}}', b'{"seen": 1e400}',
          b'{"seen": 9223372036854775808}', b'{"messages":[{"id":"chat-1\\n","parts":[]}]}']


AISDK_BODIES = [b'{"id":"fz-a","messages":[{"id":"ui-1","role":"user","parts":[{"type":"text","text":"hi"}]}]}',
                b'{"id":"fz-a","trigger":"regenerate-message","messageId":"nope","messages":[]}',
                b'{"id":"fz-a\\n","messages":[]}', b'{"messageId":"nope","parts":[]}', b'{"seen":-1}',
                b'{"parts":[{"type":"text"}]}', b'{"id":5}']
GOOD_BODIES = [b'{"messages":[{"parts":[{"type":"text","text":"hi"}]}]}', b"{}", b'{"filter":{"own":true}}',
               b'{"filter":{"all":true}}', b'{"filter":{"turn_id":"turn-x"},"seen":3}',
               b'{"messages":[{"parts":[{"type":"text","text":"hi"}]}],"policy":"queue"}']


@st.composite
def hostile_calls(draw: Any, sessions: st.SearchStrategy[str], tokens: st.SearchStrategy[str | None],
                  max_frame_bytes: int) -> Call:
    if draw(st.integers(0, 4)):
        method, tail = draw(st.one_of(st.sampled_from(SESSION_ROUTES), st.sampled_from(SESSION_ROUTES),
                                      st.sampled_from(WRONG_METHODS)))
        segment = draw(st.one_of(sessions, sessions, invalid_ids()))
        path = f"/v1/sessions/{quote(segment, safe='') or '%20'}/{tail}"
    else:
        method, path = draw(st.sampled_from(OTHER_ROUTES))
        if draw(st.booleans()):
            path += "/" + draw(st.sampled_from(["..", "%2e%2e/%2e%2e/etc/passwd", "x" * 300, "%ff", "\u00e9"]))
    params = draw(st.dictionaries(st.sampled_from(QUERY_KEYS),
                                  st.one_of(st.sampled_from(NASTY), st.text(max_size=30),
                                            st.integers(0, 5).map(str)), max_size=2))
    headers: dict[str, str] = {}
    token = draw(tokens)
    if token is not None:
        headers["authorization"] = draw(st.one_of(st.just("Bearer {}"), st.sampled_from(
            ["bearer {}", "Bearer  {} ", "{}", "Basic {}"]))).format(token)
    if draw(st.booleans()):
        headers["last-event-id"] = draw(st.one_of(st.sampled_from(NASTY), st.text(string.printable, max_size=30)))
    if draw(st.booleans()):
        headers["content-type"] = draw(st.sampled_from(["application/json", "text/plain", "multipart/form-data",
                                                        "application/json; charset=latin-1", "x/\u00e9"]))
    content = None
    if method in ("POST", "PUT", "PATCH"):
        content = draw(st.one_of(
            st.sampled_from(AISDK_BODIES),
            st.sampled_from(BODIES), st.binary(max_size=512), st.sampled_from(GOOD_BODIES), st.sampled_from(GOOD_BODIES),
            json_values().map(lambda v: json.dumps(v).encode()),
            st.builds(lambda v: json.dumps({"messages": [text("hi")], **v}).encode(),
                      st.dictionaries(st.sampled_from(["policy", "parent_id", "steer", "seen", "filter", "messages"]),
                                      json_values(4), max_size=2)),
            st.integers(max_frame_bytes - 4, max_frame_bytes * 3).map(
                lambda n: json.dumps({"messages": [text("")]}).replace('""', '"' + "y" * n + '"').encode())))
    return Call(method, path, params, {k: v for k, v in headers.items() if v.isprintable()}, content)


def check_response(status: int, content_type: str, body: bytes, call: Call) -> None:
    assert status < 500, (status, body[:300], call)
    if status < 400:
        return
    assert content_type.startswith("application/json"), (status, content_type, body[:300], call)
    payload = json.loads(body)
    assert set(payload) == {"error"}, payload
    assert payload["error"]["code"] in ALL_ERROR_CODES and payload["error"]["code"] != "internal", payload
    assert isinstance(payload["error"]["message"], str) and payload["error"]["message"], payload


def request(client: httpx.Client, target: Target, call: Call) -> tuple[int, str, bytes]:
    """Send ``call``; an event stream is closed after its headers and first chunk."""
    # Raw UTF-8 header bytes (non-ASCII too); h11 refuses surrounding whitespace.
    headers = {k: v.strip().encode() for k, v in call.headers.items()}
    with client.stream(call.method, target.http + call.path, params=call.params, headers=headers,
                       content=call.content) as r:
        if r.headers.get("content-type", "").startswith("text/event-stream"):
            assert r.status_code == 200
            first = next(r.iter_raw(), b"")
            assert first.startswith((b":", b"id:", b"data:")), first[:200]
            return r.status_code, r.headers["content-type"], first
        return r.status_code, r.headers.get("content-type", ""), r.read()


def run(loop: asyncio.AbstractEventLoop, coro: Any) -> Any:
    return loop.run_until_complete(asyncio.wait_for(coro, TIMEOUT * 3))
