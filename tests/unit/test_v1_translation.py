"""v1 <-> v2 translation: every v1 field has its v2 meaning, and comes back unchanged."""

from __future__ import annotations

import grpc
import pytest
from google.protobuf import any_pb2
from google.rpc import error_details_pb2, status_pb2

from services.core.errors import FieldViolation, InvalidArgument, NotFound, Unavailable
from services.inference import v1_translation as translate
from services.inference.v2.servicer import FINISH_REASONS
from services.inference.validation import check_context
from tokenmesh.inference.v1 import inference_pb2 as v1
from tokenmesh.inference.v1 import inference_service_pb2 as v1_pb
from tokenmesh.inference.v2 import inference_pb2 as v2
from tokenmesh.inference.v2 import inference_service_pb2 as v2_pb
from tokenmesh.type.v1 import types_pb2


def _full_v1_fields() -> dict[str, object]:
    return dict(
        model="demo-lm",
        version="3",
        prompt="In the beginning",
        max_tokens=24,
        temperature=0.5,
        top_p=0.9,
        top_k=40,
        seed=2**64 - 1,
        stop=[" the", "\n"],
        request_id="req-1",
        priority=v1.PRIORITY_BATCH,
    )


@pytest.mark.parametrize(
    ("v1_type", "translate_request"),
    [
        (v1_pb.GenerateRequest, translate.generate_request),
        (v1_pb.CompleteRequest, translate.complete_request),
    ],
)
def test_a_generation_request_maps_every_field(v1_type, translate_request):
    request = translate_request(v1_type(**_full_v1_fields()))
    assert (request.model, request.version, request.prompt) == ("demo-lm", "3", "In the beginning")
    assert request.n == 1 and request.max_output_tokens == 24
    assert request.sampling.temperature == pytest.approx(0.5)
    assert request.sampling.top_p == pytest.approx(0.9)
    assert (request.sampling.top_k, request.sampling.seed) == (40, 2**64 - 1)
    assert list(request.stop_sequences) == [" the", "\n"]
    assert request.request_id == "req-1" and request.priority == v2.PRIORITY_BATCH
    # Nothing v1 cannot ask for.
    assert not (request.messages or request.template or request.variables or request.metadata)
    assert not (request.logprobs or request.top_logprobs)


def test_unset_v1_sampling_fields_stay_unset_so_model_defaults_apply():
    request = translate.generate_request(v1_pb.GenerateRequest(model="m", prompt="p"))
    assert not request.HasField("max_output_tokens")
    for name in ("temperature", "top_p", "top_k", "seed"):
        assert not request.sampling.HasField(name), name
    # Zero is a value, not "unset" (temperature 0 is greedy).
    zero = translate.sampling(v1_pb.CompleteRequest(temperature=0, seed=0, top_k=0))
    assert zero.HasField("temperature") and zero.HasField("seed") and zero.HasField("top_k")


def test_every_v1_priority_keeps_its_meaning():
    for value in (v1.PRIORITY_UNSPECIFIED, v1.PRIORITY_INTERACTIVE, v1.PRIORITY_BATCH):
        request = translate.complete_request(v1_pb.CompleteRequest(priority=value))
        assert (
            v2.Priority.Name(request.priority).split("_", 1)[1]
            == (v1.Priority.Name(value).split("_", 1)[1])
        )


def test_embed_request_asks_for_float_values_and_no_truncation():
    request = translate.embed_request(
        v1_pb.EmbedRequest(model="e", version="1", inputs=["a", "b"], request_id="r")
    )
    assert list(request.inputs) == ["a", "b"] and request.request_id == "r"
    assert request.encoding == v2.EMBEDDING_ENCODING_FLOAT
    assert request.truncate == v2.TRUNCATION_NONE


def test_every_v2_finish_reason_has_its_v1_string():
    for name, number in FINISH_REASONS.items():
        assert translate.finish_reason(number) == name
    assert translate.finish_reason(v2.FINISH_REASON_CONTENT_FILTER) == "content_filter"
    assert translate.finish_reason(v2.FINISH_REASON_UNSPECIFIED) == ""
    named = set(v2.FinishReason.values()) - {v2.FINISH_REASON_UNSPECIFIED}
    assert named <= set(translate.FINISH_REASON_NAMES), "a v2 finish reason v1 cannot name"


def _final_v2_message(**fields) -> v2_pb.GenerateResponse:
    fields.setdefault("finish_reason", v2.FINISH_REASON_LENGTH)
    return v2_pb.GenerateResponse(
        choice_index=0,
        text="end",
        token_ids=[7, 8],
        logprobs=[v2.TokenLogprob(token="e", token_id=7, logprob=-0.1)],
        usage=v2.Usage(
            prompt_tokens=3, completion_tokens=5, total_tokens=8, cached_prompt_tokens=2
        ),
        timing=v2.Timing(queue_ms=1, prefill_ms=2, time_to_first_token_ms=3, total_ms=9),
        model=types_pb2.ModelRef(name="demo-lm", version="1"),
        template=types_pb2.TemplateRef(name="t", version=1),
        confidence=0.5,
        mean_logprob=-0.7,
        request_id="r",
        **fields,
    )


def test_a_delta_carries_only_what_v1_deltas_carry():
    message = v2_pb.GenerateResponse(
        choice_index=0,
        text="he",
        token_ids=[1],
        logprobs=[v2.TokenLogprob(token="he", token_id=1, logprob=-0.2)],
        request_id="r",
    )
    out = translate.generate_response(message, 4)
    assert out == v1_pb.GenerateResponse(index=4, text="he", token_ids=[1], request_id="r")


def test_the_final_message_has_v1_usage_model_and_timing():
    out = translate.generate_response(_final_v2_message(), 2)
    assert (out.index, out.text, list(out.token_ids)) == (2, "end", [7, 8])
    assert out.finish_reason == "length"
    assert out.usage == types_pb2.TokenUsage(prompt_tokens=3, completion_tokens=5, total_tokens=8)
    assert out.model.name == "demo-lm" and out.model.version == "1"
    assert out.timing == v1.Timing(queue_ms=1, time_to_first_token_ms=3, total_ms=9)
    assert not out.HasField("error") and out.request_id == "r"


def test_an_in_band_status_becomes_a_stream_error():
    error = Unavailable("model version unloaded", reason="MODEL_UNLOADED")
    out = translate.generate_response(
        _final_v2_message(error=error.to_status(), finish_reason=v2.FINISH_REASON_ERROR), 5
    )
    assert out.finish_reason == "error"
    assert out.error == v1.StreamError(
        code="UNAVAILABLE", message="model version unloaded", reason="MODEL_UNLOADED"
    )


def test_a_stream_error_names_any_code_and_tolerates_a_status_without_error_info():
    for code in grpc.StatusCode:
        status = status_pb2.Status(code=code.value[0], message="m")
        assert translate.stream_error(status) == v1.StreamError(code=code.name, message="m")
    packed = any_pb2.Any()
    packed.Pack(error_details_pb2.RetryInfo())
    status = status_pb2.Status(code=14, message="m", details=[packed])
    assert translate.stream_error(status).reason == ""


def test_complete_response_is_the_one_choice():
    final = _final_v2_message()
    response = v2_pb.CompleteResponse(
        choices=[
            v2.Choice(
                index=0,
                text="all of it",
                token_ids=[1, 2, 3],
                finish_reason=v2.FINISH_REASON_STOP,
                timing=final.timing,
                confidence=0.4,
            )
        ],
        usage=final.usage,
        model=final.model,
        template=final.template,
        request_id="r",
    )
    out = translate.complete_response(response)
    assert out == v1_pb.CompleteResponse(
        text="all of it",
        token_ids=[1, 2, 3],
        finish_reason="stop",
        usage=types_pb2.TokenUsage(prompt_tokens=3, completion_tokens=5, total_tokens=8),
        model=final.model,
        timing=v1.Timing(queue_ms=1, time_to_first_token_ms=3, total_ms=9),
        request_id="r",
    )


def test_embed_response_keeps_values_and_usage():
    response = v2_pb.EmbedResponse(
        embeddings=[
            v2.Embedding(index=0, values=[0.5, -1.0], prompt_tokens=3),
            v2.Embedding(index=1, values=[0.25, 2.0], prompt_tokens=4),
        ],
        model=types_pb2.ModelRef(name="e", version="1"),
        usage=v2.Usage(prompt_tokens=7, total_tokens=7),
        request_id="r",
    )
    out = translate.embed_response(response)
    assert [list(e.values) for e in out.embeddings] == [[0.5, -1.0], [0.25, 2.0]]
    assert [e.index for e in out.embeddings] == [0, 1]
    assert out.usage == types_pb2.TokenUsage(prompt_tokens=7, completion_tokens=0, total_tokens=7)
    assert out.model.name == "e" and out.request_id == "r"


def test_a_model_round_trips_through_v2():
    model = v1.Model(
        name="demo-lm",
        kind=v1.MODEL_KIND_GENERATIVE,
        default_version="2",
        description="a small LM",
        versions=[
            v1.ModelVersion(
                version=str(state),
                state=state,
                engine="onnxruntime",
                context_length=512,
                max_tokens_default=64,
                embedding_dimensions=0,
                message="why",
            )
            for state in v1.ModelVersionState.values()
        ],
    )
    as_v2 = v2.Model()
    as_v2.ParseFromString(model.SerializeToString())  # same field numbers in both versions
    as_v2.versions[0].chat_template.CopyFrom(types_pb2.TemplateRef(name="chat", version=1))
    assert translate.model(as_v2) == model
    page = v2_pb.ListModelsResponse(models=[as_v2], next_page_token="demo-lm")
    assert translate.list_models_response(page) == v1_pb.ListModelsResponse(
        models=[model], next_page_token="demo-lm"
    )
    assert translate.get_model_response(v2_pb.GetModelResponse(model=as_v2)).model == model


def test_v2_field_names_in_errors_become_v1_names():
    assert translate.v1_field("max_output_tokens") == "max_tokens"
    assert translate.v1_field("stop_sequences[2]") == "stop[2]"
    assert translate.v1_field("sampling.temperature") == "temperature"
    assert translate.v1_field("prompt") == "prompt"
    assert translate.v1_field("not_max_output_tokens_x") == "not_max_output_tokens_x"


def test_the_context_length_error_reads_exactly_as_v1_wrote_it():
    def raised(field: str) -> InvalidArgument:
        with pytest.raises(InvalidArgument) as info:
            check_context(500, 100, 512, field)
        return info.value

    translated = translate.v1_error(raised("max_output_tokens"))
    v1_error = raised("max_tokens")
    assert isinstance(translated, InvalidArgument)
    assert translated.message == v1_error.message
    assert translated.reason == v1_error.reason == "CONTEXT_LENGTH_EXCEEDED"
    assert translated.to_status() == v1_error.to_status()


def test_errors_without_v2_names_pass_unchanged():
    same = InvalidArgument([FieldViolation("prompt", "is required")])
    assert translate.v1_error(same) is same
    missing = NotFound("model 'x' is not served here", reason="MODEL_NOT_FOUND")
    assert translate.v1_error(missing) is missing


def test_the_v1_surface_records_v1_and_skips_token_logprobs():
    surface = translate.V1_SURFACE
    assert surface.api_version == "v1" and not surface.token_logprobs
    assert surface.rpc("Complete") == "/tokenmesh.inference.v1.InferenceService/Complete"
