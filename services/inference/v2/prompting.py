"""The prompt a v2 generation runs, and the template version that rendered it.

Three inputs, one result (token ids plus the effective template):

- `template` ("support@3", "support@stable"): the catalogue version, from the
  worker's TemplateCache (memory once warm; aliases refreshed in the
  background), rendered with the request's `variables` and its input as
  `messages` (the conversation, or the prompt as one user turn; none if the
  template renders the whole prompt);
- `messages` without a template: the model version's chat template;
- `prompt` without a template: used as is (no template).

Rendering is sandboxed and deterministic (services.inference.templates);
a variable that is missing, unknown or over its declared length is
INVALID_ARGUMENT naming `variables.<name>`. Unknown templates, versions and
aliases are NOT_FOUND with a ResourceInfo naming the reference. A prompt
that tokenizes to nothing ("   " with a word tokenizer, a template that
renders "") is INVALID_ARGUMENT naming the input that produced it: the engine
needs a last token to compute the first logits from.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from services.core.errors import FailedPrecondition, FieldViolation, InvalidArgument, NotFound
from services.inference.models import LoadedModel
from services.inference.template_cache import TemplateCache
from services.inference.templates import Message, TemplateId
from services.inference.v2.validation import GenerationSpec
from services.router.prompts import PromptTemplate, parse_reference
from tokenmesh.type.v1 import types_pb2

#: The resource type NOT_FOUND names for a missing template, version or alias.
TEMPLATE_RESOURCE_TYPE = "tokenmesh.router.v1.PromptTemplate"
# Inputs (prompt, conversation, variables and template text together) up to this
# many characters are rendered and tokenized on the event loop; larger ones in a
# thread, so that a long render never stalls other requests' streams.
INLINE_CHARS = 256
# A catalogue template with a tag ({% for %}, {% set %}, ...) may render far more
# than its inputs (up to templates.MAX_OUTPUT_CHARS): always in a thread.
_TAG = "{%"


@dataclass(frozen=True)
class PreparedPrompt:
    """PreparedPrompt is what a generation runs: token ids, and the template behind them."""

    token_ids: list[int]
    template: TemplateId | None  # None: a prompt used as is


def template_ref(template: TemplateId | None) -> types_pb2.TemplateRef | None:
    """Returns `template` as a protobuf message (None stays None)."""
    if template is None:
        return None
    return types_pb2.TemplateRef(name=template.name, version=template.version)


async def resolve_template(templates: TemplateCache, reference: str) -> PromptTemplate:
    """Returns the version `reference` names, from the worker's cache.

    Raises:
        NotFound: no such template, version or alias (with a ResourceInfo).
        Unavailable: Redis is unreachable and the cache does not have it.
    """
    name, selector = parse_reference(reference)
    try:
        return await templates.get(name, selector)
    except NotFound as error:
        raise NotFound(
            error.message,
            reason=error.reason,
            resource_type=TEMPLATE_RESOURCE_TYPE,
            resource_name=reference,
        ) from None


def _conversation(spec: GenerationSpec) -> tuple[Message, ...]:
    """Returns what a catalogue template sees as `messages`."""
    if spec.messages:
        return spec.messages
    return (Message("user", spec.prompt),) if spec.prompt else ()


def render(spec: GenerationSpec, model: LoadedModel, template: PromptTemplate | None) -> str:
    """Returns the prompt text of `spec` (see the module docstring)."""
    if template is not None:
        return template.render(spec.variables, _conversation(spec))
    if spec.prompt is not None:
        return spec.prompt
    return model.chat_template.render(messages=spec.messages)


def _renders_inline(spec: GenerationSpec, template: PromptTemplate | None) -> bool:
    """Tells whether rendering and tokenizing are short enough for the event loop."""
    chars = len(spec.prompt or "") + sum(len(m.content) for m in spec.messages)
    if template is not None:
        if _TAG in template.source or _TAG in template.system:
            return False
        chars += len(template.source) + len(template.system)
        chars += sum(len(value) for value in spec.variables.values())
    return chars <= INLINE_CHARS


def _input_field(spec: GenerationSpec) -> str:
    """Returns the request field whose rendering is the prompt."""
    if spec.template:
        return "template"
    return "prompt" if spec.prompt is not None else "messages"


def _token_ids(
    spec: GenerationSpec, model: LoadedModel, template: PromptTemplate | None
) -> list[int]:
    return model.tokenizer.encode(render(spec, model, template))


async def prepare(
    spec: GenerationSpec, model: LoadedModel, templates: TemplateCache | None
) -> PreparedPrompt:
    """Renders and tokenizes the prompt of `spec` for `model`.

    Raises:
        InvalidArgument: bad variables or messages, a template that fails to render,
            or a prompt of no tokens.
        NotFound: an unknown template, version or alias.
        FailedPrecondition: a template on a worker without a template cache.
    """
    template: PromptTemplate | None = None
    effective: TemplateId | None = None
    if spec.template:
        if templates is None:
            raise FailedPrecondition(
                "this worker does not serve prompt templates", reason="TEMPLATES_NOT_SERVED"
            )
        template = await resolve_template(templates, spec.template)
        effective = TemplateId(template.name, template.version)
    elif spec.prompt is None:
        effective = model.chat_template_id
    if _renders_inline(spec, template):
        token_ids = _token_ids(spec, model, template)
    else:
        token_ids = await asyncio.to_thread(_token_ids, spec, model, template)
    if not token_ids:
        raise InvalidArgument(
            [FieldViolation(_input_field(spec), "renders to no tokens; at least one is needed")],
            reason="EMPTY_PROMPT",
        )
    return PreparedPrompt(token_ids, effective)
