"""Prompt templates through the edge: the CLI creates, aliases and gets them; REST reads them."""

from __future__ import annotations

import collections
import json
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

from services.inference.tokenizer import HuggingFaceTokenizer
from services.launcher.mesh import Mesh
from tests.e2e.conftest import stable_round
from tests.e2e.test_auth import create_key
from tokenmesh.inference.v2 import inference_service_pb2 as pb
from tokenmesh.inference.v2 import inference_service_pb2_grpc as rpc


def _cli(mesh: Mesh, *args: str, ok: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        [sys.executable, "-m", "services.cli", *args],
        env={**os.environ, "TOKENMESH_STATE_DIR": str(mesh.state_dir)},
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert (result.returncode == 0) == ok, result.stderr
    return result


def test_cli_creates_aliases_and_gets_a_prompt_template(mesh, tmp_path):
    name = f"support-{uuid.uuid4().hex[:6]}"
    source = tmp_path / "support.jinja"
    source.write_text("Dear {{ customer }}, about {{ topic }}:\n")
    created = json.loads(
        _cli(
            mesh, "prompts", "create", name, "--template-file", str(source),
            "--system", "You are kind.", "--variable", "topic:32", "--json",
        ).stdout
    )  # fmt: skip
    assert created["version"] == 1
    assert {v["name"]: (v["required"], v["max_length"]) for v in created["variables"]} == {
        "topic": (False, 32),
        "customer": (True, 4096),  # used but not declared: required, the default limit
    }
    source.write_text("Hello {{ customer }}.\n")
    second = json.loads(
        _cli(mesh, "prompts", "create", name, "--template-file", str(source), "--json").stdout
    )
    assert second["version"] == 2

    aliased = json.loads(_cli(mesh, "prompts", "alias", name, "stable", "1", "--json").stdout)
    assert aliased["aliases"] == {"stable": 1} and aliased["latest_version"] == 2
    got = json.loads(_cli(mesh, "prompts", "get", f"{name}@stable", "--json").stdout)
    assert (got["version"], got["template"]) == (1, "Dear {{ customer }}, about {{ topic }}:\n")
    assert got["system_prompt"] == "You are kind."
    assert json.loads(_cli(mesh, "prompts", "get", name, "--json").stdout)["version"] == 2
    listed = json.loads(_cli(mesh, "prompts", "list", "--json").stdout)
    assert {"name": name, "latest_version": 2}.items() <= next(
        t for t in listed["templates"] if t["name"] == name
    ).items()
    assert "stable->1" in _cli(mesh, "prompts", "list").stdout

    # REST through the transcoder, with the same key.
    headers = {"x-api-key": mesh.dev_api_key()}
    response = httpx.get(f"{mesh.edge_url}/v1/prompts/{name}/versions/stable", headers=headers)
    assert response.status_code == 200, response.text
    assert response.json()["template"]["version"] == 1
    missing = httpx.get(f"{mesh.edge_url}/v1/prompts/{name}/versions/9", headers=headers)
    assert missing.status_code == 404

    # Errors reach the CLI user with the field that is wrong.
    source.write_text("{% include 'etc/passwd' %}")
    refused = _cli(mesh, "prompts", "create", name, "--template-file", str(source), ok=False)
    assert "INVALID_ARGUMENT" in refused.stderr and "include" in refused.stderr


DEMO_TOKENIZER = Path(__file__).resolve().parents[2] / "models" / "demo-lm" / "1" / "tokenizer.json"
GREEDY = {"temperature": 0, "seed": 1}


def _generate(http: httpx.Client, model: str, body: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """Streams one v2 Generate over REST; returns its text and its final event."""
    with http.stream("POST", f"/v2/models/{model}:generate", json=body) as response:
        assert response.status_code == 200, response.read()
        events = [
            json.loads(line[6:]) for line in response.iter_lines() if line.startswith("data: ")
        ]
    (final,) = [e for e in events if "finish_reason" in e]
    return "".join(e["text"] for e in events), final


def _wait_for(check: Callable[[], Any], timeout_s: float = 10) -> Any:
    deadline = time.monotonic() + timeout_s
    while True:
        result = check()
        if result or time.monotonic() > deadline:
            return result
        time.sleep(0.1)


def test_a_cli_template_renders_v2_requests_through_the_edge(mesh, tmp_path):
    name = f"greet-{uuid.uuid4().hex[:6]}"
    source = tmp_path / "greet.jinja"
    source.write_text(
        "A letter from {{ who }}.\n{% for m in messages %}{{ m.content }}{% endfor %}"
    )
    _cli(mesh, "prompts", "create", name, "--template-file", str(source), "--variable", "who:16")
    source.write_text(
        "Blessed is {{ who }}, for {% for m in messages %}{{ m.content }}{% endfor %}"
    )
    _cli(mesh, "prompts", "create", name, "--template-file", str(source), "--variable", "who:16")
    _cli(mesh, "prompts", "alias", name, "stable", "1")
    renders = {1: "A letter from Moses.\nAnd God said", 2: "Blessed is Moses, for And God said"}
    tokenizer = HuggingFaceTokenizer(DEMO_TOKENIZER)
    key = create_key(mesh, scopes="inference:generate,usage:read")
    body = {"variables": {"who": "Moses"}, "prompt": "And God said"}
    body |= {"max_output_tokens": 4, "sampling": GREEDY}
    with httpx.Client(
        base_url=mesh.edge_url, timeout=30, headers={"x-api-key": key["secret"]}
    ) as http:
        served: collections.Counter[str] = collections.Counter()

        def generate(reference: str) -> tuple[str, dict[str, Any]]:
            text, final = _generate(http, "demo-lm", {**body, "template": reference})
            served[f"{final['template']['name']}@{final['template']['version']}"] += 1
            return text, final

        # name@1: the render is the prompt (its tokens, and the text the same prompt gives).
        text, final = generate(f"{name}@1")
        assert final["template"] == {"name": name, "version": 1}
        assert final["usage"]["prompt_tokens"] == len(tokenizer.encode(renders[1]))
        plain, _ = _generate(
            http, "demo-lm", {**body, "template": "", "variables": {}, "prompt": renders[1]}
        )
        assert text == plain
        # Through the alias, then the alias moved: served within a second or two.
        _, final = generate(f"{name}@stable")
        assert final["template"]["version"] == 1
        _cli(mesh, "prompts", "alias", name, "stable", "2")

        def served_version_2() -> dict[str, Any] | None:
            final = generate(f"{name}@stable")[1]
            return final if final["template"]["version"] == 2 else None

        moved = _wait_for(served_version_2, timeout_s=5)
        assert moved, "the moved alias was not served within 5 s"
        assert moved["usage"]["prompt_tokens"] == len(tokenizer.encode(renders[2]))
        # A variable over its size limit: 400 naming it. An unknown alias: 404 naming it.
        too_long = {**body, "template": f"{name}@1", "variables": {"who": "M" * 17}}
        reply = http.post("/v2/models/demo-lm:complete", json=too_long)
        assert reply.status_code == 400, reply.text
        (bad,) = [d for d in reply.json()["details"] if "field_violations" in d]
        assert [v["field"] for v in bad["field_violations"]] == ["variables.who"]
        reply = http.post("/v2/models/demo-lm:complete", json={**body, "template": f"{name}@nope"})
        assert reply.status_code == 404, reply.text
        (info,) = [d for d in reply.json()["details"] if "resource_name" in d]
        assert info["resource_name"] == f"{name}@nope"
        # Usage reports show the template versions used.
        expected = dict(served)
        assert set(expected) == {f"{name}@1", f"{name}@2"}

        def by_template() -> dict[str, int]:
            report = http.get("/v1/usage").json()
            return {k: int(v) for k, v in report.get("requests_by_template", {}).items()}

        _wait_for(lambda: by_template() == expected)
        assert by_template() == expected


def test_template_requests_reach_one_worker_whatever_their_input(mesh, tmp_path, channel):
    # The edge hashes a v2 request's template reference (not its prompt) for prefix affinity:
    # every render shares the template's head, so one worker's prefix cache keeps serving it.
    name = f"head-{uuid.uuid4().hex[:6]}"
    source = tmp_path / "head.jinja"
    source.write_text("a b c d e f {% for m in messages %}{{ m.content }}{% endfor %}")
    _cli(mesh, "prompts", "create", name, "--template-file", str(source))
    stub = rpc.InferenceServiceStub(channel)

    def workers_of_a_round() -> set[str]:
        workers = set()
        for n in range(8):
            request = pb.CompleteRequest(
                model="deterministic-test",
                template=f"{name}@1",
                prompt=f"{n} a",
                max_output_tokens=1,
            )
            reply, call = stub.Complete.with_call(request, timeout=10)
            assert (reply.template.name, reply.template.version) == (name, 1)
            workers.add(dict(call.initial_metadata())["x-tokenmesh-worker"])
        return workers

    workers_of_a_round()  # the edge's thread sends a head it has not seen in turn
    workers = stable_round(mesh, "model:deterministic-test:1", workers_of_a_round)
    assert len(workers) == 1, workers
