"""The voice pipeline on the WebSocket: voice ops and binary audio frames.

``voice`` sits above ``server`` (imports point down), so the server does not
know this module: it hands binary frames, the voice ops and the close of a
connection to whatever object is installed as ``app.voice``.
:func:`install_voice` installs a :class:`VoiceGateway` there.

On Redis (a gateway's ``RemoteRuntime``, which has a ``bus``) one voice peer per
session holds across gateways: a gateway claims the session's ``voice`` key
before it starts voice there (:class:`_VoiceClaim`).
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
import uuid
from typing import Any

from ..agent.runtime import CommandError, rate_limited
from ..core.limits import AUDIO, CANCELS, SENDS, Bucket, retry_after_ms, take
from ..protocol import ErrorCode, Interrupt, Played, Transcript, VoiceStart, VoiceStop, ack_frame, encode
from ..protocol_audio import SAMPLE_RATE, AudioFrameError, check_audio_in, decode_audio
from .metrics import voice_metrics
from .session import FRAME_MS, Interruption, VoiceConfig, VoiceOptions, VoiceSession

log = logging.getLogger("turnline.voice")


class _ConnectionSink:
    """A voice session's output into one WebSocket connection's send queue."""

    def __init__(self, conn: Any):
        self.conn = conn

    def send_audio(self, frame: bytes) -> None:
        self.conn.push_binary(frame)

    def send_json(self, frame: dict[str, Any]) -> None:
        self.conn.push(encode(frame))


class _VoiceClaim:
    """One voice session's hold on its session id across the gateways of a
    Redis store: the key ``{session}:voice``, set to the gateway id and a nonce
    of this voice session, with a TTL, so a gateway killed with -9 frees the
    session when the TTL runs out."""

    def __init__(self, bus: Any, session_id: str, gateway_id: str, ttl_ms: int):
        self.bus = bus
        self.key: str = bus.store.key(session_id, "voice")
        self.value = f"{gateway_id}:{uuid.uuid4().hex}"
        self.ttl_ms = ttl_ms
        self.renewer: asyncio.Task[None] | None = None

    async def acquire(self) -> bool:
        return bool(await self.bus.redis.set(self.key, self.value, nx=True, px=self.ttl_ms))

    async def renew(self) -> bool:
        # Never one that expired and another gateway took.
        return bool(await self.bus.renew_if_held(keys=[self.key], args=[self.value, self.ttl_ms]))

    async def release(self) -> None:
        await self.bus.release_if_held(keys=[self.key], args=[self.value])


class VoiceGateway:
    """Voice sessions of one server, at most one per session id."""

    def __init__(self, app: Any, config: VoiceConfig | None = None):
        self.app = app
        self.runtime = app.runtime
        self.config = config or VoiceConfig()
        self.metrics = voice_metrics(self.runtime.metrics.registry)
        self.sessions: dict[str, VoiceSession] = {}
        self._peers: dict[str, Any] = {}  # session id → the connection that plays it
        self._claims: dict[str, _VoiceClaim] = {}  # session id → this gateway's claim on it (Redis only)
        self._releases: dict[str, asyncio.Task[None]] = {}  # session id → its claim being freed
        # Audio-in per voice peer (one per session): a token bucket of bytes.
        # ``clock`` (seconds, monotonic) may be replaced by a test that moves time itself.
        self.audio_rate = self.runtime.config.limits.audio
        self.clock = time.monotonic
        self._audio_buckets: dict[str, Bucket] = {}

    def session(self, session_id: str) -> VoiceSession | None:
        return self.sessions.get(session_id)

    async def start(self, session_id: str, client_id: str, sink: Any, *, history: str | None = None,
                    options: VoiceOptions | None = None, may_cancel_others: bool = False) -> VoiceSession:
        """Start voice on a session, with ``sink`` playing it (the Python API;
        ``voice-start`` does the same for a WebSocket peer)."""
        if session_id in self.sessions:
            raise CommandError(ErrorCode.CONFLICT, f"voice already runs on session {session_id}")
        claim = await self._claim(session_id)
        try:
            voice = VoiceSession(self.runtime, session_id, client_id, sink, self.config, self.metrics,
                                 history=history, options=options,  # type: ignore[arg-type]
                                 may_cancel_others=may_cancel_others, on_close=self._closed)
        except (ValueError, RuntimeError) as exc:
            if claim is not None:
                await self._release(session_id, claim)
            raise CommandError(ErrorCode.BAD_FRAME, f"voice options: {exc}") from None
        self.sessions[session_id] = voice
        if claim is not None:
            self._claims[session_id] = claim
        try:
            await voice.start()
        except BaseException:
            self._closed(voice)  # it never ran: the session (and its claim) is free again
            raise
        if claim is not None:
            claim.renewer = asyncio.ensure_future(self._keep_claim(voice, claim))
            claim.renewer.set_name(f"voice-claim-{session_id}")
        return voice

    async def _claim(self, session_id: str) -> _VoiceClaim | None:
        """On Redis, this gateway's claim on the session's voice; None on one node."""
        bus = getattr(self.runtime, "bus", None)
        if bus is None:
            return None
        freeing = self._releases.get(session_id)
        if freeing is not None:  # a restart on this gateway: the old voice session's claim goes first
            await asyncio.wait([freeing])
        claim = _VoiceClaim(bus, session_id, self.runtime.id, self.config.claim_ttl_ms)
        if not await claim.acquire():
            raise CommandError(ErrorCode.CONFLICT, f"voice already runs on session {session_id} (another gateway)")
        return claim

    async def _keep_claim(self, voice: VoiceSession, claim: _VoiceClaim) -> None:
        while voice.closed is None:
            await asyncio.sleep(claim.ttl_ms / 3000)
            try:
                held = await claim.renew()
            except Exception:  # Redis unreachable for now: the next try may still be within the TTL
                log.warning("renewing the voice claim on session %s failed", voice.session_id, exc_info=True)
                continue
            if not held:  # it expired (this gateway stalled), so another gateway may run voice here now
                log.warning("voice on session %s lost its claim: closing it", voice.session_id)
                await voice.close("voice_claim_lost")
                return

    async def _release(self, session_id: str, claim: _VoiceClaim) -> None:
        try:
            await claim.release()
        except Exception:  # it expires after its TTL anyway
            log.warning("freeing the voice claim on session %s failed", session_id, exc_info=True)
        finally:
            if self._releases.get(session_id) is asyncio.current_task():
                del self._releases[session_id]

    def _closed(self, voice: VoiceSession) -> None:
        if self.sessions.get(voice.session_id) is voice:
            del self.sessions[voice.session_id]
            self._peers.pop(voice.session_id, None)
            self._audio_buckets.pop(voice.session_id, None)
            claim = self._claims.pop(voice.session_id, None)
            if claim is not None:
                # (not when the renewer itself closes the voice session: it would cancel that close)
                if claim.renewer is not None and claim.renewer is not asyncio.current_task():
                    claim.renewer.cancel()
                self._releases[voice.session_id] = asyncio.ensure_future(self._release(voice.session_id, claim))

    async def close(self) -> None:
        for voice in list(self.sessions.values()):
            await voice.close("shutdown")
        await asyncio.gather(*self._releases.values(), return_exceptions=True)

    # ------------------------------------------------------------ the server's hook

    def _peer_session(self, conn: Any, session_id: str) -> VoiceSession:
        voice = self.sessions.get(session_id)
        if voice is None or self._peers.get(session_id) is not conn:
            raise CommandError(ErrorCode.CONFLICT, f"this connection has not started voice on {session_id} "
                                                   f"(send voice-start first)")
        return voice

    async def frame(self, conn: Any, frame: Any) -> tuple[asyncio.Future[None] | None, bytes]:
        who = conn.principal
        if isinstance(frame, VoiceStart):
            _require(who, frame.session, "publish")
            options = VoiceOptions.parse(frame.options)
            if frame.session in self.sessions:
                if self._peers.get(frame.session) is not conn:
                    raise CommandError(ErrorCode.CONFLICT, f"another connection runs voice on {frame.session}")
                await self.sessions[frame.session].close("voice_restarted")
            voice = await self.start(frame.session, who.client_id, _ConnectionSink(conn), history=frame.history,
                                     options=options, may_cancel_others=who.can(frame.session, "cancel-any"))
            self._peers[frame.session] = conn
            return None, ack_frame(frame.id, session=frame.session, sample_rate=SAMPLE_RATE, frame_ms=FRAME_MS,
                                   vad=voice.vad_name, vad_frame_ms=voice.vad.frame_ms, history=voice.history)
        if isinstance(frame, VoiceStop):
            await self._peer_session(conn, frame.session).close("voice_stopped")
            return None, ack_frame(frame.id, session=frame.session)
        if isinstance(frame, Transcript):
            voice = self._peer_session(conn, frame.session)
            if frame.final and frame.text.strip():  # a final transcript is a send
                await self.app.limiter.take(SENDS, who.client_id)
            await voice.transcript(frame.text, frame.final)
            return None, ack_frame(frame.id, session=frame.session)
        if isinstance(frame, Played):
            _require(who, frame.session, "publish")
            hub = await self.app.existing_hub(frame.session)
            if frame.turn_id not in hub.state.turns:
                raise CommandError(ErrorCode.NOT_FOUND, f"no turn {frame.turn_id}")
            self._peer_session(conn, frame.session).played(frame.turn_id, frame.ms, frame.final)
            return None, ack_frame(frame.id, session=frame.session, turn_id=frame.turn_id, ms=frame.ms)
        if isinstance(frame, Interrupt):
            _require(who, frame.session, "cancel")
            voice = self.sessions.get(frame.session)
            if voice is None:
                raise CommandError(ErrorCode.CONFLICT, f"no voice runs on session {frame.session}")
            others = who.can(frame.session, "cancel-any")
            if who.client_id != voice.client_id and not others:
                raise CommandError(ErrorCode.FORBIDDEN, "interrupting another client's voice needs cancel-any")
            await self.app.limiter.take(CANCELS, who.client_id)
            it: Interruption | None
            if frame.mode == "speech":
                it = await voice.interrupt_speech(frame.reason, requester=who.client_id)
            else:
                it = await voice.interrupt_response(frame.reason, requester=who.client_id, may_cancel_others=others)
            fields: dict[str, Any] = {"session": frame.session, "mode": frame.mode,
                                      "turn_id": it.turn_id if it else None,
                                      "played_ms": it.played_ms if it else 0}
            if it is not None and frame.mode == "response":
                fields["cancelled"] = it.cancelled
            return (it.durable if it else None), ack_frame(frame.id, **fields)
        raise CommandError(ErrorCode.UNKNOWN_OP, "unknown voice op")

    async def audio(self, conn: Any, data: bytes) -> None:
        frame = check_audio_in(decode_audio(data))
        if not conn.principal.can(frame.session, "publish"):
            raise AudioFrameError(ErrorCode.FORBIDDEN, f"token of {conn.principal.client_id!r} may not publish "
                                                       f"on {frame.session!r}", frame.session)
        voice = self.sessions.get(frame.session)
        if voice is None or self._peers.get(frame.session) is not conn:
            raise AudioFrameError(ErrorCode.CONFLICT, f"this connection has not started voice on {frame.session} "
                                                      f"(send voice-start first)", frame.session)
        self._take_audio(frame.session, len(frame.pcm))
        await voice.audio(frame.pcm)

    def _take_audio(self, session_id: str, size: int) -> None:
        """Refuse (the frame is dropped) audio over the peer's bytes per second."""
        rate = self.audio_rate
        if not rate.enabled:
            return
        self._audio_buckets[session_id], wait = take(self._audio_buckets.get(session_id), rate, self.clock(), size)
        if wait == math.inf:
            raise AudioFrameError(ErrorCode.TOO_LARGE, f"an audio frame of {size} bytes is over the audio burst "
                                                       f"({rate.burst:g} bytes); send smaller frames", session_id)
        if wait:
            ms = retry_after_ms(wait)
            exc = rate_limited(AUDIO, ms, f"audio-in over {rate.per_s:g} bytes/s (burst {rate.burst:g}); "
                                          f"this frame was dropped; retry after {ms} ms")
            exc.details["session"] = session_id
            raise exc

    async def closed(self, conn: Any) -> None:
        for session_id, peer in list(self._peers.items()):
            if peer is conn:
                voice = self.sessions.get(session_id)
                if voice is not None:
                    await voice.close("disconnected")


def _require(principal: Any, session: str, action: str) -> None:
    if not principal.can(session, action):
        raise CommandError(ErrorCode.FORBIDDEN, f"token of {principal.client_id!r} may not {action} on {session!r}")


def install_voice(app: Any, config: VoiceConfig | None = None) -> VoiceGateway:
    """Run the voice pipeline on a :class:`turnline.server.app.TurnlineApp`:
    voice ops and binary audio frames on its WebSocket."""
    gateway = VoiceGateway(app, config)
    app.voice = gateway
    return gateway
