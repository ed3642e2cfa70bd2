"""Fakes that speak real wire formats over real sockets (see providers.py)."""
