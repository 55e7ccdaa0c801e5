"""Prompt templates through the edge: the CLI creates, aliases and gets them; REST reads them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid

import httpx

from services.launcher.mesh import Mesh


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
