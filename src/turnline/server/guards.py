"""Checks made on a request before anything else: where it comes from.

- :func:`guard_websocket_origin`: a browser's WebSocket from an origin that is
  not this server's own nor one listed with ``--cors-origin`` is refused with
  HTTP 403 before the upgrade. Every WebSocket route calls it first.
- :func:`cors_middleware`: CORS for the HTTP routes, for the listed origins only.
- :func:`dev_token_refusal`: the dev-mode token route serves only a browser on
  this machine talking to the server directly, never through a proxy (which
  is on loopback too, and would hand tokens to anyone).

Tokens are bearer tokens, not cookies, so these are a second line: a page on a
foreign origin must not be able to drive a user's session even with a token it
found, and a dev server must not mint tokens for the internet.
"""

from __future__ import annotations

import ipaddress
from typing import Any, Collection, Mapping
from urllib.parse import urlsplit

from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.responses import JSONResponse
from starlette.websockets import WebSocket

from ..protocol import ErrorCode

FORWARDING_HEADERS = ("forwarded", "x-forwarded-for", "x-real-ip")
# What browsers may send cross-origin: the token, JSON bodies, the SSE cursor.
CORS_REQUEST_HEADERS = ("authorization", "content-type", "last-event-id")
# What a cross-origin page may read: the AI SDK's stream marker and Retry-After of a 429.
CORS_EXPOSED_HEADERS = ("x-vercel-ai-ui-message-stream", "retry-after")
_DEFAULT_PORTS = {"http": 80, "https": 443, "ws": 80, "wss": 443}


def normalize_origin(origin: str) -> str:
    """``https://App.example.com/`` → ``https://app.example.com``; ``*`` stays.
    Raises ValueError for what is not ``scheme://host[:port]``."""
    origin = origin.strip()
    if origin == "*":
        return origin
    parts = urlsplit(origin)
    if parts.scheme not in ("http", "https") or not parts.hostname or parts.path not in ("", "/") \
            or parts.query or parts.fragment or parts.username is not None:
        raise ValueError(f"{origin!r} is not an origin: scheme://host[:port], e.g. https://app.example.com")
    port = parts.port
    host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
    return f"{parts.scheme}://{host}" + (f":{port}" if port and port != _DEFAULT_PORTS[parts.scheme] else "")


def _host_port(host_header: str) -> tuple[str, int | None]:
    parts = urlsplit("//" + host_header)
    try:
        return (parts.hostname or "").lower(), parts.port
    except ValueError:
        return "", None


def is_same_origin(origin: str, host_header: str | None) -> bool:
    """The page was served by this server: its origin's host and port are the
    request's ``Host`` (a Host without a port means the scheme's default)."""
    if not host_header:
        return False
    try:
        parts = urlsplit(origin)
        origin_port = parts.port or _DEFAULT_PORTS.get(parts.scheme)
    except ValueError:
        return False
    host, port = _host_port(host_header)
    if not parts.hostname or parts.hostname.lower() != host:
        return False
    return origin_port == port if port is not None else origin_port in (80, 443)


def origin_allowed(headers: Mapping[str, str], allowed: Collection[str]) -> bool:
    """No ``Origin`` (not a browser), this server's own origin, or a listed one."""
    origin = headers.get("origin")
    if origin is None:
        return True
    if "*" in allowed or is_same_origin(origin, headers.get("host")):
        return True
    try:
        return normalize_origin(origin) in allowed
    except ValueError:  # "null" (a sandboxed frame, a file:// page) and other non-origins
        return False


async def guard_websocket_origin(ws: WebSocket, allowed: Collection[str]) -> bool:
    """True when the WebSocket may go on; else it has been refused with a 403
    before the upgrade (the ASGI denial response where the server supports it,
    else a close before accept, which servers answer with 403)."""
    if origin_allowed(ws.headers, allowed):
        return True
    message = f"origin {ws.headers.get('origin')!r} is not allowed (turnline serve --cors-origin)"
    if "websocket.http.response" in ws.scope.get("extensions", {}):
        await ws.send_denial_response(JSONResponse({"error": {"code": ErrorCode.FORBIDDEN, "message": message}},
                                                   status_code=403))
    else:
        await ws.close(code=1008, reason="origin not allowed")
    return False


def cors_middleware(allowed: Collection[str]) -> list[Middleware]:
    """Starlette middleware for the HTTP routes; none when no origin is listed."""
    if not allowed:
        return []
    return [Middleware(CORSMiddleware, allow_origins=sorted(allowed), allow_methods=["GET", "POST"],
                       allow_headers=list(CORS_REQUEST_HEADERS), expose_headers=list(CORS_EXPOSED_HEADERS),
                       allow_credentials=False, max_age=600)]


def _is_loopback_address(host: str | None) -> bool:
    if not host:
        return False
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def is_loopback_name(host: str) -> bool:
    return host == "localhost" or host.endswith(".localhost") or _is_loopback_address(host)


def dev_token_refusal(scope: Mapping[str, Any], headers: Mapping[str, str]) -> str | None:
    """Why the dev token route must not answer this request, or None.

    Refused: a peer not on loopback; any forwarding header (a reverse proxy on
    this machine is a loopback peer serving the whole internet); a ``Host``
    that is not a loopback name (a DNS-rebinding page that resolves its own
    name to 127.0.0.1 is a loopback peer too)."""
    # Forwarding headers first: uvicorn replaces a loopback peer's address with
    # the X-Forwarded-For one, and "through a proxy" is the clearer answer.
    present = [h for h in FORWARDING_HEADERS if h in headers]
    if present:
        return f"dev tokens are not served through a proxy (the request carries {', '.join(present)})"
    client = scope.get("client")
    if not client or not _is_loopback_address(client[0]):
        return "dev tokens are served to loopback clients only"
    host, _port = _host_port(headers.get("host", ""))
    if not is_loopback_name(host):
        return f"dev tokens are served only to a page opened on a loopback address, not {host or 'no host'!r}"
    return None
