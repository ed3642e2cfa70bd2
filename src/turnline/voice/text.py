"""Streaming text → clauses for speech, and the words of a text. Pure, no I/O.

The splitter cuts the agent's text as it streams so speech can start before
the answer is complete. Its cuts depend only on the text, never on how the
text was chunked: every decision that needs the next character waits for it.
Clauses tile the stream exactly (``stream[c.start:c.end] == c.text``, no gap,
no overlap), so offsets into the spoken text stay exact.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

SENTENCE_END = ".!?…"
SOFT_BREAK = ",;:—"
CLOSERS = "\"'”’)]}»"
# Words ending in "." that do not end a sentence.
ABBREVIATIONS = frozenset({"mr.", "mrs.", "ms.", "dr.", "prof.", "sr.", "jr.", "st.", "vs.", "e.g.", "i.e.", "no."})

_WORD = re.compile(r"\S+")


@dataclass(frozen=True, slots=True)
class Clause:
    start: int  # offset of the clause's first character in the stream
    end: int
    text: str

    @property
    def speakable(self) -> bool:
        return bool(self.text.strip())


def words(text: str) -> list[tuple[int, int]]:
    """``(start, end)`` of every word (a run of non-space characters)."""
    return [m.span() for m in _WORD.finditer(text)]


class ClauseSplitter:
    """Feed text as it streams; take complete clauses.

    A clause ends after a newline; after sentence punctuation (``. ! ? …``,
    with any closing quotes or brackets) followed by a space, unless the word
    is a known abbreviation; after ``, ; : —`` followed by a space once the
    clause is at least ``soft_min_chars`` long (so speech starts sooner); and,
    failing all that, at the last space before ``max_chars``.
    """

    def __init__(self, soft_min_chars: int = 24, max_chars: int = 200):
        if max_chars < 2 or soft_min_chars < 1:
            raise ValueError("max_chars must be at least 2 and soft_min_chars at least 1")
        self.soft_min_chars = soft_min_chars
        self.max_chars = max_chars
        self._buf = ""  # the stream from offset ``_base`` on
        self._base = 0
        self._start = 0  # start of the clause being built (stream offset)
        self._scan = 0  # next stream offset to examine

    @property
    def fed(self) -> int:
        """How many characters were fed so far."""
        return self._base + len(self._buf)

    def feed(self, text: str) -> list[Clause]:
        self._buf += text
        return self._cut(final=False)

    def flush(self) -> list[Clause]:
        """End of the stream: the rest is the last clause."""
        out = self._cut(final=True)
        if self.fed > self._start:
            out.append(self._clause(self.fed))
        self._scan = self.fed
        return out

    def _char(self, offset: int) -> str:
        return self._buf[offset - self._base]

    def _clause(self, end: int) -> Clause:
        clause = Clause(self._start, end, self._buf[self._start - self._base:end - self._base])
        self._start = end
        # drop what no later decision needs
        self._buf = self._buf[end - self._base:]
        self._base = end
        return clause

    def _cut(self, final: bool) -> list[Clause]:
        out: list[Clause] = []
        i = self._scan
        fed = self.fed
        while i < fed:
            c = self._char(i)
            if c == "\n":
                out.append(self._clause(i + 1))
                i += 1
                continue
            if c in SENTENCE_END or c in SOFT_BREAK:
                j = i + 1
                while j < fed and self._char(j) in CLOSERS:
                    j += 1
                if j >= fed and not final:
                    break  # the next character decides; wait for it
                end = min(j + 1, fed)
                if (j >= fed or self._char(j).isspace()) and end - self._start <= self.max_chars:
                    if c in SENTENCE_END and not self._abbreviation(i):
                        out.append(self._clause(end))
                        i = end
                        continue
                    if c in SOFT_BREAK and i + 1 - self._start >= self.soft_min_chars:
                        out.append(self._clause(end))
                        i = end
                        continue
            if i + 1 - self._start >= self.max_chars:
                window = self._buf[self._start - self._base:i + 1 - self._base]
                space = max(window.rfind(" "), window.rfind("\t"))
                end = self._start + space + 1 if space > 0 else i + 1
                out.append(self._clause(end))
                i = end
                continue
            i += 1
        self._scan = i
        return out

    def _abbreviation(self, dot: int) -> bool:
        if self._char(dot) != ".":
            return False
        k = dot
        while k > self._start and not self._char(k - 1).isspace():
            k -= 1
        word = self._buf[k - self._base:dot + 1 - self._base].lower().lstrip("\"'“‘([{«")
        return word in ABBREVIATIONS
