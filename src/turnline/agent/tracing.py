"""Tracing: a span per turn and a child span per provider call, off unless asked.

The runtime tells a :class:`Tracing` about a few moments of each turn: it
started (with the session, owner, policy and an optional W3C ``traceparent``),
its first chunk, a cancel that named it, its abort firing, and its end (with
the reason, and how much a ``seen`` cursor cut from the saved message). The
provider adapters tell it about each model call. The default, ``NO_TRACING``,
does nothing: with tracing off a turn costs a handful of calls to empty methods
(never one per chunk), and OpenTelemetry is not imported at all.

:class:`OtelTracing` records those moments as OpenTelemetry spans and span
events; it needs the ``otel`` extra (``opentelemetry-api``; the SDK and an
exporter are the application's choice). See docs/observability.md.
"""

from __future__ import annotations

import contextvars
import importlib
import logging
import os
from collections import OrderedDict
from typing import TYPE_CHECKING, Any, Mapping
from urllib.parse import urlsplit

if TYPE_CHECKING:
    from ..core.session import TurnState
    from ..protocol import ErrorInfo

log = logging.getLogger("turnline.tracing")

# A traceparent is 55 characters in version 00; later versions may append
# fields. Anything longer than this is refused as a bad frame, not parsed.
TRACEPARENT_MAX = 512
QUEUED_TRACES_MAX = 10_000  # traceparents of queued turns kept until they start


class TurnTrace:
    """One turn's observer. This one records nothing."""

    __slots__ = ()

    def activate(self) -> None:
        """Called first thing in the turn's task: what the agent calls from
        there (a provider adapter) sees this turn as its parent."""

    def first_chunk(self) -> None:
        pass

    def cancel_received(self, requester: str, seen: int | None) -> None:
        pass

    def abort_fired(self, reason: str) -> None:
        pass

    def ended(self, state: TurnState, reason: str, error: ErrorInfo | None) -> None:
        pass


class CallTrace:
    """One provider call's observer. This one records nothing."""

    __slots__ = ()

    def ended(self, result: Any, error: BaseException | None, stopped: bool) -> None:
        """``result``: the call's :class:`StepResult`; ``error``: what it raised,
        if anything; ``stopped``: closed before its end (a cancel)."""


NO_TURN_TRACE = TurnTrace()
NO_CALL_TRACE = CallTrace()


class Tracing:
    """No tracing: the default of :class:`RuntimeConfig`."""

    enabled = False

    def turn_started(self, session_id: str, turn_id: str, owner: str, *, policy: str | None,
                     traceparent: str | None, agent_name: str) -> TurnTrace:
        return NO_TURN_TRACE

    def queued(self, turn_id: str, traceparent: str) -> None:
        """A send was queued with a traceparent: its turn, when it starts, joins that trace."""

    def call_started(self, provider: str, url: str, body: Mapping[str, Any]) -> CallTrace:
        return NO_CALL_TRACE


NO_TRACING = Tracing()

# The running turn's tracing, set by TurnTrace.activate in the turn's task (and
# inherited by the tasks it starts): provider calls find their parent here.
_current_tracing: contextvars.ContextVar[Tracing] = contextvars.ContextVar("turnline_tracing", default=NO_TRACING)


def current_tracing() -> Tracing:
    return _current_tracing.get()


# ---------------------------------------------------------------- OpenTelemetry


# gen_ai.provider.name's well-known values, by turnline adapter.
_GENAI_PROVIDER = {"openai.chat": "openai", "openai.responses": "openai", "anthropic": "anthropic"}
# Request parameters recorded as gen_ai.request.* (the first name found in the body).
_REQUEST_PARAMS = {
    "gen_ai.request.max_tokens": ("max_tokens", "max_completion_tokens", "max_output_tokens"),
    "gen_ai.request.temperature": ("temperature",),
    "gen_ai.request.top_p": ("top_p",),
}


class OtelTracing(Tracing):
    """Turns and provider calls as OpenTelemetry spans.

    ``tracer_provider``: where spans go (default: the global one the
    application configured). ``accept_traceparent``: whether a ``send``'s
    W3C ``traceparent`` (frame field or HTTP header) makes its turn a child of
    that span; turn it off when the clients are not yours to trust with your
    trace ids (a turn then joins whatever span is current, else starts a trace).
    """

    enabled = True

    def __init__(self, tracer_provider: Any = None, *, accept_traceparent: bool = True):
        from opentelemetry import context, trace
        from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

        from .. import __version__

        self._trace = trace
        self._context = context
        self._tracer = trace.get_tracer("turnline", __version__, tracer_provider=tracer_provider)
        self._propagator = TraceContextTextMapPropagator()
        self.accept_traceparent = accept_traceparent
        self._queued: OrderedDict[str, str] = OrderedDict()

    def _parent(self, traceparent: str | None) -> Any:
        """The context a turn's span starts in: the sender's traceparent if
        given and valid (W3C: an invalid one is ignored), else the current one."""
        current = self._context.get_current()
        if not traceparent or not self.accept_traceparent:
            return current
        extracted = self._propagator.extract({"traceparent": traceparent})
        if not self._trace.get_current_span(extracted).get_span_context().is_valid:
            log.debug("ignoring an invalid traceparent %r", traceparent[:80])
            return current
        return extracted

    def queued(self, turn_id: str, traceparent: str) -> None:
        self._queued[turn_id] = traceparent
        while len(self._queued) > QUEUED_TRACES_MAX:  # a queued turn cancelled never starts
            self._queued.popitem(last=False)

    def turn_started(self, session_id: str, turn_id: str, owner: str, *, policy: str | None,
                     traceparent: str | None, agent_name: str) -> TurnTrace:
        if traceparent is None:
            traceparent = self._queued.pop(turn_id, None)
        attributes: dict[str, Any] = {
            "gen_ai.operation.name": "invoke_agent",
            "gen_ai.agent.name": agent_name,
            "gen_ai.conversation.id": session_id,
            "turnline.session.id": session_id,
            "turnline.turn.id": turn_id,
            "turnline.turn.owner": owner,
        }
        if policy is not None:
            attributes["turnline.turn.policy"] = policy
        span = self._tracer.start_span(f"invoke_agent {agent_name}", context=self._parent(traceparent),
                                       kind=self._trace.SpanKind.INTERNAL, attributes=attributes)
        return _OtelTurn(self, span)

    def call_started(self, provider: str, url: str, body: Mapping[str, Any]) -> CallTrace:
        model = body.get("model")
        attributes: dict[str, Any] = {
            "gen_ai.operation.name": "chat",
            "gen_ai.provider.name": _GENAI_PROVIDER.get(provider, provider),
            "turnline.provider": provider,
        }
        if isinstance(model, str):
            attributes["gen_ai.request.model"] = model
        for name, keys in _REQUEST_PARAMS.items():
            value = next((body[k] for k in keys if k in body), None)
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                attributes[name] = value
        parts = urlsplit(url)
        if parts.hostname:
            attributes["server.address"] = parts.hostname
            attributes["server.port"] = parts.port or (443 if parts.scheme == "https" else 80)
        name = f"chat {model}" if isinstance(model, str) else "chat"
        span = self._tracer.start_span(name, kind=self._trace.SpanKind.CLIENT, attributes=attributes)
        return _OtelCall(self, span)


class _OtelTurn(TurnTrace):
    __slots__ = ("tracing", "span", "_first")

    def __init__(self, tracing: OtelTracing, span: Any):
        self.tracing = tracing
        self.span = span
        self._first = True

    def activate(self) -> None:
        # The turn's task has its own copy of the context: attaching here makes
        # the span current in that task (and the tasks it starts) only.
        tracing = self.tracing
        _current_tracing.set(tracing)
        tracing._context.attach(tracing._trace.set_span_in_context(self.span))

    def first_chunk(self) -> None:
        if self._first:
            self._first = False
            self.span.add_event("turnline.first_chunk")

    def cancel_received(self, requester: str, seen: int | None) -> None:
        attributes: dict[str, Any] = {"turnline.cancel.requester": requester}
        if seen is not None:
            attributes["turnline.cancel.seen"] = seen
        self.span.add_event("turnline.cancel_received", attributes)

    def abort_fired(self, reason: str) -> None:
        self.span.add_event("turnline.abort_fired", {"turnline.abort.reason": reason})

    def ended(self, state: TurnState, reason: str, error: ErrorInfo | None) -> None:
        span = self.span
        seen = state.cancel.seen if reason == "cancelled" and state.cancel is not None else None
        if seen is not None:
            dropped = sum(1 for c in state.chunks if c.seq > seen and not c.final)
            if dropped:
                # The saved message is what the requester had seen: these chunks were cut from it.
                span.add_event("turnline.seen_truncated", {"turnline.seen": seen, "turnline.chunks_dropped": dropped})
        span.set_attribute("turnline.turn.end_reason", reason)
        if error is not None:
            span.set_attribute("error.type", error.code)
            span.set_status(self.tracing._trace.Status(self.tracing._trace.StatusCode.ERROR, error.message))
        span.end()


class _OtelCall(CallTrace):
    __slots__ = ("tracing", "span")

    def __init__(self, tracing: OtelTracing, span: Any):
        self.tracing = tracing
        self.span = span

    def ended(self, result: Any, error: BaseException | None, stopped: bool) -> None:
        span = self.span
        if result.model:
            span.set_attribute("gen_ai.response.model", result.model)
        if result.response_id:
            span.set_attribute("gen_ai.response.id", result.response_id)
        if result.finish_reason:
            span.set_attribute("gen_ai.response.finish_reasons", [result.finish_reason])
        usage = result.usage
        if "inputTokens" in usage:
            span.set_attribute("gen_ai.usage.input_tokens", usage["inputTokens"])
        if "outputTokens" in usage:
            span.set_attribute("gen_ai.usage.output_tokens", usage["outputTokens"])
        if stopped or result.aborted:
            span.set_attribute("turnline.call.stopped", True)
        if error is not None:
            trace = self.tracing._trace
            span.set_attribute("error.type", getattr(error, "code", None) or type(error).__qualname__)
            span.set_status(trace.Status(trace.StatusCode.ERROR, str(error)[:500]))
        span.end()


# ---------------------------------------------------------------- setup from the environment


def tracing_from_env(*, accept_traceparent: bool = True) -> Tracing:
    """What ``turnline serve --otel`` uses: ``NO_TRACING`` if ``OTEL_SDK_DISABLED=true``;
    else spans through the global tracer provider, which is set up here from the
    standard ``OTEL_*`` variables unless the application (or ``opentelemetry-instrument``)
    already did: ``OTEL_TRACES_EXPORTER`` = ``otlp`` (the default; needs
    ``opentelemetry-exporter-otlp``), ``console`` or ``none``; ``OTEL_SERVICE_NAME``
    and ``OTEL_RESOURCE_ATTRIBUTES`` name the resource. Raises ``RuntimeError``
    with what to install when a piece is missing."""
    if os.environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return NO_TRACING
    try:
        from opentelemetry import trace
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter
    except ImportError:
        raise RuntimeError("OpenTelemetry is not installed: pip install 'turnline[otel]'") from None
    if not isinstance(trace.get_tracer_provider(), TracerProvider):
        exporters = [e.strip() for e in os.environ.get("OTEL_TRACES_EXPORTER", "otlp").split(",") if e.strip()]
        resource = Resource.create({"service.name": os.environ.get("OTEL_SERVICE_NAME", "turnline")})
        provider = TracerProvider(resource=resource)
        for name in exporters:
            if name == "none":
                continue
            if name == "console":
                exporter: Any = ConsoleSpanExporter()
            elif name == "otlp":
                exporter = _otlp_exporter()
            else:
                raise RuntimeError(f"OTEL_TRACES_EXPORTER={name!r}: turnline sets up otlp, console or none; "
                                   "for others configure a tracer provider yourself (or use opentelemetry-instrument)")
            provider.add_span_processor(BatchSpanProcessor(exporter))
        trace.set_tracer_provider(provider)
    return OtelTracing(accept_traceparent=accept_traceparent)


def _otlp_exporter() -> Any:
    protocol = os.environ.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL") or os.environ.get(
        "OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf")
    try:
        # (the exporter is an optional install of the application's, hence no stubs to check against)
        module = "grpc" if protocol == "grpc" else "http"
        exporter_module = importlib.import_module(f"opentelemetry.exporter.otlp.proto.{module}.trace_exporter")
    except ImportError:
        raise RuntimeError("OTEL_TRACES_EXPORTER=otlp needs pip install opentelemetry-exporter-otlp "
                           "(or set OTEL_TRACES_EXPORTER=console)") from None
    return exporter_module.OTLPSpanExporter()


def shutdown_tracing() -> None:
    """Flush and stop the global SDK tracer provider, if there is one (at exit)."""
    try:
        from opentelemetry import trace
    except ImportError:
        return
    shutdown = getattr(trace.get_tracer_provider(), "shutdown", None)
    if shutdown is not None:
        shutdown()
