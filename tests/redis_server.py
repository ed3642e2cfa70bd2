"""A Redis for tests, benchmarks and scripts, with nothing set up by hand.

``redis_for_tests()`` yields a URL: ``redis://127.0.0.1:6379`` when a server
answers PING there, otherwise a throwaway ``redis-server`` started on a free
port (nothing saved to disk) and stopped afterwards. ``redis_cluster_for_tests()``
yields the URL of one node of a throwaway Redis Cluster of three primaries
(always started here: the local server is not a cluster). ``scratch_prefix(url)``
yields a random key prefix and deletes its keys afterwards, so tests share a
server without seeing each other (never FLUSHALL: others use it too).

As a script (``scripts/redis-ensure`` runs it) it prints a reachable URL,
starting a throwaway server that keeps running in the background when none
answers; ``--stop`` stops the throwaway servers it started.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Callable, Iterator

DEFAULT_URL = "redis://127.0.0.1:6379"
START_TIMEOUT_S = 10.0
STATE_DIR = Path(__file__).resolve().parents[1] / ".turnline" / "redis-ensure"


def ping(host: str = "127.0.0.1", port: int = 6379, timeout: float = 0.5) -> bool:
    """Does a Redis answer PING at host:port? (A raw RESP exchange: no client library needed.)"""
    try:
        with socket.create_connection((host, port), timeout=timeout) as s:
            s.sendall(b"PING\r\n")
            return s.recv(64).startswith(b"+PONG")
    except OSError:
        return False


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(directory: str, *, daemonize: bool = False, port: int | None = None,
                 extra: list[str] | None = None) -> tuple[int, subprocess.Popen[bytes] | None]:
    """Start ``redis-server`` on ``port`` (default: a free loopback port); returns (port, process or None when daemonized)."""
    exe = shutil.which("redis-server")
    if exe is None:
        raise RuntimeError("redis-server is not installed and no Redis answers on 127.0.0.1:6379: "
                           "run scripts/ensure-system-deps (make test does)")
    port = port or _free_port()
    cmd = [exe, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
           "--dir", directory, *(extra or ())]
    if daemonize:
        cmd += ["--daemonize", "yes", "--pidfile", os.path.join(directory, "redis.pid"),
                "--logfile", os.path.join(directory, "redis.log")]
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
        proc = None
    else:
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + START_TIMEOUT_S
    while not ping(port=port):
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"redis-server exited: {proc.stderr.read().decode()[-2000:] if proc.stderr else ''}")
        if time.monotonic() > deadline:
            if proc is not None:
                proc.kill()
            raise RuntimeError(f"redis-server did not answer on port {port}")
        time.sleep(0.02)
    return port, proc


@contextlib.contextmanager
def redis_for_tests() -> Iterator[str]:
    """The shared local Redis if it answers, else a throwaway one for the duration."""
    if ping():
        yield DEFAULT_URL
        return
    with tempfile.TemporaryDirectory(prefix="turnline-redis-") as tmp:
        port, proc = start_server(tmp)
        assert proc is not None
        try:
            yield f"redis://127.0.0.1:{port}"
        finally:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def _command(port: int, *args: str) -> bytes:
    """One command on a fresh connection; the raw RESP reply."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(b"".join([b"*%d\r\n" % len(args)] + [b"$%d\r\n%b\r\n" % (len(a), a.encode()) for a in args]))
        reply = s.recv(1 << 16)
    if reply.startswith(b"-"):
        raise RuntimeError(f"redis {args[0]} on port {port}: {reply.decode().strip()}")
    return reply


def start_cluster(directory: str, primaries: int = 3,
                  replicas: int = 0) -> tuple[list[int], list[subprocess.Popen[bytes]]]:
    """Start a Redis Cluster of ``primaries`` nodes on free ports, the 16,384
    slots split evenly, the first ``replicas`` primaries with one replica each
    (their ports follow the primaries'), and wait until every node reports
    ``cluster_state:ok`` and every replica is in sync."""
    ports: list[int] = []
    bus_ports: list[int] = []
    procs: list[subprocess.Popen[bytes]] = []
    try:
        for i in range(primaries + replicas):
            node_dir = os.path.join(directory, f"node{i}")
            os.makedirs(node_dir)
            # The bus port is given: port + 10,000 (the default) may not exist.
            bus_ports.append(_free_port())
            port, proc = start_server(node_dir, extra=["--cluster-enabled", "yes", "--cluster-config-file",
                                                        "nodes.conf", "--cluster-node-timeout", "2000",
                                                        "--cluster-port", str(bus_ports[-1])])
            assert proc is not None
            ports.append(port)
            procs.append(proc)
        for i, port in enumerate(ports[:primaries]):
            first, last = 16384 * i // primaries, 16384 * (i + 1) // primaries - 1
            _command(port, "CLUSTER", "ADDSLOTSRANGE", str(first), str(last))
        for port in ports[1:]:
            _command(port, "CLUSTER", "MEET", "127.0.0.1", str(ports[0]), str(bus_ports[0]))
        deadline = time.monotonic() + START_TIMEOUT_S * 3

        def wait(what: str, ready: Callable[[int], bool], nodes: list[int]) -> None:
            while not all(ready(p) for p in nodes):
                if time.monotonic() > deadline:
                    raise RuntimeError(f"the Redis Cluster did not come up: {what}")
                time.sleep(0.05)

        known = b"cluster_known_nodes:%d\r" % len(ports)
        wait("the nodes meet", lambda p: known in _command(p, "CLUSTER", "INFO"), ports)
        for i, port in enumerate(ports[primaries:]):
            primary_id = _command(ports[i], "CLUSTER", "MYID").split(b"\r\n")[1].decode()
            _command(port, "CLUSTER", "REPLICATE", primary_id)
        wait("replicas in sync", lambda p: b"master_link_status:up" in _command(p, "INFO", "replication"),
             ports[primaries:])
        wait("every slot served", lambda p: b"cluster_state:ok" in _command(p, "CLUSTER", "INFO"), ports)
        return ports, procs
    except BaseException:
        for proc in procs:
            proc.kill()
            proc.wait()
        raise


@contextlib.contextmanager
def redis_cluster_for_tests(primaries: int = 3, replicas: int = 0) -> Iterator[str]:
    """A throwaway Redis Cluster for the duration; yields the URL of its first node."""
    with tempfile.TemporaryDirectory(prefix="turnline-redis-cluster-") as tmp:
        ports, procs = start_cluster(tmp, primaries, replicas)
        try:
            yield f"redis://127.0.0.1:{ports[0]}"
        finally:
            for proc in procs:
                proc.terminate()
            for proc in procs:
                try:
                    proc.wait(10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()


@contextlib.contextmanager
def scratch_prefix(url: str) -> Iterator[str]:
    """A random key prefix; its keys are deleted afterwards (on every node, when ``url`` is a cluster's)."""
    import redis
    from redis.cluster import RedisCluster

    prefix = f"t{uuid.uuid4().hex[:12]}"
    try:
        yield prefix
    finally:
        client = redis.Redis.from_url(url)
        if client.info("cluster").get("cluster_enabled"):
            client.close()
            client = RedisCluster.from_url(url)  # (scans every node)
        try:
            keys = list(client.scan_iter(match=f"{prefix}:*", count=1000))
            step = 1 if isinstance(client, RedisCluster) else 500  # a cluster's DEL names keys of one slot
            for k in range(0, len(keys), step):
                client.delete(*keys[k:k + step])
        finally:
            client.close()


def main(argv: list[str]) -> int:
    if "--stop" in argv:
        for pidfile in STATE_DIR.glob("*/redis.pid"):
            with contextlib.suppress(OSError, ValueError):
                os.kill(int(pidfile.read_text().strip()), signal.SIGTERM)
            shutil.rmtree(pidfile.parent, ignore_errors=True)
        return 0
    if ping():
        print(DEFAULT_URL)
        return 0
    for url_file in STATE_DIR.glob("*/url"):  # one we started before, still running?
        port = int(url_file.read_text().rsplit(":", 1)[1])
        if ping(port=port):
            print(url_file.read_text().strip())
            return 0
        shutil.rmtree(url_file.parent, ignore_errors=True)
    STATE_DIR.mkdir(parents=True, exist_ok=True)
    directory = tempfile.mkdtemp(dir=STATE_DIR)
    port, _ = start_server(directory, daemonize=True)
    url = f"redis://127.0.0.1:{port}"
    Path(directory, "url").write_text(url + "\n")
    print(url)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
