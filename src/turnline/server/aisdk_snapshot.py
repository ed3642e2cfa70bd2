"""What a client showed of a turn → a ``seen`` cursor (the AI SDK stop route).

``POST /api/chat/{id}/stop`` carries the client's message ``{messageId, parts}``;
:func:`snapshot_cursor` finds the last seq of the turn whose fold is a prefix of
those parts, so the cancel persists exactly what the client showed.
"""

from __future__ import annotations

from typing import Any

from ..core.fold import MessageFold
from ..core.session import TurnState

__all__ = ["snapshot_cursor"]


_TOOL_RANK = {"input-streaming": 0, "input-available": 1, "output-available": 2, "output-error": 2}


def _json_prefix(a: Any, b: Any) -> bool:
    """Whether ``b`` extends ``a`` as a streamed JSON value grows: strings by
    suffix, objects by keys, arrays by items (the partial tool input)."""
    if a is None:
        return True
    if isinstance(a, str) and isinstance(b, str):
        return b.startswith(a)
    if isinstance(a, dict) and isinstance(b, dict):
        return all(k in b and _json_prefix(v, b[k]) for k, v in a.items())
    if isinstance(a, list) and isinstance(b, list):
        return len(a) <= len(b) and all(_json_prefix(x, y) for x, y in zip(a, b))
    return a == b


def _is_tool(part: dict[str, Any]) -> bool:
    kind = part.get("type", "")
    return kind == "dynamic-tool" or kind.startswith("tool-")


def _part_relation(folded: dict[str, Any], shown: dict[str, Any]) -> str:
    """``equal``, ``prefix`` (the client saw more of this part) or ``no``."""
    kind = folded.get("type")
    if not isinstance(shown, dict) or shown.get("type") != kind:
        return "no"
    if kind in ("text", "reasoning"):
        a, b = folded.get("text", ""), shown.get("text")
        if not isinstance(b, str) or not b.startswith(a):
            return "no"
        return "equal" if a == b else "prefix"
    if _is_tool(folded):
        if folded.get("toolCallId") != shown.get("toolCallId"):
            return "no"
        mine, theirs = _TOOL_RANK.get(folded.get("state", "")), _TOOL_RANK.get(shown.get("state", ""))
        if mine is None or theirs is None or mine > theirs:
            return "no"
        if mine < theirs:
            return "prefix"
        if folded["state"] == "input-streaming":
            if folded.get("input") == shown.get("input"):
                return "equal"
            return "prefix" if _json_prefix(folded.get("input"), shown.get("input")) else "no"
        if folded["state"] != shown.get("state"):
            return "no"
        field = {"input-available": "input", "output-available": "output", "output-error": "errorText"}[folded["state"]]
        return "equal" if folded.get(field) == shown.get(field) else "no"
    if kind == "step-start":
        return "equal"
    # data-*, sources, files: what the fold keeps must be what the client shows
    same = all(shown.get(k) == v for k, v in folded.items() if k != "state")
    return "equal" if same else "no"


def _parts_relation(folded: list[dict[str, Any]], shown: list[dict[str, Any]]) -> str:
    if len(folded) > len(shown):
        return "no"
    result = "equal" if len(folded) == len(shown) else "prefix"
    for f, s in zip(folded, shown):
        rel = _part_relation(f, s)
        if rel == "no":
            return "no"
        if rel == "prefix":
            result = "prefix"
    return result


def snapshot_cursor(turn: TurnState, shown: list[dict[str, Any]]) -> tuple[int, bool]:
    """Map what a client showed of a turn (its message's ``parts``) to a ``seen``
    cursor: the last seq at which the fold of the turn's chunks is a prefix of
    ``shown``. Returns it and whether the fold there equals ``shown``.

    The fold at that seq is what ``seen`` persists, so the saved message is the
    client's, whichever of the stop and the end of the turn reached the server
    first. Parts the fold does not know (a newer SDK's) end the match there."""
    fold = MessageFold(turn.message_id)
    best = turn.start_seq
    exact = _parts_relation(fold.parts, shown) == "equal"
    for ev in turn.chunks:
        fold.add(ev.chunk)
        rel = _parts_relation(fold.parts, shown)
        if rel != "no":
            # Not stopping at the first mismatch: a data part replaced by id
            # matches again once the fold reaches the version the client shows.
            best, exact = ev.seq, rel == "equal"
    return best, exact
