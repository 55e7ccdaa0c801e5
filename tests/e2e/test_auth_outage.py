"""With its own mesh: JWTs survive an auth-service outage; guessing gets 429."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from gateway.edge_auth import EdgeAuth
from services.launcher.mesh import Mesh, MeshConfig
from services.usage.leases import LEASE_TTL_S
from tests.conftest import TEST_SERVICE_ENV
from tests.e2e.test_key_cache import ext_authz_counts

BODY = {"prompt": "hello", "max_tokens": 2}


@pytest.fixture
def small_mesh(tmp_path: Path) -> Iterator[Mesh]:
    # Its own Redis: auth state is encrypted under this mesh's own server secret.
    env = {
        **TEST_SERVICE_ENV,
        "TOKENMESH_MODELS": "",
        "TOKENMESH_AUTH_MAX_FAILURES_PER_MINUTE": "5",
    }
    config = MeshConfig(
        state_dir=tmp_path / "mesh",
        workers=1,
        envoy_concurrency=1,
        health_check_interval_s=0.5,
        service_env=env,
        edge_auth=EdgeAuth(jwks_cache_s=30.0),
    )
    with Mesh(config) as mesh:
        yield mesh


def _complete(mesh: Mesh, headers: dict[str, str]) -> httpx.Response:
    return httpx.post(
        f"{mesh.edge_url}/v1/models/deterministic-test:complete",
        json=BODY,
        headers=headers,
        timeout=10,
    )


def test_valid_jwts_keep_working_while_the_auth_service_is_down(small_mesh):
    key = small_mesh.dev_api_key()
    token = httpx.post(
        f"{small_mesh.edge_url}/v1/auth/token", json={"api_key": key}, timeout=10
    ).json()
    bearer = {"authorization": f"Bearer {token['access_token']}"}
    assert _complete(small_mesh, bearer).status_code == 200
    auth = next(c for c in small_mesh.children if c.name == "auth")
    auth.terminate()
    auth.wait(15)
    # Past the key cache's bound the edge asks about the token's key again (its JWT
    # key check), gets no answer, and lets the request through: wait for that.
    before = ext_authz_counts(small_mesh, "jwt_key_check").get("failure_mode_allowed", 0)
    statuses = []
    deadline = time.monotonic() + 20
    while ext_authz_counts(small_mesh, "jwt_key_check").get("failure_mode_allowed", 0) == before:
        assert time.monotonic() < deadline, statuses
        statuses.append(_complete(small_mesh, bearer).status_code)
        time.sleep(0.2)
    statuses.append(_complete(small_mesh, bearer).status_code)
    assert set(statuses) == {200}, statuses
    # API keys need the auth service: they fail closed, with a clear status.
    assert _complete(small_mesh, {"x-api-key": key}).status_code in (403, 503)


def test_repeated_failures_from_one_source_are_limited(small_mesh):
    statuses = [
        _complete(small_mesh, {"x-api-key": "tm_" + "y" * 43}).status_code for _ in range(8)
    ]
    assert statuses[:5] == [401] * 5, statuses
    assert statuses[-1] == 429, statuses
    assert int(_complete(small_mesh, {"x-api-key": "tm_" + "y" * 43}).headers["retry-after"]) >= 1
    # Only failures are throttled: a valid key from the same address still works.
    assert _complete(small_mesh, {"x-api-key": small_mesh.dev_api_key()}).status_code == 200


def _catalog(mesh: Mesh, headers: dict[str, str]) -> httpx.Response:
    return httpx.get(f"{mesh.edge_url}/v1/catalog/models", headers=headers, timeout=10)


def test_rate_limits_fail_open_when_the_limiter_is_down(small_mesh):
    """The usage service decides the edge's non-inference routes: without it Envoy
    lets them through. Workers decide inference RPCs themselves: still limited."""
    key = {"x-api-key": small_mesh.dev_api_key()}
    assert "x-ratelimit-remaining" in _catalog(small_mesh, key).headers
    usage = next(c for c in small_mesh.children if c.name == "usage")
    usage.terminate()
    usage.wait(15)
    replies = [_catalog(small_mesh, key) for _ in range(3)]
    assert [r.status_code for r in replies] == [200, 200, 200]
    assert "x-ratelimit-remaining" not in replies[-1].headers
    inference = _complete(small_mesh, key)
    assert inference.status_code == 200 and "x-ratelimit-remaining" in inference.headers


def test_rate_limits_fail_open_when_the_limits_redis_is_down(small_mesh):
    key = {"x-api-key": small_mesh.dev_api_key()}
    assert "x-ratelimit-remaining" in _complete(small_mesh, key).headers
    small_mesh.kill("redis-limits")
    # Slots the limiter leased before the kill admit requests for up to a
    # lease's life; after that it answers UNAVAILABLE at once and Envoy lets
    # the requests through, without rate-limit headers.
    during = [_complete(small_mesh, key) for _ in range(3)]
    time.sleep(LEASE_TTL_S + 0.2)
    after = [_complete(small_mesh, key) for _ in range(3)]
    assert [r.status_code for r in during + after] == [200] * 6
    assert not any("x-ratelimit-remaining" in r.headers for r in after)
