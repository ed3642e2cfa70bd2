"""Running turnline inside an existing Starlette or FastAPI app.

``app.mount("/chat", turnline_app)`` routes requests under ``/chat`` to
turnline, but Starlette does not run a mounted app's lifespan, and turnline's
opens its store and starts its runtime. :func:`mount` does both: it mounts the
app and chains turnline's lifespan around the host's. Alternatively enter
``turnline_app.lifespan(app)`` from the host's own lifespan. See docs/embedding.md.
"""

from __future__ import annotations

import contextlib
from typing import Any, AsyncIterator

from .app import TurnlineApp


def mount(host: Any, path: str, turnline_app: TurnlineApp, *, name: str | None = None) -> None:
    """Mount ``turnline_app`` at ``path`` in ``host`` (a Starlette or FastAPI
    app, before it starts serving) and run turnline's lifespan with the host's:
    turnline starts first (so the host's startup may use it) and stops last."""
    host.mount(path, turnline_app, name=name)
    router = host.router
    host_lifespan = router.lifespan_context

    @contextlib.asynccontextmanager
    async def lifespan(app: Any) -> AsyncIterator[Any]:
        async with turnline_app.lifespan(app):
            async with host_lifespan(app) as state:
                yield state

    router.lifespan_context = lifespan
