"""``turnline serve | token``."""

from __future__ import annotations

import importlib
import ipaddress
import logging
import os
import sys

import click

from .server.auth import AuthError, mint, parse_caps, resolve_secret


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def load_agent(spec: str):  # type: ignore[no-untyped-def]
    from .agent import as_agent

    module_name, sep, attr = spec.partition(":")
    if not sep:
        raise click.BadParameter(f"{spec!r} is not module:attr", param_hint="--agent")
    sys.path.insert(0, os.getcwd())
    try:
        obj = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        raise click.BadParameter(f"cannot load {spec!r}: {exc}", param_hint="--agent") from None
    try:
        return as_agent(obj)
    except TypeError as exc:
        raise click.BadParameter(str(exc), param_hint="--agent") from None


@click.group()
@click.version_option(package_name="turnline")
def main() -> None:
    """turnline: a durable session layer for streaming AI agents."""


@main.command()
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=8787, show_default=True, type=int)
@click.option("--store", "store_url", default="sqlite:///turnline.db", show_default=True,
              help="memory://, sqlite:///PATH or redis://HOST:PORT")
@click.option("--agent", "agent_spec", default="turnline.agent.demo:agent", show_default=True,
              help="module:attr of a turnline.Agent or a function taking a Turn")
@click.option("--secret", default=None, help="JWT signing secret (else TURNLINE_SECRET, else a dev secret)")
@click.option("--dev/--no-dev", default=None, help="dev mode: a dev token is printed and /v1/dev/token mints "
              "short-lived tokens. Default: on for a loopback host, off otherwise.")
@click.option("--policy", default="concurrent", show_default=True,
              type=click.Choice(["concurrent", "queue", "interrupt", "reject", "rollback"]),
              help="default double-texting policy")
@click.option("--queue-limit", default=16, show_default=True, type=int)
@click.option("--abort-grace", default=2.0, show_default=True, type=float,
              help="seconds an aborted handler may take before its turn is ended for it")
@click.option("--sqlite-synchronous", default="NORMAL", show_default=True,
              type=click.Choice(["NORMAL", "FULL"]), help="NORMAL survives a process crash; FULL a power loss")
@click.option("--log-level", default="info", show_default=True)
def serve(host: str, port: int, store_url: str, agent_spec: str, secret: str | None, dev: bool | None,
          policy: str, queue_limit: int, abort_grace: float, sqlite_synchronous: str, log_level: str) -> None:
    """Run the server with an agent."""
    import uvicorn

    from .agent import Runtime, RuntimeConfig
    from .server.app import ServerConfig, create_app
    from .store import open_store, parse_store_url

    dev = _is_loopback(host) if dev is None else dev
    if not dev and not (secret or os.environ.get("TURNLINE_SECRET")):
        raise click.UsageError("outside dev mode a secret is required: --secret or TURNLINE_SECRET")
    key, source = resolve_secret(secret)
    kind, where = parse_store_url(store_url)
    options = {"synchronous": sqlite_synchronous} if kind == "sqlite" else {}
    store = open_store(store_url, **options)
    agent = load_agent(agent_spec)
    runtime = Runtime(store, agent, RuntimeConfig(default_policy=policy, queue_limit=queue_limit,
                                                  abort_grace_s=abort_grace))
    app = create_app(runtime, ServerConfig(secret=key, dev=dev))
    url = f"http://{host}:{port}/"
    click.echo(f"turnline serving {url}")
    click.echo(f"  store:  {kind} {os.path.abspath(where) if kind == 'sqlite' else where or ''}".rstrip())
    click.echo(f"  agent:  {agent_spec}")
    click.echo(f"  policy: {policy}")
    if dev:
        token = mint(key, "dev", {"*": ["subscribe", "publish", "cancel", "cancel-any"]}, 24 * 3600)
        click.echo(f"  DEV MODE: secret from {source}; POST /v1/dev/token?sub=NAME mints 15-minute tokens.")
        click.echo(f"  dev token (sub=dev, 24 h): {token}")
    logging.basicConfig(level=log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    uvicorn.run(app, host=host, port=port, log_level=log_level, ws_max_size=1 << 20, lifespan="on")


@main.command()
@click.option("--sub", required=True, help="the client id")
@click.option("--cap", "caps", multiple=True, default=("*:subscribe,publish,cancel",), show_default=True,
              help="PATTERN:ACTION[,ACTION…]; repeatable. Actions: subscribe, publish, cancel, cancel-any, admin")
@click.option("--ttl", default=3600, show_default=True, type=int, help="seconds until it expires")
@click.option("--secret", default=None, help="signing secret (else TURNLINE_SECRET, else the dev secret)")
def token(sub: str, caps: tuple[str, ...], ttl: int, secret: str | None) -> None:
    """Mint a JWT for a client."""
    try:
        parsed = parse_caps(caps)
    except AuthError as exc:
        raise click.BadParameter(str(exc), param_hint="--cap") from None
    key, _ = resolve_secret(secret)
    click.echo(mint(key, sub, parsed, ttl))


if __name__ == "__main__":
    main()
