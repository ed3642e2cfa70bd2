"""Clause splitting for streaming speech (pure)."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from turnline.voice.text import ClauseSplitter, words


def split(text: str, pieces: list[int] | None = None, **kw: int) -> list[str]:
    s = ClauseSplitter(**kw)
    out = []
    if pieces is None:
        out += s.feed(text)
    else:
        i = 0
        for n in pieces:
            out += s.feed(text[i:i + n])
            i += n
        out += s.feed(text[i:])
    out += s.flush()
    return [c.text for c in out]


def test_sentences_end_at_punctuation_followed_by_a_space() -> None:
    assert split("Hello there. How are you? Fine!") == ["Hello there. ", "How are you? ", "Fine!"]


def test_a_clause_waits_for_the_character_after_its_punctuation() -> None:
    s = ClauseSplitter()
    assert s.feed("It is 3.") == []  # "3." may be "3.14"
    assert s.feed("14 today.") == []  # the next character decides
    assert [c.text for c in s.feed(" Then")] == ["It is 3.14 today. "]
    assert [c.text for c in s.flush()] == ["Then"]


def test_decimals_abbreviations_and_closing_quotes() -> None:
    assert split("Pi is 3.14 roughly. Dr. Who said \"go.\" Then left.") == [
        "Pi is 3.14 roughly. ", "Dr. Who said \"go.\" ", "Then left."]


def test_soft_breaks_only_once_the_clause_is_long_enough() -> None:
    text = "Well, that is a long enough opening clause, so it splits; ok."
    assert split(text, soft_min_chars=24) == ["Well, that is a long enough opening clause, ", "so it splits; ok."]


def test_newlines_end_clauses_and_long_runs_split_at_a_space() -> None:
    assert split("one\ntwo") == ["one\n", "two"]
    assert split("aaaa bbbb cccc dddd", max_chars=10) == ["aaaa bbbb ", "cccc dddd"]
    assert split("x" * 25, max_chars=10) == ["x" * 10, "x" * 10, "x" * 5]


def test_offsets_tile_the_stream() -> None:
    s = ClauseSplitter()
    clauses = s.feed("First one. Second, ") + s.feed("third.") + s.flush()
    text = "First one. Second, third."
    assert [(c.start, c.end) for c in clauses] == [(0, 11), (11, 25)]
    assert all(text[c.start:c.end] == c.text for c in clauses)


def test_words() -> None:
    assert words("  Hi, you\tthere ") == [(2, 5), (6, 9), (10, 15)]


alphabet = st.sampled_from(list("ab .,!?;:\n\"')3") + ["—", "…", "é"])


@settings(max_examples=400, deadline=None)
@given(st.text(alphabet, max_size=120), st.lists(st.integers(0, 12), max_size=20),
       st.integers(1, 30), st.integers(2, 60))
def test_clauses_do_not_depend_on_how_the_text_was_chunked(text: str, pieces: list[int], soft: int,
                                                             max_chars: int) -> None:
    whole = split(text, soft_min_chars=soft, max_chars=max_chars)
    chunked = split(text, pieces, soft_min_chars=soft, max_chars=max_chars)
    assert chunked == whole
    assert "".join(whole) == text
    assert all(len(c) <= max_chars for c in whole)
    assert all(c for c in whole)
