"""The edge's API-key cache (gateway/key_cache.py): one ext_authz callout per key and
Envoy worker within the revocation bound, the same identity, failures never cached."""

from __future__ import annotations

import time
from typing import cast

import httpx
import redis

from tests.e2e.test_auth import COMPLETE_BODY, cli, create_key, token_for
from tokenmesh.inference.v1 import inference_pb2

BOUND_S = 5.0  # services.auth.authenticator.REVOCATION_BOUND_S


def ext_authz_counts(mesh, checks: str = "") -> dict[str, int]:
    """Returns the edge's ext_authz counters (ok, denied, ...) over both listeners: the
    API-key checks', or with `checks="jwt_key_check"` the JWT key checks' (its
    stat_prefix, gateway/edge_auth.py).

    (Envoy counts each check twice: per listener, `http.<prefix>.ext_authz.*`,
    and per cluster, `cluster.<name>.ext_authz.*`; the listeners' are read.)
    """
    text = mesh.admin("/stats")
    counts: dict[str, int] = {}
    for line in text.splitlines():
        name, _, value = line.partition(": ")
        if not name.startswith("http.") or ".ext_authz." not in name:
            continue
        prefix, kind = name.split(".ext_authz.", 1)[1].rpartition(".")[::2]
        if prefix == checks and value.strip().isdigit():
            counts[kind] = counts.get(kind, 0) + int(value)
    return counts


def _complete(client: httpx.Client, mesh, headers: dict[str, str]) -> httpx.Response:
    return client.post(
        f"{mesh.edge_url}/v1/models/deterministic-test:complete",
        json=COMPLETE_BODY,
        headers=headers,
        timeout=10,
    )


def _usage_event(mesh, request_id: str) -> inference_pb2.UsageEvent:
    client = redis.Redis.from_url(mesh.redis_url)
    try:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            entries = cast(list[tuple[bytes, dict[bytes, bytes]]], client.xrange("tokenmesh:usage"))
            for _, fields in entries:
                if fields[b"request_id"].decode() == request_id:
                    return inference_pb2.UsageEvent.FromString(fields[b"event"])
            time.sleep(0.05)
    finally:
        client.close()
    raise AssertionError(f"no usage event for {request_id}")


def test_a_key_is_verified_once_per_worker_and_keeps_its_identity(mesh):
    key = create_key(mesh)
    before = ext_authz_counts(mesh).get("ok", 0)
    with httpx.Client() as client:  # one connection: one Envoy worker thread
        replies = [_complete(client, mesh, {"x-api-key": key["secret"]}) for _ in range(6)]
        # How OpenAI SDKs send it: the same key as a bearer token, the same entry.
        replies.append(_complete(client, mesh, {"authorization": f"Bearer {key['secret']}"}))
    assert [r.status_code for r in replies] == [200] * 7
    callouts = ext_authz_counts(mesh).get("ok", 0) - before
    # One, unless this machine stalled past the bound between two of the calls.
    assert 1 <= callouts <= 2, callouts
    for reply in (replies[-2], replies[-1]):  # answered from the cache
        event = _usage_event(mesh, reply.json()["request_id"])
        assert (event.key_id, event.tenant) == (key["id"], "acme")


def test_a_cached_key_keeps_only_its_own_scopes(mesh):
    reader = create_key(mesh, scopes="models:read")
    with httpx.Client() as client:
        models = client.get(
            f"{mesh.edge_url}/v1/models", headers={"x-api-key": reader["secret"]}, timeout=10
        )
        assert models.status_code == 200
        # The second request is answered from the cache: RBAC still refuses the RPC.
        assert _complete(client, mesh, {"x-api-key": reader["secret"]}).status_code == 403


def test_failures_are_never_cached(mesh):
    before = ext_authz_counts(mesh).get("denied", 0)
    unknown = {"x-api-key": "tm_" + "q" * 43}
    with httpx.Client() as client:
        assert [_complete(client, mesh, unknown).status_code for _ in range(3)] == [401] * 3
    assert ext_authz_counts(mesh).get("denied", 0) - before == 3  # each one asked the auth service


def test_a_revoked_key_is_refused_within_the_bound_while_cached(mesh):
    doomed = create_key(mesh)
    headers = {"x-api-key": doomed["secret"]}
    with httpx.Client() as client:
        assert _complete(client, mesh, headers).status_code == 200  # cached from here on
        cli(mesh, "keys", "revoke", doomed["id"])
        revoked_at = time.monotonic()
        seen: list[tuple[float, int]] = []
        while time.monotonic() - revoked_at < BOUND_S + 1.0:
            sent = time.monotonic() - revoked_at
            seen.append((sent, _complete(client, mesh, headers).status_code))
            time.sleep(0.1)
    late = [status for sent, status in seen if sent >= BOUND_S]
    assert late and set(late) == {401}, seen
    first_refusal = next(i for i, (_, status) in enumerate(seen) if status == 401)
    assert {status for _, status in seen[first_refusal:]} == {401}, seen


def _refused_from(
    client: httpx.Client, mesh, headers: dict[str, str], since: float
) -> list[tuple[float, int]]:
    """Sends the request every 0.1 s until the bound and a second have passed since
    `since`; returns (seconds since, status) of each."""
    seen: list[tuple[float, int]] = []
    while (sent := time.monotonic() - since) < BOUND_S + 1.0:
        seen.append((sent, _complete(client, mesh, headers).status_code))
        time.sleep(0.1)
    return seen


def test_a_jwt_is_refused_within_the_bound_once_its_key_is_revoked(mesh):
    # Envoy checks a JWT's signature and claims, never its key: a token minted before
    # the revocation (of a leaked admin key, say) kept working until its exp, 15
    # minutes by default and up to a day. Its key is checked once per bound now.
    doomed = create_key(mesh)
    bearer = {"authorization": f"Bearer {token_for(mesh, doomed['secret'])}"}
    before = ext_authz_counts(mesh, "jwt_key_check")
    with httpx.Client() as client:  # one connection: one Envoy worker thread
        assert [_complete(client, mesh, bearer).status_code for _ in range(6)] == [200] * 6
        checks = ext_authz_counts(mesh, "jwt_key_check").get("ok", 0) - before.get("ok", 0)
        cli(mesh, "keys", "revoke", doomed["id"])
        seen = _refused_from(client, mesh, bearer, time.monotonic())
    late = [status for sent, status in seen if sent >= BOUND_S]
    assert late and set(late) == {401}, seen
    first_refusal = next(i for i, (_, status) in enumerate(seen) if status == 401)
    assert {status for _, status in seen[first_refusal:]} == {401}, seen
    # One check of the key, unless this machine stalled past the bound meanwhile.
    assert 1 <= checks <= 2, checks
    # Its "no" is kept: the later refusals come from the API-key check (closed), and
    # the open JWT key check is not asked again.
    denied = ext_authz_counts(mesh, "jwt_key_check").get("denied", 0) - before.get("denied", 0)
    assert denied == 1, (denied, seen)


def test_a_jwt_of_a_secret_a_rotation_ended_is_refused_within_the_bound(mesh):
    rotating = create_key(mesh)
    old = {"authorization": f"Bearer {token_for(mesh, rotating['secret'])}"}
    with httpx.Client() as client:
        assert _complete(client, mesh, old).status_code == 200
        rotated = cli(mesh, "keys", "rotate", rotating["id"], "--overlap", "0")
        seen = _refused_from(client, mesh, old, time.monotonic())
        new = {"authorization": f"Bearer {token_for(mesh, rotated['secret'])}"}
        assert _complete(client, mesh, new).status_code == 200  # the key stands
    assert {status for sent, status in seen if sent >= BOUND_S} == {401}, seen


def test_a_header_of_many_spaces_is_refused_at_once_and_stalls_no_one(mesh):
    # The cache's trim was quadratic in a run of spaces: one such header held an
    # Envoy worker thread (every request on it, /healthz too) for seconds.
    padded = {"x-api-key": "a" + " " * 55_000 + "b"}
    with httpx.Client() as client:
        started = time.monotonic()
        assert _complete(client, mesh, padded).status_code == 401
        assert time.monotonic() - started < 2.0
