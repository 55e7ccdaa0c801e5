"""At the edge, nothing minted from a credential outlives it, and a rotation ends
the secrets earlier rotations left in their overlap.

Two gaps: a second rotation (`overlap: 0s` after a leak) left the secret the first
one rotated out working for the rest of its first overlap, and a JWT minted from a
rotated-out secret or an expiring key worked 10 s past its end, since the edge
allows that clock skew on `exp`.
"""

from __future__ import annotations

import time

import grpc
from google.protobuf import duration_pb2, timestamp_pb2

from services.auth.authenticator import REVOCATION_BOUND_S
from tests.e2e.test_auth import complete, token_for
from tokenmesh.auth.v1 import auth_pb2, auth_service_pb2, auth_service_pb2_grpc

# Longer than the edge's clock skew (a token needs some life left after it) by
# enough for the steps between the rotation and IssueToken on a loaded machine.
ENDS_IN_S = 16


def _create(admin: grpc.Channel, ttl_s: int | None = None) -> auth_service_pb2.CreateApiKeyResponse:
    request = auth_service_pb2.CreateApiKeyRequest(
        tenant="acme", name="ending", scopes=["inference:generate"], limits=auth_pb2.KeyLimits()
    )
    if ttl_s is not None:
        request.ttl.FromSeconds(ttl_s)
    return auth_service_pb2_grpc.AuthServiceStub(admin).CreateApiKey(request, timeout=10)


def _rotate(
    admin: grpc.Channel, key_id: str, overlap_s: int
) -> auth_service_pb2.RotateApiKeyResponse:
    return auth_service_pb2_grpc.AuthServiceStub(admin).RotateApiKey(
        auth_service_pb2.RotateApiKeyRequest(
            id=key_id, overlap=duration_pb2.Duration(seconds=overlap_s)
        ),
        timeout=10,
    )


def _seconds(stamp: timestamp_pb2.Timestamp) -> float:
    return stamp.ToNanoseconds() / 1e9


def test_a_second_rotation_without_overlap_ends_the_first_ones_secret(mesh, channel):
    created = _create(channel)
    leaked = {"x-api-key": created.secret}
    assert complete(mesh, leaked).status_code == 200
    _rotate(channel, created.api_key.id, 3600)  # routine: the old secret works for 1 h
    assert complete(mesh, leaked).status_code == 200
    rotating = time.monotonic()
    _rotate(channel, created.api_key.id, 0)  # it leaked: end it now
    # Refused everywhere within the revocation bound, counted from before the rotation
    # (the edge's key cache may hold it that long from the last 200). Polling up to the
    # bound raced it: the last poll could start just before the cached entry expired.
    while time.monotonic() < rotating + REVOCATION_BOUND_S:
        time.sleep(0.05)
    assert complete(mesh, leaked).status_code == 401


def test_a_jwt_stops_at_the_edge_by_its_credentials_end(mesh, channel):
    rotated_out = _create(channel)
    rotated = _rotate(channel, rotated_out.api_key.id, ENDS_IN_S)
    expiring = _create(channel, ttl_s=ENDS_IN_S)
    bearers = [
        (_seconds(rotated.old_secret_expire_time), token_for(mesh, rotated_out.secret)),
        (_seconds(expiring.api_key.expire_time), token_for(mesh, expiring.secret)),
    ]
    for _, token in bearers:
        assert complete(mesh, {"authorization": f"Bearer {token}"}).status_code == 200
    for ends, token in sorted(bearers):
        while time.time() < ends:  # the credential's end (the edge's clock is this one)
            time.sleep(0.1)
        # 401, not the 200 it got for the edge's 10 s clock skew past `exp`.
        assert complete(mesh, {"authorization": f"Bearer {token}"}).status_code == 401
