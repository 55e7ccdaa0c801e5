"""The edge's part of `Prefer: respond-async` (RFC 7240): no Python hop for other requests.

A REST Complete (`POST /v2/models/{model}:complete`, `/v1/...`) whose
`Prefer` header asks for `respond-async` must reach the jobs service's
tokenmesh.jobs.v1.HandoverService instead of a worker. Both bind the same
verb and path, which one transcoder cannot hold, so the edge has a second
transcoder, for HandoverService only, placed before the main one. It knows
only those two paths, so every other request passes it untouched (a path
lookup in C++). Routes matched on the original request decide the two
paths: with the Prefer header, the second transcoder rewrites the request
to the HandoverService RPC, the main transcoder passes the gRPC request
through, and the route re-matched on the new path sends it to the jobs
cluster (on the way back it prints HandoverService's HttpBody as it is);
without it, a route disables the second transcoder for the request and the
main one sends it to the workers as always.

The same transcoder serves OpenAI's files and batches (their paths are its
own): it may buffer a request body of a batch input file's size, which the
main transcoder, for every other REST request, does not.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from gateway import grpc_paths

SERVICE = "tokenmesh.jobs.v1.HandoverService"
# OpenAI's files and batches go through this transcoder too (before the main
# one, which passes them on as gRPC): it alone may buffer a batch input file.
BATCH_SERVICE = "tokenmesh.openai.v1.OpenAIBatchService"
# The largest request body it buffers: an upload of the jobs service's largest
# file (TOKENMESH_OPENAI_FILE_MAX_BYTES, at most 8 MiB) and its multipart framing.
MAX_UPLOAD_BYTES = 8 * 1024 * 1024 + 64 * 1024
FILTER_NAME = "tokenmesh.handover_transcoder"
# The REST Complete paths a client may prefer to be answered asynchronously.
COMPLETE_PATHS = r"^/v[12]/models/[^/]+:complete$"
TYPE_PREFIX = "type.googleapis.com/envoy"


def transcoder_filter(descriptor_path: Path) -> dict[str, Any]:
    """Builds the jobs service's transcoder: HandoverService (off on Completes without
    the Prefer header) and OpenAIBatchService (uploads up to MAX_UPLOAD_BYTES)."""
    return {
        "name": FILTER_NAME,
        "typed_config": {
            "@type": f"{TYPE_PREFIX}.extensions.filters.http.grpc_json_transcoder.v3"
            ".GrpcJsonTranscoder",
            "proto_descriptor": str(descriptor_path),
            "services": [SERVICE, BATCH_SERVICE],
            "max_request_body_size": MAX_UPLOAD_BYTES,
            "convert_grpc_status": True,
            "request_validation_options": {
                "reject_unknown_query_parameters": True,
                "reject_binding_body_field_collisions": True,  # as the edge's transcoder
            },
            "print_options": {
                "always_print_primitive_fields": True,
                "preserve_proto_field_names": True,
            },
        },
    }


def _complete_route(prefer_async: bool) -> dict[str, Any]:
    # Only REST requests: a gRPC request on a REST path is no RPC (gateway/grpc_paths.py).
    match: dict[str, Any] = {
        "safe_regex": {"regex": COMPLETE_PATHS},
        "headers": [grpc_paths.grpc_content_type(invert=True)],
    }
    route: dict[str, Any] = {
        "match": match,
        # The transcoder rewrites the path and the route is chosen again (the
        # jobs service's or the workers' prefix route): this one never routes.
        "route": {"cluster": "jobs" if prefer_async else "inference", "timeout": "0s"},
    }
    if prefer_async:
        match["headers"].append(
            {"name": "prefer", "string_match": {"contains": "respond-async", "ignore_case": True}}
        )
    else:
        route["typed_per_filter_config"] = {
            FILTER_NAME: {"@type": f"{TYPE_PREFIX}.config.route.v3.FilterConfig", "disabled": True}
        }
    return route


def routes() -> list[dict[str, Any]]:
    """Builds the routes a REST Complete matches before it is transcoded: with a Prefer
    header holding `respond-async`, it goes to HandoverService; without, the
    HandoverService transcoder is off for it."""
    return [_complete_route(prefer_async=True), _complete_route(prefer_async=False)]
