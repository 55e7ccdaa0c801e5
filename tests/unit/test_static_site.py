"""The edge's static files (the playground): routes first, no credential, within Envoy's limit."""

from __future__ import annotations

import re
from typing import Any

import pytest

from gateway import edge_auth, envoy_config, static_site
from gateway.edge_auth import EdgeAuth

MODEL_ROUTE = {"match": {"prefix": "/tokenmesh.inference."}, "route": {"cluster": "inference"}}


def _routes(auth: EdgeAuth | None) -> list[dict[str, Any]]:
    config = envoy_config.route_configuration(auth, [MODEL_ROUTE])
    routes: list[dict[str, Any]] = config["virtual_hosts"][0]["routes"]
    return routes


@pytest.mark.parametrize("auth", [EdgeAuth(), None], ids=["auth", "open"])
def test_static_routes_come_first_and_skip_the_transcoder(auth):
    routes = _routes(auth)
    files = routes[: len(static_site.STATIC_FILES)]
    assert [r["match"]["path"] for r in files] == list(static_site.PATHS)
    assert routes.index(envoy_config.without_credentials(MODEL_ROUTE)) >= len(files)
    for route, file in zip(files, static_site.STATIC_FILES, strict=True):
        assert route["direct_response"]["body"]["inline_string"] == file.source.read_text()
        disabled = route["typed_per_filter_config"][static_site.TRANSCODER_FILTER]
        assert disabled["disabled"] is True
        headers = {
            h["header"]["key"]: h["header"]["value"] for h in route["response_headers_to_add"]
        }
        assert headers["content-type"] == file.content_type
        assert headers["content-security-policy"] == static_site.CONTENT_SECURITY_POLICY


def test_static_routes_need_no_credential():
    for route in _routes(EdgeAuth())[: len(static_site.STATIC_FILES)]:
        assert route["typed_per_filter_config"][edge_auth.EXT_AUTHZ_FILTER]["disabled"] is True
    rules = edge_auth.jwt_filter(EdgeAuth(), 8080)["typed_config"]["rules"]
    unchecked = {r["match"].get("path") for r in rules if "requires" not in r}
    assert set(static_site.PATHS) <= unchecked
    public = edge_auth.rbac_filter()["typed_config"]["rules"]["policies"][edge_auth.PUBLIC]
    allowed = {
        rule["url_path"]["path"]["exact"] for rule in public["permissions"][0]["or_rules"]["rules"]
    }
    assert set(static_site.PATHS) <= allowed


def test_every_file_fits_the_direct_response_limit_the_route_configuration_sets():
    config = envoy_config.route_configuration(EdgeAuth())
    limit = config["max_direct_response_body_size_bytes"]
    assert limit == static_site.MAX_BODY_BYTES
    assert all(len(f.source.read_bytes()) <= limit for f in static_site.STATIC_FILES)


def test_the_page_loads_nothing_from_another_origin():
    page = (static_site.PLAYGROUND_DIR / "index.html").read_text()
    resources = re.findall(r'(?:src|href)="([^"]+)"', page)
    assert resources and all(r.startswith(("/playground/", "data:")) for r in resources)
    assert static_site.PATHS[0] == "/playground"
    assert {f"/playground/{name}" for name in ("playground.js", "playground.css")} <= set(
        static_site.PATHS
    )
    assert "<script>" not in page and "style=" not in page  # the CSP allows neither inline


def test_a_missing_file_loses_only_its_own_route(monkeypatch, tmp_path):
    gone = static_site.StaticFile("/gone.yaml", tmp_path / "gone.yaml", "application/yaml")
    monkeypatch.setattr(static_site, "STATIC_FILES", (*static_site.STATIC_FILES, gone))
    served = [r["match"]["path"] for r in static_site.routes()]
    assert "/gone.yaml" not in served
    assert set(static_site.PATHS) <= set(served)
