"""The signing-key schedule: one rotation a period, and never a promotion of a
next key that an edge's cached JWKS may not hold yet."""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
import subprocess
import time
from collections.abc import AsyncIterator
from dataclasses import asdict
from pathlib import Path
from typing import Any

import grpc.aio
import pytest
import redis.asyncio as aioredis
import yaml
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from prometheus_client import REGISTRY

from services.auth import signing
from services.auth.crypto import ServerSecret
from services.auth.service import NEXT_ROTATION, AuthService, AuthSettings
from services.auth.signing import KEYS, SigningKeyRing
from services.core.server import serving
from tests import mtls
from tests import observability as obs
from tests.conftest import private_db_url
from tokenmesh.auth.v1 import auth_pb2, auth_service_pb2, auth_service_pb2_grpc

# A logical database of its own: the session mesh's auth service (database 0)
# keeps its signing keys under the same global names.
PRIVATE_DB = 6
SERVER_SECRET = "s" * 32


@pytest.fixture
def db_url(redis_url: str) -> str:
    return private_db_url(redis_url, PRIVATE_DB)


@pytest.fixture
async def client(db_url: str) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.from_url(db_url)
    assert client.connection_pool.connection_kwargs["db"] == PRIVATE_DB
    await client.flushdb()
    yield client
    await client.flushdb()
    await client.aclose()


def _ring(client: aioredis.Redis, jwks_cache_s: float = 300.0) -> SigningKeyRing:
    return SigningKeyRing(client, ServerSecret(SERVER_SECRET.encode()), 900, jwks_cache_s)


def _settings(db_url: str, **overrides: Any) -> AuthSettings:
    values: dict[str, Any] = dict(
        pki_dir=mtls.pki_dir(),
        metrics_port=-1,
        grace_s=0.5,
        redis_url=db_url,
        secret=SERVER_SECRET,
    )
    values.update(overrides)
    return AuthSettings(**values)


@contextlib.asynccontextmanager
async def _auth(settings: AuthSettings) -> AsyncIterator[tuple[AuthService, grpc.aio.Channel]]:
    service = AuthService(settings)
    async with serving(service, settings) as running:
        async with mtls.aio_channel(running.port, peer="auth") as channel:  # as the edge
            yield service, channel


async def _age(client: aioredis.Redis, state: str, created: float) -> str:
    """Rewrites the `state` key as created at `created`, in the form stored before
    `activated` was kept (so this runs on either version); returns its kid."""
    for raw in (await client.hgetall(KEYS)).values():
        record = json.loads(raw)
        if record["state"] == state:
            record["created"] = created
            record.pop("activated", None)
            await client.hset(KEYS, record["kid"], json.dumps(record))
            return str(record["kid"])
    raise AssertionError(f"no {state} key")


async def _current_kid(client: aioredis.Redis) -> str:
    records = [json.loads(raw) for raw in (await client.hgetall(KEYS)).values()]
    return next(str(r["kid"]) for r in records if r["state"] == "current")


async def test_the_schedule_rotates_once_per_period(client: aioredis.Redis, db_url: str) -> None:
    rotation_s = 60.0  # the shortest allowed
    ring = _ring(client)
    await ring.ensure()
    now = time.time()
    await _age(client, "current", now - rotation_s - 1)  # due now
    # The next key was created at the last rotation and every edge has it by now.
    upcoming = await _age(client, "next", now - rotation_s - 1000)
    settings = _settings(db_url, rotation_s=rotation_s, jwks_cache_s=1.0)
    NEXT_ROTATION.set(0)  # another test's schedule may have set it
    async with _auth(settings) as (_, channel):
        deadline = time.monotonic() + 10
        while await _current_kid(client) != upcoming:
            assert time.monotonic() < deadline, "the due rotation never came"
            await asyncio.sleep(0.05)
        # The promoted key signs for a whole period now. The old schedule counted
        # its age from its creation as the next key, a period before: it rotated
        # again within about a second, as soon as the new next key counted as
        # published (an edge's fetch, or this short cache's time rule).
        stub = auth_service_pb2_grpc.AuthServiceStub(channel)
        await stub.GetJwks(auth_service_pb2.GetJwksRequest(), timeout=10)
        deadline = time.monotonic() + 10
        while _next_rotation() < time.time() + rotation_s - 10:  # the schedule's next sleep
            assert time.monotonic() < deadline, "the next rotation is not a period away"
            assert await _current_kid(client) == upcoming, "rotated twice in one period"
            await asyncio.sleep(0.05)
        assert await _current_kid(client) == upcoming


def _next_rotation() -> float:
    """When the auth service's schedule next rotates (its gauge; Unix time)."""
    value = REGISTRY.get_sample_value("tokenmesh_auth_signing_next_rotation_timestamp_seconds")
    return value or 0.0


async def test_a_key_is_current_since_its_promotion(client: aioredis.Redis) -> None:
    ring = _ring(client)
    await ring.ensure()
    first = signing.current_since(await ring.records())
    assert first is not None and first <= time.time()
    created = await _age(client, "next", time.time() - 1000)
    promoted = await ring.rotate()
    assert promoted.kid == created and promoted.activated >= first
    assert signing.current_since(await ring.records()) == promoted.activated
    # A record stored before `activated` was kept: current since its predecessor retired.
    await _age(client, "current", time.time() - 2000)
    retired = next(r for r in await ring.records() if r.state == "previous")
    assert signing.current_since(await ring.records()) == retired.deactivated
    # Fields a newer replica adds do not break this one.
    newer = {**asdict(promoted), "future_field": 1}
    await client.hset(KEYS, promoted.kid, json.dumps(newer))
    assert promoted.kid in {r.kid for r in await ring.records()}


def _reason(error: grpc.aio.AioRpcError) -> str:
    status = rpc_status.from_call(error)  # type: ignore[arg-type]
    assert status is not None
    info = error_details_pb2.ErrorInfo()
    assert status.details[0].Unpack(info)
    return str(info.reason)


async def test_a_jwks_fetch_does_not_make_a_new_next_key_published(
    client: aioredis.Redis, db_url: str
) -> None:
    async with _auth(_settings(db_url, rotation_s=0, jwks_cache_s=300.0)) as (service, channel):
        _, admin = await service.keys.create(
            "admin", "ops", ["admin"], [], auth_pb2.KeyLimits(), None
        )
        stub = auth_service_pb2_grpc.AuthServiceStub(channel)
        metadata = (("x-api-key", admin),)
        # The next key has been published for longer than any edge caches the JWKS.
        await _age(client, "next", time.time() - 300 - 60)
        first = await stub.RotateSigningKey(
            auth_service_pb2.RotateSigningKeyRequest(), metadata=metadata, timeout=10
        )
        # One fetch (one edge of several, a probe, curl: the JWKS is public)...
        await stub.GetJwks(auth_service_pb2.GetJwksRequest(), timeout=10)
        # ...says nothing of the other edges, which cached the JWKS before this
        # next key existed: promoting it now would fail their tokens' kid.
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await stub.RotateSigningKey(
                auth_service_pb2.RotateSigningKeyRequest(), metadata=metadata, timeout=10
            )
        assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert _reason(refused.value) == "SIGNING_KEY_NOT_PUBLISHED"
        assert await _current_kid(client) == first.signing_key.kid
        # Once every replica serves it and every edge's cache has turned over (and
        # been refetched), it may sign.
        published = 300 + signing.JWKS_REFETCH_MARGIN_S + signing.JWKS_SERVE_CACHE_S + 1
        upcoming = await _age(client, "next", time.time() - published)
        second = await stub.RotateSigningKey(
            auth_service_pb2.RotateSigningKeyRequest(), metadata=metadata, timeout=10
        )
        assert second.signing_key.kid == upcoming


# Promtool's clock starts at 0: the samples are moved so that the last one is
# read at this time (3 h), and an hour overdue stays a positive timestamp.
PROMTOOL_AT_S = 3 * 3600
OVERDUE_S = 2 * 3600


def _stuck_rotation_case(samples: list[tuple[float, float]]) -> dict[str, Any]:
    """Returns a promtool test that feeds the rules what the gauge read at each
    (real time, value) sample, one a second, and expects the stuck alert."""
    (rule,) = [r for r in obs.alert_rules() if r.get("alert") == "TokenmeshSigningRotationStuck"]
    last = samples[-1][0]
    values = [value - last + PROMTOOL_AT_S for _, value in samples]
    padding = f"_x{PROMTOOL_AT_S - len(values)}"
    return {
        "rule_files": [str(obs.ALERTS)],
        "evaluation_interval": "1m",
        "tests": [
            {
                "interval": "1s",
                "input_series": [
                    {
                        "series": "tokenmesh_auth_signing_next_rotation_timestamp_seconds"
                        '{instance="auth-0"}',
                        "values": " ".join([padding, *(f"{v:.3f}" for v in values)]),
                    }
                ],
                "alert_rule_test": [
                    {
                        "eval_time": f"{PROMTOOL_AT_S}s",
                        "alertname": "TokenmeshSigningRotationStuck",
                        "exp_alerts": [
                            {"exp_labels": rule["labels"], "exp_annotations": rule["annotations"]}
                        ],
                    }
                ],
            }
        ],
    }


async def test_a_refused_rotation_keeps_the_gauge_overdue_and_the_alert_fires(
    client: aioredis.Redis, db_url: str, tmp_path: Path
) -> None:
    """The schedule retries every second while the due rotation is refused (here:
    the next key is not yet in every edge's cached JWKS): each retry must leave the
    gauge at the time the rotation was due, which TokenmeshSigningRotationStuck
    reads. It was set to now + 1 s on every retry: never overdue, never an alert."""
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.fail("promtool is not installed: run `make promtool` (Debian's prometheus package)")
    rotation_s = 60.0
    ring = _ring(client)
    await ring.ensure()
    await _age(client, "current", time.time() - rotation_s - OVERDUE_S)
    stuck = await _current_kid(client)
    settings = _settings(db_url, rotation_s=rotation_s, jwks_cache_s=300.0)
    NEXT_ROTATION.set(0)  # another test's schedule may have set it
    samples: list[tuple[float, float]] = []
    async with _auth(settings):
        # One sample a second, as a scrape would take them, over several retries.
        while len(samples) < 4:
            await asyncio.sleep(1.0)
            samples.append((time.time(), _next_rotation()))
        assert await _current_kid(client) == stuck, "the rotation was refused"
    for taken, value in samples:
        assert value < taken - 3600, f"the gauge reads {value - taken:+.0f} s from now"
    case = tmp_path / "stuck_rotation_test.yml"
    case.write_text(yaml.safe_dump(_stuck_rotation_case(samples), sort_keys=False))
    result = subprocess.run(
        [promtool, "test", "rules", str(case)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
