"""The Python client: :class:`ClientTransport` (one session over the WebSocket,
with automatic resume) and :class:`View` (the session as a screen shows it)."""

from .transport import ClientTransport, TurnlineError
from .view import Freeze, GapError, View, message_text

__all__ = ["ClientTransport", "Freeze", "GapError", "TurnlineError", "View", "message_text"]
