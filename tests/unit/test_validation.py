"""Request validation reports every bad field by name."""

from __future__ import annotations

import pytest

from services.core.errors import InvalidArgument
from services.inference import validation
from services.inference.models import ModelDefaults
from tokenmesh.inference.v1 import inference_service_pb2 as pb


def _fields(request) -> list[str]:
    with pytest.raises(InvalidArgument) as info:
        validation.validate_generation(request)
    return [v.field for v in info.value.violations]


def test_a_minimal_request_is_valid():
    validation.validate_generation(pb.GenerateRequest(model="m", prompt="hi"))


@pytest.mark.parametrize(
    ("request_", "field"),
    [
        (pb.GenerateRequest(prompt="hi"), "model"),
        (pb.GenerateRequest(model="bad name!", prompt="hi"), "model"),
        (pb.GenerateRequest(model="m"), "prompt"),
        (pb.GenerateRequest(model="m", prompt="x" * 100_001), "prompt"),
        (pb.GenerateRequest(model="m", prompt="hi", max_tokens=0), "max_tokens"),
        (pb.GenerateRequest(model="m", prompt="hi", max_tokens=10**9), "max_tokens"),
        (pb.GenerateRequest(model="m", prompt="hi", max_tokens=-1), "max_tokens"),
        (pb.GenerateRequest(model="m", prompt="hi", temperature=-1), "temperature"),
        (pb.GenerateRequest(model="m", prompt="hi", temperature=float("nan")), "temperature"),
        (pb.GenerateRequest(model="m", prompt="hi", top_p=0), "top_p"),
        (pb.GenerateRequest(model="m", prompt="hi", top_k=1001), "top_k"),
        (pb.GenerateRequest(model="m", prompt="hi", stop=["a"] * 5), "stop"),
        (pb.GenerateRequest(model="m", prompt="hi", stop=[""]), "stop[0]"),
        (pb.GenerateRequest(model="m", prompt="hi", request_id="has space"), "request_id"),
        (pb.GenerateRequest(model="m", version="v 1", prompt="hi"), "version"),
        # A trailing newline passes `re.match(...$)`; the contract's fullmatch refuses it.
        (pb.GenerateRequest(model="m\n", prompt="hi"), "model"),
        (pb.GenerateRequest(model="m", version="1\n", prompt="hi"), "version"),
        (pb.GenerateRequest(model="m", prompt="hi", request_id="r\n"), "request_id"),
        (pb.GenerateRequest(model="..", prompt="hi"), "model"),
    ],
)
def test_bad_fields_are_named(request_, field):
    assert _fields(request_) == [field]


def test_all_violations_are_reported_at_once():
    request = pb.CompleteRequest(model="m", prompt="hi", max_tokens=0, temperature=3, top_p=2)
    assert _fields(request) == ["max_tokens", "temperature", "top_p"]


def test_defaults_fill_unset_fields_but_explicit_zero_wins():
    defaults = ModelDefaults(max_tokens=64, temperature=0.7)
    params = validation.sampling_params(
        pb.GenerateRequest(model="m", prompt="p", temperature=0), defaults
    )
    assert params.temperature == 0 and params.max_tokens == 64 and params.seed is None


def test_context_overflow_states_both_numbers():
    with pytest.raises(InvalidArgument) as info:
        validation.check_context(prompt_tokens=500, max_tokens=100, context_length=512)
    message = info.value.violations[0].description
    assert "500" in message and "100" in message and "512" in message
    assert info.value.reason == "CONTEXT_LENGTH_EXCEEDED"


def test_embed_inputs_are_checked():
    with pytest.raises(InvalidArgument) as info:
        validation.validate_embed(pb.EmbedRequest(model="m", inputs=["ok", ""]))
    assert [v.field for v in info.value.violations] == ["inputs[1]"]
    with pytest.raises(InvalidArgument):
        validation.validate_embed(pb.EmbedRequest(model="m"))
