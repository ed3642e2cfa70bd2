"""The server-side runtime where agent code runs."""

from .runtime import CommandError, Runtime, RuntimeConfig, SessionHub
from .signal import Aborted, AbortSignal
from .turn import Agent, CancelRequest, Turn, as_agent

__all__ = ["Aborted", "AbortSignal", "Agent", "CancelRequest", "CommandError", "Runtime", "RuntimeConfig",
           "SessionHub", "Turn", "as_agent"]
