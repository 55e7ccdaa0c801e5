"""The auth service in process, on its own Redis: failure throttling and secret files."""

from __future__ import annotations

import contextlib
import os
import stat
from collections.abc import AsyncIterator, Iterator
from typing import Any

import grpc.aio
import pytest
from envoy.service.auth.v3 import external_auth_pb2, external_auth_pb2_grpc
from envoy.type.v3 import http_status_pb2
from google.rpc import code_pb2

from services.auth.service import AuthService, AuthSettings
from services.core.server import serving
from tests import audit, mtls
from tokenmesh.auth.v1 import auth_pb2, auth_service_pb2, auth_service_pb2_grpc

MAX_FAILURES = 3
NAT = "203.0.113.7"  # many clients behind one address
ELSEWHERE = "198.51.100.9"
GUESS = "tm_" + "y" * 43


@contextlib.asynccontextmanager
async def _auth(settings: AuthSettings) -> AsyncIterator[tuple[AuthService, grpc.aio.Channel]]:
    service = AuthService(settings)
    async with serving(service, settings) as running:
        async with mtls.aio_channel(running.port, peer="auth") as channel:  # as the edge
            yield service, channel


def _settings(redis_url: str, **overrides: Any) -> AuthSettings:
    values: dict[str, Any] = dict(
        pki_dir=mtls.pki_dir(),
        metrics_port=-1,
        grace_s=0.5,
        redis_url=redis_url,
        secret="s" * 32,
        max_failures=MAX_FAILURES,
    )
    values.update(overrides)
    return AuthSettings(**values)


async def _check(channel: grpc.aio.Channel, key: str, source: str) -> Any:
    """Envoy's ext_authz Check for a request with `key` from client address `source`."""
    request = external_auth_pb2.CheckRequest()
    request.attributes.source.address.socket_address.address = source
    request.attributes.request.http.headers["x-api-key"] = key
    stub = external_auth_pb2_grpc.AuthorizationStub(channel)
    return await stub.Check(request, timeout=10)


def _is_throttled(reply: Any) -> bool:
    http: int = reply.denied_response.status.code
    code: int = reply.status.code
    return bool(
        code == code_pb2.RESOURCE_EXHAUSTED and http == http_status_pb2.StatusCode.TooManyRequests
    )


async def test_a_valid_key_passes_from_an_address_throttled_for_failures(own_redis):
    async with _auth(_settings(own_redis)) as (service, channel):
        _, valid = await service.keys.create(
            "acme", "shared nat", ["inference:generate"], [], auth_pb2.KeyLimits(), None
        )
        failures = [await _check(channel, GUESS, NAT) for _ in range(MAX_FAILURES)]
        assert [r.status.code for r in failures] == [code_pb2.UNAUTHENTICATED] * MAX_FAILURES
        guessing = await _check(channel, GUESS, NAT)
        assert _is_throttled(guessing), guessing
        retry_after = {h.header.key: h.header.value for h in guessing.denied_response.headers}
        assert int(retry_after["retry-after"]) >= 1

        allowed = await _check(channel, valid, NAT)
        assert allowed.status.code == code_pb2.OK, allowed
        headers = {h.header.key: h.header.value for h in allowed.ok_response.headers}
        assert headers["x-tokenmesh-tenant"] == "acme"

        # Failures from that address stay throttled; other addresses are untouched.
        assert _is_throttled(await _check(channel, GUESS, NAT))
        other = await _check(channel, GUESS, ELSEWHERE)
        assert other.status.code == code_pb2.UNAUTHENTICATED


async def test_an_ipv6_subnet_shares_one_failure_budget(own_redis):
    # Counted per exact address, a client holding an IPv6 /64 (the least a provider
    # hands out) guessed from a fresh address each time: 2^64 budgets, never a 429.
    async with _auth(_settings(own_redis)) as (_, channel):
        for n in range(MAX_FAILURES):
            refused = await _check(channel, GUESS, f"2001:db8:7:9::{n + 1:x}")
            assert refused.status.code == code_pb2.UNAUTHENTICATED
        assert _is_throttled(await _check(channel, GUESS, "2001:db8:7:9:ab:cd:ef:1"))
        # Another /64 is another source; an IPv4-mapped address is its IPv4 address.
        other = await _check(channel, GUESS, "2001:db8:7:a::1")
        assert other.status.code == code_pb2.UNAUTHENTICATED
        for _ in range(MAX_FAILURES):
            await _check(channel, GUESS, ELSEWHERE)
        assert _is_throttled(await _check(channel, GUESS, f"::ffff:{ELSEWHERE}"))


async def test_malformed_token_requests_are_throttled_and_keep_a_bounded_count(own_redis):
    # A malformed key sent to IssueToken was counted, yet never answered 429, and
    # each failure was kept: one source's flood grew its list without end.
    async with _auth(_settings(own_redis)) as (service, channel):
        stub = auth_service_pb2_grpc.AuthServiceStub(channel)
        codes = []
        for _ in range(MAX_FAILURES + 50):
            try:
                await stub.IssueToken(auth_service_pb2.IssueTokenRequest(api_key="nope"))
            except grpc.aio.AioRpcError as refused:
                codes.append(refused.code())
        assert codes[:MAX_FAILURES] == [grpc.StatusCode.UNAUTHENTICATED] * MAX_FAILURES
        assert set(codes[MAX_FAILURES:]) == {grpc.StatusCode.RESOURCE_EXHAUSTED}
        counted = service.authenticator.limiter._failures  # noqa: SLF001 - its memory
        assert max(len(window) for window in counted.values()) <= MAX_FAILURES


# Secret files.


@pytest.fixture
def umask_0() -> Iterator[None]:
    """The most permissive umask: a file's mode is exactly what its creator asked for."""
    old = os.umask(0)
    try:
        yield
    finally:
        os.umask(old)


async def test_the_dev_admin_key_file_is_never_readable_by_others(tmp_path, own_redis, umask_0):
    state = tmp_path / "state"
    key_file, secret_file = state / "admin.key", state / "auth.secret"
    settings = _settings(
        own_redis, secret=None, secret_file=secret_file, bootstrap_key_file=key_file
    )
    with audit.modes_under(state) as modes:
        async with _auth(settings) as (service, _):
            assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
            assert await service.keys.authenticate(key_file.read_text().strip()) is not None
    assert stat.S_IMODE(secret_file.stat().st_mode) == 0o600
    # Every file that ever existed in the state dir (temporaries included) was 0600.
    assert modes and all(seen == {0o600} for seen in modes.values()), modes
    assert sorted(os.listdir(state)) == ["admin.key", "auth.secret"]  # no temporaries left


async def test_a_stale_dev_admin_key_file_is_replaced_with_mode_0600(tmp_path, own_redis, umask_0):
    state = tmp_path / "state"
    state.mkdir()
    key_file = state / "admin.key"
    key_file.write_text("tm_" + "z" * 43 + "\n")  # a key this Redis does not know
    os.chmod(key_file, 0o644)
    stale_inode = key_file.stat().st_ino  # whoever opened it then could read what goes in
    with audit.modes_under(state) as modes:
        async with _auth(_settings(own_redis, bootstrap_key_file=key_file)) as (service, _):
            assert await service.keys.authenticate(key_file.read_text().strip()) is not None
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    assert key_file.stat().st_ino != stale_inode, "the new secret went into the old file"
    assert all(seen == {0o600} for name, seen in modes.items() if name != "admin.key"), modes


async def test_issue_token_reads_the_key_as_every_credential_is_read(own_redis):
    # It trimmed Unicode spaces (str.strip), where every other reading of a key
    # (the edge's cache, `credential`) trims ASCII whitespace only.
    async with _auth(_settings(own_redis)) as (service, channel):
        stub = auth_service_pb2_grpc.AuthServiceStub(channel)
        _, secret = await service.keys.create(
            "acme", "k", ["inference:generate"], [], auth_pb2.KeyLimits(), None
        )
        await stub.IssueToken(auth_service_pb2.IssueTokenRequest(api_key=f" {secret}\n"))
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await stub.IssueToken(auth_service_pb2.IssueTokenRequest(api_key=f"{secret}\u00a0"))
        assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
