"""Barge-in rules: when the user's voice pauses, interrupts or leaves alone the
agent's speech. A pure state machine, no I/O and no clock of its own.

Feed it voice-activity frames (:meth:`BargeIn.vad`), transcripts
(:meth:`BargeIn.transcript`) and what the agent is doing
(:meth:`BargeIn.set_agent`); each call returns the actions to take. Time is
the input audio's: every VAD frame advances it by its length, and
:meth:`BargeIn.advance` advances it with no audio (treated as silence).

While the agent **speaks**, ``debounce_ms`` of continuous voice *pauses* its
speech (at once: the pause is cheap and can be undone). The pause becomes an
*interruption* once the user has spoken ``min_speech_ms`` since the onset and
the transcript has ``min_words`` words; a transcript of at least
``max(1, min_words)`` words interrupts at once. If the user falls silent
before that, and no words come within ``false_interruption_ms`` of their last
voiced frame, it was a false interruption: the speech *resumes*. While the
agent is **thinking** (a turn runs, nothing is playing) there is nothing to
pause; the same thresholds, with their own settings, interrupt the response.

Speech marked uninterruptible is never paused or interrupted by voice, nor is
speech with at most ``finish_remainder_ms`` left to play (it finishes).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Union

Mode = Literal["speech", "response"]
AgentState = Literal["idle", "thinking", "speaking"]


@dataclass(frozen=True)
class BargeInSettings:
    enabled: bool = True
    debounce_ms: int = 0  # continuous voice before speech pauses (0: the first voiced frame)
    min_speech_ms: int = 300  # voice since the onset before the pause becomes an interruption
    min_words: int = 0  # transcript words also needed (0: voice alone suffices)
    mode: Mode = "response"  # what an interruption stops: the speech, or the whole response


@dataclass(frozen=True)
class BargeInRules:
    speaking: BargeInSettings = BargeInSettings()
    thinking: BargeInSettings = BargeInSettings()
    false_interruption_ms: int = 1500  # silence after the user's last voice before paused speech resumes
    finish_remainder_ms: int = 0  # speech with this little left to play is let finish (0: off)
    start_of_speech_ms: int = 60  # voice that starts a user utterance (for speech recognition)
    end_of_speech_ms: int = 500  # silence that ends it


# ---------------------------------------------------------------- actions


@dataclass(frozen=True)
class Pause:
    onset_ms: int  # input-audio time the user's voice began


@dataclass(frozen=True)
class Resume:
    at_ms: int
    why: str = "false_interruption"  # or: uninterruptible, short_remainder (it became so while paused)


@dataclass(frozen=True)
class Interrupt:
    mode: Mode
    reason: str
    onset_ms: int
    at_ms: int


@dataclass(frozen=True)
class UserStarted:
    onset_ms: int


@dataclass(frozen=True)
class UserStopped:
    at_ms: int  # end of the user's last voiced frame


Action = Union[Pause, Resume, Interrupt, UserStarted, UserStopped]

# barge-in states
LISTENING = "listening"  # nothing in progress
PENDING = "pending"  # the agent thinks; the user's voice may interrupt it
PAUSED = "paused"  # the agent's speech is paused; the user is speaking
RECOVERING = "recovering"  # paused, the user fell silent: words or a resume are due
IGNORING = "ignoring"  # this stretch of voice may not interrupt
DONE = "done"  # interrupted; until the user's voice ends


class BargeIn:
    def __init__(self, rules: BargeInRules | None = None):
        self.rules = rules or BargeInRules()
        self.now = 0  # input-audio ms
        self.agent: AgentState = "idle"
        self.interruptible = True
        self.remaining_ms: int | None = None
        self.state = LISTENING
        # the user's voice
        self.run_start: int | None = None  # onset of the current run of voiced frames
        self.run_ms = 0
        self.silence_ms = 0
        self.last_voice_end = 0
        self.speaking = False  # in an utterance
        # the barge-in in progress
        self.onset = 0
        self.voiced_ms = 0  # voice since the onset
        self.words = 0
        self.ignored_why: str | None = None

    # ------------------------------------------------------------ inputs

    def set_agent(self, state: AgentState, *, interruptible: bool = True,
                  remaining_ms: int | None = None) -> list[Action]:
        """What the agent does now. ``remaining_ms``: audio left to play, once
        the whole answer is synthesised (None while it is not)."""
        before = self.agent
        self.agent, self.interruptible, self.remaining_ms = state, interruptible, remaining_ms
        if state == before:
            if state == "speaking" and self.state in (PAUSED, RECOVERING):
                why = self._may_interrupt()  # it became uninterruptible, or nearly done, while paused
                if why is not None:
                    self.ignored_why = why
                    self.state = IGNORING if self.state == PAUSED else LISTENING
                    return [Resume(self.now, why)]
            return []
        if state == "idle":
            if self.state != DONE:
                self.state = LISTENING if self.run_start is None else IGNORING
            return []
        out: list[Action] = []
        if state == "speaking" and self.state == PENDING:
            # it started to speak while the user was already speaking to it
            why = self._may_interrupt()
            if why is not None:
                self.state, self.ignored_why = IGNORING, why
                return []
            self.state = PAUSED
            out.append(Pause(self.onset))
            out += self._maybe_commit()
        elif state == "speaking" and self.state in (LISTENING, IGNORING) and self.run_start is not None:
            self.state = LISTENING
            out += self._voiced()
        elif state == "thinking" and self.state in (PAUSED, RECOVERING):
            # the speech it paused is over; the user's voice now weighs on the response
            self.state = PENDING
            out += self._maybe_commit()
        return out

    def vad(self, voiced: bool, frame_ms: int) -> list[Action]:
        """One VAD frame of ``frame_ms`` of input audio."""
        out: list[Action] = []
        start = self.now
        self.now += frame_ms
        if voiced:
            if self.run_start is None:
                self.run_start, self.run_ms = start, 0
            self.run_ms += frame_ms
            self.silence_ms = 0
            self.last_voice_end = self.now
            if self.state in (PAUSED, PENDING, RECOVERING):
                self.voiced_ms += frame_ms
            out += self._voiced()  # first: a pause is what the user waits for
            if not self.speaking and self.run_ms >= self.rules.start_of_speech_ms:
                self.speaking = True
                out.insert(1 if out and isinstance(out[0], Pause) else 0, UserStarted(self.run_start))
        else:
            self.run_start, self.run_ms = None, 0
            out += self._silence(frame_ms)
        return out

    def advance(self, ms: int) -> list[Action]:
        """``ms`` of time with no input audio: silence."""
        if ms <= 0:
            return []
        self.now += ms
        self.run_start, self.run_ms = None, 0
        return self._silence(ms)

    def transcript(self, text: str, final: bool = False) -> list[Action]:
        """An interim or final transcript of the user's current utterance."""
        self.words = len(text.split())
        if self.state in (PAUSED, PENDING, RECOVERING):
            return self._maybe_commit()
        if self.state == LISTENING and self.words >= 1:
            settings = self._settings()
            if settings is not None and self.words >= max(1, settings.min_words) and self._may_interrupt() is None:
                self.onset = self.now
                return self._commit(settings)
        return []

    # ------------------------------------------------------------ decisions

    def _settings(self) -> BargeInSettings | None:
        s = self.rules.speaking if self.agent == "speaking" else self.rules.thinking if self.agent == "thinking" else None
        return s if s is not None and s.enabled else None

    def _may_interrupt(self) -> str | None:
        """Why the agent's current speech may not be interrupted by voice (None: it may)."""
        if self.agent != "speaking":
            return None
        if not self.interruptible:
            return "uninterruptible"
        limit = self.rules.finish_remainder_ms
        if limit > 0 and self.remaining_ms is not None and self.remaining_ms <= limit:
            return "short_remainder"
        return None

    def _voiced(self) -> list[Action]:
        if self.state == RECOVERING:
            self.state = PAUSED  # the user speaks again
            return self._maybe_commit()
        if self.state in (PAUSED, PENDING):
            return self._maybe_commit()
        if self.state != LISTENING:
            return []
        settings = self._settings()
        if settings is None or self.run_ms < max(settings.debounce_ms, 1):
            return []
        why = self._may_interrupt()
        if why is not None:
            self.state, self.ignored_why = IGNORING, why
            return []
        self.onset = self.run_start if self.run_start is not None else self.now
        self.voiced_ms = self.run_ms
        self.words = 0
        if self.agent == "speaking":
            self.state = PAUSED
            return [Pause(self.onset), *self._maybe_commit()]
        self.state = PENDING
        return self._maybe_commit()

    def _maybe_commit(self) -> list[Action]:
        settings = self._settings()
        if settings is None:
            return []
        by_words = self.words >= max(1, settings.min_words)
        by_voice = self.voiced_ms >= settings.min_speech_ms and self.words >= settings.min_words
        if by_words or by_voice:
            return self._commit(settings)
        return []

    def _commit(self, settings: BargeInSettings) -> list[Action]:
        self.state = DONE
        return [Interrupt(settings.mode, "user_speaking", self.onset, self.now)]

    def _silence(self, ms: int) -> list[Action]:
        out: list[Action] = []
        was = self.silence_ms
        self.silence_ms += ms
        ended = was < self.rules.end_of_speech_ms <= self.silence_ms
        if ended and self.speaking:
            self.speaking = False
            out.append(UserStopped(self.last_voice_end))
        if ended:
            if self.state == PAUSED:
                self.state = RECOVERING
            elif self.state in (PENDING, IGNORING, DONE):
                self.state = LISTENING
                self.words = 0
        if self.state == RECOVERING and self.silence_ms >= max(self.rules.false_interruption_ms,
                                                                self.rules.end_of_speech_ms):
            self.state = LISTENING
            self.words = 0
            out.append(Resume(self.now))
        return out
