"""Tokens signed by an identity provider's keys, published as a JWKS.

The key set is fetched with httpx (asynchronously: a fetch never blocks the
event loop) and cached. A token whose ``kid`` is cached is checked at once,
with no await on I/O. An unknown ``kid`` (the provider rotated its keys)
refetches the set, but at most once per ``min_refresh_s`` however many such
tokens arrive: a stream of made-up ``kid`` values cannot make the server hammer
the provider. The set is also refetched when its cache lifetime
(``Cache-Control: max-age``, clamped) runs out; if that fetch fails the cached
keys stay in use.

Only asymmetric keys are taken from the set (a symmetric ``oct`` key is
skipped), and each key's algorithms follow from its type, narrowed to its
``alg`` when the set names one.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
from typing import Any, Callable

import httpx
import jwt
from jwt import PyJWK

from .auth import RSA_ALGORITHMS, AuthError, ClaimRules, KeysUnavailable, Principal, algorithms_for_key

log = logging.getLogger("turnline.auth")

ASYMMETRIC_ALGORITHMS = RSA_ALGORITHMS | {"ES256", "ES384", "ES512", "ES256K", "EdDSA"}
MAX_JWKS_BYTES = 1 << 20
MAX_KEYS = 100
_MAX_AGE = re.compile(r"(?:^|[,\s])max-age=(\d+)")


class JwksVerifier:
    def __init__(self, url: str, rules: ClaimRules = ClaimRules(), *, min_refresh_s: float = 30.0,
                 default_max_age_s: float = 600.0, max_age_cap_s: float = 86_400.0, timeout_s: float = 5.0,
                 clock: Callable[[], float] = time.monotonic):
        self.url = url
        self.rules = rules
        self.algorithms = ASYMMETRIC_ALGORITHMS
        self.min_refresh_s = min_refresh_s
        self.default_max_age_s = default_max_age_s
        self.max_age_cap_s = max_age_cap_s
        self.timeout_s = timeout_s
        self.clock = clock
        self.fetches = 0  # attempts, successful or not
        self._keys: dict[str | None, tuple[Any, frozenset[str]]] = {}
        self._have_keys = False
        self._expires_at = 0.0
        self._tried_at: float | None = None
        self._last_error = ""
        self._inflight: asyncio.Future[None] | None = None

    def describe(self) -> str:
        return f"JWKS {self.url}"

    async def verify(self, token: str) -> Principal:
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError as exc:
            raise AuthError(f"invalid token: {exc}") from None
        kid = header.get("kid")
        if kid is not None and not isinstance(kid, str):
            raise AuthError("invalid token: its kid is not a string")
        entry = self._lookup(kid)
        if entry is None or self.clock() >= self._expires_at:
            await self._refresh()
            entry = self._lookup(kid)
        if entry is None:
            if not self._have_keys:
                raise KeysUnavailable(f"the identity provider's keys could not be fetched: {self._last_error}")
            raise AuthError(f"invalid token: no key {kid!r} in the identity provider's key set"
                            if kid is not None else "invalid token: no kid, and the key set has several keys")
        key, algorithms = entry
        return self.rules.principal(self.rules.decode(token, key, sorted(algorithms)))

    def _lookup(self, kid: str | None) -> tuple[Any, frozenset[str]] | None:
        if kid is None and len(self._keys) == 1:
            return next(iter(self._keys.values()))
        return self._keys.get(kid)

    async def _refresh(self) -> None:
        """Fetch the key set unless one was tried less than ``min_refresh_s``
        ago; callers arriving during a fetch wait for that one."""
        if self._inflight is not None:
            await asyncio.shield(self._inflight)
            return
        if self._tried_at is not None and self.clock() - self._tried_at < self.min_refresh_s:
            return
        self._tried_at = self.clock()
        self._inflight = asyncio.ensure_future(self._fetch())
        try:
            await asyncio.shield(self._inflight)
        finally:
            self._inflight = None

    async def _fetch(self) -> None:
        self.fetches += 1
        try:
            async with httpx.AsyncClient(timeout=self.timeout_s, follow_redirects=False) as client:
                async with client.stream("GET", self.url, headers={"accept": "application/json"}) as response:
                    if response.status_code != 200:
                        raise ValueError(f"HTTP {response.status_code}")
                    body = bytearray()
                    async for chunk in response.aiter_bytes():
                        body += chunk
                        if len(body) > MAX_JWKS_BYTES:
                            raise ValueError(f"key set over {MAX_JWKS_BYTES} bytes")
            keys = parse_jwks(json.loads(body))
        except Exception as exc:  # the provider down or answering nonsense: keep what we have
            self._last_error = f"{type(exc).__name__}: {exc}"
            log.warning("fetching the JWKS %s failed (%s); %s", self.url, self._last_error,
                        "keeping the cached keys" if self._have_keys else "no keys yet")
            return
        self._keys = keys
        self._have_keys = True
        self._expires_at = self.clock() + self._max_age(response.headers.get("cache-control", ""))
        log.info("JWKS %s: %d key(s): %s", self.url, len(keys), ", ".join(map(repr, keys)))

    def _max_age(self, cache_control: str) -> float:
        match = _MAX_AGE.search(cache_control)
        age = float(match.group(1)) if match else self.default_max_age_s
        return min(max(age, self.min_refresh_s), self.max_age_cap_s)


def parse_jwks(document: Any) -> dict[str | None, tuple[Any, frozenset[str]]]:
    """``{"keys": [...]}`` → ``{kid: (public key, algorithms)}``; unusable keys are skipped."""
    if not isinstance(document, dict) or not isinstance(document.get("keys"), list):
        raise ValueError('not a JWKS: no "keys" list')
    keys: dict[str | None, tuple[Any, frozenset[str]]] = {}
    for data in document["keys"][:MAX_KEYS]:
        if not isinstance(data, dict) or data.get("use", "sig") != "sig" or data.get("kty") == "oct":
            continue
        try:
            key = PyJWK(data).key
            algorithms = algorithms_for_key(key)
        except Exception as exc:
            log.warning("skipping JWKS key %r: %s", data.get("kid"), exc)
            continue
        alg = data.get("alg")
        if alg is not None:
            if alg not in algorithms:
                log.warning("skipping JWKS key %r: alg %r does not fit its key type", data.get("kid"), alg)
                continue
            algorithms = frozenset({alg})
        kid = data.get("kid")
        keys[kid if isinstance(kid, str) else None] = (key, algorithms)
    return keys
