"""Inference v2 requests become domain specs: defaults, per-choice seeds, finish reasons."""

from __future__ import annotations

import pytest

from services.core.errors import InvalidArgument
from services.inference.models import ModelDefaults
from services.inference.templates import MAX_VARIABLE_LENGTH, MAX_VARIABLES, Message
from services.inference.v2.choices import request_finish_reason
from services.inference.v2.validation import SEED_MODULUS, GenerationSpec
from tokenmesh.inference.v2 import inference_pb2 as resources
from tokenmesh.inference.v2 import inference_service_pb2 as pb

DEFAULTS = ModelDefaults(max_tokens=64, temperature=0.8, top_p=0.95, top_k=50)


def test_unset_sampling_fields_take_the_model_defaults():
    spec = GenerationSpec.from_pb(
        pb.GenerateRequest(model="m", prompt="p", sampling=resources.SamplingParams(top_k=0))
    )
    params = spec.params(DEFAULTS)
    assert (params.max_tokens, params.temperature, params.top_p) == (64, 0.8, 0.95)
    assert params.top_k == 0, "an explicit 0 is not unset"
    assert spec.n == 1 and params.seed is None


def test_seeded_choices_draw_from_seed_plus_index():
    request = pb.CompleteRequest(
        model="m", prompt="p", n=3, sampling=resources.SamplingParams(seed=SEED_MODULUS - 2)
    )
    seeds = [p.seed for p in GenerationSpec.from_pb(request).choice_params(DEFAULTS)]
    assert seeds == [SEED_MODULUS - 2, SEED_MODULUS - 1, 0]
    unseeded = GenerationSpec.from_pb(pb.CompleteRequest(model="m", prompt="p", n=2))
    assert [p.seed for p in unseeded.choice_params(DEFAULTS)] == [None, None]


def test_messages_are_the_input_when_given():
    spec = GenerationSpec.from_pb(
        pb.GenerateRequest(
            model="m", messages=[resources.ChatMessage(role="user", content="hi")], n=2
        )
    )
    assert spec.prompt is None and spec.messages == (Message("user", "hi"),)


def test_a_template_reference_with_variables_is_the_input():
    spec = GenerationSpec.from_pb(
        pb.GenerateRequest(model="m", template="support@stable", variables={"customer": "Ann"})
    )
    assert (spec.template, dict(spec.variables)) == ("support@stable", {"customer": "Ann"})
    assert spec.prompt is None and spec.messages == ()
    with_prompt = GenerationSpec.from_pb(
        pb.CompleteRequest(model="m", prompt="help", template="support@3")
    )
    assert with_prompt.prompt == "help"


TOO_LONG = "x" * (MAX_VARIABLE_LENGTH + 1)
TOO_MANY = {f"v{i}": "" for i in range(MAX_VARIABLES + 1)}


def _fields(request: pb.GenerateRequest) -> dict[str, str]:
    with pytest.raises(InvalidArgument) as info:
        GenerationSpec.from_pb(request)
    return {v.field: v.description for v in info.value.violations}


@pytest.mark.parametrize(
    ("fields", "violations"),
    [
        ({"template": "support@@1"}, ["template"]),
        ({"template": "@3"}, ["template"]),
        ({"template": "support@Not_An_Alias"}, ["template"]),
        ({"prompt": "p", "variables": {"a": "1"}}, ["variables"]),
        ({"template": "t@1", "variables": {"9lives": "x"}}, ["variables"]),
        ({"template": "t@1", "variables": {"big": TOO_LONG}}, ["variables.big"]),
        ({"template": "t@1", "variables": TOO_MANY}, ["variables"]),
        ({}, ["prompt"]),
    ],
)  # fmt: skip
def test_template_fields_are_checked_before_resolving(fields, violations):
    assert list(_fields(pb.GenerateRequest(model="m", **fields))) == violations


@pytest.mark.parametrize(
    ("reasons", "expected"),
    [
        (["stop", "length", "stop"], "length"),
        (["stop", "error", "quota"], "error"),
        (["length", "cancelled"], "cancelled"),
        ([], "cancelled"),
    ],
)
def test_a_request_finishes_with_its_most_serious_choice(reasons, expected):
    assert request_finish_reason(reasons) == expected
