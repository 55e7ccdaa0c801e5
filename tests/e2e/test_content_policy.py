"""Content policies and redacted samples through the edge, as an operator and a client see them.

Each test uses a tenant of its own; workers pick attachments up within ~1 s,
so the client side polls until the policy is in force (a condition, not a clock).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from typing import Any

import httpx
import pytest

from tests.e2e.test_auth import cli

MODEL = "deterministic-test"


def _run(mesh, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "services.cli", *args],
        env={**os.environ, "TOKENMESH_STATE_DIR": str(mesh.state_dir)},
        capture_output=True,
        text=True,
        timeout=30,
    )


def _tenant_client(mesh, tenant: str) -> httpx.Client:
    key = cli(
        mesh, "keys", "create", "--tenant", tenant, "--scopes", "inference:generate,usage:read"
    )
    return httpx.Client(base_url=mesh.edge_url, headers={"x-api-key": key["secret"]}, timeout=30)


def _until(condition: Callable[[], Any], what: str, timeout_s: float = 15.0) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        found = condition()
        if found:
            return found
        time.sleep(0.1)
    pytest.fail(f"timed out waiting for {what}")


def _generate(http: httpx.Client, prompt: str, max_tokens: int = 16) -> tuple[str, dict[str, Any]]:
    body = {"prompt": prompt, "max_output_tokens": max_tokens, "sampling": {"temperature": 0}}
    with http.stream("POST", f"/v2/models/{MODEL}:generate", json=body) as response:
        assert response.status_code == 200, response.read()
        events = [
            json.loads(line[6:]) for line in response.iter_lines() if line.startswith("data: ")
        ]
    final = next(e for e in events if e.get("finish_reason"))
    return "".join(e["text"] for e in events), final


@pytest.fixture
def tenant() -> str:
    return f"cp-{uuid.uuid4().hex[:8]}"


def test_redacted_email_reaches_the_model_as_a_placeholder_visible_in_samples(mesh, tenant):
    name = f"pii-{tenant}"
    created = cli(mesh, "policies", "create", name, "--redact", "email", "--flag", "ip")
    assert (created["name"], created["version"]) == (name, 1)
    assert cli(mesh, "policies", "attach", name, "--tenant", tenant)["policy"] == name
    listed = cli(mesh, "policies", "list")
    assert {"tenant": tenant, "key_id": "", "policy": name} in listed["attachments"]
    assert cli(mesh, "policies", "get", name)["pii_rules"] == [
        {"detector": "email", "action": "POLICY_ACTION_REDACT"},
        {"detector": "ip", "action": "POLICY_ACTION_FLAG"},
    ]
    settings = cli(mesh, "samples", "enable", "--tenant", tenant, "--rate", "1.0")
    assert settings["rate"] == 1.0 and settings["consented_by"]

    def sampled() -> list[dict[str, Any]]:
        with _tenant_client(mesh, tenant) as http:
            _generate(http, "please write to jane.doe@example.com today", 4)
        exported = _run(mesh, "samples", "export", "--tenant", tenant, "--since", "1h")
        assert exported.returncode == 0, exported.stderr
        return [json.loads(line) for line in exported.stdout.splitlines()]

    samples = _until(sampled, "a sample of the tenant's request")
    assert all("jane.doe@example.com" not in s["input"] for s in samples)
    assert samples[-1]["input"] == "please write to [EMAIL] today"
    assert samples[-1]["tenant"] == tenant and samples[-1]["model"]["name"] == MODEL
    assert "tm_" not in json.dumps(samples)  # never a credential
    assert cli(mesh, "policies", "detach", "--tenant", tenant)["policy"] == name
    assert cli(mesh, "samples", "disable", "--tenant", tenant)["rate"] == 0


def test_a_block_rule_answers_400_naming_the_rule_without_the_text(mesh, tenant):
    name = f"block-{tenant}"
    cli(mesh, "policies", "create", name, "--block", "card", "--block-pattern", r"project\s+falcon")
    cli(mesh, "policies", "attach", f"{name}@1", "--tenant", tenant)
    with _tenant_client(mesh, tenant) as http:

        def blocked(prompt: str) -> httpx.Response | None:
            body = {"prompt": prompt, "max_output_tokens": 2}
            reply = http.post(f"/v2/models/{MODEL}:complete", json=body)
            return reply if reply.status_code == 400 else None

        card = _until(lambda: blocked("charge 4111 1111 1111 1111 now"), "the card rule")
        assert "4111" not in card.text
        assert (
            f"{name}@1" in card.text and "pii:card" in card.text and "CONTENT_POLICY" in card.text
        )
        pattern = _until(lambda: blocked("status of project  falcon?"), "the pattern rule")
        assert "falcon" not in pattern.text and "block_pattern:0" in pattern.text


def test_an_output_rule_stops_the_stream_with_content_filter_and_meters_the_tokens(mesh, tenant):
    with _tenant_client(mesh, tenant) as http:
        billed = 0
        free, final = _generate(http, "the output filter", 24)
        billed += int(final["usage"]["completion_tokens"])
        banned = free.split()[12]
        name = f"out-{tenant}"
        cli(mesh, "policies", "create", name, "--output-block-pattern", rf"(?<!\S){banned}(?!\S)")
        cli(mesh, "policies", "attach", name, "--tenant", tenant)

        def filtered() -> tuple[str, dict[str, Any]] | None:
            nonlocal billed
            text, final = _generate(http, "the output filter", 24)
            billed += int(final["usage"]["completion_tokens"])
            return (
                (text, final) if final["finish_reason"] == "FINISH_REASON_CONTENT_FILTER" else None
            )

        text, final = _until(filtered, "the output rule")
        assert banned not in text.split() and free.startswith(text)
        assert f"{name}@1 rule output_block_pattern:0" in final["finish_message"]
        assert int(final["usage"]["completion_tokens"]) > len(text.split())  # held tokens billed
        report = _until(
            lambda: (
                (r := http.get("/v1/usage").json()) and int(r["completion_tokens"]) >= billed and r
            ),
            "the usage report",
        )
        assert int(report["completion_tokens"]) == billed


def test_a_flag_rule_lets_the_request_through_and_is_counted(mesh, tenant):
    name = f"flag-{tenant}"
    cli(mesh, "policies", "create", name, "--flag", "ip")
    cli(mesh, "policies", "attach", name, "--tenant", tenant)
    needle = f'policy="{name}@1",rule="pii:ip"'

    def counted() -> bool:
        with _tenant_client(mesh, tenant) as http:
            _, final = _generate(http, "host 10.1.2.3 is down", 2)
        assert final["finish_reason"] == "FINISH_REASON_LENGTH"
        for i in range(mesh.config.workers):
            url = f"http://127.0.0.1:{mesh.ports[f'inference-{i}-metrics']}/metrics"
            if any(needle in line for line in httpx.get(url, timeout=5).text.splitlines()):
                return True
        return False

    _until(counted, "the flag hit in the workers' metrics")


def test_policies_and_samples_need_the_admin_scope(mesh, tenant):
    with _tenant_client(mesh, tenant) as http:
        assert http.get("/v1/policies").status_code == 403
        assert http.get(f"/v1/samples/{tenant}").status_code == 403
