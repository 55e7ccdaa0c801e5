"""Sync-to-async hand-over (RFC 7240 `Prefer: respond-async`) through the real edge."""

from __future__ import annotations

import email.utils
import time
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from google.api import annotations_pb2
from google.protobuf import descriptor_pool
from google.protobuf.descriptor import MethodDescriptor
from google.protobuf.timestamp_pb2 import Timestamp

from services.core import api_versions
from services.launcher.mesh import Mesh
from tests.e2e.conftest import authed_channel
from tests.e2e.test_auth import create_key
from tests.e2e.test_jobs import JOB_SCOPES, all_results, finished, wait_until
from tests.e2e.test_key_cache import _usage_event
from tokenmesh.inference.v1 import inference_service_pb2 as _v1  # noqa: F401 (registers it)
from tokenmesh.inference.v2 import inference_service_pb2 as _v2  # noqa: F401 (registers it)
from tokenmesh.jobs.v1 import handover_service_pb2
from tokenmesh.router.v1 import router_service_pb2 as router_pb
from tokenmesh.router.v1 import router_service_pb2_grpc as router_rpc

MODEL = "deterministic-test"
V2_BODY = {"prompt": "In the beginning", "max_output_tokens": 4, "sampling": {"seed": 7}}


@pytest.fixture(scope="module")
def api(mesh) -> Iterator[httpx.Client]:
    key = create_key(mesh, scopes=JOB_SCOPES)
    with httpx.Client(
        base_url=mesh.edge_url, timeout=30, headers={"x-api-key": key["secret"]}
    ) as client:
        yield client


def test_respond_async_answers_202_with_a_location_that_resolves_to_the_job(api):
    reply = api.post(
        f"/v2/models/{MODEL}:complete", json=V2_BODY, headers={"Prefer": "respond-async"}
    )
    assert reply.status_code == 202, reply.text
    assert reply.headers["preference-applied"] == "respond-async"
    assert "x-tokenmesh-http-status" not in reply.headers
    job = reply.json()
    location = reply.headers["location"]
    assert location == f"/v1/jobs/{job['id']}" and job["counts"]["total"] == 1
    assert api.get(location).json()["id"] == job["id"]
    done = finished(api, job["id"])
    assert done["status"] == "SUCCEEDED"
    [result] = all_results(api, job["id"])
    sync = api.post(f"/v2/models/{MODEL}:complete", json=V2_BODY)
    assert sync.status_code == 200 and "preference-applied" not in sync.headers
    assert result["complete"]["choices"][0]["text"] == sync.json()["choices"][0]["text"]


def test_respond_async_with_wait_answers_a_quick_request_inline(api):
    sync = api.post(f"/v2/models/{MODEL}:complete", json=V2_BODY).json()
    reply = api.post(
        f"/v2/models/{MODEL}:complete", json=V2_BODY, headers={"Prefer": "respond-async, wait=5"}
    )
    assert reply.status_code == 200, reply.text
    body: dict[str, Any] = reply.json()
    assert body["choices"][0]["text"] == sync["choices"][0]["text"]
    assert body["request_id"].startswith("job-") and body["model"]["name"] == MODEL


def test_a_v1_complete_is_handed_over_too(mesh, api):
    body = {"prompt": "In the beginning", "max_tokens": 4, "seed": 7}
    sync = api.post(f"/v1/models/{MODEL}:complete", json=body).json()
    reply = api.post(
        f"/v1/models/{MODEL}:complete", json=body, headers={"Prefer": "wait=5; respond-async"}
    )
    assert reply.status_code == 200, reply.text
    assert reply.json()["text"] == sync["text"]
    accepted = api.post(
        f"/v1/models/{MODEL}:complete", json=body, headers={"Prefer": "respond-async"}
    )
    assert accepted.status_code == 202 and accepted.headers["location"].startswith("/v1/jobs/job-")
    # Metered as v1, as the direct call is (it was v2's: its item runs on v2's Complete).
    job_id = accepted.json()["id"]
    assert finished(api, job_id)["status"] == "SUCCEEDED"
    event = _usage_event(mesh, f"{job_id}:0")
    assert (event.api_version, event.rpc) == (
        "v1",
        "/tokenmesh.inference.v1.InferenceService/Complete",
    )


def test_respond_async_refuses_bad_input_and_keys_without_the_jobs_scope(mesh, api):
    bad = api.post(
        f"/v2/models/{MODEL}:complete",
        json={**V2_BODY, "sampling": {"temperature": -1}},
        headers={"Prefer": "respond-async"},
    )
    assert bad.status_code == 400, bad.text
    # The Complete's own field names, not the job's `items[0].complete.*`.
    fields = [
        v["field"] for detail in bad.json()["details"] for v in detail.get("field_violations", [])
    ]
    assert fields == ["sampling.temperature"], bad.text
    without_inference = create_key(mesh, scopes="jobs")
    lacking = httpx.post(
        f"{mesh.edge_url}/v2/models/{MODEL}:complete",
        json=V2_BODY,
        headers={"x-api-key": without_inference["secret"], "Prefer": "respond-async"},
        timeout=10,
    )
    assert lacking.status_code == 403, lacking.text
    assert "items[" not in lacking.json()["message"], lacking.text
    key = create_key(mesh, scopes="inference:generate")
    headers = {"x-api-key": key["secret"], "Prefer": "respond-async"}
    denied = httpx.post(
        f"{mesh.edge_url}/v2/models/{MODEL}:complete", json=V2_BODY, headers=headers, timeout=10
    )
    assert denied.status_code == 403, denied.text


def test_a_sunset_version_is_404_handed_over_too_and_a_jobs_item_fails_at_once(
    mesh: Mesh,
) -> None:
    # The edge's sunset routes match the model header, which its routing filter
    # does not set on a request it hands over: a respond-async Complete for a
    # sunset version became a job, whose item ran on a worker still loading the
    # version or, naming no version of a retired model, waited out the job's window.
    model = f"retired-{uuid.uuid4().hex[:8]}"  # no worker serves it: nothing else would answer
    sunset = int(time.time()) + 2
    with authed_channel(mesh.edge_address, [("x-api-key", mesh.dev_api_key())]) as channel:
        catalogue = router_rpc.RouterServiceStub(channel)
        catalogue.RegisterModelVersion(
            router_pb.RegisterModelVersionRequest(model=model, version="1"), timeout=10
        )
        catalogue.DeprecateModelVersion(
            router_pb.DeprecateModelVersionRequest(
                model=model, version="1", sunset_time=Timestamp(seconds=sunset)
            ),
            timeout=10,
        )
    key = create_key(mesh, scopes=JOB_SCOPES)
    when = email.utils.formatdate(sunset, usegmt=True)
    with httpx.Client(
        base_url=mesh.edge_url, timeout=30, headers={"x-api-key": key["secret"]}
    ) as api:
        path = f"/v2/models/{model}:complete"
        wait_until(
            lambda: api.post(path, json=V2_BODY).status_code == 404,
            30,
            "the edge to answer the sunset model itself",
        )
        for version, message in (
            ("", f"every version of {model!r} was sunset, the last on {when}"),
            ("1", f"version '1' of {model!r} was sunset on {when}"),
        ):
            direct = api.post(path, json={**V2_BODY, "version": version})
            assert direct.status_code == 404 and direct.json()["message"] == message, direct.text
            for prefer in ("respond-async", "respond-async, wait=5"):
                handed = api.post(
                    path, json={**V2_BODY, "version": version}, headers={"Prefer": prefer}
                )
                assert handed.status_code == 404, handed.text
                assert handed.json()["code"] == direct.json()["code"]
                assert handed.json()["message"] == message
            v1 = api.post(
                f"/v1/models/{model}:complete",
                json={"prompt": "a", "max_tokens": 1, "version": version},
                headers={"Prefer": "respond-async"},
            )
            assert v1.status_code == 404 and v1.json()["message"] == message, v1.text
        assert api.get("/v1/jobs").json().get("jobs", []) == []  # none created
        # A job's items take the same answer, at once (not at the window's end).
        items = [{"complete": {**V2_BODY, "model": model, "version": v}} for v in ("", "1")]
        job = api.post("/v1/jobs", json={"items": items}).json()
        done = finished(api, job["id"], timeout_s=30)
        assert done["status"] == "FAILED" and done["counts"]["failed"] == 2, done
        errors = [r["error"] for r in all_results(api, job["id"])]
    assert [e["code"] for e in errors] == ["NOT_FOUND"] * 2
    assert errors[0]["message"] == f"every version of {model!r} was sunset, the last on {when}"
    assert errors[1]["message"] == f"version '1' of {model!r} was sunset on {when}"


def test_an_item_error_answered_inline_is_the_direct_calls_error(api):
    # The inline answer of `wait=N` is "this operation's error": it had only the
    # code and message (`details: []`, no reason to branch on), and v1 callers read
    # v2's field names (`max_output_tokens: prompt (600 tokens) + ...`).
    prompt = "hi " * 600  # past the model's context with any max
    cases = (
        (f"/v2/models/{MODEL}:complete", {"prompt": prompt, "max_output_tokens": 2}),
        (f"/v1/models/{MODEL}:complete", {"prompt": prompt, "max_tokens": 2}),
    )
    for path, body in cases:
        direct = api.post(path, json=body)
        assert direct.status_code == 400, direct.text
        reasons = [d.get("reason") for d in direct.json()["details"]]
        assert "CONTEXT_LENGTH_EXCEEDED" in reasons, direct.text
        handed = api.post(path, json=body, headers={"Prefer": "respond-async, wait=10"})
        assert handed.status_code == 400, handed.text
        assert handed.json() == direct.json()
    assert handed.json()["message"].startswith("max_tokens: "), handed.text


def test_respond_async_for_a_model_nothing_serves_is_404_and_creates_no_job(mesh: Mesh):
    # It answered 202, and its job waited for a worker until its window ended (24 h).
    key = create_key(mesh, scopes=JOB_SCOPES)  # its own: no other test's jobs
    model = f"no-such-{uuid.uuid4().hex[:8]}"
    with httpx.Client(
        base_url=mesh.edge_url, timeout=30, headers={"x-api-key": key["secret"]}
    ) as api:
        for path, body in (
            (f"/v2/models/{model}:complete", V2_BODY),
            (f"/v1/models/{model}:complete", {"prompt": "a", "max_tokens": 1}),
        ):
            direct = api.post(path, json=body)
            assert direct.status_code == 404, direct.text
            assert direct.json()["details"][0]["reason"] == "MODEL_NOT_FOUND", direct.text
            for prefer in ("respond-async", "respond-async, wait=5"):
                handed = api.post(path, json=body, headers={"Prefer": prefer})
                assert handed.status_code == 404, handed.text
                assert handed.json() == direct.json()
        assert api.get("/v1/jobs").json().get("jobs", []) == []  # none created
        # A model the catalogue knows still becomes a job, whatever version it names
        # (the worker answers for a version it does not have).
        for version in ("", "1", "latest", "no-such-version"):
            accepted = api.post(
                f"/v2/models/{MODEL}:complete",
                json={**V2_BODY, "version": version},
                headers={"Prefer": "respond-async"},
            )
            assert accepted.status_code == 202, (version, accepted.text)


def _rest_path(method: MethodDescriptor) -> str:
    post: str = method.GetOptions().Extensions[annotations_pb2.http].post
    return post.replace("{request.", "{")  # HandoverService wraps the request


def test_each_handover_rpc_answers_under_the_policy_of_the_rpc_its_rest_path_names():
    # A Prefer header moves a Complete's REST path to HandoverService: the RPC it
    # reaches must stand in for the one the path names (its version's deprecation,
    # its sunset), or `Prefer: respond-async` gets past a retired version.
    service = handover_service_pb2.DESCRIPTOR.services_by_name["HandoverService"]
    pool = descriptor_pool.Default()
    for method in service.methods:
        stands_in_for = api_versions.STAND_INS[f"/{service.full_name}/{method.name}"]
        target = pool.FindMethodByName(stands_in_for.lstrip("/").replace("/", "."))
        assert _rest_path(method) == _rest_path(target), method.name


def test_a_key_limited_to_some_models_learns_nothing_of_others_by_handing_over(mesh: Mesh):
    # The direct call answers 403 MODEL_NOT_ALLOWED for every model outside the key's
    # list, before any lookup. The hand-over answered 404 for a name nothing serves
    # and 202 (a job) for one that exists: a restricted key could list the models.
    key = create_key(mesh, "--models", "demo-lm", scopes=JOB_SCOPES)
    with httpx.Client(
        base_url=mesh.edge_url, timeout=30, headers={"x-api-key": key["secret"]}
    ) as api:
        for model in (MODEL, f"no-such-{uuid.uuid4().hex[:8]}"):
            path = f"/v2/models/{model}:complete"
            direct = api.post(path, json=V2_BODY)
            assert direct.status_code == 403, direct.text
            handed = api.post(path, json=V2_BODY, headers={"Prefer": "respond-async"})
            assert handed.status_code == 403, handed.text
            assert handed.json()["details"][0]["reason"] == "MODEL_NOT_ALLOWED"
        assert api.get("/v1/jobs").json().get("jobs", []) == []  # none created
