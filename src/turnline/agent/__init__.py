"""The server-side runtime where agent code runs."""

from .adapters import as_agent
from .runtime import CommandError, Runtime, RuntimeConfig, SessionHub
from .signal import Aborted, AbortSignal
from .turn import Agent, CancelRequest, Turn

__all__ = ["Aborted", "AbortSignal", "Agent", "CancelRequest", "CommandError", "Runtime", "RuntimeConfig",
           "SessionHub", "Turn", "as_agent"]
