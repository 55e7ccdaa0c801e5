"""The contract change jobs needs, over real mTLS to a real worker.

The `jobs` identity may send the edge's identity headers to an inference v2
worker (acting for a job's owner), but only the identity headers, only at
batch priority and only for a key holding the RPC's scope. Every other
identity still may not send them, and `jobs` may not call anything else.
"""

from __future__ import annotations

from typing import cast

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from services.core import contract
from tokenmesh.inference.v2 import inference_pb2 as resources
from tokenmesh.inference.v2 import inference_service_pb2 as pb
from tokenmesh.inference.v2 import inference_service_pb2_grpc as rpc

OWNER = (
    (contract.KEY_ID_HEADER, "key_delegation_test"),
    (contract.TENANT_HEADER, "acme"),
    (contract.SCOPES_HEADER, "inference:generate jobs"),
)
BATCH = pb.CompleteRequest(
    model="deterministic-test",
    prompt="hello",
    max_output_tokens=2,
    priority=resources.PRIORITY_BATCH,
    request_id="job-000000000000000000000000:0",
)


def _reason(error: grpc.RpcError) -> str:
    status = rpc_status.from_call(cast(grpc.Call, error))
    for detail in status.details if status else ():
        info = error_details_pb2.ErrorInfo()
        if detail.Unpack(info):
            return str(info.reason)
    return ""


@pytest.fixture(scope="module")
def as_jobs(mesh):
    with mesh.channel("inference-0", caller=contract.JOBS) as channel:
        yield rpc.InferenceServiceStub(channel)


def test_jobs_may_run_a_batch_request_as_the_owner(as_jobs):
    response = as_jobs.Complete(BATCH, metadata=OWNER, timeout=30)
    assert response.request_id == BATCH.request_id and response.choices


@pytest.mark.parametrize(
    ("change", "metadata", "reason"),
    [
        ({"priority": resources.PRIORITY_INTERACTIVE}, OWNER, "DELEGATED_PRIORITY"),
        ({"priority": resources.PRIORITY_UNSPECIFIED}, OWNER, "DELEGATED_PRIORITY"),
        ({}, (OWNER[0], OWNER[1], (contract.SCOPES_HEADER, "inference:embed")), "MISSING_SCOPE"),
        ({}, (OWNER[1], OWNER[2]), "DELEGATED_CALL_WITHOUT_KEY"),
        ({}, (*OWNER, ("x-tokenmesh-route-model", "x")), "DELEGATED_HEADER_NOT_ALLOWED"),
    ],
)
def test_jobs_never_gets_more_than_the_owner_at_batch_priority(as_jobs, change, metadata, reason):
    request = pb.CompleteRequest()
    request.CopyFrom(BATCH)
    for name, value in change.items():
        setattr(request, name, value)
    with pytest.raises(grpc.RpcError) as denied:
        as_jobs.Complete(request, metadata=metadata, timeout=30)
    assert denied.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert _reason(denied.value) == reason


def test_other_identities_still_may_not_send_identity_headers(mesh):
    with mesh.channel("inference-0", caller=contract.USAGE) as channel:
        with pytest.raises(grpc.RpcError) as denied:
            rpc.InferenceServiceStub(channel).Complete(BATCH, metadata=OWNER, timeout=30)
    assert _reason(denied.value) == "EDGE_HEADERS_FROM_NON_EDGE"


def test_jobs_may_not_list_models_or_call_v1(as_jobs, mesh):
    with pytest.raises(grpc.RpcError) as denied:
        as_jobs.ListModels(pb.ListModelsRequest(), metadata=OWNER, timeout=30)
    assert _reason(denied.value) in ("EDGE_HEADERS_FROM_NON_EDGE", "CALLER_NOT_ALLOWED")
