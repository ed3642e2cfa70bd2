"""Fake LLM providers on a real loopback HTTP server, speaking each provider's
real streaming wire format:

- ``POST /v1/chat/completions``: OpenAI Chat Completions, ``data: {chat.completion.chunk}``
  lines (tool calls as ``delta.tool_calls``, reasoning as ``delta.reasoning_content``
  like vLLM, usage in a last chunk when ``stream_options.include_usage``), then
  ``data: [DONE]``;
- ``POST /v1/responses``: the OpenAI Responses API's typed events, ``response.created``
  … ``response.output_text.delta``, ``response.reasoning_summary_text.delta``,
  ``response.function_call_arguments.delta`` … ``response.completed``;
- ``POST /v1/messages``: Anthropic Messages, ``event: message_start`` …
  ``content_block_delta`` (``text_delta``, ``thinking_delta``, ``signature_delta``,
  ``input_json_delta``) … ``message_delta``, ``message_stop``, and ``error`` events.

A *script* says what a request gets: the text, reasoning and tool call to
stream, the first-token latency and the delay between tokens, an HTTP error, or
a fault mid-stream. The request's ``model`` picks it: a name registered in
``FakeProviders.scripts``, or an inline spec ``fake:tokens=40,delay=0.005,first=0.02``.

Every request is recorded: its body and headers, when each token was generated,
when the client disconnected (from the ASGI ``http.disconnect`` message, watched
while streaming), and so how many tokens were generated after that. Like a
real model server, the fake stops generating once it sees the client go. A
``gated`` script generates each token only when the test allows it
(:meth:`FakeProviders.allow`), so tests order races without sleeping.

Run in-process with :func:`running_fake` (tests), or as its own process with
``uvicorn tests.fakes.providers:app`` (benchmarks, which read the records from
``GET /_fake/records?tag=…``; ``time.monotonic_ns`` is system-wide on Linux).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import socket
import threading
import time
import uuid
from dataclasses import dataclass, field, fields
from typing import Any, Callable, Iterator

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

# ---------------------------------------------------------------- scripts


@dataclass
class Script:
    text: str = "Hello there, world."  # streamed as word tokens
    reasoning: str = ""  # streamed first, as reasoning tokens
    tool: tuple[str, dict[str, Any]] | None = None  # a tool call; its JSON arguments streamed in pieces
    tokens: int | None = None  # instead of ``text``: this many tokens "tok0 ", "tok1 ", …
    first: float = 0.0  # seconds before the first token (time to first token)
    delay: float = 0.0  # seconds between tokens
    gated: bool = False  # each token waits for a permit (FakeProviders.allow)
    status: int | None = None  # answer this HTTP status and a JSON body instead of a stream
    retry_after: str | None = None  # its Retry-After header
    break_after: int | None = None  # drop the connection after this many tokens
    malformed_after: int | None = None  # then send a data line that is not JSON
    error_after: int | None = None  # then send the provider's in-stream error event
    truncate_after: int | None = None  # then end the body cleanly, without the terminal event
    input_tokens: int = 11

    @classmethod
    def parse(cls, spec: str) -> Script:
        """``tokens=40,delay=0.005,first=0.02`` (numbers and ``text``/``reasoning`` words joined by ``_``)."""
        kinds = {f.name: f.type for f in fields(cls)}
        values: dict[str, Any] = {}
        for item in filter(None, spec.split(",")):
            key, _, value = item.partition("=")
            if key not in kinds or key == "tool":
                raise ValueError(f"unknown script field {key!r}")
            if key in ("text", "reasoning", "retry_after"):
                values[key] = value.replace("_", " ")
            elif key in ("first", "delay"):
                values[key] = float(value)
            elif key == "gated":
                values[key] = value in ("1", "true", "yes")
            else:
                values[key] = int(value)
        return cls(**values)

    def plan(self) -> list[tuple[str, str]]:
        """The tokens, in order: ``(kind, piece)`` with kind reasoning, text or tool."""
        out = [("reasoning", w) for w in _words(self.reasoning)]
        if self.tokens is not None:
            out += [("text", f"tok{i} ") for i in range(self.tokens)]
        else:
            out += [("text", w) for w in _words(self.text)]
        if self.tool is not None:
            args = json.dumps(self.tool[1])
            out += [("tool", args[i:i + 8]) for i in range(0, len(args), 8)]
        return out


def _words(text: str) -> list[str]:
    words = text.split(" ")
    return [w + " " for w in words[:-1] if w] + ([words[-1]] if words[-1] else []) if text else []


# ---------------------------------------------------------------- records


@dataclass
class Record:
    """One request the fake answered (live: the server thread fills it in)."""

    provider: str
    body: dict[str, Any]
    headers: dict[str, str]
    script: Script
    tag: str | None = None
    started_ns: int = field(default_factory=time.monotonic_ns)
    token_ns: list[int] = field(default_factory=list)  # when each token was generated
    disconnect_ns: int | None = None  # when the fake saw the client go (http.disconnect)
    finished_ns: int | None = None  # the handler returned
    end: str | None = None  # complete, disconnected, http <status>, broken, malformed, error-event, truncated
    permits: asyncio.Semaphore | None = None  # gated scripts: one permit per token

    @property
    def generated(self) -> int:
        return len(self.token_ns)

    def generated_after(self, t_ns: int) -> int:
        return sum(1 for t in self.token_ns if t > t_ns)

    @property
    def after_disconnect(self) -> int:
        return 0 if self.disconnect_ns is None else self.generated_after(self.disconnect_ns)

    def to_json(self) -> dict[str, Any]:
        return {"provider": self.provider, "tag": self.tag, "model": self.body.get("model"),
                "started_ns": self.started_ns, "token_ns": self.token_ns, "disconnect_ns": self.disconnect_ns,
                "finished_ns": self.finished_ns, "end": self.end, "generated": self.generated,
                "after_disconnect": self.after_disconnect}


# ---------------------------------------------------------------- wire formats


def _sse(data: Any, event: str | None = None) -> bytes:
    head = f"event: {event}\n" if event else ""
    return f"{head}data: {json.dumps(data, separators=(',', ':'))}\n\n".encode()


class ChatWire:
    """OpenAI Chat Completions chunks."""

    provider = "openai.chat"

    def __init__(self, rec: Record):
        self.rec = rec
        self.id = f"chatcmpl-{uuid.uuid4().hex[:24]}"
        self.model = rec.body.get("model", "")
        self.include_usage = bool((rec.body.get("stream_options") or {}).get("include_usage"))
        self.call_id = f"call_{uuid.uuid4().hex[:24]}"
        self.tool_started = False

    def chunk(self, delta: dict[str, Any], finish: str | None = None, **extra: Any) -> bytes:
        obj: dict[str, Any] = {"id": self.id, "object": "chat.completion.chunk", "created": int(time.time()),
                               "model": self.model, "system_fingerprint": "fp_fake",
                               "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]}
        if self.include_usage:
            obj["usage"] = None
        obj.update(extra)
        return _sse(obj)

    def prelude(self) -> bytes:
        return self.chunk({"role": "assistant", "content": ""})

    def token(self, kind: str, piece: str) -> bytes:
        if kind == "reasoning":
            return self.chunk({"reasoning_content": piece})
        if kind == "text":
            return self.chunk({"content": piece})
        head = b""
        if not self.tool_started:
            self.tool_started = True
            name = self.rec.script.tool[0]  # type: ignore[index]
            head = self.chunk({"tool_calls": [{"index": 0, "id": self.call_id, "type": "function",
                                               "function": {"name": name, "arguments": ""}}]})
        return head + self.chunk({"tool_calls": [{"index": 0, "function": {"arguments": piece}}]})

    def finish(self, usage: dict[str, int]) -> bytes:
        out = self.chunk({}, "tool_calls" if self.tool_started else "stop")
        if self.include_usage:
            out += _sse({"id": self.id, "object": "chat.completion.chunk", "created": int(time.time()),
                         "model": self.model, "system_fingerprint": "fp_fake", "choices": [],
                         "usage": {"prompt_tokens": usage["input"], "completion_tokens": usage["output"],
                                   "total_tokens": usage["input"] + usage["output"],
                                   "prompt_tokens_details": {"cached_tokens": 0},
                                   "completion_tokens_details": {"reasoning_tokens": usage["reasoning"]}}})
        return out + b"data: [DONE]\n\n"

    def error_event(self) -> bytes:
        return _sse({"error": {"message": "The server had an error while processing your request.",
                               "type": "server_error", "param": None, "code": None}})

    @staticmethod
    def error_body(status: int) -> dict[str, Any]:
        kinds = {401: ("invalid_request_error", "invalid_api_key", "Incorrect API key provided: sk-fake."),
                 429: ("requests", "rate_limit_exceeded", "Rate limit reached for requests."),
                 500: ("server_error", None, "The server had an error while processing your request.")}
        kind, code, message = kinds.get(status, ("server_error", None, f"fake error {status}"))
        return {"error": {"message": message, "type": kind, "param": None, "code": code}}


class ResponsesWire:
    """OpenAI Responses API typed events."""

    provider = "openai.responses"

    def __init__(self, rec: Record):
        self.rec = rec
        self.id = f"resp_{uuid.uuid4().hex}"
        self.model = rec.body.get("model", "")
        self.seq = itertools.count()
        self.items: list[dict[str, Any]] = []
        self.current: dict[str, Any] | None = None  # the open output item
        self.text = ""

    def ev(self, kind: str, **fields: Any) -> bytes:
        return _sse({"type": kind, "sequence_number": next(self.seq), **fields}, event=kind)

    def response(self, status: str, usage: dict[str, Any] | None = None) -> dict[str, Any]:
        return {"id": self.id, "object": "response", "created_at": int(time.time()), "status": status,
                "error": None, "incomplete_details": None, "model": self.model, "output": list(self.items),
                "parallel_tool_calls": True, "tool_choice": "auto", "tools": [], "usage": usage}

    def prelude(self) -> bytes:
        return (self.ev("response.created", response=self.response("in_progress"))
                + self.ev("response.in_progress", response=self.response("in_progress")))

    def _open(self, kind: str) -> bytes:
        index = len(self.items)
        if kind == "reasoning":
            item = {"id": f"rs_{uuid.uuid4().hex}", "type": "reasoning", "summary": []}
            out = self.ev("response.output_item.added", output_index=index, item=item)
            out += self.ev("response.reasoning_summary_part.added", item_id=item["id"], output_index=index,
                           summary_index=0, part={"type": "summary_text", "text": ""})
        elif kind == "text":
            item = {"id": f"msg_{uuid.uuid4().hex}", "type": "message", "status": "in_progress",
                    "role": "assistant", "content": []}
            out = self.ev("response.output_item.added", output_index=index, item=item)
            out += self.ev("response.content_part.added", item_id=item["id"], output_index=index, content_index=0,
                           part={"type": "output_text", "text": "", "annotations": []})
        else:
            item = {"id": f"fc_{uuid.uuid4().hex}", "type": "function_call", "status": "in_progress",
                    "call_id": f"call_{uuid.uuid4().hex[:24]}", "name": self.rec.script.tool[0],  # type: ignore[index]
                    "arguments": ""}
            out = self.ev("response.output_item.added", output_index=index, item=dict(item))
        self.current = {"kind": kind, "item": item, "index": index}
        self.text = ""
        return out

    def _close(self) -> bytes:
        if self.current is None:
            return b""
        kind, item, index = self.current["kind"], self.current["item"], self.current["index"]
        if kind == "reasoning":
            out = self.ev("response.reasoning_summary_text.done", item_id=item["id"], output_index=index,
                          summary_index=0, text=self.text)
            out += self.ev("response.reasoning_summary_part.done", item_id=item["id"], output_index=index,
                           summary_index=0, part={"type": "summary_text", "text": self.text})
            item = {**item, "summary": [{"type": "summary_text", "text": self.text}]}
        elif kind == "text":
            part = {"type": "output_text", "text": self.text, "annotations": []}
            out = self.ev("response.output_text.done", item_id=item["id"], output_index=index, content_index=0,
                          text=self.text, logprobs=[])
            out += self.ev("response.content_part.done", item_id=item["id"], output_index=index, content_index=0,
                           part=part)
            item = {**item, "status": "completed", "content": [part]}
        else:
            out = self.ev("response.function_call_arguments.done", item_id=item["id"], output_index=index,
                          arguments=self.text)
            item = {**item, "status": "completed", "arguments": self.text}
        self.items.append(item)
        self.current = None
        return out + self.ev("response.output_item.done", output_index=index, item=item)

    def token(self, kind: str, piece: str) -> bytes:
        out = b""
        if self.current is None or self.current["kind"] != kind:
            out += self._close() + self._open(kind)
        item_id, index = self.current["item"]["id"], self.current["index"]  # type: ignore[index]
        self.text += piece
        if kind == "reasoning":
            return out + self.ev("response.reasoning_summary_text.delta", item_id=item_id, output_index=index,
                                 summary_index=0, delta=piece)
        if kind == "text":
            return out + self.ev("response.output_text.delta", item_id=item_id, output_index=index,
                                 content_index=0, delta=piece, logprobs=[])
        return out + self.ev("response.function_call_arguments.delta", item_id=item_id, output_index=index,
                             delta=piece)

    def finish(self, usage: dict[str, int]) -> bytes:
        out = self._close()
        return out + self.ev("response.completed", response=self.response("completed", {
            "input_tokens": usage["input"], "input_tokens_details": {"cached_tokens": 0},
            "output_tokens": usage["output"], "output_tokens_details": {"reasoning_tokens": usage["reasoning"]},
            "total_tokens": usage["input"] + usage["output"]}))

    def error_event(self) -> bytes:
        return self.ev("error", code="server_error", message="The model failed to generate a response.", param=None)

    @staticmethod
    def error_body(status: int) -> dict[str, Any]:
        return ChatWire.error_body(status)


class AnthropicWire:
    """Anthropic Messages events."""

    provider = "anthropic"

    def __init__(self, rec: Record):
        self.rec = rec
        self.id = f"msg_{uuid.uuid4().hex[:24]}"
        self.model = rec.body.get("model", "")
        self.index = -1
        self.kind: str | None = None
        self.pinged = False
        self.tool_used = False

    @staticmethod
    def ev(kind: str, **fields: Any) -> bytes:
        return _sse({"type": kind, **fields}, event=kind)

    def prelude(self) -> bytes:
        return self.ev("message_start", message={
            "id": self.id, "type": "message", "role": "assistant", "model": self.model, "content": [],
            "stop_reason": None, "stop_sequence": None,
            "usage": {"input_tokens": self.rec.script.input_tokens, "output_tokens": 1}})

    def _close(self) -> bytes:
        if self.kind is None:
            return b""
        out = b""
        if self.kind == "reasoning":
            out += self.ev("content_block_delta", index=self.index,
                           delta={"type": "signature_delta", "signature": f"sig-{self.id}"})
        self.kind = None
        return out + self.ev("content_block_stop", index=self.index)

    def token(self, kind: str, piece: str) -> bytes:
        out = b""
        if kind != self.kind:
            out += self._close()
            self.index += 1
            self.kind = kind
            if kind == "reasoning":
                block: dict[str, Any] = {"type": "thinking", "thinking": "", "signature": ""}
            elif kind == "text":
                block = {"type": "text", "text": ""}
            else:
                self.tool_used = True
                block = {"type": "tool_use", "id": f"toolu_{uuid.uuid4().hex[:24]}",
                         "name": self.rec.script.tool[0], "input": {}}  # type: ignore[index]
            out += self.ev("content_block_start", index=self.index, content_block=block)
            if not self.pinged:
                self.pinged = True
                out += self.ev("ping")
        delta = ({"type": "thinking_delta", "thinking": piece} if kind == "reasoning"
                 else {"type": "text_delta", "text": piece} if kind == "text"
                 else {"type": "input_json_delta", "partial_json": piece})
        return out + self.ev("content_block_delta", index=self.index, delta=delta)

    def finish(self, usage: dict[str, int]) -> bytes:
        return (self._close()
                + self.ev("message_delta", delta={"stop_reason": "tool_use" if self.tool_used else "end_turn",
                                                  "stop_sequence": None},
                          usage={"output_tokens": usage["output"]})
                + self.ev("message_stop"))

    def error_event(self) -> bytes:
        return self.ev("error", error={"type": "overloaded_error", "message": "Overloaded"})

    @staticmethod
    def error_body(status: int) -> dict[str, Any]:
        kinds = {401: ("authentication_error", "invalid x-api-key"),
                 429: ("rate_limit_error", "Number of request tokens has exceeded your per-minute rate limit"),
                 500: ("api_error", "Internal server error"), 529: ("overloaded_error", "Overloaded")}
        kind, message = kinds.get(status, ("api_error", f"fake error {status}"))
        return {"type": "error", "error": {"type": kind, "message": message}}


WIRES = {"/v1/chat/completions": ChatWire, "/v1/responses": ResponsesWire, "/v1/messages": AnthropicWire}


# ---------------------------------------------------------------- the server


class _Dropped(Exception):
    """Raised out of the ASGI app mid-body: the server drops the connection."""


class _EndBody(Exception):
    """A fault that ends the body early, cleanly."""


class FakeStream(Response):
    def __init__(self, owner: FakeProviders, rec: Record, wire: Any):
        self.owner = owner
        self.rec = rec
        self.wire = wire
        self.gone = asyncio.Event()

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        rec = self.rec
        finishing = False

        async def watch() -> None:
            while True:
                message = await receive()
                if message["type"] == "http.disconnect":
                    if not finishing:
                        rec.disconnect_ns = time.monotonic_ns()
                        self.gone.set()
                        self.owner.changed()
                    return

        async def body(data: bytes) -> None:
            await send({"type": "http.response.body", "body": data, "more_body": True})

        watcher = asyncio.ensure_future(watch())
        try:
            await send({"type": "http.response.start", "status": 200,
                        "headers": [(b"content-type", b"text/event-stream; charset=utf-8"),
                                    (b"cache-control", b"no-cache")]})
            try:
                if not await self._stream(body):
                    return
            except _EndBody:
                pass
            finishing = True
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        finally:
            watcher.cancel()
            rec.finished_ns = time.monotonic_ns()
            self.owner.changed()

    async def _stream(self, body: Callable[[bytes], Any]) -> bool:
        """Generate the script's tokens; False if the client left first."""
        rec, wire, script = self.rec, self.wire, self.rec.script
        await body(wire.prelude())
        plan = script.plan()
        for i, (kind, piece) in enumerate(plan):
            await self._fault(i, body)
            if script.gated:
                await _until_either(rec.permits.acquire(), self.gone)  # type: ignore[union-attr]
            else:
                await _until_either(asyncio.sleep(script.first if i == 0 else script.delay), self.gone)
            if self.gone.is_set():  # like a model server, stop generating for a client that left
                rec.end = "disconnected"
                return False
            rec.token_ns.append(time.monotonic_ns())
            self.owner.changed()
            await body(wire.token(kind, piece))
        await self._fault(len(plan), body)
        reasoning = sum(1 for k, _ in plan if k == "reasoning")
        await body(wire.finish({"input": script.input_tokens, "output": len(plan), "reasoning": reasoning}))
        rec.end = "complete"
        return True

    async def _fault(self, sent: int, body: Callable[[bytes], Any]) -> None:
        """Inject the script's fault once ``sent`` tokens are out."""
        rec, script = self.rec, self.rec.script
        if script.break_after == sent:
            rec.end = "broken"
            raise _Dropped("the fake provider drops the connection")
        if script.malformed_after == sent:
            rec.end = "malformed"
            await body(b'data: {"choices": [{"delta": \n\n')
        elif script.error_after == sent:
            rec.end = "error-event"
            await body(self.wire.error_event())
        elif script.truncate_after == sent:
            rec.end = "truncated"
        else:
            return
        raise _EndBody


async def _until_either(awaitable: Any, gone: asyncio.Event) -> None:
    work = asyncio.ensure_future(awaitable)
    left = asyncio.ensure_future(gone.wait())
    await asyncio.wait({work, left}, return_when=asyncio.FIRST_COMPLETED)
    for task in (work, left):
        task.cancel()


class FakeProviders:
    """The three fake providers on one server. Thread-safe to read from tests."""

    def __init__(self) -> None:
        self.scripts: dict[str, Script] = {}
        self.records: list[Record] = []
        self.base = ""  # http://127.0.0.1:PORT once running
        self.loop: asyncio.AbstractEventLoop | None = None
        self._cond = threading.Condition()
        routes = [Route(path, self._endpoint, methods=["POST"]) for path in WIRES]
        routes += [Route("/_fake/records", self._records, methods=["GET"]),
                   Route("/healthz", lambda _r: PlainTextResponse("ok"), methods=["GET"])]
        self.app = Starlette(routes=routes)

    # -------------------------------------------------------- for tests

    @property
    def openai_url(self) -> str:
        return f"{self.base}/v1"

    @property
    def anthropic_url(self) -> str:
        return self.base

    def script_for(self, model: str) -> Script:
        if model in self.scripts:
            return self.scripts[model]
        if model.startswith("fake:"):
            return Script.parse(model[5:])
        return Script()

    def reset(self) -> None:
        """Forget every record and script (between tests sharing one server)."""
        self.records.clear()
        self.scripts.clear()

    def changed(self) -> None:
        with self._cond:
            self._cond.notify_all()

    async def until(self, predicate: Callable[[], Any], what: str, timeout: float = 5.0) -> None:
        """Wait (bounded) until ``predicate()`` holds; it is re-checked whenever a record changes."""

        def wait() -> bool:
            with self._cond:
                return self._cond.wait_for(predicate, timeout)

        if not await asyncio.to_thread(wait):
            raise AssertionError(f"fake provider: timed out waiting for {what}")

    async def request(self, n: int = 0) -> Record:
        """The ``n``-th request (from 0) once it has arrived."""
        await self.until(lambda: len(self.records) > n, f"request #{n}")
        return self.records[n]

    def allow(self, rec: Record, tokens: int = 1) -> None:
        """Let a gated stream generate ``tokens`` more tokens."""
        assert self.loop is not None and rec.permits is not None

        def release() -> None:
            for _ in range(tokens):
                rec.permits.release()  # type: ignore[union-attr]

        self.loop.call_soon_threadsafe(release)

    # -------------------------------------------------------- server side

    async def _endpoint(self, request: Request) -> Response:
        self.loop = asyncio.get_running_loop()
        wire_type = WIRES[request.url.path]
        body = await request.json()
        script = self.script_for(str(body.get("model", "")))
        rec = Record(provider=wire_type.provider, body=body, headers=dict(request.headers), script=script,
                     tag=request.headers.get("x-fake-tag"), permits=asyncio.Semaphore(0))
        self.records.append(rec)
        self.changed()
        if script.status is not None:
            rec.end = f"http {script.status}"
            rec.finished_ns = time.monotonic_ns()
            self.changed()
            headers = {"retry-after": script.retry_after} if script.retry_after else None
            return JSONResponse(wire_type.error_body(script.status), status_code=script.status, headers=headers)
        return FakeStream(self, rec, wire_type(rec))

    async def _records(self, request: Request) -> JSONResponse:
        tag = request.query_params.get("tag")
        return JSONResponse([r.to_json() for r in self.records if tag is None or r.tag == tag])


@contextlib.contextmanager
def running_fake() -> Iterator[FakeProviders]:
    """A :class:`FakeProviders` on a free loopback port, in its own thread and loop."""
    fake = FakeProviders()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # critical: a dropped connection (break_after) is an exception uvicorn would log
    server = uvicorn.Server(uvicorn.Config(fake.app, host="127.0.0.1", port=port, log_level="critical",
                                           lifespan="off"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("the fake provider did not start")
        time.sleep(0.01)
    fake.base = f"http://127.0.0.1:{port}"
    try:
        yield fake
    finally:
        server.should_exit = True
        thread.join(10)


_default = FakeProviders()
app = _default.app  # `uvicorn tests.fakes.providers:app`
