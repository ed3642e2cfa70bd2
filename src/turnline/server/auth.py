"""JWT tokens and capabilities. The client id is the token's ``sub``, nothing else.

A :class:`Verifier` turns a token into a :class:`Principal`. Each verifier holds
its keys and the algorithms those keys allow, both from the server's
configuration, never from the token: an HS256 token is checked only against the
shared secret, an RS256 one only against an RSA public key, and ``alg: none``
is accepted by none. The JWKS verifier (keys fetched from an identity
provider) is in :mod:`.jwks`.
"""

from __future__ import annotations

import os
import re
import secrets
import time
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterable, Mapping, Protocol, Sequence

import jwt
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
from cryptography.hazmat.primitives.serialization import load_pem_public_key

from ..protocol import is_valid_id

ACTIONS = ("subscribe", "publish", "cancel", "cancel-any", "admin")
ALGORITHM = "HS256"


class AuthError(Exception):
    """A token refused: the client gets ``unauthorized``."""


class KeysUnavailable(Exception):
    """The keys to check a token with could not be had (an identity provider's
    JWKS unreachable): not the client's fault, so not ``unauthorized``."""


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
    """An HS256 token signed with ``secret``, no audience or issuer asked."""
    return KeyVerifier.from_secret(secret).verify_now(token)


@dataclass(frozen=True)
class ClaimRules:
    """What a token must say besides its signature, and where turnline's claims are.

    ``audience``/``issuer``: checked when given (a token carrying an ``aud``
    is refused when no audience is configured: it was meant for someone else).
    ``claim_prefix``: an identity provider's custom claims are often
    namespaced (Auth0: ``https://turnline.dev/cap``; Keycloak: ``turnline_cap``);
    with a prefix ``P`` the capabilities are read from ``P + "cap"`` only, and
    the client id from ``P + "sub"`` when the token has one, else from ``sub``.
    """

    audience: tuple[str, ...] = ()
    issuer: str | None = None
    claim_prefix: str = ""

    def decode(self, token: str, key: Any, algorithms: Sequence[str]) -> dict[str, Any]:
        try:
            return jwt.decode(token, key, algorithms=list(algorithms), audience=list(self.audience) or None,
                              issuer=self.issuer, options={"require": ["sub", "exp"]})
        except jwt.ExpiredSignatureError:
            raise AuthError("token expired") from None
        except jwt.InvalidAudienceError as exc:
            hint = "" if self.audience else " (this server has no --jwt-audience configured)"
            raise AuthError(f"invalid token: {exc}{hint}") from None
        except jwt.PyJWTError as exc:
            raise AuthError(f"invalid token: {exc}") from None

    def principal(self, claims: Mapping[str, Any]) -> Principal:
        prefix = self.claim_prefix
        sub = claims.get(prefix + "sub", claims.get("sub")) if prefix else claims.get("sub")
        cap = claims.get(prefix + "cap", {})
        if not is_valid_id(sub):  # the client id is an id like any other (it is named by cancel filters)
            raise AuthError(f"token has no valid {prefix + 'sub or ' if prefix else ''}sub "
                            "(letters, digits and . _ : - only, at most 128)")
        if not isinstance(cap, dict) or not all(isinstance(v, list) for v in cap.values()):
            raise AuthError(f"token {prefix}cap must map session patterns to lists of actions")
        return Principal(sub, {str(k): frozenset(map(str, v)) for k, v in cap.items()})


class Verifier(Protocol):
    """Turns a token into a Principal or raises :class:`AuthError` (or
    :class:`KeysUnavailable`). ``algorithms``: what it may accept, fixed by
    its configuration."""

    algorithms: frozenset[str]

    async def verify(self, token: str) -> Principal: ...

    def describe(self) -> str: ...


RSA_ALGORITHMS = frozenset({"RS256", "RS384", "RS512", "PS256", "PS384", "PS512"})
_EC_ALGORITHMS = {"secp256r1": "ES256", "secp384r1": "ES384", "secp521r1": "ES512", "secp256k1": "ES256K"}


def algorithms_for_key(key: Any) -> frozenset[str]:
    """The algorithms a public key may verify: derived from its type, so a
    token cannot pick HS256 and have a public key used as an HMAC secret."""
    if isinstance(key, rsa.RSAPublicKey):
        return RSA_ALGORITHMS
    if isinstance(key, ec.EllipticCurvePublicKey):
        alg = _EC_ALGORITHMS.get(key.curve.name)
        if alg is None:
            raise ValueError(f"unsupported elliptic curve {key.curve.name}")
        return frozenset({alg})
    if isinstance(key, (ed25519.Ed25519PublicKey, ed448.Ed448PublicKey)):
        return frozenset({"EdDSA"})
    raise ValueError(f"unsupported public key type {type(key).__name__}: use RSA, EC or Ed25519/Ed448")


def load_public_key(pem: bytes) -> Any:
    """A PEM public key or X.509 certificate (some providers hand out the latter)."""
    if b"PRIVATE KEY" in pem:
        raise ValueError("this is a private key: give the server the public key only")
    try:
        if b"BEGIN CERTIFICATE" in pem:
            return x509.load_pem_x509_certificate(pem).public_key()
        return load_pem_public_key(pem)
    except ValueError as exc:
        raise ValueError(f"not a PEM public key or certificate: {exc}") from None


class KeyVerifier:
    """Tokens signed with one key: a shared secret (HS256) or a public key."""

    def __init__(self, key: Any, algorithms: Iterable[str], rules: ClaimRules = ClaimRules(), name: str = "key"):
        self.key = key
        self.algorithms = frozenset(algorithms)
        self.rules = rules
        self.name = name

    @classmethod
    def from_secret(cls, secret: str, rules: ClaimRules = ClaimRules()) -> KeyVerifier:
        return cls(secret, {ALGORITHM}, rules, "shared secret")

    @classmethod
    def from_pem(cls, pem: bytes, rules: ClaimRules = ClaimRules(), name: str = "public key") -> KeyVerifier:
        key = load_public_key(pem)
        return cls(key, algorithms_for_key(key), rules, name)

    def verify_now(self, token: str) -> Principal:
        return self.rules.principal(self.rules.decode(token, self.key, sorted(self.algorithms)))

    async def verify(self, token: str) -> Principal:
        return self.verify_now(token)

    def describe(self) -> str:
        return f"{self.name} ({', '.join(sorted(self.algorithms))})"


def token_algorithm(token: str) -> str:
    try:
        alg = jwt.get_unverified_header(token).get("alg")
    except jwt.PyJWTError as exc:
        raise AuthError(f"invalid token: {exc}") from None
    if not isinstance(alg, str):
        raise AuthError("invalid token: no alg in its header")
    return alg


class Verifiers:
    """Several verifiers (a shared secret and an identity provider's keys):
    the token goes to those whose configured algorithms include its ``alg``,
    each checking with its own keys only."""

    def __init__(self, verifiers: Sequence[Verifier]):
        if not verifiers:
            raise ValueError("no verifier configured")
        self.verifiers = list(verifiers)
        self.algorithms = frozenset().union(*(v.algorithms for v in verifiers))

    async def verify(self, token: str) -> Principal:
        alg = token_algorithm(token)
        first: AuthError | None = None
        for verifier in self.verifiers:
            if alg in verifier.algorithms:
                try:
                    return await verifier.verify(token)
                except AuthError as exc:
                    first = first or exc
        if first is not None:
            raise first
        raise AuthError(f"invalid token: algorithm {alg!r} is not accepted here "
                        f"(accepted: {', '.join(sorted(self.algorithms))})")

    def describe(self) -> str:
        return " + ".join(v.describe() for v in self.verifiers)


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
