"""What a v2 request's prompt becomes: a catalogue template, a chat template, or itself."""

from __future__ import annotations

import pytest
from google.rpc import error_details_pb2

from services.core.errors import InvalidArgument, NotFound
from services.inference.models import LoadedModel
from services.inference.repository import deterministic_test_model, model_chat_template_ref
from services.inference.scheduler import SchedulerLimits
from services.inference.templates import (
    DEFAULT_CHAT_TEMPLATE_ID,
    Message,
    TemplateId,
    Variable,
    declare,
)
from services.inference.v2 import prompting
from services.inference.v2.validation import GenerationSpec
from services.router.prompts import PromptTemplate
from tokenmesh.inference.v2 import inference_pb2 as resources
from tokenmesh.inference.v2 import inference_service_pb2 as pb

SOURCE = "{{ system }}\n{% for m in messages %}{{ m.role }}> {{ m.content }}\n{% endfor %}{{ ask }}"
SYSTEM = "You help {{ customer }}."


@pytest.fixture(scope="module")
def model() -> LoadedModel:
    return deterministic_test_model("m", "1", 0.0, SchedulerLimits())


def _template(source: str = SOURCE, system: str = SYSTEM) -> PromptTemplate:
    variables = (Variable("customer", required=True, max_length=8), Variable("ask", default="?"))
    return PromptTemplate("support", 3, source, system, declare(source, system, variables))


def _spec(**fields: object) -> GenerationSpec:
    return GenerationSpec.from_pb(pb.GenerateRequest(model="m", **fields))  # type: ignore[arg-type]


def test_a_template_renders_the_prompt_as_a_user_turn(model):
    spec = _spec(template="support@3", prompt="my order", variables={"customer": "Ann"})
    assert prompting.render(spec, model, _template()) == "You help Ann.\nuser> my order\n?"


def test_a_template_renders_a_conversation_or_no_input(model):
    chat = [
        resources.ChatMessage(role="user", content="hi"),
        resources.ChatMessage(role="assistant", content="hello"),
    ]
    spec = _spec(template="support@3", messages=chat, variables={"customer": "Bo", "ask": "!"})
    assert (
        prompting.render(spec, model, _template()) == "You help Bo.\nuser> hi\nassistant> hello\n!"
    )
    alone = _spec(template="support@3", variables={"customer": "Cy"})
    assert prompting.render(alone, model, _template()) == "You help Cy.\n?"


def test_rendering_is_deterministic(model):
    spec = _spec(template="support@3", prompt="x", variables={"customer": "Ann"})
    assert len({prompting.render(spec, model, _template()) for _ in range(5)}) == 1


@pytest.mark.parametrize(
    ("variables", "field"),
    [
        ({"customer": "a" * 9}, "variables.customer"),  # over its max_length of 8
        ({}, "variables.customer"),  # required
        ({"customer": "Ann", "colour": "red"}, "variables.colour"),  # not declared
    ],
)
def test_variables_are_checked_against_the_declarations(model, variables, field):
    spec = _spec(template="support@3", prompt="p", variables=variables)
    with pytest.raises(InvalidArgument) as info:
        prompting.render(spec, model, _template())
    assert [v.field for v in info.value.violations] == [field]


def test_messages_without_a_template_use_the_chat_template_and_a_prompt_none(model):
    chat = _spec(messages=[resources.ChatMessage(role="user", content="hi")])
    assert prompting.render(chat, model, None) == "User: hi\nAssistant:"
    assert prompting.render(_spec(prompt="as is"), model, None) == "as is"


async def test_prepare_names_the_effective_template(model):
    chat = await prompting.prepare(
        _spec(messages=[resources.ChatMessage(role="user", content="hi")]), model, None
    )
    assert chat.template == DEFAULT_CHAT_TEMPLATE_ID
    assert chat.token_ids == model.tokenizer.encode("User: hi\nAssistant:")
    plain = await prompting.prepare(_spec(prompt="a b"), model, None)
    assert plain.template is None and plain.token_ids == model.tokenizer.encode("a b")
    ref = prompting.template_ref(DEFAULT_CHAT_TEMPLATE_ID)
    assert ref is not None and (ref.name, ref.version) == ("tokenmesh.default-chat", 1)


def test_a_model_versions_own_chat_template_is_named_after_it():
    assert model_chat_template_ref({}, "demo-lm", "1") == DEFAULT_CHAT_TEMPLATE_ID
    own = model_chat_template_ref({"chat_template": "{{ messages }}"}, "demo-lm", "2")
    assert own == TemplateId("demo-lm.2.chat", 1)


def test_not_found_can_carry_a_resource_info():
    error = NotFound(
        "no alias", reason="PROMPT_TEMPLATE_ALIAS_NOT_FOUND", resource_type="t", resource_name="s@x"
    )
    infos = []
    for detail in error.to_status().details:
        if detail.Is(error_details_pb2.ResourceInfo.DESCRIPTOR):
            info = error_details_pb2.ResourceInfo()
            detail.Unpack(info)
            infos.append((info.resource_type, info.resource_name, info.description))
    assert infos == [("t", "s@x", "no alias")]
    assert len(NotFound("plain").to_status().details) == 1, "only the ErrorInfo"


def test_a_conversation_is_what_a_template_sees_as_messages():
    spec = _spec(template="t@1", messages=[resources.ChatMessage(role="system", content="s")])
    assert prompting._conversation(spec) == (Message("system", "s"),)
