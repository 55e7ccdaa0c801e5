"""Inference v2 requests become domain specs: defaults, per-choice seeds, finish reasons."""

from __future__ import annotations

import pytest

from services.core.errors import InvalidArgument
from services.inference.models import ModelDefaults
from services.inference.templates import Message
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


def test_templates_are_refused_until_served():
    with pytest.raises(InvalidArgument) as info:
        GenerationSpec.from_pb(pb.GenerateRequest(model="m", prompt="p", template="support@1"))
    assert [v.field for v in info.value.violations] == ["template"]


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
