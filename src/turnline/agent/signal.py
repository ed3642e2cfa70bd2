"""AbortSignal: one abort per turn, visible to async code, sync code and callbacks."""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Callable, Generator


class Aborted(Exception):
    """Raised by :meth:`AbortSignal.raise_if_aborted` once the turn is cancelled."""


class AbortSignal:
    """Fires once. ``await signal`` waits for it; ``signal.aborted`` polls it;
    ``signal.wait(timeout)`` blocks a worker thread on it (for sync agents);
    listeners run synchronously at the moment it fires."""

    __slots__ = ("_reason", "_fired_ns", "_event", "_thread_event", "_listeners")

    def __init__(self) -> None:
        self._reason: str | None = None
        self._fired_ns: int | None = None
        self._event: asyncio.Event | None = None
        self._thread_event = threading.Event()
        self._listeners: list[Callable[[str], None]] = []

    @property
    def aborted(self) -> bool:
        return self._reason is not None

    @property
    def reason(self) -> str | None:
        return self._reason

    @property
    def fired_ns(self) -> int | None:
        """``time.monotonic_ns()`` when it fired (for latency measurements)."""
        return self._fired_ns

    def abort(self, reason: str = "cancelled") -> bool:
        """Fire the signal. Returns False if it had already fired (a no-op)."""
        if self._reason is not None:
            return False
        self._fired_ns = time.monotonic_ns()
        self._reason = reason
        self._thread_event.set()
        if self._event is not None:
            self._event.set()
        listeners, self._listeners = self._listeners, []
        for listener in listeners:
            listener(reason)
        return True

    def add_listener(self, listener: Callable[[str], None]) -> Callable[[], None]:
        """Call ``listener(reason)`` when the signal fires (at once if it has).
        Returns a function that removes the listener."""
        if self._reason is not None:
            listener(self._reason)
            return lambda: None
        self._listeners.append(listener)

        def remove() -> None:
            if listener in self._listeners:
                self._listeners.remove(listener)

        return remove

    def raise_if_aborted(self) -> None:
        if self._reason is not None:
            raise Aborted(self._reason)

    def wait(self, timeout: float | None = None) -> bool:
        """Block the calling thread until the signal fires; for sync agent code."""
        return self._thread_event.wait(timeout)

    def __await__(self) -> Generator[None, None, str]:
        if self._event is None:
            self._event = asyncio.Event()
            if self._reason is not None:
                self._event.set()
        yield from self._event.wait().__await__()
        return self._reason  # type: ignore[return-value]
