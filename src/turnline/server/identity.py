"""How a server checks tokens, from its settings: which verifier, and whether
dev mode is on (and why). The CLI's ``turnline serve`` options map onto
:class:`IdentitySettings` one to one; docs/security.md explains them.

Dev mode is on only when asked (``--dev``) or when nothing was configured
and the server binds a loopback address (``make serve``): then tokens are
signed with a throwaway secret in ``.turnline/dev-secret`` and the demo page
gets its tokens from ``/v1/dev/token``. A configured secret or key never runs
in dev mode: ``--dev`` with one is refused at startup, since either the
operator meant production (and dev mode would hand out tokens for every
session) or they meant to try things (and then the secret is not needed).
"""

from __future__ import annotations

import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from .auth import ClaimRules, KeyVerifier, Verifier, Verifiers
from .jwks import JwksVerifier


class SettingsError(ValueError):
    """Settings that do not make sense together; the message says what to change."""


@dataclass(frozen=True)
class IdentitySettings:
    secret: str | None = None  # --secret
    env_secret: str | None = None  # TURNLINE_SECRET
    public_key: str | None = None  # --jwt-public-key PATH
    jwks_url: str | None = None  # --jwks-url
    audience: tuple[str, ...] = ()
    issuer: str | None = None
    claim_prefix: str = ""
    jwks_min_refresh_s: float = 30.0

    @classmethod
    def from_environment(cls, **options: object) -> IdentitySettings:
        return cls(env_secret=os.environ.get("TURNLINE_SECRET") or None, **options)  # type: ignore[arg-type]

    def configured(self) -> list[str]:
        """The names of the configured token sources, for messages."""
        names = [("--secret", self.secret), ("TURNLINE_SECRET", self.env_secret),
                 ("--jwt-public-key", self.public_key), ("--jwks-url", self.jwks_url)]
        return [name for name, value in names if value]

    @property
    def shared_secret(self) -> str | None:
        return self.secret or self.env_secret

    def rules(self) -> ClaimRules:
        return ClaimRules(audience=self.audience, issuer=self.issuer, claim_prefix=self.claim_prefix)

    def verifier(self, dev_secret: str | None = None) -> Verifier:
        """Every configured source, each with its own keys; the dev secret when none is."""
        rules = self.rules()
        verifiers: list[Verifier] = []
        secret = self.shared_secret or dev_secret
        if secret:
            verifiers.append(KeyVerifier.from_secret(secret, rules))
        if self.public_key:
            try:
                pem = Path(self.public_key).read_bytes()
            except OSError as exc:
                raise SettingsError(f"--jwt-public-key: cannot read {self.public_key}: {exc.strerror}") from None
            try:
                verifiers.append(KeyVerifier.from_pem(pem, rules, name=f"public key {self.public_key}"))
            except ValueError as exc:
                raise SettingsError(f"--jwt-public-key {self.public_key}: {exc}") from None
        if self.jwks_url:
            check_jwks_url(self.jwks_url)
            verifiers.append(JwksVerifier(self.jwks_url, rules, min_refresh_s=self.jwks_min_refresh_s))
        if not verifiers:
            raise SettingsError("no secret or key: --secret, TURNLINE_SECRET, --jwt-public-key or --jwks-url")
        return verifiers[0] if len(verifiers) == 1 else Verifiers(verifiers)


def check_jwks_url(url: str) -> None:
    """https, or http to this machine only (a key set over plain http could be swapped on the way)."""
    parts = urlsplit(url)
    if parts.scheme == "https" and parts.hostname:
        return
    if parts.scheme == "http" and parts.hostname and is_loopback_host(parts.hostname):
        return
    raise SettingsError(f"--jwks-url {url!r} must be an https:// URL (http:// only to a loopback address)")


def is_loopback_host(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True)
class DevMode:
    on: bool
    reason: str


def decide_dev_mode(flag: bool | None, host: str, settings: IdentitySettings) -> DevMode:
    """``flag``: ``--dev`` (True), ``--no-dev`` (False) or neither (None)."""
    configured = settings.configured()
    sources = "--secret, TURNLINE_SECRET, --jwt-public-key or --jwks-url"
    if flag and configured:
        raise SettingsError(f"--dev cannot be combined with {' and '.join(configured)}: dev mode mints tokens "
                            "for every session. Drop --dev to serve with your secret or key, or leave them "
                            "out to try turnline locally.")
    if flag:
        return DevMode(True, "--dev was given")
    if configured:
        return DevMode(False, f"tokens are checked with {' and '.join(configured)}")
    if flag is False:
        raise SettingsError(f"--no-dev needs a secret or key: {sources}")
    if not is_loopback_host(host):
        raise SettingsError(f"serving on {host} (not a loopback address) needs a secret or key: {sources} "
                            "(or --dev, to try it out on a network you trust)")
    return DevMode(True, f"no secret or key was configured ({sources})")
