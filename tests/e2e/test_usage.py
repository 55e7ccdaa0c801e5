"""Through the edge: GET /v1/usage equals the usage clients received."""

from __future__ import annotations

import json
import time

import httpx

from tests.e2e.test_auth import create_key


def test_usage_report_equals_what_clients_received(mesh):
    key = create_key(mesh, scopes="inference:generate,usage:read")
    headers = {"x-api-key": key["secret"]}
    prompt = completion = requests = 0
    with httpx.Client(base_url=mesh.edge_url, headers=headers, timeout=30) as http:
        for i in range(6):
            body = {"prompt": f"count me {i}", "max_tokens": 3 + i, "seed": i}
            usage = http.post("/v1/models/deterministic-test:complete", json=body).json()["usage"]
            prompt += usage["prompt_tokens"]
            completion += usage["completion_tokens"]
            requests += 1
        for i in range(3):
            with http.stream(
                "POST",
                "/v1/models/demo-lm:generate",
                json={"prompt": "And God", "max_tokens": 5, "seed": i},
            ) as response:
                last = [line for line in response.iter_lines() if line.startswith("data: ")][-1]
            usage = json.loads(last[6:])["usage"]
            prompt += usage["prompt_tokens"]
            completion += usage["completion_tokens"]
            requests += 1
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            report = http.get("/v1/usage").json()
            if int(report["requests"]) >= requests:
                break
            time.sleep(0.2)
    assert int(report["requests"]) == requests
    assert int(report["prompt_tokens"]) == prompt
    assert int(report["completion_tokens"]) == completion
    assert int(report["total_tokens"]) == prompt + completion
    assert {m["model"] for m in report["by_model"]} == {"deterministic-test", "demo-lm"}


def test_usage_needs_the_usage_scope(mesh):
    key = create_key(mesh, scopes="inference:generate")
    reply = httpx.get(f"{mesh.edge_url}/v1/usage", headers={"x-api-key": key["secret"]}, timeout=10)
    assert reply.status_code == 403
