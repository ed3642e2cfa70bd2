"""What every provider adapter shares: the error type and its codes, the SSE
line decoder, the request's endpoint and headers, the step result and the
decoders' base, and :class:`ProviderStream`, which runs one streaming HTTP
call and turns it into UI message stream chunks.

Each provider module supplies a *decoder*: a plain object fed one SSE event at
a time that returns the chunks it produces (sans-I/O, so it is unit-tested
without sockets). ``ProviderStream`` is the thin I/O loop around it.
"""

from __future__ import annotations

import asyncio
import json
import os
import weakref
from dataclasses import dataclass, field
from datetime import datetime, timezone
from email.utils import parsedate_to_datetime
from typing import Any, AsyncIterator, Mapping, Protocol

import httpx

from ...protocol import ErrorCode
from ..runtime import CommandError
from ..signal import AbortSignal
from ..tracing import current_tracing

Chunk = dict[str, Any]

# The read timeout is the longest silence between two bytes: reasoning models
# may think for minutes before their first token (Anthropic sends pings).
DEFAULT_TIMEOUT = httpx.Timeout(300.0, connect=10.0)
_ERROR_BODY_LIMIT = 64 * 1024


class ProviderErrorCode:
    """Stable ``error.code`` values of a turn ended by a provider failure
    (the same strings as ``protocol.ErrorCode.PROVIDER_*``)."""

    AUTH = ErrorCode.PROVIDER_AUTH  # HTTP 401/403: bad or missing key, no access to the model
    RATE_LIMITED = ErrorCode.PROVIDER_RATE_LIMITED  # HTTP 429 (or a rate-limit error event)
    BAD_REQUEST = ErrorCode.PROVIDER_BAD_REQUEST  # other HTTP 4xx: the request was refused
    ERROR = ErrorCode.PROVIDER_ERROR  # HTTP 5xx, or an error event in the stream
    STREAM_BROKEN = ErrorCode.PROVIDER_STREAM_BROKEN  # dropped mid-way, ended early, or not valid SSE
    UNREACHABLE = ErrorCode.PROVIDER_UNREACHABLE  # no HTTP response at all (connect error/timeout)


class ProviderError(CommandError):
    """A provider failure. Raised out of the stream, it ends the turn with
    ``error`` and this ``code`` and ``message`` (the runtime reads both)."""

    def __init__(self, code: str, provider: str, message: str, *, status: int | None = None,
                 retry_after: float | None = None, provider_code: str | None = None):
        super().__init__(code, f"{provider}: {message}")
        self.provider = provider
        self.status = status
        self.retry_after = retry_after
        self.provider_code = provider_code


@dataclass
class ToolCall:
    id: str
    name: str
    input: Any  # the parsed arguments (the raw text if they were not valid JSON)


@dataclass
class StepResult:
    """What one model call produced, filled in as the stream is read."""

    text: str = ""
    reasoning: str = ""
    tool_calls: list[ToolCall] = field(default_factory=list)
    usage: dict[str, int] = field(default_factory=dict)  # inputTokens, outputTokens, totalTokens, …
    finish_reason: str | None = None  # stop, length, tool-calls, content-filter, other
    model: str | None = None
    response_id: str | None = None
    complete: bool = False  # the provider's terminal event arrived
    aborted: bool = False  # the stream was stopped by its abort signal
    # The assistant turn in the provider's own format, ready to append to the
    # request's messages for the next step of a tool loop (a dict, or for the
    # Responses API a list of output items).
    message: Any = None


class Decoder(Protocol):
    result: StepResult

    def feed(self, event: str, data: str) -> list[Chunk]: ...

    def close(self) -> list[Chunk]: ...


# ---------------------------------------------------------------- SSE


class SSELines:
    """Server-sent events from decoded lines (the WHATWG rules that matter
    here): ``event:`` and ``data:`` fields, ``:`` comments, a blank line
    dispatches; an event without data is not dispatched."""

    __slots__ = ("_event", "_data")

    def __init__(self) -> None:
        self._event = ""
        self._data: list[str] = []

    def feed(self, line: str) -> tuple[str, str] | None:
        if not line:
            if not self._data:
                self._event = ""
                return None
            out = (self._event or "message", "\n".join(self._data))
            self._event, self._data = "", []
            return out
        if line[0] == ":":
            return None
        name, _, value = line.partition(":")
        if value[:1] == " ":
            value = value[1:]
        if name == "data":
            self._data.append(value)
        elif name == "event":
            self._event = value
        return None


def parse_json_event(provider: str, data: str) -> dict[str, Any]:
    """An event's data, which every provider sends as a JSON object."""
    try:
        obj = json.loads(data)
    except ValueError:
        raise ProviderError(ProviderErrorCode.STREAM_BROKEN, provider,
                            f"malformed SSE data (not JSON): {data[:200]!r}") from None
    if not isinstance(obj, dict):
        raise ProviderError(ProviderErrorCode.STREAM_BROKEN, provider, f"unexpected event {data[:200]!r}")
    return obj


# ---------------------------------------------------------------- the request


def endpoint(env: str, base_url: str | None, api_key: str | None, default_base_url: str) -> tuple[str, str | None]:
    """The base URL (without a trailing slash) and the API key: the arguments,
    else ``{env}_BASE_URL`` and ``{env}_API_KEY``. ``api_key=""`` sends no key."""
    base = (base_url or os.environ.get(f"{env}_BASE_URL") or default_base_url).rstrip("/")
    key = api_key if api_key is not None else os.environ.get(f"{env}_API_KEY")
    return base, key


def request_headers(auth: Mapping[str, str], headers: Mapping[str, str] | None) -> dict[str, str]:
    """A streaming call's headers: the provider's auth headers, then the caller's, which win."""
    return {"accept": "text/event-stream", **auth, **(headers or {})}


# ---------------------------------------------------------------- shared pieces of decoders


def parse_tool_input(text: str) -> tuple[Any, bool]:
    """The arguments a tool call streamed, parsed; ``("", True)`` → ``{}``."""
    if not text.strip():
        return {}, True
    try:
        return json.loads(text), True
    except ValueError:
        return text, False


def tool_input_done(call_id: str, name: str, text: str, result: StepResult) -> Chunk:
    value, ok = parse_tool_input(text)
    result.tool_calls.append(ToolCall(call_id, name, value))
    if ok:
        return {"type": "tool-input-available", "toolCallId": call_id, "toolName": name, "input": value}
    return {"type": "tool-input-error", "toolCallId": call_id, "toolName": name, "input": text,
            "errorText": "the model's tool arguments are not valid JSON"}


def usage_of(**counts: Any) -> dict[str, int]:
    """AI SDK ``LanguageModelUsage`` names; absent counts are left out."""
    out = {k: int(v) for k, v in counts.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    if "totalTokens" not in out and "inputTokens" in out and "outputTokens" in out:
        out["totalTokens"] = out["inputTokens"] + out["outputTokens"]
    return out


def finish_chunks(result: StepResult) -> list[Chunk]:
    """``finish-step``, then the step's usage and finish reason as message metadata."""
    result.complete = True
    meta: dict[str, Any] = {"finishReason": result.finish_reason or "other"}
    if result.usage:
        meta["usage"] = result.usage
    if result.model:
        meta["model"] = result.model
    return [{"type": "finish-step"}, {"type": "message-metadata", "messageMetadata": meta}]


class Parts:
    """Open text and reasoning parts of one step, by id, in the order opened."""

    def __init__(self, result: StepResult):
        self.result = result
        self.open: dict[str, str] = {}  # id -> "text" | "reasoning"

    def delta(self, kind: str, part_id: str, delta: str, out: list[Chunk]) -> None:
        if not delta:
            return
        if part_id not in self.open:
            self.open[part_id] = kind
            out.append({"type": f"{kind}-start", "id": part_id})
        out.append({"type": f"{kind}-delta", "id": part_id, "delta": delta})
        if kind == "text":
            self.result.text += delta
        else:
            self.result.reasoning += delta

    def end(self, part_id: str, out: list[Chunk], **extra: Any) -> None:
        kind = self.open.pop(part_id, None)
        if kind is not None:
            out.append({"type": f"{kind}-end", "id": part_id, **extra})

    def end_all(self, out: list[Chunk], kind: str | None = None) -> None:
        for part_id, k in list(self.open.items()):
            if kind is None or k == kind:
                self.end(part_id, out)


class StepDecoder:
    """What every decoder starts from: the step's result, its open parts, and
    the ``start-step`` chunk sent once, before the step's first chunk."""

    def __init__(self) -> None:
        self.result = StepResult()
        self._parts = Parts(self.result)
        self._started = False

    def _start(self, out: list[Chunk]) -> None:
        if not self._started:
            self._started = True
            out.append({"type": "start-step"})


# ---------------------------------------------------------------- HTTP errors


def _retry_after(headers: httpx.Headers) -> float | None:
    ms = headers.get("retry-after-ms")
    if ms:
        try:
            return float(ms) / 1000
        except ValueError:
            pass
    value = headers.get("retry-after")
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        return max(0.0, (parsedate_to_datetime(value) - datetime.now(timezone.utc)).total_seconds())
    except (TypeError, ValueError):
        return None


def _error_detail(body: bytes) -> tuple[str, str | None]:
    """The message (and provider error code/type) of an error body: OpenAI's
    ``{"error": {"message", "code"|"type"}}`` or Anthropic's
    ``{"type": "error", "error": {"type", "message"}}``; else the text."""
    text = body.decode("utf-8", "replace").strip()
    try:
        obj = json.loads(text)
    except ValueError:
        return text[:500] or "(empty body)", None
    err = obj.get("error") if isinstance(obj, dict) else None
    if isinstance(err, dict):
        code = err.get("code") or err.get("type")
        return str(err.get("message") or text[:500]), str(code) if code else None
    if isinstance(err, str):
        return err, None
    return text[:500], None


def _public(url: httpx.URL) -> httpx.URL:
    """The URL without what may hold a secret (a query's key, userinfo)."""
    return url.copy_with(query=None, userinfo=b"")


def http_error(provider: str, response: httpx.Response, body: bytes) -> ProviderError:
    status = response.status_code
    detail, provider_code = _error_detail(body)
    url = _public(response.request.url)
    message = f"HTTP {status} {response.reason_phrase} from {url}: {detail}"
    retry_after = _retry_after(response.headers)
    if status in (401, 403):
        code = ProviderErrorCode.AUTH
    elif status == 429:
        code = ProviderErrorCode.RATE_LIMITED
        if retry_after is not None:
            message += f" (retry after {retry_after:g} s)"
    elif 400 <= status < 500:
        code = ProviderErrorCode.BAD_REQUEST
    else:
        code = ProviderErrorCode.ERROR
    return ProviderError(code, provider, message, status=status, retry_after=retry_after,
                         provider_code=provider_code)


# ---------------------------------------------------------------- the HTTP client


_clients: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, httpx.AsyncClient] = weakref.WeakKeyDictionary()


def shared_client() -> httpx.AsyncClient:
    """One pooled client per event loop: calls reuse connections (a new TLS
    handshake per call would add its round trips to every first token)."""
    loop = asyncio.get_running_loop()
    client = _clients.get(loop)
    if client is None or client.is_closed:
        client = _clients[loop] = httpx.AsyncClient(timeout=DEFAULT_TIMEOUT)
    return client


# ---------------------------------------------------------------- the stream


class ProviderStream:
    """One streaming model call as an async iterator of UI message stream chunks.

    Give it to ``turn.stream_response``: on a cancel the turn stops it where it
    awaits, which closes the HTTP response (the connection is dropped, so the
    provider sees the client go away and stops generating). Iterating it
    yourself, pass ``signal=turn.abort_signal``: when the signal fires, the
    pending read is interrupted, the response closed and the iteration ends.

    Provider failures raise :class:`ProviderError`. ``result`` holds what the
    step produced (text, tool calls, usage, the assistant message in the
    provider's format) once the stream has ended.
    """

    def __init__(self, *, provider: str, url: str, headers: Mapping[str, str], body: dict[str, Any],
                 decoder: Decoder, client: httpx.AsyncClient | None = None, signal: AbortSignal | None = None,
                 timeout: httpx.Timeout | float | None = None):
        self.provider = provider
        self.url = url
        self._shown_url = str(_public(httpx.URL(url)))  # for messages
        self.headers = dict(headers)
        self.body = body
        self.decoder = decoder
        self.client = client
        self.signal = signal
        self.timeout = DEFAULT_TIMEOUT if timeout is None else timeout
        self._gen = self._chunks()

    @property
    def result(self) -> StepResult:
        return self.decoder.result

    def __aiter__(self) -> ProviderStream:
        return self

    async def __anext__(self) -> Chunk:
        signal = self.signal
        if signal is None:
            return await self._gen.__anext__()
        if signal.aborted:
            await self._stop_on_abort()
        task = asyncio.current_task()
        assert task is not None
        fired = False

        def on_abort(_reason: str) -> None:
            nonlocal fired
            fired = True
            task.cancel()

        remove = signal.add_listener(on_abort)
        try:
            return await self._gen.__anext__()
        except asyncio.CancelledError:
            # Only our own cancel is turned into the end of the iteration; a
            # cancel from anyone else (stream_response's, the runtime's) goes on.
            if fired and task.uncancel() == 0:
                await self._stop_on_abort()
            raise
        finally:
            remove()

    async def _stop_on_abort(self) -> None:
        self.result.aborted = True
        await self.aclose()
        raise StopAsyncIteration

    async def aclose(self) -> None:
        await self._gen.aclose()

    async def _chunks(self) -> AsyncIterator[Chunk]:
        # A span per call when tracing is on (a child of the turn's span); else a no-op.
        call = current_tracing().call_started(self.provider, self.url, self.body)
        error: BaseException | None = None
        stopped = False
        try:
            client = self.client or shared_client()
            decoder = self.decoder
            status: int | None = None  # once the response's head arrived
            events = 0
            try:
                async with client.stream("POST", self.url, json=self.body, headers=self.headers,
                                         timeout=self.timeout) as response:
                    status = response.status_code
                    if status >= 400:
                        body = b""
                        async for piece in response.aiter_bytes():
                            body += piece
                            if len(body) > _ERROR_BODY_LIMIT:
                                break
                        raise http_error(self.provider, response, body)
                    ctype = response.headers.get("content-type", "")
                    if not ctype.startswith("text/event-stream"):
                        raise ProviderError(ProviderErrorCode.STREAM_BROKEN, self.provider,
                                            f"expected an event stream from {self._shown_url}, got "
                                            f"{ctype or 'no content type'} (HTTP {status})", status=status)
                    lines = SSELines()
                    async for line in response.aiter_lines():
                        event = lines.feed(line)
                        if event is None or decoder.result.complete:
                            continue  # after the terminal event, read on to EOF so the connection is reused
                        events += 1
                        for chunk in decoder.feed(*event):
                            yield chunk
                    tail = lines.feed("")
                    if tail is not None and not decoder.result.complete:
                        for chunk in decoder.feed(*tail):
                            yield chunk
                    for chunk in decoder.close():
                        yield chunk
            except httpx.RequestError as exc:
                if status is None:
                    raise ProviderError(ProviderErrorCode.UNREACHABLE, self.provider,
                                        f"cannot reach {self._shown_url}: {type(exc).__name__}: {exc}") from exc
                raise ProviderError(ProviderErrorCode.STREAM_BROKEN, self.provider,
                                    f"the stream broke mid-way (HTTP {status}, after {events} events): "
                                    f"{type(exc).__name__}: {exc}") from exc
        except (GeneratorExit, asyncio.CancelledError):
            stopped = True  # closed before its end: a cancel, or a consumer that stopped reading
            raise
        except BaseException as exc:
            error = exc
            raise
        finally:
            call.ended(self.decoder.result, error, stopped)
