"""Shared fixtures: real turnline servers on loopback ports (tests/servers.py), Redis."""

from __future__ import annotations

from typing import Any

import pytest

from servers import RunningServer, start_server


@pytest.fixture
def serve() -> Any:
    """``serve(agent=..., store=...)`` starts a server; all are stopped after the test."""
    started: list[RunningServer] = []

    def factory(*args: Any, **kwargs: Any) -> RunningServer:
        s = start_server(*args, **kwargs)
        started.append(s)
        return s

    yield factory
    for s in started:
        s.stop()


@pytest.fixture
def gate() -> Any:
    """Holds a test agent until the test opens it (integration tests)."""
    from wsraw import Gate  # tests/integration is on sys.path for its own modules

    return Gate()


@pytest.fixture(scope="session")
def redis_url() -> Any:
    """A reachable Redis (the local one, else a throwaway server): tests/redis_server.py."""
    from redis_server import redis_for_tests

    with redis_for_tests() as url:
        yield url


@pytest.fixture(scope="session")
def redis_cluster_url() -> Any:
    """The URL of one node of a throwaway Redis Cluster (three primaries) for the whole run."""
    from redis_server import redis_cluster_for_tests

    with redis_cluster_for_tests() as url:
        yield url


@pytest.fixture
def redis_prefix(redis_url: str) -> Any:
    """A random key prefix for this test; its keys are deleted afterwards."""
    from redis_server import scratch_prefix

    with scratch_prefix(redis_url) as prefix:
        yield prefix


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Browser tests run last: Playwright's sync API keeps an event loop running
    in the main thread for as long as the browser is open, and no asyncio test
    can run beside it."""
    items.sort(key=lambda item: "/tests/e2e/" in str(item.path))
