"""Through the edge: prices set with the CLI, usage v2 grouped by tag and API version, with cost."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from decimal import Decimal
from typing import Any

import httpx

from services.core.pricing import format_amount
from services.launcher.mesh import Mesh
from tests.e2e.test_auth import cli, create_key

MODEL = "deterministic-test"
PROMPT, CACHED, COMPLETION = Decimal("3"), Decimal("0.3"), Decimal("15")


def _price_every_version(mesh: Mesh) -> None:
    listed = cli(mesh, "models", "list")
    versions = next(m for m in listed["models"] if m["name"] == MODEL)["versions"]
    for version in versions:
        result = subprocess.run(
            [sys.executable, "-m", "services.cli", "models", "price", MODEL, version["version"],
             "--prompt", str(PROMPT), "--completion", str(COMPLETION), "--cached", str(CACHED)],
            env={**os.environ, "TOKENMESH_STATE_DIR": str(mesh.state_dir)},
            capture_output=True, text=True, timeout=30,
        )  # fmt: skip
        assert result.returncode == 0, result.stderr
        assert "USD/1M tokens: prompt 3, cached 0.3, completion 15" in result.stdout


def _cost(usage: dict[str, Any]) -> Decimal:
    cached = int(usage.get("cached_prompt_tokens", 0))
    prompt = int(usage["prompt_tokens"]) - cached
    amount = prompt * PROMPT + cached * CACHED + int(usage["completion_tokens"]) * COMPLETION
    return amount / 1_000_000


def _report(http: httpx.Client, group_by: str, requests: int) -> dict[str, Any]:
    deadline = time.monotonic() + 15
    while True:
        reply = http.get("/v2/usage", params={"group_by": group_by})
        assert reply.status_code == 200, reply.text
        report: dict[str, Any] = reply.json()
        if int(report["totals"]["requests"]) >= requests or time.monotonic() > deadline:
            return report
        time.sleep(0.2)


def test_usage_v2_groups_by_tag_and_api_version_with_cost(mesh):
    _price_every_version(mesh)
    key = create_key(mesh, scopes="inference:generate,usage:read")
    usages: dict[str, dict[str, Any]] = {}
    with httpx.Client(
        base_url=mesh.edge_url, headers={"x-api-key": key["secret"]}, timeout=30
    ) as http:
        for team in ("a", "b"):
            body = {"prompt": "tally this", "max_output_tokens": 4, "metadata": {"team": team}}
            reply = http.post(f"/v2/models/{MODEL}:complete", json=body)
            assert reply.status_code == 200, reply.text
            usages[team] = reply.json()["usage"]
        reply = http.post(
            f"/v1/models/{MODEL}:complete", json={"prompt": "v1 too", "max_tokens": 3}
        )
        assert reply.status_code == 200, reply.text
        usages["v1"] = reply.json()["usage"]

        by_team = _report(http, "tag:team", 3)
        groups = {g["value"]: g["totals"] for g in by_team["groups"]}
        assert set(groups) == {"a", "b", ""}  # the v1 request has no tags
        for team, value in (("a", "a"), ("b", "b"), ("v1", "")):
            group, usage = groups[value], usages[team]
            assert int(group["requests"]) == 1
            assert int(group["prompt_tokens"]) == usage["prompt_tokens"]
            assert int(group["completion_tokens"]) == usage["completion_tokens"]
            assert group["cost"]["currency_code"] == "USD"
            assert group["cost"]["total"] == format_amount(_cost(usage)), (team, group)
        total = sum((_cost(u) for u in usages.values()), Decimal(0))
        assert by_team["totals"]["cost"]["total"] == format_amount(total)

        # v1 and v2 are metered into the same totals, and told apart by API version.
        by_api = _report(http, "api_version", 3)
        api = {g["value"]: g["totals"] for g in by_api["groups"]}
        assert {v: int(t["requests"]) for v, t in api.items()} == {"v1": 1, "v2": 2}
        tokens = sum(u["prompt_tokens"] + u["completion_tokens"] for u in usages.values())
        assert int(by_api["totals"]["total_tokens"]) == tokens
        assert int(http.get("/v1/usage").json()["total_tokens"]) == tokens

        bad = http.get("/v2/usage", params={"group_by": "team"})
        assert bad.status_code == 400
        assert "group_by" in bad.text
