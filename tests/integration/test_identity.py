"""Who may get in: dev mode only when asked or when nothing is configured, and
tokens from the app's own identity provider (docs/security.md).

Every server here is ``turnline serve`` as a real process on loopback:

- with ``TURNLINE_SECRET`` there is no dev mode (no dev token route, no banner);
- with ``--dev`` the dev token route refuses anything proxied or not local;
- ``--dev`` together with a secret or key is refused at startup;
- tokens signed by RSA, EC and Ed25519 keys made here are accepted against
  ``--jwt-public-key``, and against ``--jwks-url`` (a key set served by a
  local HTTP server) through a key rotation, with the refetches bounded;
- wrong ``aud``/``iss``, expired, ``alg: none``, HS256 signed with the public
  key's own bytes, another key: ``unauthorized`` on the WebSocket and HTTP;
- the claim prefix maps ``PREFIX+cap`` (and ``PREFIX+sub``) onto turnline's claims.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import os
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Iterator

import httpx
import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from servers import SECRET, free_port
from turnline.server.auth import ClaimRules, mint
from turnline.server.jwks import JwksVerifier
from wsraw import RawWS

ROOT = Path(__file__).resolve().parents[2]
TURNLINE = str(Path(sys.executable).with_name("turnline"))
START_TIMEOUT = 20.0
TIMEOUT = 10.0
AUD = "turnline-api"
ISS = "https://idp.test/"
PREFIX = "https://turnline.dev/"
CAPS = {"*": ["subscribe", "publish", "cancel"]}


# ---------------------------------------------------------------- a real server process


class Serve:
    """``turnline serve`` in a subprocess, in its own directory (its own dev secret)."""

    def __init__(self, tmp: Path, *args: str, env: dict[str, str] | None = None):
        self.tmp = tmp
        self.args = args
        self.env = env or {}
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = tmp / f"serve-{self.port}.log"

    @property
    def http(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def ws(self) -> str:
        return f"ws://127.0.0.1:{self.port}/v1/ws"

    def __enter__(self) -> Serve:
        env = {**os.environ, "PYTHONUNBUFFERED": "1", **self.env}
        if "TURNLINE_SECRET" not in self.env:
            env.pop("TURNLINE_SECRET", None)
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen([TURNLINE, "serve", "--store", "memory://", "--port", str(self.port),
                                          "--log-level", "warning", *self.args],
                                         cwd=self.tmp, env=env, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            if self.proc.poll() is not None:
                pytest.fail(f"server exited ({self.proc.returncode}): {self.output()}")
            try:
                if httpx.get(f"{self.http}/healthz", timeout=1.0).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"server did not start: {self.output()}")
            time.sleep(0.05)

    def __exit__(self, *exc: Any) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait(TIMEOUT)

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")


def refused_at_startup(tmp: Path, *args: str, env: dict[str, str] | None = None) -> str:
    full_env = {**os.environ, **(env or {})}
    if "TURNLINE_SECRET" not in (env or {}):
        full_env.pop("TURNLINE_SECRET", None)
    out = subprocess.run([TURNLINE, "serve", "--store", "memory://", "--port", str(free_port()), *args],
                         cwd=tmp, env=full_env, capture_output=True, text=True, timeout=30)
    assert out.returncode == 2, (out.stdout, out.stderr)
    assert "Traceback" not in out.stderr and "turnline serving" not in out.stdout
    return out.stderr


# ---------------------------------------------------------------- dev mode


def test_a_configured_secret_means_no_dev_mode(tmp_path: Path) -> None:
    with Serve(tmp_path, env={"TURNLINE_SECRET": SECRET}) as srv:
        # Not a route: GET finds nothing, POST finds only the static files' GET route.
        for method, status in (("GET", 404), ("POST", 405)):
            r = httpx.request(method, f"{srv.http}/v1/dev/token?sub=mallory")
            assert r.status_code == status and "token" not in r.json(), r.text
        r = httpx.get(f"{srv.http}/v1/sessions/s-1/tree",
                      headers={"Authorization": f"Bearer {mint(SECRET, 'a', CAPS)}"})
        assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"  # the secret's tokens get in
        out = srv.output()
        assert "DEV MODE" not in out and "dev token" not in out, out
        assert "tokens: shared secret (HS256) from TURNLINE_SECRET" in out, out
    assert not (tmp_path / ".turnline").exists()  # no dev secret was made


@pytest.mark.parametrize("args, reason", [
    ((), "no secret or key was configured"),  # `make serve`
    (("--dev",), "--dev was given"),
])
def test_dev_mode_serves_local_browsers_only(tmp_path: Path, args: tuple[str, ...], reason: str) -> None:
    with Serve(tmp_path, *args) as srv:
        assert f"DEV MODE on: {reason}" in srv.output(), srv.output()
        r = httpx.post(f"{srv.http}/v1/dev/token?sub=dana")
        assert r.status_code == 200, r.text
        token = r.json()["token"]
        r = httpx.get(f"{srv.http}/v1/sessions/s-1/tree", headers={"Authorization": f"Bearer {token}"})
        assert r.status_code == 404  # authenticated; the session does not exist
        for headers in ({"X-Forwarded-For": "203.0.113.9"}, {"X-Forwarded-For": "127.0.0.1"},
                        {"Forwarded": "for=203.0.113.9"}, {"X-Real-IP": "203.0.113.9"},
                        {"Host": "evil.example:80"}):  # a DNS-rebinding page names its own host
            r = httpx.post(f"{srv.http}/v1/dev/token?sub=mallory", headers=headers)
            assert r.status_code == 403, (headers, r.text)
            assert r.json()["error"]["code"] == "forbidden" and r.json()["error"]["message"]
            assert "token" not in r.json()


def test_dev_with_a_secret_or_key_is_refused_at_startup(tmp_path: Path) -> None:
    pem = tmp_path / "key.pem"
    pem.write_bytes(public_pem(rsa.generate_private_key(public_exponent=65537, key_size=2048)))
    for args, env, named in ((("--dev", "--secret", SECRET), {}, "--secret"),
                             (("--dev",), {"TURNLINE_SECRET": SECRET}, "TURNLINE_SECRET"),
                             (("--dev", "--jwt-public-key", str(pem)), {}, "--jwt-public-key"),
                             (("--dev", "--jwks-url", "https://idp.test/jwks"), {}, "--jwks-url")):
        err = refused_at_startup(tmp_path, *args, env=env)
        assert "--dev cannot be combined with" in err and named in err, err
    err = refused_at_startup(tmp_path, "--host", "0.0.0.0")
    assert "needs a secret or key" in err, err


# ---------------------------------------------------------------- keys made here


def public_pem(private: Any) -> bytes:
    return private.public_key().public_bytes(serialization.Encoding.PEM,
                                            serialization.PublicFormat.SubjectPublicKeyInfo)


KEYS = {
    "RS256": lambda: rsa.generate_private_key(public_exponent=65537, key_size=2048),
    "ES256": lambda: ec.generate_private_key(ec.SECP256R1()),
    "EdDSA": lambda: ed25519.Ed25519PrivateKey.generate(),
}


def claims(sub: str = "alice", **extra: Any) -> dict[str, Any]:
    now = int(time.time())
    return {"sub": sub, "iat": now, "exp": now + 600, "aud": AUD, "iss": ISS, PREFIX + "cap": CAPS, **extra}


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def hs256_by_hand(key: bytes, payload: dict[str, Any], kid: str | None = None) -> str:
    """PyJWT will not sign HS256 with a PEM key; an attacker's script would."""
    header = {"alg": "HS256", "typ": "JWT", **({"kid": kid} if kid else {})}
    signing_input = _b64(json.dumps(header).encode()) + "." + _b64(json.dumps(payload).encode())
    return signing_input + "." + _b64(hmac.new(key, signing_input.encode(), hashlib.sha256).digest())


def forged_tokens(alg: str, private: Any, pem: bytes, kid: str | None = None) -> list[tuple[str, str]]:
    headers = {"kid": kid} if kid else {}
    now = int(time.time())
    other = KEYS[alg]()
    none = _b64(json.dumps({"alg": "none", "typ": "JWT", **headers}).encode()) + "." + \
        _b64(json.dumps(claims()).encode()) + "."
    return [
        ("wrong-aud", jwt.encode(claims(aud="someone-else"), private, algorithm=alg, headers=headers)),
        ("no-aud", jwt.encode({k: v for k, v in claims().items() if k != "aud"}, private, algorithm=alg,
                              headers=headers)),
        ("wrong-iss", jwt.encode(claims(iss="https://evil.test/"), private, algorithm=alg, headers=headers)),
        ("expired", jwt.encode(claims(exp=now - 60), private, algorithm=alg, headers=headers)),
        ("alg-none", none),
        ("hs256-with-the-public-key", hs256_by_hand(pem, claims(), kid)),
        ("another-key", jwt.encode(claims(), other, algorithm=alg, headers=headers)),
        ("tampered", jwt.encode(claims(), private, algorithm=alg, headers=headers)[:-4] + "AAAA"),
    ]


async def accepted(srv: Serve, token: str, session: str = "id-1") -> None:
    """Both faces take the token and act as its subject."""
    ws = await RawWS.open(srv.ws, token)
    ack = await ws.subscribe(session)
    assert ack["op"] == "ack", ack
    await ws.close()
    async with httpx.AsyncClient(timeout=TIMEOUT) as client:
        r = await client.post(f"{srv.http}/v1/sessions/{session}/messages",
                              headers={"Authorization": f"Bearer {token}"},
                              json={"messages": [{"parts": [{"type": "text", "text": "hi"}]}]})
        assert r.status_code == 200 and r.json()["turn_ids"], r.text


async def refused(srv: Serve, token: str, why: str) -> None:
    ws = await RawWS.open(srv.ws, token)
    err = await ws.next_error(0)
    assert err["code"] == "unauthorized" and err["message"], (why, err)
    await ws.wait_until(lambda: ws.closed is not None and ws._reader.done(), what="close")
    assert ws.closed.rcvd is not None and ws.closed.rcvd.code == 4401, why
    async with httpx.AsyncClient(timeout=TIMEOUT) as client:
        for headers, query in (({"Authorization": f"Bearer {token}"}, ""), ({}, f"?token={token}")):
            r = await client.get(f"{srv.http}/v1/sessions/id-1/messages{query}", headers=headers)
            assert r.status_code == 401 and r.json()["error"]["code"] == "unauthorized", (why, r.text)


IDP_ARGS = ("--jwt-audience", AUD, "--jwt-issuer", ISS, "--jwt-claim-prefix", PREFIX)


@pytest.mark.parametrize("alg", list(KEYS))
async def test_public_key_tokens(tmp_path: Path, alg: str) -> None:
    private = KEYS[alg]()
    pem = public_pem(private)
    (tmp_path / "idp.pem").write_bytes(pem)
    with Serve(tmp_path, "--jwt-public-key", str(tmp_path / "idp.pem"), "--secret", SECRET, *IDP_ARGS) as srv:
        assert f"public key {tmp_path / 'idp.pem'}" in srv.output()
        await accepted(srv, jwt.encode(claims(), private, algorithm=alg))
        # turnline token's HS256 tokens still work beside the provider's (with the aud and iss asked for).
        await accepted(srv, jwt.encode(claims(), SECRET, algorithm="HS256"))
        for why, token in forged_tokens(alg, private, pem):
            await refused(srv, token, why)
        await claim_mapping(srv, private, alg)


async def claim_mapping(srv: Serve, private: Any, alg: str, headers: dict[str, str] | None = None) -> None:
    """``PREFIX+cap`` carries the capabilities, ``PREFIX+sub`` (when present) the client id; an
    unprefixed ``cap`` grants nothing (it is not where this server reads capabilities)."""
    token = jwt.encode({**claims("auth0|6f1c", **{PREFIX + "sub": "auth0.6f1c",
                                                  PREFIX + "cap": {"chat-*": ["subscribe", "publish"]}})},
                       private, algorithm=alg, headers=headers)
    ws = await RawWS.open(srv.ws, token)
    await ws.subscribe("chat-1")
    await ws.fails({"op": "subscribe", "session": "other-1"}, "forbidden")
    ack = await ws.ok({"op": "send", "session": "chat-1", "messages": [{"parts": [{"type": "text", "text": "hi"}]}]})
    start = await ws.wait_event("chat-1", "turn-start", turn_id=ack["turn_ids"][0])
    assert start["owner"] == "auth0.6f1c"
    await ws.close()
    plain = jwt.encode({k: v for k, v in claims().items() if k != PREFIX + "cap"} | {"cap": CAPS},
                       private, algorithm=alg, headers=headers)
    ws = await RawWS.open(srv.ws, plain)
    await ws.fails({"op": "subscribe", "session": "chat-1"}, "forbidden")
    await ws.close()


# ---------------------------------------------------------------- JWKS


def jwk_of(private: Any, kid: str, alg: str) -> dict[str, Any]:
    algorithm = jwt.get_algorithm_by_name(alg)
    return {**json.loads(algorithm.to_jwk(private.public_key())), "kid": kid, "use": "sig", "alg": alg}


class JwksServer:
    """A key set on a loopback port whose keys the test changes; counts the fetches."""

    def __init__(self, max_age: int | None = None):
        self.keys: list[dict[str, Any]] = []
        self.fetches = 0
        self.max_age = max_age
        self.lock = threading.Lock()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - http.server's name
                with outer.lock:
                    outer.fetches += 1
                    body = json.dumps({"keys": outer.keys}).encode()
                self.send_response(200)
                self.send_header("content-type", "application/json")
                if outer.max_age is not None:
                    self.send_header("cache-control", f"public, max-age={outer.max_age}")
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/.well-known/jwks.json"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def set_keys(self, *keys: dict[str, Any]) -> None:
        with self.lock:
            self.keys = list(keys)

    def __enter__(self) -> JwksServer:
        self.thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def jwks() -> Iterator[JwksServer]:
    with JwksServer() as server:
        yield server


async def test_jwks_tokens_and_key_rotation(tmp_path: Path, jwks: JwksServer) -> None:
    rsa_a, ec_b = KEYS["RS256"](), KEYS["ES256"]()
    jwks.set_keys(jwk_of(rsa_a, "a", "RS256"))
    with Serve(tmp_path, "--jwks-url", jwks.url, "--jwks-min-refresh", "0", *IDP_ARGS) as srv:
        assert jwks.fetches == 0  # fetched when the first token arrives
        await accepted(srv, jwt.encode(claims(), rsa_a, algorithm="RS256", headers={"kid": "a"}))
        assert jwks.fetches == 1  # then cached: two verifications, one fetch
        for why, token in forged_tokens("RS256", rsa_a, public_pem(rsa_a), kid="a"):
            await refused(srv, token, why)
        # The provider rotates in an EC key: its first token makes the server refetch the set.
        jwks.set_keys(jwk_of(rsa_a, "a", "RS256"), jwk_of(ec_b, "b", "ES256"))
        before = jwks.fetches
        await accepted(srv, jwt.encode(claims(), ec_b, algorithm="ES256", headers={"kid": "b"}))
        assert jwks.fetches == before + 1
        # An RS256 token claiming kid b (an EC key) is refused: b's algorithm is ES256.
        await refused(srv, jwt.encode(claims(), rsa_a, algorithm="RS256", headers={"kid": "b"}), "alg-of-kid")
        # "a" retired: its tokens are refused once the set no longer has it.
        jwks.set_keys(jwk_of(ec_b, "b", "ES256"))
        await refused(srv, jwt.encode(claims(), rsa_a, algorithm="RS256", headers={"kid": "c"}), "unknown-kid")
        await refused(srv, jwt.encode(claims(), rsa_a, algorithm="RS256", headers={"kid": "a"}), "retired-kid")
        await claim_mapping(srv, ec_b, "ES256", headers={"kid": "b"})


async def test_jwks_refetches_are_bounded(tmp_path: Path, jwks: JwksServer) -> None:
    key = KEYS["RS256"]()
    jwks.set_keys(jwk_of(key, "a", "RS256"))
    with Serve(tmp_path, "--jwks-url", jwks.url, "--jwks-min-refresh", "3600", *IDP_ARGS) as srv:
        await accepted(srv, jwt.encode(claims(), key, algorithm="RS256", headers={"kid": "a"}))
        assert jwks.fetches == 1
        # A flood of made-up kids, some at once: none makes the server fetch again within the bound.
        tokens = [jwt.encode(claims(), key, algorithm="RS256", headers={"kid": f"made-up-{i}"}) for i in range(30)]
        async with httpx.AsyncClient(timeout=TIMEOUT) as client:
            answers = await asyncio.gather(*(client.get(f"{srv.http}/v1/sessions/id-1/messages",
                                                        headers={"Authorization": f"Bearer {t}"}) for t in tokens))
        assert {r.status_code for r in answers} == {401}
        await refused(srv, tokens[0], "unknown-kid")
        assert jwks.fetches == 1
        # Known keys keep working meanwhile.
        await accepted(srv, jwt.encode(claims(), key, algorithm="RS256", headers={"kid": "a"}))
        assert jwks.fetches == 1


async def test_jwks_verifier_honours_cache_lifetime_and_bound() -> None:
    """The verifier object against a real key set over HTTP, on a clock the test turns."""
    key = KEYS["ES256"]()
    now = [1000.0]
    with JwksServer(max_age=300) as server:
        server.set_keys(jwk_of(key, "a", "ES256"))
        verifier = JwksVerifier(server.url, ClaimRules(audience=(AUD,), issuer=ISS, claim_prefix=PREFIX),
                                min_refresh_s=30, clock=lambda: now[0])
        good = jwt.encode(claims(), key, algorithm="ES256", headers={"kid": "a"})
        assert (await verifier.verify(good)).client_id == "alice"
        assert server.fetches == 1
        now[0] += 299  # within max-age: cached
        await verifier.verify(good)
        unknown = jwt.encode(claims(), key, algorithm="ES256", headers={"kid": "z"})
        with pytest.raises(Exception, match="no key 'z'"):
            await verifier.verify(unknown)  # 299 s since the last fetch ≥ 30: one refetch
        assert server.fetches == 2
        for _ in range(5):
            with pytest.raises(Exception, match="no key 'z'"):
                await verifier.verify(unknown)  # within 30 s of that refetch: none
        assert server.fetches == 2
        now[0] += 301  # past max-age: the next token refetches, even with a cached kid
        await verifier.verify(good)
        assert server.fetches == 3
        # The provider down: cached keys stay in use, and refetch attempts stay bounded.
        server.httpd.shutdown()
        server.httpd.server_close()
        now[0] += 400
        await verifier.verify(good)
        assert verifier.fetches == 4
        await verifier.verify(good)
        assert verifier.fetches == 4


# ---------------------------------------------------------------- logs


async def test_query_tokens_are_not_logged(tmp_path: Path) -> None:
    token = mint(SECRET, "alice", CAPS)
    with Serve(tmp_path, "--secret", SECRET, "--log-level", "info") as srv:
        ws = await RawWS.open(srv.ws, token, header_token=False)
        await ws.subscribe("log-1")
        await ws.close()
        async with httpx.AsyncClient(timeout=TIMEOUT) as client:
            r = await client.get(f"{srv.http}/v1/sessions/log-1/tree?x=1&token={token}")
            assert r.status_code == 404
        # uvicorn writes its request lines before it answers the next request: this one's line is the marker.
        async with httpx.AsyncClient(timeout=TIMEOUT) as client:
            await client.get(f"{srv.http}/healthz?marker=1")
        deadline = time.monotonic() + TIMEOUT
        while "marker=1" not in srv.output():
            assert time.monotonic() < deadline, srv.output()
            await asyncio.sleep(0.05)
        out = srv.output()
        assert "/v1/ws?token=[redacted]" in out and "tree?x=1&token=[redacted]" in out, out
        assert token not in out and token.split(".")[2] not in out


async def test_an_unreachable_jwks_is_not_the_tokens_fault(tmp_path: Path) -> None:
    """No key set yet (the provider down): ``internal``, and the WebSocket closes with
    1011 (clients retry) rather than 4401 (clients give up on the token)."""
    key = KEYS["RS256"]()
    dead = f"http://127.0.0.1:{free_port()}/.well-known/jwks.json"  # nothing listens there
    with Serve(tmp_path, "--jwks-url", dead, *IDP_ARGS) as srv:
        token = jwt.encode(claims(), key, algorithm="RS256", headers={"kid": "a"})
        ws = await RawWS.open(srv.ws, token)
        err = await ws.next_error(0)
        assert err["code"] == "internal" and "could not be fetched" in err["message"], err
        await ws.wait_until(lambda: ws.closed is not None and ws._reader.done(), what="close")
        assert ws.closed.rcvd is not None and ws.closed.rcvd.code == 1011
        async with httpx.AsyncClient(timeout=TIMEOUT) as client:
            r = await client.get(f"{srv.http}/v1/sessions/id-1/messages", headers={"Authorization": f"Bearer {token}"})
            assert r.status_code == 500 and r.json()["error"]["code"] == "internal", r.text
        assert "fetching the JWKS" in srv.output()
