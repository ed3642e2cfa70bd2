"""turnline: a durable, bidirectional session layer for streaming AI agents."""

__version__ = "0.1.0"
