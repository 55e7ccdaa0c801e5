"""Shared fixtures: a real Redis and the whole real mesh (services + Envoy).

Processes bind ports reserved at start, are started in dependency order and
always stopped. Their logs are printed only when a test that used them fails.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import pytest

from services.launcher.mesh import Mesh, MeshConfig, spawn_redis

# Fast settings for tests; the code paths are the ones `make run` uses.
TEST_SERVICE_ENV = {
    "TOKENMESH_TEST_MODELS": "deterministic-test:1",
    "TOKENMESH_MODELS": "demo-lm:1,all-minilm-l6-v2:1",
    "TOKENMESH_ENGINE": "onnxruntime",
    "TOKENMESH_ENGINE_THREADS": "1",
    "TOKENMESH_TEST_ENGINE_STEP_MS": "20",
    # Tests share 127.0.0.1 as their source address; the limiter gets its own test.
    "TOKENMESH_AUTH_MAX_FAILURES_PER_MINUTE": "100000",
    # Keys without their own limit may make many requests here.
    "TOKENMESH_RATELIMIT_DEFAULT_RPM": "100000",
    "TOKENMESH_GRACE_SECONDS": "5",
    "TOKENMESH_LOG_LEVEL": "INFO",
    # Jobs: webhooks to the tests' own loopback receiver, retried within a second;
    # items a killed replica left are taken over soon.
    "TOKENMESH_WEBHOOK_ALLOW_HOSTS": "127.0.0.1",
    "TOKENMESH_WEBHOOK_RETRY_SCHEDULE": "0.2,0.2,0.2",
    "TOKENMESH_WEBHOOK_POLL_SECONDS": "0.1",
    "TOKENMESH_JOBS_CLAIM_IDLE_SECONDS": "2",
    # The shared mesh computes every request (tests of the response cache start
    # a mesh of their own with it on: tests/e2e/test_response_cache.py).
    "TOKENMESH_CACHE": "off",
}


@pytest.hookimpl(tryfirst=True, hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    outcome = yield
    report = outcome.get_result()  # type: ignore[attr-defined]
    setattr(item, f"rep_{report.when}", report)


def _redis(tmp_path_factory: pytest.TempPathFactory, name: str, durable: bool) -> Iterator[str]:
    """Yields REDIS_URL when set, else the URL of a bundled redis-server it runs."""
    if os.environ.get("REDIS_URL"):
        yield os.environ["REDIS_URL"]
        return
    state = tmp_path_factory.mktemp(name)
    child, url = spawn_redis(state / "data", state / "redis.log", durable=durable)
    try:
        yield url
    finally:
        child.terminate()
        child.wait(10)


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real Redis: REDIS_URL when set, else the bundled redis-server (AOF)."""
    yield from _redis(tmp_path_factory, "redis", durable=True)


def private_db_url(redis_url: str, db: int) -> str:
    """Returns `redis_url` pointing at logical database `db` (the session mesh uses 0:
    a test whose state must not meet the mesh's background tasks takes its own)."""
    return urlunsplit(urlsplit(redis_url)._replace(path=f"/{db}"))


@pytest.fixture(scope="session")
def limits_redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The rate limiter's Redis: REDIS_URL when set, else a volatile bundled one
    (as `make run` has it: no fsync on the edge's hot path)."""
    yield from _redis(tmp_path_factory, "redis-limits", durable=False)


def one_worker_mesh_config(state_dir: Path, **env: str) -> MeshConfig:
    """A mesh of its own (its own Redis too) with one worker serving the test model
    only, for tests that kill, pause or restart its parts; `env` adds settings."""
    return MeshConfig(
        state_dir=state_dir,
        workers=1,
        envoy_concurrency=1,
        health_check_interval_s=0.5,
        service_env={**TEST_SERVICE_ENV, "TOKENMESH_MODELS": "", **env},
    )


@pytest.fixture(scope="session")
def mesh(
    tmp_path_factory: pytest.TempPathFactory, redis_url: str, limits_redis_url: str
) -> Iterator[Mesh]:
    """The whole mesh: auth, router, usage, two inference workers, Envoy."""
    config = MeshConfig(
        state_dir=Path(tmp_path_factory.mktemp("mesh")),
        redis_url=redis_url,
        # Each service logs in as its own Redis ACL user (added to the session's Redis).
        redis_users=True,
        workers=2,
        envoy_concurrency=1,
        health_check_interval_s=0.5,
        service_env={**TEST_SERVICE_ENV, "TOKENMESH_RATELIMIT_REDIS_URL": limits_redis_url},
    )
    with Mesh(config) as running:
        yield running


@pytest.fixture(autouse=True)
def _dump_mesh_logs_on_failure(request: pytest.FixtureRequest) -> Iterator[None]:
    yield
    report = getattr(request.node, "rep_call", None)
    if report is not None and report.failed and "mesh" in request.fixturenames:
        print(request.getfixturevalue("mesh").log_tails())
