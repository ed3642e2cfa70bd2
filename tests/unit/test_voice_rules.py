"""Barge-in rules (pure state machine, driven by the input audio's clock)."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from turnline.voice.rules import (
    BargeIn, BargeInRules, BargeInSettings, Interrupt, Pause, Resume, UserStarted, UserStopped,
)

F = 20  # ms per VAD frame


def run(b: BargeIn, pattern: str) -> list:
    """Feed VAD frames: '1' voiced, '0' silent, '.' ten silent frames."""
    out: list = []
    for ch in pattern:
        if ch == ".":
            for _ in range(10):
                out += b.vad(False, F)
        else:
            out += b.vad(ch == "1", F)
    return out


def speaking(rules: BargeInRules | None = None, **kw) -> BargeIn:  # type: ignore[no-untyped-def]
    b = BargeIn(rules or BargeInRules())
    assert b.set_agent("speaking", **kw) == []
    return b


def kinds(actions: list) -> list[str]:
    return [type(a).__name__ for a in actions]


def test_voice_pauses_speech_at_once_and_interrupts_after_min_speech() -> None:
    b = speaking(BargeInRules(speaking=BargeInSettings(min_speech_ms=100)))
    assert run(b, "00") == []
    assert run(b, "1") == [Pause(onset_ms=40)]  # the first voiced frame: no debounce
    assert run(b, "11") == [UserStarted(onset_ms=40)]
    assert run(b, "1") == []
    assert run(b, "1") == [Interrupt("response", "user_speaking", 40, 140)]  # 100 ms of voice
    assert run(b, "1111") == []  # once


def test_debounce_needs_continuous_voice() -> None:
    b = speaking(BargeInRules(speaking=BargeInSettings(debounce_ms=60, min_speech_ms=1000)))
    assert run(b, "110110") == []  # runs of 40 ms: no pause
    assert run(b, "11") == []
    assert run(b, "1") == [Pause(onset_ms=120), UserStarted(onset_ms=120)]  # onset: the start of the run


def test_a_false_interruption_resumes_after_the_window_of_silence() -> None:
    rules = BargeInRules(speaking=BargeInSettings(min_speech_ms=300), false_interruption_ms=600,
                         end_of_speech_ms=200)
    b = speaking(rules)
    assert kinds(run(b, "11")) == ["Pause"]  # a cough
    out = run(b, "0" * 29)
    assert out == []  # 580 ms of silence: still waiting for words
    assert run(b, "0") == [Resume(at_ms=640)]
    assert b.state == "listening"
    # and it can pause again later
    assert kinds(run(b, "1")) == ["Pause"]


def test_words_during_the_window_make_it_a_real_interruption() -> None:
    rules = BargeInRules(speaking=BargeInSettings(min_speech_ms=300), false_interruption_ms=600,
                         end_of_speech_ms=200)
    b = speaking(rules)
    run(b, "11" + "0" * 15)
    assert b.state == "recovering"
    assert b.transcript("", final=False) == []
    assert b.transcript("wait", final=True) == [Interrupt("response", "user_speaking", 0, 340)]
    assert run(b, "." * 5) == []  # no resume after an interruption


def test_min_words_holds_the_pause_until_the_transcript_has_them() -> None:
    b = speaking(BargeInRules(speaking=BargeInSettings(min_speech_ms=100, min_words=2)))
    assert kinds(run(b, "1" * 20)) == ["Pause", "UserStarted"]  # 400 ms of voice, no words yet
    assert b.transcript("stop") == []
    assert kinds(b.transcript("stop that")) == ["Interrupt"]


def test_uninterruptible_speech_is_neither_paused_nor_interrupted() -> None:
    b = speaking(interruptible=False)
    assert kinds(run(b, "1" * 50)) == ["UserStarted"]
    assert b.transcript("hello there you") == []
    assert b.ignored_why == "uninterruptible"
    # once the user's voice has ended, the next utterance is judged afresh
    assert kinds(run(b, "." * 3)) == ["UserStopped"]
    b.set_agent("speaking", interruptible=True)
    assert kinds(run(b, "1")) == ["Pause"]


def test_speech_that_turns_uninterruptible_or_nearly_done_while_paused_resumes() -> None:
    b = speaking(BargeInRules(speaking=BargeInSettings(min_speech_ms=1000)))
    assert kinds(run(b, "1")) == ["Pause"]
    assert b.set_agent("speaking", interruptible=False) == [Resume(20, "uninterruptible")]  # the mark came late
    assert b.transcript("stop it now") == []
    near = speaking(BargeInRules(finish_remainder_ms=500, speaking=BargeInSettings(min_speech_ms=1000)))
    assert kinds(run(near, "1")) == ["Pause"]
    assert near.set_agent("speaking", remaining_ms=900) == []
    assert near.set_agent("speaking", remaining_ms=400) == [Resume(20, "short_remainder")]
    assert near.ignored_why == "short_remainder"


def test_a_short_remainder_is_let_finish() -> None:
    rules = BargeInRules(finish_remainder_ms=800)
    b = speaking(rules, remaining_ms=500)
    assert kinds(run(b, "1" * 30)) == ["UserStarted"]
    assert b.ignored_why == "short_remainder"
    b2 = speaking(rules, remaining_ms=1500)
    assert kinds(run(b2, "1")) == ["Pause"]
    b3 = speaking(rules, remaining_ms=None)  # the answer is not all synthesised yet: unknown
    assert kinds(run(b3, "1")) == ["Pause"]


def test_thinking_has_its_own_settings_and_nothing_to_pause() -> None:
    rules = BargeInRules(speaking=BargeInSettings(min_speech_ms=100, mode="speech"),
                         thinking=BargeInSettings(min_speech_ms=200, mode="response"))
    b = BargeIn(rules)
    b.set_agent("thinking")
    out = run(b, "1" * 9)
    assert kinds(out) == ["UserStarted"]  # no pause: nothing plays
    assert run(b, "1") == [Interrupt("response", "user_speaking", 0, 200)]
    s = BargeIn(rules)
    s.set_agent("speaking")
    assert kinds(run(s, "11111")) == ["Pause", "UserStarted", "Interrupt"]
    assert s.state == "done"
    off = BargeIn(BargeInRules(thinking=BargeInSettings(enabled=False)))
    off.set_agent("thinking")
    assert kinds(run(off, "1" * 50)) == ["UserStarted"]
    assert off.transcript("stop it now") == []


def test_speech_starting_while_the_user_talks_pauses_at_once() -> None:
    b = BargeIn(BargeInRules(thinking=BargeInSettings(min_speech_ms=10_000)))
    b.set_agent("thinking")
    run(b, "1" * 5)
    assert b.state == "pending"
    assert b.set_agent("speaking") == [Pause(onset_ms=0)]


def test_transcripts_alone_interrupt_a_speaking_agent() -> None:
    b = speaking(BargeInRules(speaking=BargeInSettings(min_words=2)))
    assert b.transcript("hey") == []
    assert b.transcript("hey you") == [Interrupt("response", "user_speaking", 0, 0)]
    idle = BargeIn()
    assert idle.transcript("hello there") == []  # nothing to interrupt


def test_utterances_are_segmented_for_speech_recognition() -> None:
    b = BargeIn(BargeInRules(start_of_speech_ms=60, end_of_speech_ms=100))
    assert run(b, "11") == []  # too short to be speech
    assert run(b, "0111") == [UserStarted(onset_ms=60)]
    assert run(b, "1001") == []  # a short gap is inside the utterance
    assert run(b, "0000") == []
    assert run(b, "0") == [UserStopped(at_ms=200)]  # the end of the last voiced frame


def test_advance_is_silence() -> None:
    b = speaking(BargeInRules(false_interruption_ms=500, end_of_speech_ms=200))
    run(b, "1")
    assert b.advance(499) == []
    assert b.advance(1) == [Resume(at_ms=520)]


events = st.one_of(
    st.tuples(st.just("vad"), st.booleans()),
    st.tuples(st.just("silence"), st.integers(1, 2000)),
    st.tuples(st.just("words"), st.integers(0, 4)),
    st.tuples(st.just("agent"), st.sampled_from(["idle", "thinking", "speaking"]), st.booleans(),
              st.sampled_from([None, 100, 5000])),
)


@settings(max_examples=500, deadline=None)
@given(st.lists(events, max_size=200), st.integers(0, 100), st.integers(0, 600), st.integers(0, 3),
       st.integers(0, 2000))
def test_rules_invariants(script, debounce, min_speech, min_words, window) -> None:  # type: ignore[no-untyped-def]
    rules = BargeInRules(speaking=BargeInSettings(debounce_ms=debounce, min_speech_ms=min_speech,
                                                  min_words=min_words),
                         thinking=BargeInSettings(min_speech_ms=min_speech, min_words=min_words),
                         false_interruption_ms=window, finish_remainder_ms=1000)
    b = BargeIn(rules)
    paused = False
    since_pause_words = 0
    for ev in script:
        if ev[0] == "vad":
            out = b.vad(ev[1], F)
        elif ev[0] == "silence":
            out = b.advance(ev[1])
        elif ev[0] == "words":
            since_pause_words = max(since_pause_words, ev[1])
            out = b.transcript(" ".join(["w"] * ev[1]))
        else:
            out = b.set_agent(ev[1], interruptible=ev[2], remaining_ms=ev[3])
            if ev[1] != "speaking":
                paused = False
            since_pause_words = 0
        for a in out:
            if isinstance(a, Pause):
                assert not paused and b.agent == "speaking"
                assert b.interruptible and not (b.remaining_ms is not None and b.remaining_ms <= 1000)
                paused, since_pause_words = True, 0
            elif isinstance(a, Resume):
                assert paused, "resume without a pause"
                assert since_pause_words < max(1, min_words), "words came, yet it resumed"
                paused = False
            elif isinstance(a, Interrupt):
                assert b.agent in ("speaking", "thinking")
                assert b.voiced_ms >= min_speech or b.words >= max(1, min_words)
                assert b.words >= min_words
                assert not (b.agent == "speaking" and not b.interruptible)
                paused = False
        if b.state == "done":
            assert not paused
