"""Jobs through the real edge: submit, poll, results, signed webhooks, a crash mid-job.

The session mesh allows webhooks to 127.0.0.1 (TOKENMESH_WEBHOOK_ALLOW_HOSTS)
and retries them within a second (TOKENMESH_WEBHOOK_RETRY_SCHEDULE); the
receiver is a plain HTTP server in this process. Signatures are checked with
the `standardwebhooks` package, an implementation independent of ours.
"""

from __future__ import annotations

import http.server
import json
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest
import redis
import standardwebhooks

from services.jobs.secret_box import SEALED_PREFIX
from services.jobs.store import secret_key
from tests.e2e.test_auth import create_key

MODEL = "deterministic-test"
JOB_SCOPES = "inference:generate,inference:embed,models:read,usage:read,jobs"


def wait_until(condition: Callable[[], Any], timeout_s: float, what: str) -> Any:
    """Polls `condition` until it returns something truthy; fails after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


class Receiver:
    """A webhook receiver on 127.0.0.1 that records every request; the first
    `failures` requests get a 500."""

    def __init__(self) -> None:
        self.requests: list[tuple[dict[str, str], bytes]] = []
        self.failures = 0
        self.lock = threading.Lock()
        receiver = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's name
                body = self.rfile.read(int(self.headers.get("content-length", "0")))
                with receiver.lock:
                    receiver.requests.append(
                        ({k.lower(): v for k, v in self.headers.items()}, body)
                    )
                    failing = receiver.failures > 0
                    receiver.failures -= 1 if failing else 0
                self.send_response(500 if failing else 204)
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.server.server_port}{path}"

    def received(self, path: str) -> list[tuple[dict[str, str], bytes]]:
        with self.lock:
            return [r for r in self.requests if r[0].get("x-path", path) == path]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(scope="module")
def receiver() -> Iterator[Receiver]:
    server = Receiver()
    yield server
    server.close()


@pytest.fixture(scope="module")
def owner(mesh) -> dict[str, Any]:
    """A key that may run jobs, with its webhook secret."""
    key = create_key(mesh, scopes=JOB_SCOPES)
    reply = httpx.post(
        f"{mesh.edge_url}/v1/webhooks/secret",
        json={},
        headers={"x-api-key": key["secret"]},
        timeout=10,
    )
    assert reply.status_code == 200, reply.text
    key["webhook_secret"] = reply.json()["secret"]
    assert key["webhook_secret"].startswith("whsec_")
    return key


@pytest.fixture(scope="module")
def api(mesh, owner) -> Iterator[httpx.Client]:
    with httpx.Client(
        base_url=mesh.edge_url, timeout=30, headers={"x-api-key": owner["secret"]}
    ) as client:
        yield client


def complete_body(i: int) -> dict[str, Any]:
    return {
        "model": MODEL,
        "prompt": f"Item {i}: in the beginning",
        "max_output_tokens": 4,
        "sampling": {"seed": 1000 + i, "temperature": 0.8},
    }


def submit(api: httpx.Client, body: dict[str, Any]) -> dict[str, Any]:
    reply = api.post("/v1/jobs", json=body)
    assert reply.status_code == 200, reply.text
    job: dict[str, Any] = reply.json()
    assert job["id"].startswith("job-") and job["status"] in ("QUEUED", "RUNNING")
    return job


def finished(api: httpx.Client, job_id: str, timeout_s: float = 90) -> dict[str, Any]:
    def final() -> dict[str, Any] | None:
        job: dict[str, Any] = api.get(f"/v1/jobs/{job_id}").json()
        return job if job["status"] not in ("QUEUED", "RUNNING", "CANCELLING") else None

    result: dict[str, Any] = wait_until(final, timeout_s, f"job {job_id} to end")
    return result


def all_results(api: httpx.Client, job_id: str) -> list[dict[str, Any]]:
    results: list[dict[str, Any]] = []
    token = ""
    while True:
        page = api.get(f"/v1/jobs/{job_id}/results", params={"page_size": 20, "page_token": token})
        assert page.status_code == 200, page.text
        results += page.json()["results"]
        token = page.json()["next_page_token"]
        if not token:
            return results


def usage_requests(api: httpx.Client) -> int:
    return int(api.get("/v1/usage").json()["requests"])


def test_a_job_of_50_completions_matches_sync_calls_and_sends_one_signed_webhook(
    mesh, api, owner, receiver, admin_key
):
    before = usage_requests(api)
    bodies = [complete_body(i) for i in range(50)]
    job = submit(
        api,
        {
            "items": [{"complete": b} for b in bodies],
            "webhook_url": receiver.url("/hooks/fifty"),
            "metadata": {"suite": "e2e"},
        },
    )
    done = finished(api, job["id"])
    assert done["status"] == "SUCCEEDED"
    assert done["counts"] == {"total": 50, "succeeded": 50, "failed": 0}
    assert done["progress"] == 1 and done["metadata"] == {"suite": "e2e"}

    results = all_results(api, job["id"])
    assert [r["index"] for r in results] == list(range(50))
    assert all(r["request_id"] == f"{job['id']}:{r['index']}" for r in results)
    with httpx.Client(base_url=mesh.edge_url, timeout=30, headers={"x-api-key": admin_key}) as sync:
        for body, result in zip(bodies, results, strict=True):
            expected = sync.post(f"/v2/models/{MODEL}:complete", json=body).json()
            assert result["complete"]["choices"][0]["text"] == expected["choices"][0]["text"]

    # One event, signed with the key's secret (verified by another implementation).
    events = wait_until(lambda: _events_for(receiver, job["id"]), 30, "the webhook")
    headers, body = events[0]
    verified = standardwebhooks.Webhook(owner["webhook_secret"]).verify(body, headers)
    assert verified["type"] == "job.succeeded" and verified["data"]["id"] == job["id"]
    assert headers["webhook-id"] == f"msg-{job['id']}"
    hook = wait_until(lambda: _delivered(api, job["id"]), 30, "the webhook to show as delivered")
    assert hook["attempts"] == 1 and len(_events_for(receiver, job["id"])) == 1

    # Metered once each: the key's usage grew by exactly the 50 items.
    wait_until(lambda: usage_requests(api) >= before + 50, 30, "usage to count the items")
    assert usage_requests(api) == before + 50
    prompt = sum(int(r["complete"]["usage"]["prompt_tokens"]) for r in results)
    assert int(done["usage"]["prompt_tokens"]) == prompt


def _events_for(receiver: Receiver, job_id: str) -> list[tuple[dict[str, str], bytes]]:
    return [(h, b) for h, b in receiver.received("") if json.loads(b)["data"]["id"] == job_id]


def _delivered(api: httpx.Client, job_id: str) -> dict[str, Any] | None:
    hook: dict[str, Any] = api.get(f"/v1/jobs/{job_id}").json()["webhook"]
    return hook if hook["state"] == "DELIVERED" else None


def test_webhook_secrets_are_sealed_in_redis(mesh, owner):
    # `make run` gives the jobs service a key file: Redis never holds a secret
    # that could sign events (the signed-webhook test above verifies them).
    with redis.Redis.from_url(mesh.redis_url) as client:
        hashes = [client.hgetall(k) for k in client.scan_iter(match=secret_key("*"))]
    values = [v for stored in hashes for v in stored.values()]
    assert any(v.startswith(SEALED_PREFIX.encode()) for v in values)
    assert not any(owner["webhook_secret"].encode() in v for v in values)


def test_a_webhook_answered_500_twice_is_retried_and_the_attempts_show(api, owner, receiver):
    with receiver.lock:
        receiver.failures = 2
    job = submit(
        api,
        {
            "items": [{"complete": complete_body(i)} for i in range(2)],
            "webhook_url": receiver.url("/hooks/retry"),
        },
    )
    finished(api, job["id"])
    hook = wait_until(lambda: _delivered(api, job["id"]), 30, "the webhook after two 500s")
    assert hook["attempts"] == 3
    assert [a["http_status"] for a in hook["recent_attempts"]] == [500, 500, 204]
    assert len(_events_for(receiver, job["id"])) == 3
    ids = {h["webhook-id"] for h, _ in _events_for(receiver, job["id"])}
    assert ids == {hook["event_id"]}  # the same id on every attempt: receivers dedupe


@pytest.mark.parametrize(
    "url",
    [
        "https://169.254.169.254/latest/meta-data",
        "https://10.0.0.1/hook",
        "http://example.com/hook",
        "https://[::1]/hook",
        "https://user:pw@8.8.8.8/hook",
    ],
)
def test_webhooks_to_private_or_metadata_addresses_are_refused_at_submission(api, url):
    reply = api.post(
        "/v1/jobs", json={"items": [{"complete": complete_body(0)}], "webhook_url": url}
    )
    assert reply.status_code == 400, reply.text
    violations = [d for d in reply.json()["details"] if "field_violations" in d]
    assert violations[0]["field_violations"][0]["field"] == "webhook_url"


def test_a_job_for_a_model_the_key_may_not_use_is_refused_when_submitted(mesh):
    # It was accepted, and every item failed PERMISSION_DENIED later.
    key = create_key(mesh, "--models", "demo-lm", scopes=JOB_SCOPES)
    with httpx.Client(
        base_url=mesh.edge_url, timeout=30, headers={"x-api-key": key["secret"]}
    ) as client:
        reply = client.post(
            "/v1/jobs", json={"items": [{"complete": complete_body(i)} for i in range(3)]}
        )
        assert reply.status_code == 403, reply.text
        assert reply.json()["details"][0]["reason"] == "MODEL_NOT_ALLOWED"
        assert client.get("/v1/jobs").json().get("jobs", []) == []


def test_a_key_without_the_item_scope_cannot_submit_it(mesh):
    key = create_key(mesh, scopes="inference:embed,jobs")
    reply = httpx.post(
        f"{mesh.edge_url}/v1/jobs",
        json={"items": [{"complete": complete_body(0)}]},
        headers={"x-api-key": key["secret"]},
        timeout=10,
    )
    assert reply.status_code == 403, reply.text
    assert "inference:generate" in reply.json()["message"]


def test_the_same_idempotency_key_returns_the_same_job(api):
    body = {"items": [{"complete": complete_body(0)}], "idempotency_key": "batch-2024-06-01"}
    first, second = submit(api, body), submit(api, body)
    assert first["id"] == second["id"]
    # Another request under the key is refused (it was answered the first's job).
    other = {**body, "items": [{"complete": complete_body(1)}]}
    reply = api.post("/v1/jobs", json=other)
    assert reply.status_code == 400, reply.text
    assert reply.json()["details"][0]["reason"] == "IDEMPOTENCY_KEY_REUSED", reply.text


def test_a_bad_item_is_refused_with_its_path(api):
    reply = api.post(
        "/v1/jobs",
        json={"items": [{"complete": complete_body(0)}, {"complete": {"model": MODEL, "n": 99}}]},
    )
    assert reply.status_code == 400, reply.text
    fields = [
        v["field"]
        for d in reply.json()["details"]
        if "field_violations" in d
        for v in d["field_violations"]
    ]
    assert "items[1].complete.n" in fields


def test_cancel_keeps_finished_results_and_ends_the_rest(api):
    items = [{"complete": {**complete_body(i), "max_output_tokens": 64}} for i in range(40)]
    job = submit(api, {"items": items})
    wait_until(
        lambda: api.get(f"/v1/jobs/{job['id']}").json()["counts"]["succeeded"] >= 1,
        60,
        "a first item to finish",
    )
    cancelled = api.post(f"/v1/jobs/{job['id']}:cancel", json={})
    assert cancelled.status_code == 200, cancelled.text
    # CANCELLING while the items in flight are stopped, then CANCELLED: final results.
    assert cancelled.json()["status"] in ("CANCELLING", "CANCELLED")
    assert finished(api, job["id"])["status"] == "CANCELLED"
    results = all_results(api, job["id"])
    assert [r["index"] for r in results] == list(range(40))
    kinds = {("complete" if "complete" in r else r["error"]["code"]) for r in results}
    assert "complete" in kinds and "CANCELLED" in kinds
    again = api.post(f"/v1/jobs/{job['id']}:cancel", json={})
    assert again.status_code == 400  # FAILED_PRECONDITION


def test_another_keys_job_is_not_found(mesh, api):
    job = submit(api, {"items": [{"complete": complete_body(0)}]})
    other = create_key(mesh, scopes=JOB_SCOPES)
    reply = httpx.get(
        f"{mesh.edge_url}/v1/jobs/{job['id']}", headers={"x-api-key": other["secret"]}, timeout=10
    )
    assert reply.status_code == 404


def test_list_events_and_jsonl_download(api):
    job = submit(api, {"items": [{"complete": complete_body(i)} for i in range(3)]})
    with api.stream("GET", f"/v1/jobs/{job['id']}/events") as stream:
        assert stream.headers["content-type"].startswith("text/event-stream")
        events = [json.loads(x[6:]) for x in stream.iter_lines() if x.startswith("data: ")]
    assert events[-1]["event"]["type"] == "job.succeeded"
    assert events[-1]["event"]["job"]["counts"]["succeeded"] == 3
    listed = api.get("/v1/jobs", params={"status": "SUCCEEDED", "page_size": 100}).json()
    assert job["id"] in [j["id"] for j in listed["jobs"]]
    download = api.get(f"/v1/jobs/{job['id']}/results:download")
    assert download.status_code == 200
    assert download.headers["content-type"].startswith("application/jsonl")
    lines = [json.loads(line) for line in download.text.splitlines()]
    assert [line["index"] for line in lines] == [0, 1, 2]


def test_kill_9_mid_job_then_restart_gives_one_result_per_item_metered_once(mesh):
    # A key of its own: the module's key may still have an earlier test's items
    # waiting in the meter's batch (it applies them up to its linger later), which
    # would count as this job's.
    key = create_key(mesh, scopes=JOB_SCOPES)
    with httpx.Client(
        base_url=mesh.edge_url, timeout=30, headers={"x-api-key": key["secret"]}
    ) as api:
        assert usage_requests(api) == 0
        items = [{"complete": {**complete_body(i), "max_output_tokens": 16}} for i in range(24)]
        job = submit(api, {"items": items})
        wait_until(
            lambda: api.get(f"/v1/jobs/{job['id']}").json()["counts"]["succeeded"] >= 2,
            60,
            "some items to finish",
        )
        mesh.kill("jobs")
        mesh.restart_service("jobs", "jobs")
        done = finished(api, job["id"], timeout_s=120)
        assert done["status"] == "SUCCEEDED" and done["counts"]["succeeded"] == 24
        results = all_results(api, job["id"])
        assert [r["index"] for r in results] == list(range(24))
        wait_until(lambda: usage_requests(api) >= 24, 30, "usage to count the items")
        assert usage_requests(api) == 24


def test_the_cli_creates_a_secret_submits_waits_and_prints_results(mesh, tmp_path):
    from tests.e2e.test_auth import cli

    key = create_key(mesh, scopes=JOB_SCOPES)
    secret = cli(mesh, "--api-key", key["secret"], "webhooks", "secret", "create")
    assert secret["secret"].startswith("whsec_") and secret["key_id"] == key["id"]
    items = tmp_path / "items.jsonl"
    items.write_text("".join(json.dumps({"complete": complete_body(i)}) + "\n" for i in range(3)))
    job = cli(mesh, "--api-key", key["secret"], "jobs", "submit", str(items), "--wait")
    assert job["status"] == "SUCCEEDED" and job["counts"]["succeeded"] == 3
    listed = cli(mesh, "--api-key", key["secret"], "jobs", "list")
    assert [j["id"] for j in listed["jobs"]] == [job["id"]]
