"""Model routing at the edge: the headers routes match, and the Lua filter that sets them.

Envoy's routes pick a cluster per model version from headers; the Lua
filter (LuaJIT inside Envoy, no Python hop) decodes a request's `model` and
`version` fields from its protobuf body into those headers, so REST paths
(`/v1/models/{model}:generate`, transcoded into the body) and native gRPC
requests route the same way; it reads the body as the workers' protobuf
parser does (of a field given twice the last) and refuses (INVALID_ARGUMENT)
one it cannot read that way, so the model it routes and limits by is the one
the worker serves. It also copies the head of a generation's
prompt into a header that the routes hash, so that prompts which start the
same way reach the same worker (and its prefix cache).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from services.core import contract
from services.core.errors import FieldViolation, InvalidArgument

INFERENCE_PREFIX = "/tokenmesh.inference.v1.InferenceService/"
# Model routes match every inference API's paths (v1, v2 and the OpenAI surface's
# requests for a model go to the same clusters). Only the Lua filter sets
# MODEL_HEADER, and only on the Generate/Complete/Embed paths of those APIs
# (tokenmesh.openai.v1's CreateChatCompletion/CreateCompletion/CreateEmbedding),
# so other paths under this prefix (InferenceAdminService, other services) never
# match a model route.
INFERENCE_ROUTE_PREFIX = "/tokenmesh."
# Model lookups the Lua filter routes by their model (its MODEL_LOOKUPS): they match
# the model's routes, but are no inference request (shadow traffic never copies them:
# services/router/shadow.py).
MODEL_LOOKUP_PATHS = ("/tokenmesh.openai.v1.OpenAIService/GetModel",)
# Set by the Lua filter from the request body.
MODEL_HEADER = "x-tokenmesh-model"
# Set by the client or, from the body's version field, by the Lua filter.
VERSION_HEADER = "x-model-version"
# Set by the Lua filter: the hex of a Generate/Complete prompt's first 64 bytes,
# which the routes hash to pick a worker (prompts that start alike meet the
# same worker's prefix cache).
PREFIX_HEADER = "x-tokenmesh-prefix"
# Set by the chosen route: what the worker must serve, and what to serve instead.
ROUTE_MODEL_HEADER = "x-tokenmesh-route-model"
ROUTE_VERSION_HEADER = "x-tokenmesh-route-version"
FALLBACK_MODEL_HEADER = "x-tokenmesh-fallback-model"
FALLBACK_VERSION_HEADER = "x-tokenmesh-fallback-version"
# Only the edge may set these: clients' copies are removed on arrival.
EDGE_ONLY_HEADERS = (
    MODEL_HEADER,
    PREFIX_HEADER,
    ROUTE_MODEL_HEADER,
    ROUTE_VERSION_HEADER,
    FALLBACK_MODEL_HEADER,
    FALLBACK_VERSION_HEADER,
    contract.SHADOW_HEADER,
    contract.SHADOWED_HEADER,
)
LUA_SOURCE = Path(__file__).with_name("model_routing.lua")


def model_health_name(model: str, version: str) -> str:
    """Returns the gRPC health name a worker reports one model version's readiness under
    (what the edge's per-version clusters health-check)."""
    return f"{INFERENCE_PREFIX.strip('/')}/{model}/{version}"


#: The model-routing Lua filter's name: route metadata under it is what the
#: filter's `handle:metadata()` reads (the router's prefix pins).
LUA_FILTER_NAME = "envoy.filters.http.lua"
#: Route metadata (beside the pins' prefix keys, which are hex, so never this):
#: one cycle of weighted turns over the workers of the versions a route splits
#: over (override addresses, services/router/snapshot.spread_workers). A head the
#: filter's Envoy thread has not seen lately takes the next turn instead of where
#: the hash points (see model_routing.lua).
SPREAD_KEY = "workers"


# The filter's refusals (INVALID_ARGUMENT, sent without reaching a worker). Their
# messages carry no percent sign: the filter sets grpc-message as it is.
COMPRESSED_REFUSAL = InvalidArgument(
    [
        FieldViolation(
            "grpc-encoding",
            "the edge reads inference requests uncompressed: send them without "
            "grpc-encoding (it reads the model to route and limit each request)",
        )
    ],
    reason="COMPRESSED_REQUEST",
)
MALFORMED_REFUSAL = InvalidArgument(
    [
        FieldViolation(
            "request",
            "the edge could not read this request message as protobuf does (a group, "
            "an unknown wire type, a malformed field or bytes past the message): send "
            "one well-formed message (the edge reads the model to route and limit each "
            "request)",
        )
    ],
    reason="MALFORMED_REQUEST",
)


def lua_source() -> str:
    """The filter's Lua: its refusals' messages and details, then model_routing.lua."""
    for refusal in (COMPRESSED_REFUSAL, MALFORMED_REFUSAL):
        # Lua string literals, set as grpc-message as they are (gRPC percent-decodes).
        if set(refusal.message) & set('"\\%'):
            raise ValueError(f"not a plain Lua literal: {refusal.message!r}")
    constants = "".join(
        f'local {name}_REFUSAL = "{refusal.message}"\n'
        f'local {name}_DETAILS = "{refusal.status_details_bin()}"\n'
        for name, refusal in (("COMPRESSED", COMPRESSED_REFUSAL), ("MALFORMED", MALFORMED_REFUSAL))
    )
    return constants + LUA_SOURCE.read_text()


def lua_filter() -> dict[str, Any]:
    """Builds the filter that copies the body's model and version into headers."""
    return {
        "name": LUA_FILTER_NAME,
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.lua.v3.Lua",
            "default_source_code": {"inline_string": lua_source()},
        },
    }
