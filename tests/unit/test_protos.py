"""Generated code and the API contract stay in step with proto/."""

from __future__ import annotations

from google.api import annotations_pb2

from gateway import protos
from tokenmesh.auth.v1 import auth_service_pb2
from tokenmesh.inference.v1 import inference_service_pb2
from tokenmesh.router.v1 import router_service_pb2
from tokenmesh.usage.v1 import usage_service_pb2

PUBLIC = {
    auth_service_pb2: "AuthService",
    router_service_pb2: "RouterService",
    inference_service_pb2: "InferenceService",
    usage_service_pb2: "UsageService",
}


def test_committed_stubs_match_the_protos():
    assert protos.stale_stubs() == [], "run `make proto` and commit the result"


def _http_rule(method):
    return method.GetOptions().Extensions[annotations_pb2.http]


def test_every_public_rpc_has_an_http_annotation():
    for module, name in PUBLIC.items():
        for method in module.DESCRIPTOR.services_by_name[name].methods:
            rule = _http_rule(method)
            assert rule.WhichOneof("pattern"), f"{name}/{method.name} has no google.api.http"


def test_the_fixed_rest_contract():
    service = inference_service_pb2.DESCRIPTOR.services_by_name["InferenceService"]
    rules = {m.name: _http_rule(m) for m in service.methods}
    assert rules["ListModels"].get == "/v1/models"
    assert rules["GetModel"].get == "/v1/models/{model}"
    assert rules["Generate"].post == "/v1/models/{model}:generate"
    assert rules["Complete"].post == "/v1/models/{model}:complete"
    assert rules["Embed"].post == "/v1/models/{model}:embed"
    assert service.methods_by_name["Generate"].server_streaming
    auth = auth_service_pb2.DESCRIPTOR.services_by_name["AuthService"]
    assert _http_rule(auth.methods_by_name["IssueToken"]).post == "/v1/auth/token"
    usage = usage_service_pb2.DESCRIPTOR.services_by_name["UsageService"]
    assert _http_rule(usage.methods_by_name["GetUsage"]).get == "/v1/usage"


def test_generate_request_has_the_contract_fields():
    fields = set(inference_service_pb2.GenerateRequest.DESCRIPTOR.fields_by_name)
    assert {
        "model",
        "version",
        "prompt",
        "max_tokens",
        "temperature",
        "top_p",
        "top_k",
        "seed",
        "stop",
        "request_id",
    } <= fields
    response = set(inference_service_pb2.GenerateResponse.DESCRIPTOR.fields_by_name)
    assert {
        "index",
        "text",
        "token_ids",
        "finish_reason",
        "usage",
        "model",
        "timing",
        "error",
    } <= response


def test_descriptor_set_builds(tmp_path):
    from google.protobuf import descriptor_pb2

    path = protos.build_descriptor_set(tmp_path / "d.pb")
    files = {f.name for f in descriptor_pb2.FileDescriptorSet.FromString(path.read_bytes()).file}
    assert "tokenmesh/inference/v1/inference_service.proto" in files
    assert "google/rpc/error_details.proto" in files


def test_api_reference_is_up_to_date():
    from pathlib import Path

    from gateway import apidocs

    committed = (Path(__file__).resolve().parents[2] / "docs" / "api.md").read_text()
    assert committed == apidocs.render(), "run `make docs` and commit docs/api.md"
