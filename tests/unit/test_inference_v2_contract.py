"""The inference v2 API keeps the JSON contract of issue 16 (names, shapes, REST paths).

The edge prints proto field names with every field that has no presence, so
the proto field names are the JSON names; json_format with the same options
stands in for Envoy's transcoder here.
"""

from __future__ import annotations

from typing import Any

from google.api import annotations_pb2
from google.protobuf import json_format
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message

from tokenmesh.inference.v2 import inference_pb2 as resources
from tokenmesh.inference.v2 import inference_service_pb2 as pb

SERVICE = pb.DESCRIPTOR.services_by_name["InferenceService"]


def _json(message: Message) -> dict[str, Any]:
    return json_format.MessageToDict(
        message, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
    )


def _fields(descriptor: Descriptor) -> set[str]:
    return set(descriptor.fields_by_name)


def test_rest_paths():
    rules = {m.name: m.GetOptions().Extensions[annotations_pb2.http] for m in SERVICE.methods}
    assert rules["ListModels"].get == "/v2/models"
    assert rules["GetModel"].get == "/v2/models/{model}"
    for rpc, verb in (("Generate", "generate"), ("Complete", "complete"), ("Embed", "embed")):
        assert rules[rpc].post == f"/v2/models/{{model}}:{verb}"
        assert rules[rpc].body == "*"
    assert SERVICE.methods_by_name["Generate"].server_streaming
    assert not SERVICE.methods_by_name["Complete"].server_streaming


def test_every_rpc_has_its_own_request_and_response():
    for method in SERVICE.methods:
        assert method.input_type.name == f"{method.name}Request"
        assert method.output_type.name == f"{method.name}Response"


CONTRACT_REQUEST = {
    "model": "demo-lm",
    "version": "1",
    "messages": [{"role": "user", "content": "Hello"}],
    "template": "support@stable",
    "variables": {"product": "tokenmesh"},
    "n": 3,
    "sampling": {"temperature": 0.7, "top_p": 0.9, "top_k": 40, "seed": 7},
    "max_output_tokens": 16,
    "stop_sequences": ["\n\n"],
    "logprobs": True,
    "top_logprobs": 5,
    "metadata": {"team": "search"},
}


def test_generation_requests_parse_the_contract_json():
    for request_type in (pb.GenerateRequest, pb.CompleteRequest):
        request = json_format.ParseDict(CONTRACT_REQUEST, request_type())
        assert request.messages[0].role == "user"
        assert request.sampling.seed == 7
        assert request.HasField("max_output_tokens")
        assert dict(request.metadata) == {"team": "search"}
        prompt = json_format.ParseDict({"model": "demo-lm", "prompt": "Hi"}, request_type())
        assert prompt.prompt == "Hi"


def test_v1_routing_fields_keep_their_numbers():
    # gateway/model_routing.lua reads model (1), version (2) and prompt (3) from the frame.
    for request_type in (pb.GenerateRequest, pb.CompleteRequest, pb.EmbedRequest):
        fields = request_type.DESCRIPTOR.fields_by_name
        assert (fields["model"].number, fields["version"].number) == (1, 2)
    assert pb.GenerateRequest.DESCRIPTOR.fields_by_name["prompt"].number == 3
    assert pb.EmbedRequest.DESCRIPTOR.fields_by_name["inputs"].number == 3


def test_stream_delta_names_its_choice_and_leaves_out_final_fields():
    delta = pb.GenerateResponse(choice_index=2, text="Hel", token_ids=[5, 6])
    delta.logprobs.add(token="Hel", token_id=5, logprob=-0.25).top_logprobs.add(
        token="Hel", token_id=5, logprob=-0.25
    )
    printed = _json(delta)
    assert printed["choice_index"] == 2
    assert printed["token_ids"] == [5, 6]
    assert set(printed["logprobs"][0]) >= {"token", "logprob", "top_logprobs"}
    assert set(printed["logprobs"][0]["top_logprobs"][0]) >= {"token", "logprob"}
    final_only = {"finish_reason", "usage", "timing", "model", "template", "confidence"}
    assert not final_only & set(printed), "a delta must not look like a final message"


def test_final_message_carries_the_choice_outcome():
    final = pb.GenerateResponse(
        choice_index=0, finish_reason=resources.FINISH_REASON_STOP, confidence=0.8
    )
    final.mean_logprob = -0.22
    final.usage.cached_prompt_tokens = 12
    final.model.name = "demo-lm"
    final.template.name = "support"
    final.template.version = 3
    printed = _json(final)
    assert printed["finish_reason"] == "FINISH_REASON_STOP"
    assert printed["usage"]["cached_prompt_tokens"] == 12
    assert {"prefill_ms", "decode_ms", "time_to_first_token_ms"} <= _fields(
        resources.Timing.DESCRIPTOR
    )
    assert {"queue_ms", "total_ms", "output_tokens_per_second"} <= _fields(
        resources.Timing.DESCRIPTOR
    )
    assert printed["template"] == {"name": "support", "version": 3}
    assert set(printed["model"]) == {"name", "version"}
    assert (printed["confidence"], printed["mean_logprob"]) == (0.8, -0.22)
    error = pb.GenerateResponse.DESCRIPTOR.fields_by_name["error"]
    assert error.message_type.full_name == "google.rpc.Status"


def test_finish_reasons():
    names = {v.name for v in resources.FinishReason.DESCRIPTOR.values}
    reasons = ("STOP", "LENGTH", "CANCELLED", "ERROR", "QUOTA", "CONTENT_FILTER")
    assert names == {"FINISH_REASON_UNSPECIFIED", *(f"FINISH_REASON_{r}" for r in reasons)}


def test_complete_returns_every_choice():
    assert {"choices", "usage", "model", "template", "request_id"} <= _fields(
        pb.CompleteResponse.DESCRIPTOR
    )
    assert {
        "index",
        "text",
        "token_ids",
        "logprobs",
        "finish_reason",
        "confidence",
        "mean_logprob",
        "timing",
    } <= _fields(resources.Choice.DESCRIPTOR)


def test_embed_base64_replaces_values():
    request = json_format.ParseDict(
        {"model": "m", "inputs": ["a"], "encoding": "BASE64", "truncate": "END"},
        pb.EmbedRequest(),
    )
    assert request.encoding == resources.EMBEDDING_ENCODING_BASE64
    assert request.truncate == resources.TRUNCATION_END
    floats = _json(resources.Embedding(index=0, values=[1.0], prompt_tokens=2))
    assert floats["values"] == [1.0] and "base64" not in floats
    packed = _json(resources.Embedding(index=0, base64=b"\x00\x00\x80?", prompt_tokens=2))
    assert packed["base64"] == "AACAPw==" and not packed["values"]
    assert packed["prompt_tokens"] == 2
    # Responses and generated code use the full enum names (declared first).
    assert _json(request)["encoding"] == "EMBEDDING_ENCODING_BASE64"


def test_model_versions_carry_prices():
    price = resources.ModelVersion.DESCRIPTOR.fields_by_name["price"].message_type
    assert {
        "currency_code",
        "prompt_per_million_tokens",
        "cached_prompt_per_million_tokens",
        "completion_per_million_tokens",
    } <= _fields(price)


def test_maps_are_string_maps():
    for name in ("variables", "metadata"):
        field = pb.GenerateRequest.DESCRIPTOR.fields_by_name[name]
        entry = field.message_type
        assert entry.GetOptions().map_entry
        assert {f.type for f in entry.fields} == {FieldDescriptor.TYPE_STRING}
