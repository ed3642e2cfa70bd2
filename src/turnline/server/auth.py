"""JWT tokens and capabilities. The client id is the token's ``sub``, nothing else."""

from __future__ import annotations

import os
import re
import secrets
import time
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Iterable, Mapping

import jwt

from ..protocol import is_valid_id

ACTIONS = ("subscribe", "publish", "cancel", "cancel-any", "admin")
ALGORITHM = "HS256"


class AuthError(Exception):
    pass


@dataclass(frozen=True)
class Principal:
    client_id: str
    caps: Mapping[str, frozenset[str]]

    def can(self, session: str, action: str) -> bool:
        for pattern, actions in self.caps.items():
            if _matches(pattern, session) and (action in actions or "admin" in actions):
                return True
            if action == "cancel" and _matches(pattern, session) and "cancel-any" in actions:
                return True
        return False


@lru_cache(maxsize=1024)
def _pattern_re(pattern: str) -> re.Pattern[str]:
    # Only '*' is a wildcard. fnmatch would also expand '?' and '[…]', so a
    # token pattern like 'room-?*' or '[a-z]*' would grant more than it says.
    return re.compile(".*".join(map(re.escape, pattern.split("*"))), re.DOTALL)


def _matches(pattern: str, session: str) -> bool:
    if pattern == "*":
        return True
    if "*" not in pattern:
        return pattern == session
    return _pattern_re(pattern).fullmatch(session) is not None


def parse_caps(specs: Iterable[str]) -> dict[str, list[str]]:
    """``'chat-*:subscribe,publish,cancel'`` → ``{'chat-*': [...]}``."""
    caps: dict[str, list[str]] = {}
    for spec in specs:
        pattern, sep, actions = spec.rpartition(":")
        if not sep or not pattern:
            raise AuthError(f"capability {spec!r} is not PATTERN:ACTION[,ACTION…]")
        names = [a.strip() for a in actions.split(",") if a.strip()]
        if not names:
            raise AuthError(f"capability {spec!r} names no action; use PATTERN:ACTION[,ACTION…] "
                            f"with actions among {', '.join(ACTIONS)}")
        unknown = [a for a in names if a not in ACTIONS]
        if unknown:
            raise AuthError(f"unknown action(s) {', '.join(map(repr, unknown))} in {spec!r}; "
                            f"use {', '.join(ACTIONS)}")
        caps.setdefault(pattern, []).extend(n for n in names if n not in caps.get(pattern, []))
    return caps


def mint(secret: str, sub: str, caps: Mapping[str, list[str]], ttl_s: int = 3600) -> str:
    now = int(time.time())
    return jwt.encode({"sub": sub, "iat": now, "exp": now + ttl_s, "cap": dict(caps)}, secret, algorithm=ALGORITHM)


def verify(secret: str, token: str) -> Principal:
    try:
        claims = jwt.decode(token, secret, algorithms=[ALGORITHM], options={"require": ["sub", "exp"]})
    except jwt.ExpiredSignatureError:
        raise AuthError("token expired") from None
    except jwt.PyJWTError as exc:
        raise AuthError(f"invalid token: {exc}") from None
    sub = claims.get("sub")
    cap = claims.get("cap", {})
    if not is_valid_id(sub):  # the client id is an id like any other (it is named by cancel filters)
        raise AuthError("token has no valid sub")
    if not isinstance(cap, dict) or not all(isinstance(v, list) for v in cap.values()):
        raise AuthError("token cap must map session patterns to lists of actions")
    return Principal(sub, {str(k): frozenset(map(str, v)) for k, v in cap.items()})


def resolve_secret(explicit: str | None = None, dev_dir: str | os.PathLike[str] = ".turnline") -> tuple[str, str]:
    """The signing secret and where it came from: ``--secret``, ``TURNLINE_SECRET``,
    or (dev mode) a random one kept in ``.turnline/dev-secret`` so that
    ``turnline token`` mints tokens the local server accepts."""
    if explicit:
        return explicit, "--secret"
    env = os.environ.get("TURNLINE_SECRET")
    if env:
        return env, "TURNLINE_SECRET"
    path = Path(dev_dir) / "dev-secret"
    if path.exists():
        return path.read_text().strip(), str(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    value = secrets.token_urlsafe(32)
    path.write_text(value + "\n")
    path.chmod(0o600)
    return value, str(path)
