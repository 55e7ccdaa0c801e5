"""Request rate limits at the edge: exact per-key requests/minute, draft-03 headers."""

from __future__ import annotations

import grpc
import httpx
import pytest

from tests.e2e.conftest import authed_channel
from tests.e2e.test_auth import create_key
from tokenmesh.inference.v1 import inference_service_pb2 as pb
from tokenmesh.inference.v1 import inference_service_pb2_grpc as rpc

BODY = {"prompt": "hello", "max_tokens": 1}


def test_three_per_minute_means_exactly_three(mesh):
    key = create_key(mesh, "--rpm", "3")
    headers = {"x-api-key": key["secret"]}
    replies = [
        httpx.post(
            f"{mesh.edge_url}/v1/models/deterministic-test:complete",
            json=BODY,
            headers=headers,
            timeout=10,
        )
        for _ in range(4)
    ]
    assert [r.status_code for r in replies] == [200, 200, 200, 429]
    assert [int(r.headers["x-ratelimit-remaining"]) for r in replies[:3]] == [2, 1, 0]
    assert all(r.headers["x-ratelimit-limit"].startswith("3") for r in replies[:3])
    assert "x-tokenmesh-ratelimit-warning" in replies[2].headers  # at >= 80% of the limit
    assert "x-tokenmesh-ratelimit-warning" not in replies[0].headers
    over = replies[3]
    assert 1 <= int(over.headers["retry-after"]) <= 60
    body = over.json()
    assert body["code"] == 8 and "requests_per_minute=3" in body["message"]


def test_a_request_the_worker_refuses_still_gets_the_limits_headers(mesh):
    # As Envoy's filter gives them on every answer; the worker's error answers lacked them.
    key = create_key(mesh, "--rpm", "5")
    reply = httpx.post(
        f"{mesh.edge_url}/v1/models/deterministic-test:complete",
        json={"prompt": "hello", "max_tokens": -1},
        headers={"x-api-key": key["secret"]},
        timeout=10,
    )
    assert reply.status_code == 400
    assert reply.headers["x-ratelimit-limit"].startswith("5")
    assert reply.headers["x-ratelimit-remaining"] == "4"


def test_a_clients_attempt_count_cannot_pass_as_an_envoy_retry(mesh):
    # A worker only reads the windows for a retry's try (x-envoy-attempt-count > 1):
    # a client's copy must never reach it.
    key = create_key(mesh, "--rpm", "2")
    headers = {"x-api-key": key["secret"], "x-envoy-attempt-count": "2"}
    codes = [
        httpx.post(
            f"{mesh.edge_url}/v1/models/deterministic-test:complete",
            json=BODY,
            headers=headers,
            timeout=10,
        ).status_code
        for _ in range(3)
    ]
    assert codes == [200, 200, 429]


def test_grpc_callers_get_resource_exhausted_and_jwts_share_the_limit(mesh):
    key = create_key(mesh, "--rpm", "2")
    token = httpx.post(
        f"{mesh.edge_url}/v1/auth/token", json={"api_key": key["secret"]}, timeout=10
    ).json()
    with authed_channel(
        mesh.edge_address, [("authorization", f"Bearer {token['access_token']}")]
    ) as channel:
        stub = rpc.InferenceServiceStub(channel)
        request = pb.CompleteRequest(model="deterministic-test", prompt="x", max_tokens=1)
        stub.Complete(request, timeout=10)
        stub.Complete(request, timeout=10)
        with pytest.raises(grpc.RpcError) as info:
            stub.Complete(request, timeout=10)
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    # The API key itself is over the same limit.
    reply = httpx.post(
        f"{mesh.edge_url}/v1/models/deterministic-test:complete",
        json=BODY,
        headers={"x-api-key": key["secret"]},
        timeout=10,
    )
    assert reply.status_code == 429


def _complete(mesh, secret: str, max_tokens: int) -> httpx.Response:
    body = {"prompt": "one two three", "max_tokens": max_tokens}  # 3 prompt tokens
    return httpx.post(
        f"{mesh.edge_url}/v1/models/deterministic-test:complete",
        json=body,
        headers={"x-api-key": secret},
        timeout=10,
    )


def test_token_budget_rejects_what_cannot_fit_before_any_compute(mesh):
    key = create_key(mesh, "--tpm", "50")
    first = _complete(mesh, key["secret"], 40)  # reserves 43 of 50, uses 43
    assert first.status_code == 200 and first.json()["usage"]["total_tokens"] == 43
    too_big = _complete(mesh, key["secret"], 10)  # 13 more would make 56 > 50
    assert too_big.status_code == 429
    error = too_big.json()
    assert "tokens_per_minute=50" in error["message"]
    kinds = {d["@type"].rsplit(".", 1)[-1] for d in error["details"]}
    assert {"QuotaFailure", "RetryInfo"} <= kinds
    assert _complete(mesh, key["secret"], 4).status_code == 200  # 7 more fits: 50 exactly


def test_unused_reservations_are_released(mesh):
    key = create_key(mesh, "--tpm", "40")
    # Asks for 30 but stops early at a stop word, so most of the reservation comes back.
    body = {"prompt": "one two three", "max_tokens": 30, "stop": [" "]}
    first = httpx.post(
        f"{mesh.edge_url}/v1/models/deterministic-test:complete",
        json=body,
        headers={"x-api-key": key["secret"]},
        timeout=10,
    )
    assert first.status_code == 200 and first.json()["finish_reason"] == "stop"
    used = first.json()["usage"]["total_tokens"]
    deadline = __import__("time").monotonic() + 5
    while True:  # the reconciliation happens just after the response
        second = _complete(mesh, key["secret"], 40 - used - 3)
        if second.status_code == 200 or __import__("time").monotonic() > deadline:
            break
    assert second.status_code == 200, second.text


def test_monthly_quota_is_enforced(mesh):
    key = create_key(mesh, "--monthly-tokens", "20")
    assert _complete(mesh, key["secret"], 10).status_code == 200
    reply = _complete(mesh, key["secret"], 10)
    assert reply.status_code == 429 and "monthly_tokens=20" in reply.json()["message"]


def test_budget_rejections_carry_retry_after(mesh):
    key = create_key(mesh, "--tpm", "30")
    assert _complete(mesh, key["secret"], 20).status_code == 200  # 23 of 30
    reply = _complete(mesh, key["secret"], 20)  # 23 fit 30, not the 7 left
    assert reply.status_code == 429
    assert 1 <= int(reply.headers["retry-after"]) <= 60


def test_a_request_over_the_whole_budget_is_a_400_without_retry_after(mesh):
    # 3 + 20 > tokens_per_minute=10: no wait admits it (it was a 429 "retry in 60s").
    key = create_key(mesh, "--tpm", "10")
    reply = _complete(mesh, key["secret"], 20)
    assert reply.status_code == 400
    assert "retry-after" not in reply.headers
    error = reply.json()
    assert error["code"] == 9 and "tokens_per_minute=10" in error["message"]
    reasons = {d.get("reason") for d in error["details"]}
    assert "REQUEST_EXCEEDS_BUDGET" in reasons
