"""turnline: a durable, bidirectional session layer for streaming AI agents."""

__version__ = "0.1.0"

from .agent import Aborted, AbortSignal, Agent, CancelRequest, Turn  # noqa: E402

__all__ = ["Aborted", "AbortSignal", "Agent", "CancelRequest", "Turn", "__version__"]
