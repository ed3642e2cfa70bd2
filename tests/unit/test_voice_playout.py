"""The playout map (audio frames → text heard, to the word) and the message as heard (pure)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from turnline.protocol import Message
from turnline.voice.playout import Mark, PlayoutMap, Synthesis, align_words, heard_message, spoken_text
from turnline.voice.text import words

MS = 16  # samples per ms at 16 kHz


def pcm(ms: int) -> bytes:
    return bytes(ms * MS * 2)


def test_words_take_the_audio_between_their_marks() -> None:
    text = "Hello big world."
    # the engine reports each word's start; "." closes the clause at 900 ms
    synth = Synthesis(pcm(1000), [Mark(0, 0), Mark(6, 300 * MS), Mark(10, 500 * MS), Mark(16, 900 * MS)])
    ws = align_words(text, 100, 50 * MS, synth)
    assert [(w.start, w.end) for w in ws] == [(100, 105), (106, 109), (110, 116)]
    assert [(w.audio_start // MS, w.audio_end // MS) for w in ws] == [(50, 350), (350, 550), (550, 950)]


def test_words_an_engine_merged_are_heard_together() -> None:
    # espeak reports "I am" as one word event at "I"
    synth = Synthesis(pcm(600), [Mark(0, 0), Mark(5, 300 * MS)])
    ws = align_words("I am fine", 0, 0, synth)
    assert [w.audio_end // MS for w in ws] == [300, 300, 600]


def test_without_marks_the_audio_is_shared_by_characters() -> None:
    ws = align_words("ab cd", 0, 0, Synthesis(pcm(500)))
    assert [(w.audio_start // MS, w.audio_end // MS) for w in ws] == [(0, 300), (300, 500)]


def built_map() -> tuple[PlayoutMap, str]:
    spoken = "One two. Three"
    m = PlayoutMap()
    m.add(0, "One two. ", Synthesis(pcm(430), [Mark(0, 0), Mark(4, 200 * MS), Mark(8, 400 * MS)]))
    m.add(9, "Three", Synthesis(pcm(300), [Mark(0, 0)]))
    m.finish()
    return m, spoken


def test_heard_text_is_cut_at_the_last_word_whose_audio_has_played() -> None:
    m, spoken = built_map()
    heard = {ms: spoken[:m.heard_end(ms)] for ms in (0, 199, 200, 399, 400, 429, 430, 729, 730, 10_000)}
    assert heard == {0: "", 199: "", 200: "One", 399: "One", 400: "One two.", 429: "One two.",
                     430: "One two.", 729: "One two.", 730: "One two. Three", 10_000: "One two. Three"}


def test_frames_are_20_ms_and_carry_their_span_and_the_heard_cut() -> None:
    m, spoken = built_map()
    assert m.total_ms == 740 and m.frames == 37  # 730 ms padded to whole frames
    frames = [m.frame(i) for i in range(m.frames)]
    assert all(len(f.pcm) == 640 and f.ms == 20 * f.seq for f in frames)
    assert all(f.heard_end == m.heard_end(f.ms + 20) for f in frames)
    assert (frames[0].span_start, frames[0].span_end) == (0, 3)  # "One"
    assert spoken[frames[10].span_start:frames[10].span_end] == "two."
    assert (frames[21].span_start, frames[21].span_end) == (9, 14)  # "Three" starts at 430 ms
    assert frames[36].heard_end == len(spoken)
    with pytest.raises(IndexError):
        m.frame(37)


def test_clauses_must_come_in_text_order() -> None:
    m, _ = built_map()
    m2 = PlayoutMap()
    m2.add(10, "later", Synthesis(pcm(100)))
    with pytest.raises(ValueError):
        m2.add(0, "earlier", Synthesis(pcm(100)))
    with pytest.raises(RuntimeError):
        m.add(20, "more", Synthesis(pcm(10)))


clause_st = st.lists(st.text(st.sampled_from("abc é"), min_size=1, max_size=20), min_size=1, max_size=6)


@st.composite
def turns(draw):  # type: ignore[no-untyped-def]
    # as the splitter cuts them: after a space or newline (the last one may end anywhere)
    clauses = draw(clause_st)
    clauses = [c.rstrip() + draw(st.sampled_from([" ", "\n"])) for c in clauses[:-1]] + clauses[-1:]
    m = PlayoutMap()
    spoken = ""
    for text in clauses:
        total = draw(st.integers(0, 3000)) * MS
        starts = [s for s, _ in words(text)]
        if draw(st.booleans()):
            samples = sorted(draw(st.lists(st.integers(0, total), min_size=len(starts) + 1,
                                           max_size=len(starts) + 1)))
            marks = [Mark(c, a) for c, a in zip(starts + [len(text)], samples)]
            synth = Synthesis(bytes(total * 2), draw(st.permutations(marks)))
        else:
            synth = Synthesis(bytes(total * 2))
        m.add(len(spoken), text, synth)
        spoken += text
    m.finish()
    return m, spoken


@settings(max_examples=300, deadline=None)
@given(turns(), st.lists(st.integers(0, 20_000), min_size=1, max_size=8))
def test_heard_text_is_a_prefix_ending_at_a_word_and_grows_with_playout(turn, positions) -> None:  # type: ignore[no-untyped-def]
    m, spoken = turn
    ends = {e for _, e in words(spoken)} | {0}
    last = -1
    for ms in sorted(positions):
        cut = m.heard_end(ms)
        assert cut in ends  # to the word
        assert cut >= last  # never shrinks
        last = cut
        # exactly the words whose audio has played to its end
        assert cut == max([w.end for w in m.words if w.audio_end <= ms * MS], default=0)
    assert spoken[:m.heard_end(10 ** 9)] == spoken.rstrip()
    for i in range(m.frames):
        f = m.frame(i)
        assert f.heard_end == m.heard_end(f.ms + 20)
        assert f.span_start <= f.span_end


def message(*parts: dict) -> Message:
    return Message(id="reply-1", role="assistant", parts=list(parts), parent_id="msg-1",
                   metadata={"interrupted": {"reason": "cancelled", "seen": None}})


def test_heard_message_keeps_the_heard_words_and_every_other_part() -> None:
    tool = {"type": "tool-weather", "toolCallId": "c1", "state": "output-available", "input": {}, "output": 1}
    msg = message({"type": "text", "text": "Let me check.", "state": "done"}, tool,
                  {"type": "text", "text": "It is sunny today.", "state": "done"})
    spoken = spoken_text(msg.parts)
    assert spoken == "Let me check.\nIt is sunny today."
    cut = spoken.index("sunny") + len("sunny")
    heard = heard_message(msg, cut, 1234)
    assert heard.parts == [msg.parts[0], tool, {"type": "text", "text": "It is sunny", "state": "done"}]
    assert heard.metadata == {"interrupted": {"reason": "cancelled", "seen": None},
                              "voice": {"history": "keep-heard", "heard_ms": 1234, "heard_chars": cut,
                                        "unspoken": " today."}}
    early = heard_message(msg, 3, 10)
    assert early.parts == [{"type": "text", "text": "Let", "state": "done"}, tool]
    assert early.metadata["voice"]["unspoken"] == " me check.\nIt is sunny today."
    nothing = heard_message(msg, 0, 0)
    assert nothing.parts == [tool]
    kept = heard_message(msg, cut, 1234, "keep-generated")
    assert kept.parts == msg.parts and kept.metadata["voice"]["history"] == "keep-generated"
    with pytest.raises(ValueError):
        heard_message(msg, 0, 0, "keep-all")
