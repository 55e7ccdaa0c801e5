"""Edge authentication: JWTs verified in Envoy, API keys via ext_authz,
per-RPC scopes, key revocation and rotation, signing-key rotation."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from typing import Any

import grpc
import httpx
import jwt
import pytest
import redis
from cryptography.hazmat.primitives import serialization

from gateway import edge_auth
from services.auth.crypto import ServerSecret
from services.auth.signing import JWKS_REFETCH_MARGIN_S, KEYS, SigningKeyRing
from tests.e2e.conftest import authed_channel
from tokenmesh.inference.v1 import inference_service_pb2 as pb
from tokenmesh.inference.v1 import inference_service_pb2_grpc as rpc

GENERATE = "/v1/models/deterministic-test:generate"
COMPLETE_BODY = {"prompt": "hello", "max_tokens": 2}


def cli(mesh, *args: str) -> dict[str, Any]:
    """Runs the operator CLI against the test mesh; returns its JSON output."""
    result = subprocess.run(
        [sys.executable, "-m", "services.cli", *args, "--json"],
        env={**os.environ, "TOKENMESH_STATE_DIR": str(mesh.state_dir)},
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 0, result.stderr
    parsed: dict[str, Any] = json.loads(result.stdout)
    return parsed


def create_key(
    mesh, *extra: str, scopes: str = "inference:generate,inference:embed,models:read"
) -> dict[str, Any]:
    return cli(mesh, "keys", "create", "--tenant", "acme", "--scopes", scopes, *extra)


def token_for(mesh, secret: str) -> str:
    reply = httpx.post(f"{mesh.edge_url}/v1/auth/token", json={"api_key": secret}, timeout=10)
    assert reply.status_code == 200, reply.text
    body = reply.json()
    assert body["token_type"] == "Bearer" and body["expires_in"] > 0
    return str(body["access_token"])


def complete(mesh, headers: dict[str, str], model: str = "deterministic-test") -> httpx.Response:
    return httpx.post(
        f"{mesh.edge_url}/v1/models/{model}:complete",
        json=COMPLETE_BODY,
        headers=headers,
        timeout=10,
    )


@pytest.fixture(scope="module")
def key(mesh) -> dict[str, Any]:
    return create_key(mesh)


def test_jwt_and_api_key_both_work_for_rest(mesh, key):
    token = token_for(mesh, key["secret"])
    assert complete(mesh, {"authorization": f"Bearer {token}"}).status_code == 200
    assert complete(mesh, {"x-api-key": key["secret"]}).status_code == 200
    assert complete(mesh, {"authorization": f"Bearer {key['secret']}"}).status_code == 200
    # An auth scheme is case-insensitive: a JWT so sent was refused 401, a key was not.
    for scheme in ("bearer", "BEARER", "bEaReR"):
        for credential in (token, key["secret"]):
            reply = complete(mesh, {"authorization": f"{scheme} {credential}"})
            assert reply.status_code == 200, (scheme, reply.text)
    with httpx.stream(
        "POST",
        f"{mesh.edge_url}{GENERATE}",
        json=COMPLETE_BODY,
        headers={"authorization": f"Bearer {token}"},
        timeout=10,
    ) as response:
        assert response.status_code == 200


@pytest.mark.parametrize("kind", ["jwt", "api_key"])
def test_jwt_and_api_key_both_work_for_grpc(mesh, key, kind):
    credential = token_for(mesh, key["secret"]) if kind == "jwt" else key["secret"]
    metadata = (
        [("authorization", f"Bearer {credential}")]
        if kind == "jwt"
        else [("x-api-key", credential)]
    )
    with authed_channel(mesh.edge_address, metadata) as channel:
        stub = rpc.InferenceServiceStub(channel)
        reply = stub.Complete(
            pb.CompleteRequest(model="deterministic-test", prompt="x", max_tokens=1), timeout=10
        )
        assert reply.usage.completion_tokens == 1


def test_the_worker_sees_who_called(mesh, key):
    """Identity reaches upstreams: the usage event carries the key id and tenant."""
    reply = complete(mesh, {"x-api-key": key["secret"]})
    request_id = reply.json()["request_id"]
    client = redis.Redis.from_url(mesh.redis_url)
    try:
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            found = [
                f
                for _, f in client.xrange("tokenmesh:usage")
                if f[b"request_id"].decode() == request_id
            ]
            if found:
                break
            time.sleep(0.05)
    finally:
        client.close()
    from tokenmesh.inference.v1 import inference_pb2

    event = inference_pb2.UsageEvent.FromString(found[0][b"event"])
    assert event.key_id == key["id"] and event.tenant == "acme"


def test_unauthenticated_requests_get_401_with_www_authenticate(mesh):
    for headers in (
        {},
        {"x-api-key": "tm_" + "x" * 43},
        {"x-api-key": "garbage"},
        {"authorization": "Bearer not-a-token"},
    ):
        reply = complete(mesh, headers)
        assert reply.status_code == 401, headers
        assert reply.headers["www-authenticate"].startswith("Bearer")
        assert reply.json()["code"] == 16


def test_spoofed_identity_headers_are_ignored(mesh):
    reply = complete(mesh, {"x-tokenmesh-key-id": "key_admin", "x-tokenmesh-scopes": "admin"})
    assert reply.status_code == 401


def _signer(mesh) -> tuple[str, Any]:
    secret = ServerSecret((mesh.state_dir / "auth-secret").read_text().strip().encode())

    async def current() -> tuple[str, Any]:
        client = __import__("redis.asyncio", fromlist=["Redis"]).from_url(mesh.redis_url)
        try:
            return await SigningKeyRing(client, secret, 900, 300).current()
        finally:
            await client.aclose()

    return asyncio.run(current())


def _claims(key: dict[str, Any], **overrides: Any) -> dict[str, Any]:
    now = int(time.time())
    claims = {
        "iss": "https://tokenmesh.local/auth",
        "aud": "tokenmesh",
        "sub": key["id"],
        "tenant": "acme",
        "scope": "inference:generate models:read",
        "models": "",
        "tier": "",
        "iat": now,
        "nbf": now,
        "exp": now + 300,
        "jti": "t",
    }
    claims.update(overrides)
    return claims


def test_bad_jwts_are_rejected(mesh, key):
    kid, private = _signer(mesh)
    now = int(time.time())
    good = jwt.encode(_claims(key), private, algorithm="ES256", headers={"kid": kid})
    assert (
        complete(mesh, {"authorization": f"Bearer {good}"}).status_code == 200
    )  # the forger works...
    public_pem = private.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    header, payload, signature = good.split(".")
    forged_payload = jwt.utils.base64url_encode(
        json.dumps(_claims(key, scope="admin")).encode()
    ).decode()
    bad = {
        "expired": jwt.encode(
            _claims(key, exp=now - 120, iat=now - 600, nbf=now - 600),
            private,
            algorithm="ES256",
            headers={"kid": kid},
        ),
        "not yet valid": jwt.encode(
            _claims(key, nbf=now + 600), private, algorithm="ES256", headers={"kid": kid}
        ),
        "tampered": f"{header}.{forged_payload}.{signature}",
        "alg none": jwt.encode(_claims(key), None, algorithm="none", headers={"kid": kid}),
        "HS256 with the public key": _hs256(_claims(key), public_pem, kid),
        "wrong issuer": jwt.encode(
            _claims(key, iss="https://evil"), private, algorithm="ES256", headers={"kid": kid}
        ),
        "wrong audience": jwt.encode(
            _claims(key, aud="other"), private, algorithm="ES256", headers={"kid": kid}
        ),
        "unknown kid": jwt.encode(
            _claims(key), private, algorithm="ES256", headers={"kid": "sk_unknown"}
        ),
    }
    for name, token in bad.items():
        reply = complete(mesh, {"authorization": f"Bearer {token}"})
        assert reply.status_code == 401, f"{name}: {reply.status_code} {reply.text}"


def test_a_jwt_without_exp_or_outliving_any_issued_token_is_rejected(mesh, key):
    kid, private = _signer(mesh)

    def status(claims: dict[str, Any]) -> int:
        token = jwt.encode(claims, private, algorithm="ES256", headers={"kid": kid})
        return complete(mesh, {"authorization": f"Bearer {token}"}).status_code

    no_exp = _claims(key)
    del no_exp["exp"]
    # Signed by the real current key, every other claim valid: it would never expire.
    assert status(no_exp) == 401
    now = int(time.time())
    ttl = mesh.config.edge_auth.token_ttl_s  # the auth service's, as the launcher sets both
    # The lifetime the auth service issues is accepted...
    assert status(_claims(key, exp=now + ttl)) == 200
    # ...a longer one (beyond the clock-skew allowance) is not: a day's, which any
    # edge took (a token minted with a leaked key worked a day after it was retired).
    assert status(_claims(key, exp=now + ttl + edge_auth.JWT_CLOCK_SKEW_S + 60)) == 401
    assert status(_claims(key, exp=now + edge_auth.LONGEST_TOKEN_TTL_S)) == 401


def _hs256(claims: dict[str, Any], key: bytes, kid: str) -> str:
    import base64
    import hashlib
    import hmac

    def b64(data: bytes) -> str:
        return base64.urlsafe_b64encode(data).rstrip(b"=").decode()

    signing_input = (
        f"{b64(json.dumps({'alg': 'HS256', 'typ': 'JWT', 'kid': kid}).encode())}."
        f"{b64(json.dumps(claims).encode())}"
    )
    return f"{signing_input}.{b64(hmac.new(key, signing_input.encode(), hashlib.sha256).digest())}"


def test_scopes_and_allowed_models_are_enforced(mesh):
    no_embed = create_key(mesh, scopes="inference:generate,models:read")
    reply = httpx.post(
        f"{mesh.edge_url}/v1/models/all-minilm-l6-v2:embed",
        json={"inputs": ["x"]},
        headers={"x-api-key": no_embed["secret"]},
        timeout=10,
    )
    assert reply.status_code == 403 and reply.json()["code"] == 7
    token = token_for(mesh, no_embed["secret"])
    reply = httpx.post(
        f"{mesh.edge_url}/v1/models/all-minilm-l6-v2:embed",
        json={"inputs": ["x"]},
        headers={"authorization": f"Bearer {token}"},
        timeout=10,
    )
    assert reply.status_code == 403
    one_model = create_key(mesh, "--models", "demo-lm")
    assert complete(mesh, {"x-api-key": one_model["secret"]}, model="demo-lm").status_code == 200
    denied = complete(mesh, {"x-api-key": one_model["secret"]}, model="deterministic-test")
    assert denied.status_code == 403
    assert denied.json()["details"][0]["reason"] == "MODEL_NOT_ALLOWED"
    token = token_for(mesh, one_model["secret"])
    assert (
        complete(mesh, {"authorization": f"Bearer {token}"}, model="deterministic-test").status_code
        == 403
    )
    # Admin RPCs need the admin scope.
    reply = httpx.get(
        f"{mesh.edge_url}/v1/auth/keys", headers={"x-api-key": one_model["secret"]}, timeout=10
    )
    assert reply.status_code == 403


def _wait_status(mesh, headers: dict[str, str], status: int, timeout_s: float) -> float:
    """Returns when (seconds from now) the first request that got `status` was sent:
    the change had reached the edge by then. (The time its answer came back added the
    request's own latency, 18 ms over a 5 s bound once on a loaded CI machine.)"""
    started = time.monotonic()
    while (sent := time.monotonic()) - started < timeout_s:
        if complete(mesh, headers).status_code == status:
            return sent - started
        time.sleep(0.1)
    raise AssertionError(f"still not {status} after {timeout_s}s")


def test_a_revoked_key_stops_working_within_5_seconds(mesh):
    doomed = create_key(mesh)
    assert complete(mesh, {"x-api-key": doomed["secret"]}).status_code == 200
    cli(mesh, "keys", "revoke", doomed["id"])
    assert _wait_status(mesh, {"x-api-key": doomed["secret"]}, 401, 5.0) <= 5.0
    reply = httpx.post(
        f"{mesh.edge_url}/v1/auth/token", json={"api_key": doomed["secret"]}, timeout=10
    )
    assert reply.status_code == 401


def test_a_rotated_key_keeps_its_old_secret_for_the_overlap_only(mesh):
    rotating = create_key(mesh)
    old = rotating["secret"]
    rotated = cli(mesh, "keys", "rotate", rotating["id"], "--overlap", "3")
    new = rotated["secret"]
    assert new != old
    assert complete(mesh, {"x-api-key": new}).status_code == 200
    assert complete(mesh, {"x-api-key": old}).status_code == 200
    _wait_status(mesh, {"x-api-key": old}, 401, 10.0)
    assert complete(mesh, {"x-api-key": new}).status_code == 200


def _next_key_published_a_cache_period_ago(mesh) -> None:
    """Backdates the next signing key past the JWKS cache time (and refetch margin).

    A rotation waits until every edge's cached JWKS holds the next key; this
    mesh's one edge fetched it at start, after the auth service created it.
    """
    client = redis.Redis.from_url(mesh.redis_url)
    try:
        for kid, raw in client.hgetall(KEYS).items():
            record = json.loads(raw)
            if record["state"] == "next":
                record["created"] = time.time() - 300 - JWKS_REFETCH_MARGIN_S - 60
                client.hset(KEYS, kid, json.dumps(record))
    finally:
        client.close()


def test_signing_key_rotation_needs_no_envoy_restart(mesh, key):
    envoy_pid = next(c.pid for c in mesh.children if c.name == "envoy")
    before = token_for(mesh, key["secret"])
    _next_key_published_a_cache_period_ago(mesh)
    rotated = cli(mesh, "signing-keys", "rotate")
    after = token_for(mesh, key["secret"])
    assert jwt.get_unverified_header(after)["kid"] == rotated["kid"]
    assert jwt.get_unverified_header(before)["kid"] != rotated["kid"]
    assert complete(mesh, {"authorization": f"Bearer {after}"}).status_code == 200
    assert complete(mesh, {"authorization": f"Bearer {before}"}).status_code == 200
    assert next(c.pid for c in mesh.children if c.name == "envoy") == envoy_pid
    jwks = httpx.get(f"{mesh.edge_url}/.well-known/jwks.json", timeout=10).json()
    kids = {k["kid"] for k in jwks["keys"]}
    assert {jwt.get_unverified_header(before)["kid"], rotated["kid"]} <= kids


def _token_requests_logged(mesh) -> int:
    log = mesh.log_dir / "edge-access.log"
    text = log.read_text(errors="replace") if log.exists() else ""
    return text.count('"/v1/auth/token')


def test_secrets_never_reach_redis_or_logs(mesh):
    made = create_key(mesh)
    secret = made["secret"]
    complete(mesh, {"x-api-key": secret})
    token_for(mesh, secret)
    # The transcoder took the key from the query too: the access log wrote it (a live
    # secret in edge-access.log, `grpc_path`, for a request the transcoder did not
    # rewrite), and the edge's trace span exported it (`http.url`). A key in a URL is
    # refused at the edge now, its query taken off before anything logs it.
    logged = _token_requests_logged(mesh)
    for method, path, params in (
        ("POST", "/v1/auth/token", {"api_key": secret}),
        ("GET", "/v1/auth/token", {"apiKey": secret}),  # a wrong verb: no rewrite
        ("POST", "/v1/auth/token", {"API_KEY": secret, "ttl": "60"}),
        ("GET", "/v1/models", {"api%5Fkey": secret}),
        ("POST", "/v1/auth/token", {"%61pi_%6Bey": secret}),  # as the transcoder decodes it
        ("POST", "/v1/auth/token", {"%41%50%49%4b%45%59": secret}),
    ):
        url = f"{mesh.edge_url}{path}?" + "&".join(f"{k}={v}" for k, v in params.items())
        reply = httpx.request(method, url, json={} if method == "POST" else None, timeout=10)
        assert reply.status_code == 400, (method, path, reply.text)
        assert "never the URL" in reply.json()["message"], reply.text
        assert secret not in reply.text
    # The key itself where its id goes wrote it to the access log's `path`; a key as
    # another parameter's value to `grpc_path` (no rewrite). Refused too, logged without.
    encoded = "".join(f"%{ord(c):02X}" for c in secret)
    for method, url in (
        ("POST", f"/v1/auth/keys/{secret}:revoke"),
        ("GET", f"/v1/auth/keys/{encoded}"),
        ("GET", f"/v1/models?key={secret}"),
        ("GET", f"/v1/usage?token=%20{encoded}&x=1"),
    ):
        reply = httpx.request(method, f"{mesh.edge_url}{url}", timeout=10)
        assert reply.status_code == 400, (method, url, reply.text)
        assert "the URL holds one" in reply.json()["message"], reply.text
        assert secret not in reply.text
    # Only a key's shape: a word that merely starts so, or a longer one, is no key.
    for url in ("/v1/models/tm_" + "a" * 10, "/v1/models/tm_" + "a" * 44):
        reply = httpx.get(f"{mesh.edge_url}{url}", headers={"x-api-key": secret}, timeout=10)
        assert reply.status_code == 404, (url, reply.text)
    deadline = time.monotonic() + 10  # Envoy flushes its access log every second
    while _token_requests_logged(mesh) <= logged:
        assert time.monotonic() < deadline, "the token request was never logged"
        time.sleep(0.1)
    client = redis.Redis.from_url(mesh.redis_url)
    try:
        for name in client.scan_iter("*"):
            kind = client.type(name)
            values: list[bytes] = [name]
            if kind == b"string":
                values.append(client.get(name) or b"")
            elif kind == b"set":
                values.extend(client.smembers(name))
            elif kind == b"hash":
                values.extend(client.hgetall(name).values())
            for value in values:
                assert secret.encode() not in value, name
    finally:
        client.close()
    for log in mesh.log_dir.glob("*.log"):
        assert secret not in log.read_text(errors="replace"), log.name


def test_grpc_reflection_needs_credentials(mesh):
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    with grpc.insecure_channel(mesh.edge_address) as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        request = reflection_pb2.ServerReflectionRequest(list_services="")
        with pytest.raises(grpc.RpcError) as info:
            next(iter(stub.ServerReflectionInfo(iter([request]), timeout=10)))
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
