"""docs/openapi.yaml: current, valid OpenAPI 3.1, and shaped like the transcoder's JSON."""

from __future__ import annotations

import json
import textwrap
from http import HTTPStatus
from pathlib import Path
from typing import Any

import jsonschema  # type: ignore[import-untyped]
import pytest
import yaml
from google.protobuf import descriptor_pb2
from grpc_tools import protoc
from openapi_spec_validator import validate

from gateway import edge_auth, envoy_config, openai_edge, openapi, protos


@pytest.fixture(scope="module")
def files() -> list[descriptor_pb2.FileDescriptorProto]:
    return openapi.descriptor_files()


@pytest.fixture(scope="module")
def document(files) -> dict[str, Any]:
    return openapi.build(files)


def test_committed_document_is_current(files):
    committed = openapi.DOCUMENT_PATH.read_text(encoding="utf-8")
    assert committed == openapi.render(files), "run `make docs` and commit docs/openapi.yaml"


def test_document_is_valid_openapi_3_1(document):
    validate(document)
    assert document["openapi"].startswith("3.1")


def test_every_served_route_is_described(files, document):
    index = openapi.Protos.of(files)
    for binding in openapi.bindings(index, envoy_config.TRANSCODED_SERVICES):
        operation = document["paths"][binding.path][binding.verb]
        assert operation["operationId"] == binding.operation_id
        public = edge_auth.RPC_SCOPES.get(binding.rpc_path) == edge_auth.PUBLIC
        assert (operation.get("security") == []) == public, binding.rpc_path
        if not public:
            assert {"401", "403", "429"} <= set(operation["responses"]), binding.rpc_path
    assert document["paths"][openapi.SERVED_PATH]["get"]["security"] == []


def _validator(document: dict[str, Any], schema: dict[str, Any]) -> jsonschema.Validator:
    root = {"$schema": "https://json-schema.org/draft/2020-12/schema", **schema}
    root["components"] = document["components"]
    return jsonschema.Draft202012Validator(root, format_checker=jsonschema.FormatChecker())


def _media_examples(document):
    for ops in document["paths"].values():
        for operation in ops.values():
            bodies = [operation.get("requestBody", {})]
            bodies += [r for r in operation["responses"].values() if "content" in r]
            for body in bodies:
                for media in body.get("content", {}).values():
                    if "example" in media:
                        yield operation["operationId"], media["schema"], media["example"]
                    data = media["schema"].get("properties", {}).get("data", {})
                    for example in data.get("contentSchema", {}).get("examples", []):
                        yield operation["operationId"], data["contentSchema"], example


def test_examples_match_their_schemas(document):
    checked = 0
    for operation_id, schema, example in _media_examples(document):
        errors = [e.message for e in _validator(document, schema).iter_errors(example)]
        assert not errors, f"{operation_id}: {errors}"
        checked += 1
    assert checked >= 10


def test_error_responses_match_what_the_edge_sends(document):
    # Envoy's own reply (local_reply_config) and a transcoded google.rpc.Status.
    error = document["components"]["responses"]["NotFound"]["content"]["application/json"]
    validator = _validator(document, error["schema"])
    local_reply = envoy_config._error_body(5)["json_format"] | {"http_status": 404}
    validator.validate(local_reply | {"message": "Could not resolve /nope to a method."})
    validator.validate(
        {
            "code": 3,
            "message": "bad request",
            "details": [
                {
                    "@type": "type.googleapis.com/google.rpc.BadRequest",
                    "field_violations": [{"field": "n", "description": "1-8"}],
                }
            ],
        }
    )


def error_reply_problems(
    document: dict[str, Any], path: str, verb: str, status: int, body: dict[str, Any]
) -> list[str]:
    """What `document` gets wrong about an error reply the edge sent for (path, verb, status):
    no response for the status, a schema the body breaks, or a member of the body that
    the response's schema does not describe (Error and openai.Error are open objects)."""
    response = document["paths"][path][verb]["responses"].get(str(status))
    if response is None:
        return [f"{verb.upper()} {path} lists no {status}"]
    while "$ref" in response:
        _, _, kind, name = response["$ref"].split("/", 3)
        response = document["components"][kind][name]
    schema = response["content"]["application/json"]["schema"]
    described = {"allOf": [schema], "unevaluatedProperties": False}
    errors = _validator(document, described).iter_errors(body)
    return [f"{verb.upper()} {path} {status}: {e.message}" for e in errors]


def before_headers_body(status: int) -> dict[str, Any]:
    """The edge's reply of `status` sent before it read a request's headers, as Envoy fills
    its mapper's placeholders (the message is the status's reason phrase)."""
    for mapper in envoy_config.before_request_mappers():
        _, status_filter = mapper["filter"]["and_filter"]["filters"]
        comparison = status_filter["status_code_filter"]["comparison"]
        if (comparison["op"], comparison["value"]["default_value"]) == ("EQ", status):
            text = json.dumps(mapper["body_format_override"]["json_format"])
            text = text.replace('"%RESPONSE_CODE%"', str(status))
            return dict(json.loads(text.replace("%LOCAL_REPLY_BODY%", HTTPStatus(status).phrase)))
    raise AssertionError(f"no before-headers mapper for {status}")


@pytest.mark.parametrize("status", openai_edge.BEFORE_HEADERS_STATUSES)
def test_every_route_describes_the_replies_sent_before_its_headers_were_read(document, status):
    # Nothing tells a path then: any route gets the body in both shapes, which
    # carries OpenAI's `error` beside google.rpc.Status's members.
    body = before_headers_body(status)
    assert body["error"]["code"] == openai_edge.LOCAL_ERRORS[status][1]
    problems = [
        problem
        for path, operations in document["paths"].items()
        for verb in operations
        for problem in error_reply_problems(document, path, verb, status, body)
    ]
    assert not problems, problems[:5]


def test_the_rest_error_describes_openais_error_member(document):
    validator = _validator(document, openapi._ref("schemas", "Error"))
    body = before_headers_body(431)
    assert validator.is_valid(body)
    assert not validator.is_valid(body | {"error": {"message": "m"}})  # OpenAI's four members
    assert validator.is_valid({k: v for k, v in body.items() if k != "error"})  # optional


# A service that uses every JSON convention the transcoder has.
_PROTO = """
syntax = "proto3";
package demo.v1;
import "google/api/annotations.proto";
import "google/protobuf/duration.proto";
import "google/protobuf/struct.proto";
import "google/protobuf/timestamp.proto";
import "google/protobuf/wrappers.proto";

// Things has things.
service Things {
  // GetThing gets a thing.
  rpc GetThing(GetThingRequest) returns (Thing) {
    option (google.api.http) = {get: "/v1/{name=shelves/*/things/*}"};
  }
  // UpdateThing updates a thing.
  rpc UpdateThing(UpdateThingRequest) returns (Thing) {
    option (google.api.http) = {patch: "/v1/things/{thing.id}" body: "thing"};
  }
  // WatchThings streams things.
  rpc WatchThings(GetThingRequest) returns (stream Thing) {
    option (google.api.http) = {post: "/v1/things:watch" body: "*"};
  }
}
// Kind is a kind.
enum Kind {
  KIND_UNSPECIFIED = 0;
  KIND_BIG = 1;
}
// Filter filters.
message Filter {
  // kinds are kinds.
  repeated Kind kinds = 1;
  google.protobuf.Timestamp since = 2;
}
message GetThingRequest {
  string name = 1;
  Filter filter = 2;
  repeated string tags = 3;
  map<string, string> labels = 4;
  int64 limit = 5;
}
message UpdateThingRequest {
  Thing thing = 1;
  bool validate_only = 2;
}
// Thing is a thing.
message Thing {
  string id = 1;
  int64 count = 2;
  uint64 seed = 3;
  optional int32 rank = 4;
  bytes blob = 5;
  google.protobuf.Duration ttl = 6;
  google.protobuf.Struct extra = 7;
  google.protobuf.Int64Value big = 8;
  map<string, int64> totals = 9;
  Kind kind = 10;
  oneof source {
    string url = 11;
    string path = 12;
  }
}
"""


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> dict[str, Any]:
    tmp = tmp_path_factory.mktemp("demo")
    (tmp / "demo.proto").write_text(textwrap.dedent(_PROTO))
    out = tmp / "demo.pb"
    args = [*protos._include_args(), f"-I{tmp}", "--include_imports", "--include_source_info"]
    assert protoc.main(["protoc", *args, f"--descriptor_set_out={out}", "demo.proto"]) == 0
    files = descriptor_pb2.FileDescriptorSet.FromString(Path(out).read_bytes()).file
    document = openapi.build(files, services=["demo.v1.Things"], examples={})
    validate(document)
    return document


def test_path_patterns_and_query_parameters(demo):
    operation = demo["paths"]["/v1/{name}"]["get"]
    parameters = {p["name"]: p for p in operation["parameters"]}
    assert (
        parameters["name"]["in"] == "path"
        and "shelves/*/things/*" in (parameters["name"]["description"])
    )
    # Non-path fields of a GET are query parameters: nested by dotted name,
    # repeated ones repeated, maps never.
    assert set(parameters) == {"name", "filter.kinds", "filter.since", "tags", "limit"}
    assert parameters["tags"]["schema"] == {"type": "array", "items": {"type": "string"}}
    assert parameters["tags"]["explode"] is True
    assert parameters["filter.since"]["schema"] == {"type": "string", "format": "date-time"}
    assert parameters["limit"]["schema"]["type"] == ["string", "integer"]
    assert "requestBody" not in operation


def test_field_body_and_remaining_query(demo):
    operation = demo["paths"]["/v1/things/{thing.id}"]["patch"]
    assert [p["name"] for p in operation["parameters"]] == ["thing.id", "validate_only"]
    body = operation["requestBody"]["content"]["application/json"]["schema"]
    assert body["$ref"] == "#/components/schemas/demo.v1.Thing"


def test_body_star_leaves_out_path_fields_and_streams_are_sse(demo):
    operation = demo["paths"]["/v1/things:watch"]["post"]
    body = operation["requestBody"]["content"]["application/json"]["schema"]
    assert {"name", "filter", "tags", "labels", "limit"} == set(body["properties"])
    assert body["properties"]["labels"]["additionalProperties"] == {"type": "string"}
    (media,) = operation["responses"]["200"]["content"].items()
    assert media[0] == "text/event-stream"
    data = media[1]["schema"]["properties"]["data"]
    assert data["contentMediaType"] == "application/json"
    assert data["contentSchema"] == {"$ref": "#/components/schemas/demo.v1.Thing"}


def test_json_conventions_of_a_response_message(demo):
    thing = demo["components"]["schemas"]["demo.v1.Thing"]
    props = thing["properties"]
    # 64-bit integers print as strings and are read from numbers too (the edge takes
    # `"seed": 7`; a string-only schema refused the docs' own example).
    assert (
        props["count"]["type"] == ["string", "integer"] and props["seed"]["pattern"] == "^[0-9]+$"
    )
    assert props["blob"] == {"type": "string", "contentEncoding": "base64"}
    assert props["ttl"]["type"] == "string" and props["ttl"]["pattern"].endswith("s$")
    assert props["extra"]["type"] == "object"
    assert props["big"]["type"] == ["string", "integer"]  # Int64Value prints as its int64
    assert props["totals"]["additionalProperties"]["type"] == ["string", "integer"]
    assert props["kind"] == {"$ref": "#/components/schemas/demo.v1.Kind"}
    assert demo["components"]["schemas"]["demo.v1.Kind"]["enum"] == ["KIND_UNSPECIFIED", "KIND_BIG"]
    # Used in requests too (UpdateThing's body), so nothing is required; presence
    # fields (optional, messages, oneof members) never are.
    assert "required" not in thing
    assert thing["not"] == {"anyOf": [{"required": ["url", "path"]}]}
    validator = jsonschema.Draft202012Validator({**thing, "components": demo["components"]})
    assert not validator.is_valid({"url": "a", "path": "b"})
    assert validator.is_valid({"url": "a", "count": "3"})


def test_response_only_messages_list_fields_without_presence_as_required(document):
    schemas = document["components"]["schemas"]
    usage = schemas["tokenmesh.inference.v2.Usage"]
    assert set(usage["required"]) == set(usage["properties"])
    response = schemas["tokenmesh.inference.v2.GenerateResponse"]
    assert "finish_reason" not in response["required"]  # optional: absent on deltas
    assert "usage" not in response["required"]  # a message: absent on deltas
    assert "text" in response["required"]
    request = schemas.get("tokenmesh.inference.v2.SamplingParams", {})
    assert "required" not in request


def test_served_copy_fits_the_edge(document):
    text = openapi.DOCUMENT_PATH.read_bytes()
    assert yaml.safe_load(text)["paths"].keys() == document["paths"].keys()
