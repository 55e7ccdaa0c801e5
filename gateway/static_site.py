"""Static files the edge serves itself (the playground), with no credential and no Python hop.

Each file is a route with a `direct_response` whose body is the file's text,
inlined into the route configuration: the router (which builds the routes
for RDS) and a static edge read the same packaged files, so the edge's host
needs no copy of them. Such a route comes before every other route and
turns off the filters that would ask for a credential or a gRPC method
(transcoder, ext_authz); see `edge_auth.PUBLIC_PATHS`.

To serve another file (e.g. an API description), add a `StaticFile` to
`STATIC_FILES`: the route, the auth exemptions and the size limit follow.
"""

from __future__ import annotations

import functools
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gateway import protos

PLAYGROUND_DIR = Path(__file__).with_name("playground")
# `make docs` writes it into docs/; an image copies it elsewhere and says where.
OPENAPI_DOCUMENT = Path(
    os.environ.get("TOKENMESH_OPENAPI_DOCUMENT", protos.ROOT / "docs" / "openapi.yaml")
)
logger = logging.getLogger(__name__)
# Self only: no inline script or style, no third-party origin, no framing.
CONTENT_SECURITY_POLICY = (
    "default-src 'self'; img-src 'self' data:; object-src 'none'; base-uri 'none'; "
    "form-action 'none'; frame-ancestors 'none'"
)
# The transcoder answers 404 for a path that is no gRPC method (it rejects
# unknown methods): it is off on these routes. (`edge_auth.public_routes`
# turns ext_authz off on them too, and RBAC lets their paths through.)
TRANSCODER_FILTER = "envoy.filters.http.grpc_json_transcoder"
# Envoy refuses a route configuration whose direct_response bodies exceed its
# limit (4 KiB by default); the largest static file must fit under this one.
# (docs/openapi.yaml is about 200 KiB.)
MAX_BODY_BYTES = 1024 * 1024


@dataclass(frozen=True)
class StaticFile:
    """StaticFile is one file the edge serves at `path` (GET and HEAD)."""

    path: str
    source: Path
    content_type: str

    def text(self) -> str:
        return _read(self.source)


STATIC_FILES: tuple[StaticFile, ...] = (
    StaticFile("/playground", PLAYGROUND_DIR / "index.html", "text/html; charset=utf-8"),
    StaticFile(
        "/playground/playground.js",
        PLAYGROUND_DIR / "playground.js",
        "text/javascript; charset=utf-8",
    ),
    StaticFile(
        "/playground/playground.css", PLAYGROUND_DIR / "playground.css", "text/css; charset=utf-8"
    ),
    # The OpenAPI description of every REST route (`make docs`, gateway/openapi.py).
    StaticFile("/openapi.yaml", OPENAPI_DOCUMENT, "application/yaml; charset=utf-8"),
)
PATHS: tuple[str, ...] = tuple(f.path for f in STATIC_FILES)


@functools.cache
def _read(source: Path) -> str:
    """Reads a packaged file once (routes are rebuilt on every catalogue change)."""
    text = source.read_text(encoding="utf-8")
    if len(text.encode()) > MAX_BODY_BYTES:
        raise ValueError(f"{source} is over the edge's {MAX_BODY_BYTES}-byte direct response limit")
    return text


def _header(key: str, value: str) -> dict[str, Any]:
    return {"header": {"key": key, "value": value}, "append_action": "OVERWRITE_IF_EXISTS_OR_ADD"}


def _disabled() -> dict[str, Any]:
    return {"@type": "type.googleapis.com/envoy.config.route.v3.FilterConfig", "disabled": True}


def route(file: StaticFile) -> dict[str, Any]:
    """Builds the route that answers `file` from the edge itself."""
    return {
        "match": {
            "path": file.path,
            "headers": [{"name": ":method", "string_match": {"safe_regex": {"regex": "GET|HEAD"}}}],
        },
        "direct_response": {"status": 200, "body": {"inline_string": file.text()}},
        "response_headers_to_add": [
            _header("content-type", file.content_type),
            _header("content-security-policy", CONTENT_SECURITY_POLICY),
            _header("x-content-type-options", "nosniff"),
            _header("referrer-policy", "no-referrer"),
            # Small files, changed by a deploy: revalidate rather than go stale.
            _header("cache-control", "no-cache"),
        ],
        "typed_per_filter_config": {TRANSCODER_FILTER: _disabled()},
    }


def routes() -> list[dict[str, Any]]:
    """Builds one route per static file that exists.

    A missing file loses its own route (404), never the others: the router
    builds every route of the edge from this list.
    """
    present = [f for f in STATIC_FILES if f.source.is_file()]
    for missing in set(STATIC_FILES) - set(present):
        logger.warning("not serving %s: %s is missing", missing.path, missing.source)
    return [route(f) for f in present]
