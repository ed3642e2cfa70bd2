"""A voice session: speech in and out over a normal turnline session.

    user audio ──VAD──► barge-in rules ──► pause / resume / interrupt the speech
        │                     │
        └──STT (utterance)──► transcript ──► send on the session (policy interrupt)
    session log (followed) ──► agent text ──clauses──► TTS ──► playout map
        ──► audio-out frames, paced in real time ──► the peer plays them and
            acknowledges ``played`` ms ──► what was heard, to the word

The session's log stays the source of truth: the voice session follows it
like any subscriber (turns, chunks, cancels, ends), and writes to it only
through the session's hub: user messages (``send``), cancels,
``speech-interrupted`` events and, once an interrupted turn has ended and its
playback is settled, the ``turn-revised`` message as heard. The hub may be a
gateway's (:class:`turnline.server.gateway.RemoteHub`): then all of these are
commands the worker owning the session runs, and the turns run there.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import logging
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Literal, Protocol

import msgspec

from ..agent.runtime import CommandError, Runtime
from ..core.fold import MessageFold
from ..protocol import (
    CancelFilter, CancelResult, ChunkEvent, ErrorCode, MessageIn, SpeechInterrupted, TurnEnd, TurnRevised,
    TurnStart, text_part,
)
from ..protocol_audio import AUDIO_OUT, AudioFrame, encode_audio
from .metrics import VoiceMetrics
from .playout import PlayoutMap, heard_message
from .rules import (
    Action, BargeIn, BargeInRules, BargeInSettings, Interrupt, Pause, Resume, UserStarted, UserStopped,
)
from .stt import SpeechToText, Transcriber, TranscriptPassthrough
from .text import ClauseSplitter
from .tts import EspeakTTS, TextToSpeech
from .vad import VAD, make_vad

log = logging.getLogger("turnline.voice")

History = Literal["keep-heard", "keep-generated"]
Mode = Literal["speech", "response"]
FRAME_MS = 20


class VoiceClosed(CommandError):
    """The voice session ended (voice-stop or the peer's disconnect)."""

    def __init__(self, session_id: str, why: str):
        super().__init__(ErrorCode.CONFLICT, f"voice on session {session_id} has ended ({why})")


class AudioSink(Protocol):
    """Where a voice session's output goes: the peer that plays it."""

    def send_audio(self, frame: bytes) -> None: ...  # an encoded audio-out frame

    def send_json(self, frame: dict[str, Any]) -> None: ...  # a ``voice``/``transcript`` signal


@dataclass
class VoiceConfig:
    """Server-wide voice settings; ``voice-start`` options override some per session."""

    tts: TextToSpeech = field(default_factory=EspeakTTS)
    stt: SpeechToText = field(default_factory=TranscriptPassthrough)
    rules: BargeInRules = field(default_factory=BargeInRules)
    history: History = "keep-heard"
    vad: str = "webrtc"
    vad_aggressiveness: int = 3
    vad_frame_ms: int = 20
    send_policy: str = "interrupt"  # the policy of a user utterance sent on the session
    lead_ms: int = 60  # audio sent ahead of real time (the peer's jitter buffer)
    ack_timeout_s: float = 2.0  # how long an interruption waits for the peer's final ``played``
    stall_ms: int = 1000  # no audio-in for this long: the rules' clock runs on as silence
    preroll_ms: int = 300  # audio before the detected start of an utterance given to the STT
    soft_min_chars: int = 24
    max_clause_chars: int = 200
    # On Redis: how long a gateway's claim on a session's voice outlives the
    # gateway (kill -9); renewed every third of it while the voice session lives.
    claim_ttl_ms: int = 10000


# ---------------------------------------------------------------- per-session options (voice-start)


class SettingsIn(msgspec.Struct, forbid_unknown_fields=True, omit_defaults=True):
    enabled: bool | None = None
    debounce_ms: int | None = None
    min_speech_ms: int | None = None
    min_words: int | None = None
    mode: Mode | None = None


class VoiceOptions(msgspec.Struct, forbid_unknown_fields=True, omit_defaults=True):
    vad: Literal["webrtc", "silero"] | None = None
    vad_aggressiveness: int | None = None
    vad_frame_ms: Literal[10, 20, 30] | None = None
    speaking: SettingsIn | None = None
    thinking: SettingsIn | None = None
    false_interruption_ms: int | None = None
    finish_remainder_ms: int | None = None
    start_of_speech_ms: int | None = None
    end_of_speech_ms: int | None = None

    @classmethod
    def parse(cls, raw: dict[str, Any] | None) -> VoiceOptions:
        try:
            opts = msgspec.convert(raw or {}, cls)
        except msgspec.ValidationError as exc:
            raise CommandError(ErrorCode.BAD_FRAME, f"voice options: {exc}") from None
        for name in ("false_interruption_ms", "finish_remainder_ms", "start_of_speech_ms", "end_of_speech_ms"):
            value = getattr(opts, name)
            if value is not None and not 0 <= value <= 60_000:
                raise CommandError(ErrorCode.BAD_FRAME, f"voice options: {name} is 0 to 60000 ms")
        for s in (opts.speaking, opts.thinking):
            if s is not None and any(v is not None and not 0 <= v <= 60_000
                                     for v in (s.debounce_ms, s.min_speech_ms, s.min_words)):
                raise CommandError(ErrorCode.BAD_FRAME, "voice options: barge-in thresholds are 0 to 60000")
        if opts.vad_aggressiveness is not None and opts.vad_aggressiveness not in (0, 1, 2, 3):
            raise CommandError(ErrorCode.BAD_FRAME, "voice options: vad_aggressiveness is 0 to 3")
        return opts

    def rules(self, base: BargeInRules) -> BargeInRules:
        def merged(settings: BargeInSettings, over: SettingsIn | None) -> BargeInSettings:
            if over is None:
                return settings
            return dataclasses.replace(settings, **{k: v for k, v in msgspec.structs.asdict(over).items()
                                                    if v is not None})

        top = {k: getattr(self, k) for k in ("false_interruption_ms", "finish_remainder_ms",
                                             "start_of_speech_ms", "end_of_speech_ms") if getattr(self, k) is not None}
        return dataclasses.replace(base, speaking=merged(base.speaking, self.speaking),
                                   thinking=merged(base.thinking, self.thinking), **top)


@dataclass(frozen=True)
class Interruption:
    turn_id: str
    mode: Mode
    reason: str
    played_ms: int  # the playout position acknowledged when it was decided
    cancelled: bool = False  # mode response: the turn's cancel was accepted
    # resolves when the events it caused are durable
    durable: asyncio.Future[None] | None = field(default=None, compare=False, repr=False)


# ---------------------------------------------------------------- one turn's speech


class TurnSpeech:
    """The speech of one turn: its text as it streams, clauses waiting for the
    engine, the playout map, and how far it was sent and played."""

    def __init__(self, turn_id: str, message_id: str, owner: str, splitter: ClauseSplitter):
        self.turn_id = turn_id
        self.message_id = message_id
        self.owner = owner
        self.fold = MessageFold(message_id)
        self.splitter = splitter
        self.fed = 0  # spoken-text characters given to the splitter
        self.pending: collections.deque[Any] = collections.deque()  # clauses to synthesise
        self.synthesizing = False
        self.map = PlayoutMap(FRAME_MS)
        self.ended = asyncio.Event()  # its turn-end was seen (by this session's follower)
        self.status = "waiting"  # waiting | speaking | paused | interrupted | done
        self.sent = 0  # frames sent
        self.acked_ms = 0
        self.final_ack = False
        self.acked = asyncio.Event()  # poked on every ack
        self.interruption: Interruption | None = None
        self.response_interrupted = False
        self.settled = asyncio.Event()  # revised (or nothing to revise)

    @property
    def interruptible(self) -> bool:
        voice = self.fold.metadata.get("voice")
        return not (isinstance(voice, dict) and voice.get("interruptible") is False)

    @property
    def active(self) -> bool:
        """Its speech may still play."""
        return self.status in ("waiting", "speaking", "paused")

    def available_text(self) -> str:
        """The spoken text that is final so far: text parts in order, joined by a
        newline; a part is spoken only once every part before it has closed."""
        texts: list[str] = []
        for part in self.fold.parts:
            if part.get("type") != "text":
                continue
            texts.append(part.get("text", ""))
            if part.get("state") != "done" and not self.ended.is_set():
                break
        return "\n".join(texts)


# ---------------------------------------------------------------- the session


class VoiceSession:
    def __init__(self, runtime: Runtime, session_id: str, client_id: str, sink: AudioSink,
                 config: VoiceConfig, metrics: VoiceMetrics, *, history: History | None = None,
                 options: VoiceOptions | None = None, may_cancel_others: bool = False,
                 on_close: Callable[[VoiceSession], None] | None = None):
        options = options or VoiceOptions()
        self.runtime = runtime
        self.session_id = session_id
        self.client_id = client_id
        self.sink = sink
        self.config = config
        self.metrics = metrics
        self.history: History = history or config.history
        self.may_cancel_others = may_cancel_others
        self.rules = BargeIn(options.rules(config.rules))
        self.vad: VAD = make_vad(options.vad or config.vad,
                                 aggressiveness=options.vad_aggressiveness if options.vad_aggressiveness is not None
                                 else config.vad_aggressiveness,
                                 frame_ms=options.vad_frame_ms or config.vad_frame_ms)
        self.vad_name = options.vad or config.vad
        self._vad_bytes = 16 * self.vad.frame_ms * 2
        self.turns: dict[str, TurnSpeech] = {}
        self.queue: list[TurnSpeech] = []  # speech order: turn-start order
        self._active_turns: set[str] = set()
        self.closed: str | None = None
        self._on_close = on_close
        self._wake = asyncio.Event()  # the sender
        self._synth_wake = asyncio.Event()
        self._t0 = 0.0
        self._base = 0
        self._audible_until = 0.0
        self._inbuf = bytearray()
        self._preroll: collections.deque[tuple[bytes, bool]] = collections.deque(
            maxlen=max(1, config.preroll_ms // self.vad.frame_ms))
        self._arrivals: collections.deque[tuple[int, float]] = collections.deque(maxlen=512)
        self._last_audio = time.monotonic()
        self._transcriber: Transcriber | None = None
        self._inputs: asyncio.Queue[tuple[str, asyncio.Future[None]]] = asyncio.Queue()
        self._pending_finishes: set[asyncio.Task[None]] = set()
        self._tasks: list[asyncio.Task[None]] = []
        self._settlers: set[asyncio.Task[None]] = set()
        self._agent_key: tuple[Any, ...] = ("idle", True, None)
        self._in_flight: asyncio.Future[None] | None = None
        self.last_barge_in_latency: float | None = None  # seconds, the latest automatic barge-in

    # ------------------------------------------------------------ life

    async def start(self) -> None:
        hub = await self.runtime.hub(self.session_id)
        after = hub.state.last_seq
        for name, coro in (("follow", self._follow(after)), ("synth", self._synth_loop()),
                           ("send", self._send_loop()), ("inputs", self._input_loop()),
                           ("tick", self._tick_loop())):
            task = asyncio.ensure_future(coro)
            task.set_name(f"voice-{name}-{self.session_id}")
            task.add_done_callback(self._task_done)
            self._tasks.append(task)
        self.metrics.sessions.inc()

    def _task_done(self, task: asyncio.Task[None]) -> None:
        if not task.cancelled() and task.exception() is not None:
            log.error("voice task %s failed", task.get_name(), exc_info=task.exception())

    async def close(self, reason: str = "voice_stopped") -> None:
        """End voice: the playing speech is interrupted (and persisted as heard),
        utterances not yet sent are rejected, nothing more is spoken."""
        if self.closed is not None:
            return
        self.closed = reason
        if self._on_close is not None:
            self._on_close(self)  # the session's voice is free for a new peer from now on
        for ts in self.queue:
            if ts.status in ("speaking", "paused"):
                self._stop_speech(ts, reason, "speech")
            elif ts.status == "waiting":
                ts.status = "done"  # never heard, never cut: kept as generated
                ts.settled.set()
        for ts in self.queue:
            ts.acked.set()  # settlers stop waiting for acks that will not come
        rejected = VoiceClosed(self.session_id, reason)
        if self._in_flight is not None and not self._in_flight.done():
            self._in_flight.set_exception(rejected)
            self._in_flight.exception()
            self.metrics.inputs_rejected.inc()
        while not self._inputs.empty():
            _text, fut = self._inputs.get_nowait()
            if not fut.done():
                fut.set_exception(rejected)
                fut.exception()
            self.metrics.inputs_rejected.inc()
        for task in list(self._pending_finishes):
            task.cancel()
            self.metrics.inputs_rejected.inc()
        self._transcriber = None
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self.metrics.sessions.dec()

    async def wait_settled(self, timeout: float | None = None) -> None:
        """Until every interrupted turn is persisted as heard (tests, examples)."""
        if self._settlers:
            await asyncio.wait(list(self._settlers), timeout=timeout)

    def _check_open(self) -> None:
        if self.closed is not None:
            raise VoiceClosed(self.session_id, self.closed)

    # ------------------------------------------------------------ state

    def current(self) -> TurnSpeech | None:
        """The turn whose speech plays (or will play next)."""
        for ts in self.queue:
            if ts.active:
                return ts
        return None

    @property
    def state(self) -> str:
        """idle | thinking | speaking | paused: what the agent does, as the user perceives it."""
        agent = self._agent_now()[0]
        ts = self.current()
        if agent == "speaking" and ts is not None and ts.status == "paused":
            return "paused"
        return agent

    def _agent_now(self) -> tuple[str, bool, int | None]:
        ts = self.current()
        if ts is not None and ts.status in ("speaking", "paused"):
            if ts.status == "paused" or ts.sent < ts.map.frames or time.monotonic() < self._audible_until:
                remaining = None
                if ts.map.finished:
                    remaining = max(ts.map.total_ms - ts.acked_ms, 0)
                return "speaking", ts.interruptible, remaining
        if any(not self.turns[t].response_interrupted for t in self._active_turns if t in self.turns):
            return "thinking", True, None
        return "idle", True, None

    def _sync_agent(self) -> list[Action]:
        key = self._agent_now()
        if key == self._agent_key:
            return []
        self._agent_key = key
        return self.rules.set_agent(key[0], interruptible=key[1], remaining_ms=key[2])  # type: ignore[arg-type]

    # ------------------------------------------------------------ inputs from the peer

    async def audio(self, pcm: bytes) -> None:
        """Audio-in: PCM16 LE mono 16 kHz, any length."""
        self._check_open()
        now = time.monotonic()
        self._last_audio = now
        self._inbuf += pcm
        n = self._vad_bytes
        while len(self._inbuf) >= n and self.closed is None:
            frame = bytes(self._inbuf[:n])
            del self._inbuf[:n]
            voiced = self.vad.is_speech(frame)
            self._arrivals.append((self.rules.now + self.vad.frame_ms, now))
            actions = self._sync_agent() + self.rules.vad(voiced, self.vad.frame_ms)
            self._preroll.append((frame, voiced))
            if self._transcriber is not None and not any(isinstance(a, UserStarted) for a in actions):
                interim = await self._transcriber.feed(frame, voiced)
                if interim:
                    self.sink.send_json({"op": "transcript", "session": self.session_id, "text": interim,
                                         "final": False})
                    actions += self.rules.transcript(interim, final=False)
            await self._apply(actions)

    async def transcript(self, text: str, final: bool = True) -> None:
        """A transcript from the peer's own recognition. A final one is sent on
        the session (in order, after earlier utterances)."""
        self._check_open()
        actions = self._sync_agent() + self.rules.transcript(text, final)
        await self._apply(actions)
        if final and text.strip():
            self._enqueue(text)

    def played(self, turn_id: str, ms: int, final: bool = False) -> None:
        """The peer played ``ms`` of the turn's audio (capped at what was sent)."""
        self._check_open()
        ts = self.turns.get(turn_id)
        if ts is None:
            return
        ts.acked_ms = max(ts.acked_ms, min(ms, ts.sent * FRAME_MS))
        if final:
            ts.final_ack = True
        ts.acked.set()
        ts.acked = asyncio.Event()

    async def say(self, text: str) -> None:
        """A final user utterance, as if recognised: sent on the session."""
        self._check_open()
        await self._enqueue(text)

    def _enqueue(self, text: str) -> asyncio.Future[None]:
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._inputs.put_nowait((text, fut))
        return fut

    # ------------------------------------------------------------ interruptions (the API)

    async def interrupt_speech(self, reason: str = "client_request", *, requester: str | None = None
                               ) -> Interruption | None:
        """Stop the agent's speech now and drop its queued audio; its LLM turn
        keeps running (its text still streams to screens)."""
        self._check_open()
        ts = self.current()
        if ts is None:
            return None
        return self._stop_speech(ts, reason, "speech", requester)

    async def interrupt_response(self, reason: str = "client_request", *, requester: str | None = None,
                                 may_cancel_others: bool | None = None) -> Interruption | None:
        """Cancel the agent's turn (a normal turnline cancel, by ``requester``'s
        rights) and stop its speech."""
        self._check_open()
        ts = self.current()
        if ts is None or ts.response_interrupted:
            running = [t for t in self.queue if t.turn_id in self._active_turns and not t.response_interrupted]
            ts = running[-1] if running else None
        if ts is None:
            return None
        return await self._interrupt_response(ts, reason, requester or self.client_id,
                                              self.may_cancel_others if may_cancel_others is None else may_cancel_others)

    async def _interrupt_response(self, ts: TurnSpeech, reason: str, requester: str, others: bool
                                  ) -> Interruption | None:
        if ts.response_interrupted:
            return None  # once per turn
        ts.response_interrupted = True
        if ts.active:
            it = self._stop_speech(ts, reason, "response", requester)
        else:  # its speech had already stopped (or played out): the response is what stops now
            it = Interruption(ts.turn_id, "response", reason, ts.acked_ms)
            it = dataclasses.replace(it, durable=self._record(it, requester))
        if ts.turn_id not in self._active_turns:
            return it
        hub = await self.runtime.hub(self.session_id)
        result, durable = await hub.cancel(requester, CancelFilter(turn_id=ts.turn_id), may_cancel_others=others)
        return dataclasses.replace(it, cancelled=ts.turn_id in result.cancelled, durable=durable)

    def _record(self, it: Interruption, requester: str | None = None) -> asyncio.Future[None] | None:
        """Append ``speech-interrupted`` and count it; the future says when it is durable."""
        self.metrics.interruptions.labels(it.reason, it.mode).inc()
        hub = self.runtime.loaded(self.session_id)
        if hub is None:
            return None
        try:
            return hub.emit([SpeechInterrupted(turn_id=it.turn_id, reason=it.reason, mode=it.mode,
                                               played_ms=it.played_ms, client_id=requester or self.client_id)])
        except CommandError:
            log.warning("speech-interrupted for %s was not stored", it.turn_id)
            return None

    def _stop_speech(self, ts: TurnSpeech, reason: str, mode: Mode, requester: str | None = None) -> Interruption:
        """Silence the turn now (synchronously: nothing more is sent after this)."""
        was_playing = ts.status in ("speaking", "paused")
        ts.status = "interrupted"
        ts.pending.clear()
        it = Interruption(ts.turn_id, mode, reason, ts.acked_ms)
        if was_playing:
            self.sink.send_json({"op": "voice", "session": self.session_id, "state": "interrupted",
                                 "turn_id": ts.turn_id, "ms": ts.sent * FRAME_MS})
        it = dataclasses.replace(it, durable=self._record(it, requester))
        ts.interruption = it
        self._poke()
        settler = asyncio.ensure_future(self._settle(ts))
        self._settlers.add(settler)
        settler.add_done_callback(self._settlers.discard)
        return it

    def _pause(self, ts: TurnSpeech) -> None:
        ts.status = "paused"
        self.sink.send_json({"op": "voice", "session": self.session_id, "state": "paused",
                             "turn_id": ts.turn_id, "ms": ts.sent * FRAME_MS})
        self._poke()

    def _resume(self, ts: TurnSpeech) -> None:
        ts.status = "speaking"
        ts.final_ack = False
        ts.sent = min(ts.sent, ts.acked_ms // FRAME_MS)  # from where the peer stopped
        self.sink.send_json({"op": "voice", "session": self.session_id, "state": "resumed",
                             "turn_id": ts.turn_id, "ms": ts.sent * FRAME_MS})
        self._reset_clock(ts.sent)
        self._poke()

    # ------------------------------------------------------------ rules → actions

    async def _apply(self, actions: list[Action]) -> None:
        for a in actions:
            if self.closed is not None:
                return
            ts = self.current()
            if isinstance(a, Pause):
                if ts is not None and ts.status == "speaking":
                    self._pause(ts)
                    self._observe_latency(a.onset_ms)
            elif isinstance(a, Resume):
                if ts is not None and ts.status == "paused":
                    self._resume(ts)
                    if a.why == "false_interruption":
                        self.metrics.false_interruptions.inc()
            elif isinstance(a, Interrupt):
                playing = ts is not None and ts.status == "speaking"
                if a.mode == "speech":
                    if ts is not None and ts.active:
                        self._stop_speech(ts, a.reason, "speech")
                else:
                    await self.interrupt_response(a.reason)
                if playing:  # stopped without a pause first (e.g. by a transcript)
                    self._observe_latency(a.onset_ms)
            elif isinstance(a, UserStarted):
                self._transcriber = self.config.stt.open()
                for frame, voiced in list(self._preroll):
                    interim = await self._transcriber.feed(frame, voiced)
                    if interim:
                        await self._apply(self.rules.transcript(interim, final=False))
            elif isinstance(a, UserStopped):
                transcriber, self._transcriber = self._transcriber, None
                if transcriber is not None:
                    task = asyncio.ensure_future(self._finish_utterance(transcriber))
                    self._pending_finishes.add(task)
                    task.add_done_callback(self._pending_finishes.discard)

    def _observe_latency(self, onset_ms: int) -> None:
        """From the arrival of the input frame holding the onset to now (the audio stopped)."""
        for end_ms, wall in self._arrivals:
            if end_ms > onset_ms:
                self.last_barge_in_latency = time.monotonic() - wall
                self.metrics.barge_in_latency.observe(self.last_barge_in_latency)
                return

    async def _finish_utterance(self, transcriber: Transcriber) -> None:
        text = (await transcriber.finish()).strip()
        if not text or self.closed is not None:
            return
        self.sink.send_json({"op": "transcript", "session": self.session_id, "text": text, "final": True})
        await self._apply(self._sync_agent() + self.rules.transcript(text, final=True))
        self._enqueue(text)

    # ------------------------------------------------------------ user utterances → the session

    async def _input_loop(self) -> None:
        while True:
            text, fut = await self._inputs.get()
            self._in_flight = fut
            try:
                await self._send(text)
            except Exception as exc:
                if not fut.done():
                    fut.set_exception(exc)
                    fut.exception()
                log.warning("voice input on %s was not sent: %r", self.session_id, exc)
                if isinstance(exc, CommandError) and exc.code == ErrorCode.RATE_LIMITED:
                    # Over a limit (the session's turns): the peer is told, not left waiting.
                    self.runtime.metrics.limit_refusals.labels(exc.details.get("limit", "turns")).inc()
                    self.sink.send_json({"op": "error", "id": None, "code": exc.code, "message": exc.message,
                                         "session": self.session_id, **exc.details})
            else:
                if not fut.done():
                    fut.set_result(None)
            finally:
                self._in_flight = None

    async def _send(self, text: str) -> None:
        policy = self.config.send_policy
        if policy in ("interrupt", "rollback"):
            # Cancel our own running turns first and wait until each is
            # persisted as heard, so the next turn's model input is what the
            # user heard (a send would start it before that revision).
            hub = await self.runtime.hub(self.session_id)
            own = [self.turns[t] for t in list(self._active_turns)
                   if t in self.turns and hub.state.active.get(t) is not None
                   and hub.state.active[t].owner == self.client_id]
            for ts in own:
                await self._interrupt_response(ts, "user_speaking", self.client_id, self.may_cancel_others)
            waits = [asyncio.ensure_future(ts.settled.wait()) for ts in self.turns.values()
                     if ts.interruption is not None and not ts.settled.is_set()]
            if waits:
                grace = self.config.ack_timeout_s + self.runtime.config.abort_grace_s + 1.0
                _done, late = await asyncio.wait(waits, timeout=grace)
                for w in late:
                    w.cancel()
        self._check_open()
        hub = await self.runtime.hub(self.session_id)
        message = MessageIn(parts=[text_part(text)], metadata={"voice": {"transcript": True}})
        _outcome, durable = await hub.send(self.client_id, [message], policy=policy)
        await durable

    # ------------------------------------------------------------ the session's log → speech

    async def _follow(self, after: int) -> None:
        async for batch in self.runtime.store.follow(self.session_id, after):
            for record in batch:
                try:
                    ev = record.event()
                except msgspec.DecodeError:
                    continue
                await self._on_event(ev)

    async def _on_event(self, ev: Any) -> None:
        if isinstance(ev, TurnStart):
            ts = TurnSpeech(ev.turn_id, ev.message_id, ev.owner,
                            ClauseSplitter(self.config.soft_min_chars, self.config.max_clause_chars))
            self.turns[ev.turn_id] = ts
            self.queue.append(ts)
            self._active_turns.add(ev.turn_id)
            self._forget_old()
        elif isinstance(ev, ChunkEvent):
            ts = self.turns.get(ev.turn_id)
            if ts is None:
                return
            ts.fold.add(ev.chunk)
            if ts.active and not ev.final:
                self._feed(ts)
        elif isinstance(ev, CancelResult):
            for turn_id in ev.cancelled:
                ts = self.turns.get(turn_id)
                if ts is not None and ts.active and ts.interruption is None:
                    ts.response_interrupted = True
                    self._stop_speech(ts, "cancelled", "response")
        elif isinstance(ev, TurnEnd):
            ts = self.turns.get(ev.turn_id)
            self._active_turns.discard(ev.turn_id)
            if ts is None:
                return
            ts.ended.set()
            if ts.active:
                self._feed(ts)
                if not ts.map.frames and not ts.pending and not ts.synthesizing:
                    ts.status = "done"  # nothing to say
                    ts.settled.set()
                    self._poke()
        else:
            return
        await self._apply(self._sync_agent())

    def _forget_old(self) -> None:
        # Keep finished turns a while (late acks), not forever.
        done = [t for t in self.queue if not t.active and t.settled.is_set()]
        for ts in done[:-16]:
            self.queue.remove(ts)
            self.turns.pop(ts.turn_id, None)

    def _feed(self, ts: TurnSpeech) -> None:
        text = ts.available_text()
        clauses = ts.splitter.feed(text[ts.fed:]) if len(text) > ts.fed else []
        ts.fed = max(ts.fed, len(text))
        if ts.ended.is_set():
            clauses += ts.splitter.flush()
        ts.pending.extend(c for c in clauses if c.speakable)
        self._finish_audio_if_complete(ts)
        self._synth_wake.set()

    def _finish_audio_if_complete(self, ts: TurnSpeech) -> None:
        if ts.ended.is_set() and not ts.pending and not ts.synthesizing and not ts.map.finished:
            ts.map.finish()
            self._poke()

    async def _synth_loop(self) -> None:
        while True:
            ts = next((t for t in self.queue if t.active and t.pending), None)
            if ts is None:
                await self._synth_wake.wait()
                self._synth_wake.clear()
                continue
            clause = ts.pending.popleft()
            ts.synthesizing = True
            try:
                synthesis = await self.config.tts.synthesize(clause.text)
            except Exception:
                log.exception("speech synthesis failed for %r; skipping the clause", clause.text)
                continue
            finally:
                ts.synthesizing = False
            if ts.active:
                ts.map.add(clause.start, clause.text, synthesis)
                self._finish_audio_if_complete(ts)
                self._poke()

    # ------------------------------------------------------------ speech → the peer, in real time

    def _poke(self) -> None:
        self._wake.set()

    def _reset_clock(self, frame: int) -> None:
        lead = self.config.lead_ms // FRAME_MS
        self._t0 = time.monotonic()
        self._base = frame - lead  # the first ``lead`` frames go at once

    async def _sleep(self, seconds: float | None) -> None:
        # asyncio.timeout, not wait_for: on 3.11 wait_for swallows a cancel
        # that races the wake-up, and the task would never stop.
        self._wake.clear()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(seconds):
                await self._wake.wait()

    async def _send_loop(self) -> None:
        frame_s = FRAME_MS / 1000
        while True:
            ts = self.current()
            if ts is None or ts.status == "paused":
                await self._sleep(None)
                continue
            if ts.sent >= ts.map.frames:
                if ts.map.finished:
                    self._speech_done(ts)
                    continue
                await self._sleep(None)  # wait for more audio (an underrun, or text not there yet)
                continue
            now = time.monotonic()
            if ts.status == "waiting":
                ts.status = "speaking"
                self.sink.send_json({"op": "voice", "session": self.session_id, "state": "speaking",
                                     "turn_id": ts.turn_id, "ms": ts.sent * FRAME_MS})
                self._reset_clock(ts.sent)
                await self._apply(self._sync_agent())
                continue
            due = self._t0 + (ts.sent - self._base) * frame_s
            if now - due > 2 * frame_s:  # the peer ran dry: start again with a lead
                self._reset_clock(ts.sent)
                due = self._t0 + (ts.sent - self._base) * frame_s
            if due > now:
                await self._sleep(due - now)
                continue
            f = ts.map.frame(ts.sent)
            self.sink.send_audio(encode_audio(AudioFrame(
                AUDIO_OUT, self.session_id, f.seq, f.ms, f.pcm, ts.turn_id, f.span_start, f.span_end, f.heard_end)))
            ts.sent += 1
            self._audible_until = max(due, now) + frame_s + self.config.lead_ms / 1000

    def _speech_done(self, ts: TurnSpeech) -> None:
        ts.status = "done"
        ts.settled.set()
        self.sink.send_json({"op": "voice", "session": self.session_id, "state": "done",
                             "turn_id": ts.turn_id, "ms": ts.sent * FRAME_MS})

    async def _tick_loop(self) -> None:
        # A peer that stops sending audio stops the rules' clock; after a
        # stall the time runs on as silence, so a pause cannot hang forever.
        stall = self.config.stall_ms / 1000
        while True:
            await asyncio.sleep(0.1)
            await self.runtime.hub(self.session_id)  # in use: the runtime keeps it loaded while voice runs
            now = time.monotonic()
            idle = now - self._last_audio
            if idle >= stall:
                self._last_audio = now
                await self._apply(self._sync_agent() + self.rules.advance(int(idle * 1000)))
            else:
                await self._apply(self._sync_agent())

    # ------------------------------------------------------------ history = what was heard

    async def _settle(self, ts: TurnSpeech) -> None:
        """Once the peer's playback of an interrupted turn is known (its final
        ack, its disconnect, or ``ack_timeout_s``) and the turn has ended,
        persist the turn as heard."""
        try:
            loop = asyncio.get_running_loop()
            deadline = loop.time() + self.config.ack_timeout_s
            while ts.sent and not ts.final_ack and self.closed is None and loop.time() < deadline:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout_at(deadline):
                        await ts.acked.wait()
            await self._turn_ended(ts)
            await self._revise(ts)
        finally:
            ts.settled.set()

    async def _turn_ended(self, ts: TurnSpeech) -> None:
        while True:
            hub = await self.runtime.hub(self.session_id)  # (a gateway's replica is refreshed)
            if not hub.state.is_active(ts.turn_id):
                return
            turn = hub.turns.get(ts.turn_id)
            if turn is not None:
                await turn.ended.wait()
            else:  # it runs elsewhere (a gateway's hub: on a worker): this session's follower sees its end
                await ts.ended.wait()

    async def _revise(self, ts: TurnSpeech) -> None:
        hub = self.runtime.loaded(self.session_id)
        if hub is None:
            return
        turn = hub.state.turns.get(ts.turn_id)
        message = hub.state.messages.get(ts.message_id)
        if turn is None or turn.active or message is None or turn.reason is None:
            return
        heard_ms = ts.acked_ms
        revised = heard_message(message, ts.map.heard_end(heard_ms), heard_ms, self.history)
        try:  # stored before the turn counts as settled: a send waiting on that comes after it
            await hub.emit([TurnRevised(turn_id=ts.turn_id, reason=turn.reason,  # type: ignore[arg-type]
                                        message=revised, client_id=self.runtime.agent_id)])
        except CommandError:
            log.warning("the heard revision of %s was not stored", ts.turn_id)
            return
        self.metrics.revisions.labels(self.history).inc()

