"""``turnline serve | token``."""

from __future__ import annotations

import functools
import gc
import importlib
import logging
import os
import sys
from typing import Any, Callable

import functools
from typing import Any, Callable

import click

from .core.limits import LimitsConfig
from .server.auth import AuthError, mint, parse_caps, resolve_secret


DEMO_AGENT = "turnline.agent.demo:agent"
GC_YOUNG_THRESHOLD = 50_000  # see _tune_gc
OTEL_HELP = ("OpenTelemetry spans per turn and provider call (needs turnline[otel]); exporters from the "
             "standard OTEL_* variables, OTEL_TRACES_EXPORTER=otlp|console|none (docs/observability.md)")


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


def _security_options(command: Callable[..., Any]) -> Callable[..., Any]:
    """``serve``'s options for tokens and origins (docs/security.md)."""
    options = [
        click.option("--jwt-public-key", type=click.Path(dir_okay=False), default=None,
                     help="PEM public key (or certificate) of your identity provider: RS256, ES256 or EdDSA tokens"),
        click.option("--jwks-url", default=None,
                     help="your identity provider's JWKS (https://…/.well-known/jwks.json), cached and "
                     "refetched when a token names an unknown kid (see --jwks-min-refresh)"),
        click.option("--jwks-min-refresh", default=30.0, show_default=True, type=click.FloatRange(min=0),
                     help="seconds between two fetches of the JWKS at least, however many unknown kids arrive"),
        click.option("--jwt-audience", multiple=True,
                     help="a token's aud must be this (repeatable: any of them); without it, a token "
                     "with an aud is refused"),
        click.option("--jwt-issuer", default=None, help="a token's iss must be this"),
        click.option("--jwt-claim-prefix", default="",
                     help="read capabilities from PREFIX+'cap' (and the client id from PREFIX+'sub' when present), "
                     "e.g. https://turnline.dev/"),
        click.option("--cors-origin", "cors_origins", multiple=True,
                     help="an origin (https://app.example.com) whose pages may call the HTTP API and open "
                     "WebSockets; repeatable. Default: none (same-origin pages only)"),
    ]
    return functools.reduce(lambda cmd, option: option(cmd), reversed(options), command)


def _identity(host: str, secret: str | None, dev: bool | None, opts: dict[str, Any]):  # type: ignore[no-untyped-def]
    """The verifier, dev mode and the secret dev tokens are minted with, or a usage error."""
    from .server.guards import normalize_origin
    from .server.identity import IdentitySettings, SettingsError, decide_dev_mode

    settings = IdentitySettings.from_environment(
        secret=secret, public_key=opts["jwt_public_key"], jwks_url=opts["jwks_url"],
        audience=tuple(opts["jwt_audience"]), issuer=opts["jwt_issuer"], claim_prefix=opts["jwt_claim_prefix"],
        jwks_min_refresh_s=opts["jwks_min_refresh"])
    try:
        mode = decide_dev_mode(dev, host, settings)
        dev_secret = resolve_secret(None) if mode.on else None
        verifier = settings.verifier(dev_secret[0] if dev_secret else None)
        origins = [normalize_origin(o) for o in opts["cors_origins"]]
    except ValueError as exc:  # SettingsError, or an origin that is not one
        raise click.UsageError(str(exc)) from None
    return settings, mode, dev_secret, verifier, origins


_DEFAULT_LIMITS = LimitsConfig()
# (option, LimitsConfig field, type, help); 0 turns a limit off. docs/limits.md.
_LIMIT_OPTIONS = [
    ("--max-turns-per-session", "max_turns_per_session", int, "turns one session runs at once"),
    ("--send-rate", "send_rate", float, "sends (and regenerates) per second per client"),
    ("--send-burst", "send_burst", int, "sends a client may make at once before --send-rate applies"),
    ("--cancel-rate", "cancel_rate", float, "cancels per second per client"),
    ("--cancel-burst", "cancel_burst", int, "cancels a client may make at once"),
    ("--max-subscriptions", "max_subscriptions", int, "sessions one WebSocket follows at once"),
    ("--max-connections-per-client", "max_connections_per_client", int,
     "open WebSockets per client id (on redis://, across every gateway)"),
    ("--audio-bytes-per-s", "audio_bytes_per_s", int, "voice audio-in per voice peer (16 kHz PCM16 is 32000)"),
    ("--audio-burst-bytes", "audio_burst_bytes", int, "voice audio-in a peer may send at once"),
]


def limit_options(command: Callable[..., Any]) -> Callable[..., Any]:
    """The limit options of ``serve``, handed to it as one ``limits: LimitsConfig``."""

    @functools.wraps(command)
    def wrapper(**kwargs: Any) -> Any:
        values = {name: kwargs.pop(name) for _, name, _, _ in _LIMIT_OPTIONS}
        if any(v < 0 for v in values.values()):
            raise click.BadParameter("limits are 0 (off) or more")
        return command(limits=LimitsConfig(**values), **kwargs)

    for flag, name, kind, text in reversed(_LIMIT_OPTIONS):
        wrapper = click.option(flag, name, default=getattr(_DEFAULT_LIMITS, name), show_default=True, type=kind,
                               help=f"{text}; 0: no limit")(wrapper)
    return wrapper


@click.group()
@click.version_option(package_name="turnline")
def main() -> None:
    """turnline: a durable session layer for streaming AI agents."""


@main.command()
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=8787, show_default=True, type=int)
@click.option("--store", "store_url", default="sqlite:///turnline.db", show_default=True,
              help="memory://, sqlite:///PATH or redis://HOST:PORT")
@click.option("--agent", "agent_spec", default=None,
              help="module:attr of a turnline.Agent, a function taking a Turn, a compiled LangGraph graph or a "
              "PydanticAI agent [default: the demo agent; "
              "on redis:// none: a gateway only, unless given, when it runs a worker in-process too]")
@click.option("--secret", default=None, help="HS256 signing secret (else TURNLINE_SECRET)")
@click.option("--dev/--no-dev", default=None, help="dev mode: a dev token is printed and /v1/dev/token mints "
              "short-lived tokens for browsers on this machine. Default: on only when no secret or key is "
              "configured and the host is loopback; refused together with a secret or key.")
@_security_options
@click.option("--policy", default="concurrent", show_default=True,
              type=click.Choice(["concurrent", "queue", "interrupt", "reject", "rollback"]),
              help="default double-texting policy")
@click.option("--queue-limit", default=16, show_default=True, type=int)
@click.option("--abort-grace", default=2.0, show_default=True, type=float,
              help="seconds an aborted handler may take before its turn is ended for it")
@click.option("--sqlite-synchronous", default="NORMAL", show_default=True,
              type=click.Choice(["NORMAL", "FULL"]), help="NORMAL survives a process crash; FULL a power loss")
@click.option("--aisdk-cancel-on-disconnect", is_flag=True, default=False,
              help="a dropped /api/chat fetch (the AI SDK's stop()) cancels its turn; by default it "
              "cancels nothing and the client resumes")
@click.option("--lease-ms", default=3000, show_default=True, type=int,
              help="redis:// only: the in-process worker's session lease (see `turnline worker`)")
@click.option("--voice/--no-voice", default=False, show_default=True,
              help="run the voice pipeline: audio over the WebSocket, espeak-ng speech, barge-in (docs/voice.md)")
@click.option("--ws-deflate/--no-ws-deflate", default=False, show_default=True,
              help="accept permessage-deflate on WebSockets: smaller catch-ups over slow links, paid "
              "for with CPU on every frame and zlib memory on every connection")
@click.option("--otel/--no-otel", default=False, show_default=True, help=OTEL_HELP)
@click.option("--log-level", default="info", show_default=True)
@limit_options
def serve(host: str, port: int, store_url: str, agent_spec: str, secret: str | None, dev: bool | None,
          policy: str, queue_limit: int, abort_grace: float, sqlite_synchronous: str,
          aisdk_cancel_on_disconnect: bool, lease_ms: int, voice: bool, ws_deflate: bool, otel: bool,
          log_level: str, limits: LimitsConfig, **security: Any) -> None:
    """Run the server with an agent."""
    import uvicorn

    from .agent import Runtime, RuntimeConfig
    from .server.app import ServerConfig, create_app
    from .server.logs import redact_tokens_in_logs
    from .store import open_store, parse_store_url

    settings, mode, dev_secret, verifier, origins = _identity(host, secret, dev, security)
    kind, where = parse_store_url(store_url)
    options = {"synchronous": sqlite_synchronous} if kind == "sqlite" else {}
    store = open_store(store_url, **options)
    config = RuntimeConfig(default_policy=policy, queue_limit=queue_limit, abort_grace_s=abort_grace,
                           tracing=_tracing(otel), limits=limits)
    if kind == "redis":
        agent_spec, runtime = _gateway(store, agent_spec, config, lease_ms)
    else:
        agent_spec = agent_spec or DEMO_AGENT
        runtime = Runtime(store, load_agent(agent_spec), config)
    app = create_app(runtime, ServerConfig(secret=settings.shared_secret or (dev_secret and dev_secret[0]),
                                           dev=mode.on, verifier=verifier, cors_origins=origins,
                                           aisdk_cancel_on_disconnect=aisdk_cancel_on_disconnect))
    url = f"http://{host}:{port}/"
    click.echo(f"turnline serving {url}")
    click.echo(f"  store:  {kind} {os.path.abspath(where) if kind == 'sqlite' else where or ''}".rstrip())
    click.echo(f"  agent:  {agent_spec or 'none (a gateway: workers run the turns)'}")
    click.echo(f"  policy: {policy}")
    checks = (("aud", ", ".join(settings.audience)), ("iss", settings.issuer), ("claim prefix", settings.claim_prefix))
    click.echo(f"  tokens: {verifier.describe()} from {' and '.join(settings.configured()) or 'the dev secret'}"
               + "".join(f", {name} {value}" for name, value in checks if value))
    click.echo(f"  cors:   {', '.join(origins) if origins else 'none (same-origin pages only)'}")
    if config.tracing.enabled:
        click.echo("  otel:   a span per turn and per provider call (docs/observability.md)")
    click.echo(f"  limits: {_describe_limits(limits)} (docs/limits.md)")
    if voice:
        from .voice import install_voice

        install_voice(app)
        click.echo("  voice:  on (espeak-ng speech, webrtcvad barge-in, transcripts from the client)")
    if mode.on and dev_secret:
        token = mint(dev_secret[0], "dev", {"*": ["subscribe", "publish", "cancel", "cancel-any"]}, 24 * 3600)
        click.echo(f"  DEV MODE on: {mode.reason}. Tokens are signed with the secret in {dev_secret[1]}; "
                   "POST /v1/dev/token?sub=NAME mints 15-minute tokens for browsers on this machine "
                   "(never through a proxy). Not for production: configure a secret or key.")
        click.echo(f"  dev token (sub=dev, 24 h): {token}")
    logging.basicConfig(level=log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    _tune_gc()
    server_config = uvicorn.Config(app, host=host, port=port, log_level=log_level, ws_max_size=1 << 20,
                                   lifespan="on", ws_per_message_deflate=ws_deflate)  # configures uvicorn's loggers
    redact_tokens_in_logs()
    server = uvicorn.Server(server_config)
    server.run()
    if otel:
        from .agent.tracing import shutdown_tracing

        shutdown_tracing()  # export the spans still batched
    if not server.started:  # as uvicorn.run: a port in use is a failed start
        sys.exit(3)


def _tracing(otel: bool):  # type: ignore[no-untyped-def]
    from .agent.tracing import NO_TRACING, tracing_from_env

    if not otel:
        return NO_TRACING
    try:
        return tracing_from_env()
    except RuntimeError as exc:
        raise click.UsageError(f"--otel: {exc}") from None


def _describe_limits(limits: LimitsConfig) -> str:
    def show(value: float, text: str) -> str:
        return f"{value:g} {text}" if value else f"no {text} limit"

    return ", ".join([
        show(limits.max_turns_per_session, "turns/session"),
        f"sends {limits.send_rate:g}/s burst {limits.send_burst}" if limits.sends.enabled else "no send limit",
        f"cancels {limits.cancel_rate:g}/s burst {limits.cancel_burst}" if limits.cancels.enabled
        else "no cancel limit",
        show(limits.max_subscriptions, "subscriptions/connection"),
        show(limits.max_connections_per_client, "connections/client"),
        f"audio {limits.audio_bytes_per_s} B/s" if limits.audio.enabled else "no audio limit",
    ])


def _tune_gc() -> None:
    """A server allocates a few objects per streamed token, nearly all short
    lived: with the default young-generation threshold (700) the collector
    ran hundreds of times a second in a busy worker, each pass costing about
    as much as one with thousands of objects. Fewer, larger young passes, and
    what startup loaded (modules, the app) moved out of the collector's
    reach, cut a streamed token's CPU and the collector's pauses."""
    gc.freeze()
    gc.set_threshold(GC_YOUNG_THRESHOLD, *gc.get_threshold()[1:])


def _gateway(store, agent_spec: str | None, config, lease_ms: int):  # type: ignore[no-untyped-def]
    """``serve`` on Redis: a gateway, plus an in-process worker when an agent is named."""
    from .agent import Runtime
    from .agent.cluster import ClusterConfig, ClusterWorker
    from .server.gateway import RemoteRuntime

    cluster = ClusterConfig(lease_ms=lease_ms)
    worker = None
    if agent_spec:
        worker = ClusterWorker(Runtime(store, load_agent(agent_spec), config), store, cluster)
    return agent_spec, RemoteRuntime(store, cluster, config=config, worker=worker)


@main.command()
@click.option("--store", "store_url", required=True,
              help="redis://HOST:PORT[/DB][?prefix=…], shared with the gateways")
@click.option("--agent", "agent_spec", required=True,
              help="module:attr of a turnline.Agent or a function taking a Turn")
@click.option("--policy", default="concurrent", show_default=True,
              type=click.Choice(["concurrent", "queue", "interrupt", "reject", "rollback"]),
              help="default double-texting policy (workers decide it; give every worker the same)")
@click.option("--queue-limit", default=16, show_default=True, type=int)
@click.option("--abort-grace", default=2.0, show_default=True, type=float,
              help="seconds an aborted handler may take before its turn is ended for it")
@click.option("--lease-ms", default=3000, show_default=True, type=int,
              help="a session's lease; a dead worker's turns end (worker_lost) within it plus --reaper-ms")
@click.option("--reaper-ms", default=500, show_default=True, type=int,
              help="how often to look for sessions whose worker stopped renewing its lease")
@click.option("--concurrency", default=256, show_default=True, type=int,
              help="busy sessions (running or queued turns) this worker takes from the dispatch stream at once")
@click.option("--idle-release", default=30.0, show_default=True, type=float,
              help="seconds after which a session with nothing running or queued is let go")
@click.option("--id", "worker_id", default=None, help="worker id (default: w<pid>-<random>)")
@click.option("--otel/--no-otel", default=False, show_default=True, help=OTEL_HELP)
@click.option("--log-level", default="info", show_default=True)
def worker(store_url: str, agent_spec: str, policy: str, queue_limit: int, abort_grace: float, lease_ms: int,
           reaper_ms: int, concurrency: int, idle_release: float, worker_id: str | None, otel: bool,
           log_level: str) -> None:
    """Run an agent worker for gateways on Redis (`turnline serve --store redis://…`)."""
    import asyncio
    import signal

    from .agent import Runtime, RuntimeConfig
    from .agent.cluster import ClusterConfig, ClusterWorker
    from .protocol import is_valid_id
    from .store import open_store, parse_store_url

    if parse_store_url(store_url)[0] != "redis":
        raise click.BadParameter("workers share a redis:// store with the gateways", param_hint="--store")
    if lease_ms < 100 or reaper_ms < 10:
        raise click.BadParameter("--lease-ms must be at least 100 and --reaper-ms at least 10")
    if worker_id is not None and not is_valid_id(worker_id):
        raise click.BadParameter("letters, digits and . _ : - only", param_hint="--id")
    agent = load_agent(agent_spec)
    logging.basicConfig(level=log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    config = RuntimeConfig(default_policy=policy, queue_limit=queue_limit, abort_grace_s=abort_grace,
                           tracing=_tracing(otel))
    cluster = ClusterConfig(lease_ms=lease_ms, reaper_interval_s=reaper_ms / 1000, concurrency=concurrency,
                            idle_release_s=idle_release)

    async def run() -> None:
        store = open_store(store_url)
        await store.open()
        node = ClusterWorker(Runtime(store, agent, config), store, cluster, worker=worker_id)
        await node.start()
        _tune_gc()
        click.echo(f"turnline worker {node.id}: agent {agent_spec}, lease {lease_ms} ms, "
                   f"worker_lost within {cluster.worker_lost_bound_s:g} s")
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        await node.close()
        await store.close()
        if otel:
            from .agent.tracing import shutdown_tracing

            shutdown_tracing()

    try:  # installed with uvicorn[standard]; the gateway's uvicorn uses it too
        import uvloop
    except ImportError:  # pragma: no cover - depends on the platform
        asyncio.run(run())
    else:
        uvloop.run(run())


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
