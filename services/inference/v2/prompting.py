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
needs a last token to compute the first logits from. So is a prompt that
renders to more characters than the model's context can hold in tokens
(CONTEXT_LENGTH_EXCEEDED), refused as it renders, before it is tokenized.

Special tokens: what a client sends (the prompt, messages, variables) is read
as text, never as a special token its text spells ("<|endoftext|>",
"<|im_start|>system"), as OpenAI reads it; only the special tokens a template's
own text spells (a chat template's role markers) are special tokens.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from services.core.errors import FailedPrecondition, FieldViolation, InvalidArgument, NotFound
from services.inference.models import LoadedModel
from services.inference.template_cache import TemplateCache
from services.inference.templates import Message, RenderTooLong, TemplateId
from services.inference.tokenizer import unmarked
from services.inference.v2.validation import GenerationSpec
from services.router.prompts import PromptTemplate, parse_reference
from tokenmesh.type.v1 import types_pb2

#: The resource type NOT_FOUND names for a missing template, version or alias.
TEMPLATE_RESOURCE_TYPE = "tokenmesh.router.v1.PromptTemplate"
# Inputs (prompt, conversation, variables and template text together) up to this
# many characters are rendered on the event loop, and a prompt of up to this many
# characters is tokenized there; larger ones in a thread, so that a long render or
# tokenization never stalls other requests' streams. A catalogue template that does
# more than print its text and values (a tag, a filter, `*`) may render far more than
# its inputs (up to templates.MAX_OUTPUT_CHARS, or take ~100 ms): always in a thread.
INLINE_CHARS = 256


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


def _client_messages(messages: tuple[Message, ...]) -> tuple[Message, ...]:
    """Returns `messages` with nothing in their content that could mark a special token."""
    return tuple(Message(m.role, unmarked(m.content)) for m in messages)


def _client_variables(variables: Mapping[str, str]) -> dict[str, str]:
    return {name: unmarked(value) for name, value in variables.items()}


def render(
    spec: GenerationSpec,
    model: LoadedModel,
    template: PromptTemplate | None,
    max_chars: int | None = None,
) -> str:
    """Returns the prompt text of `spec` (see the module docstring): a rendered one holds
    the marks of the template's own special tokens (`Tokenizer.encode_marked` reads it).

    Raises:
        RenderTooLong: a template's output went past `max_chars`.
    """
    if template is None and spec.prompt is not None:
        return spec.prompt
    # Client text never holds a mark: only the template's own special tokens are marked.
    marks = model.tokenizer.special_marks()
    conversation = _client_messages(_conversation(spec))
    if template is not None:
        return template.prompt.render(
            _client_variables(spec.variables), conversation, marks=marks, max_chars=max_chars
        )
    return model.chat_template.render(messages=conversation, marks=marks, max_chars=max_chars)


def _encoder(
    spec: GenerationSpec, model: LoadedModel, template: PromptTemplate | None
) -> Callable[[str], list[int]]:
    """Returns how the text of `spec` is tokenized: a prompt used as is is all the
    client's text; a rendered one has the template's special tokens marked."""
    if template is None and spec.prompt is not None:
        return model.tokenizer.encode
    return model.tokenizer.encode_marked


def _renders_inline(spec: GenerationSpec, template: PromptTemplate | None) -> bool:
    """Tells whether rendering is short enough for the event loop (tokenizing is judged
    by the rendered text: see `prepare`).

    A model version's chat template comes with the model and its output grows
    with the conversation: a short conversation renders on the loop.
    """
    chars = len(spec.prompt or "") + sum(len(m.content) for m in spec.messages)
    if template is not None:
        if not template.prompt.substitutes_only:
            return False
        chars += len(template.source) + len(template.system)
        chars += sum(len(value) for value in spec.variables.values())
    return chars <= INLINE_CHARS


def max_prompt_chars(model: LoadedModel) -> int | None:
    """Returns the most characters a prompt that fits `model`'s context can have (None:
    not known for its tokenizer): more cannot be fewer tokens than the context."""
    per_token = model.tokenizer.max_token_chars()
    return None if per_token is None else model.context_length * per_token


def _input_field(spec: GenerationSpec) -> str:
    """Returns the request field whose rendering is the prompt."""
    if spec.template:
        return "template"
    return "prompt" if spec.prompt is not None else "messages"


def _text(
    spec: GenerationSpec,
    model: LoadedModel,
    template: PromptTemplate | None,
    max_chars: int | None,
) -> str:
    """Returns the prompt text of `spec`, refusing one longer than `max_chars`."""
    try:
        text = render(spec, model, template, max_chars)
    except RenderTooLong:
        raise _too_long(spec, model, max_chars) from None
    if max_chars is not None and len(text) > max_chars:
        raise _too_long(spec, model, max_chars)
    return text


def _too_long(spec: GenerationSpec, model: LoadedModel, max_chars: int | None) -> InvalidArgument:
    verb = "is" if _input_field(spec) == "prompt" else "renders to"
    return InvalidArgument(
        [
            FieldViolation(
                _input_field(spec),
                f"{verb} more than {max_chars} characters: more than the model's context "
                f"of {model.context_length} tokens can hold",
            )
        ],
        reason="CONTEXT_LENGTH_EXCEEDED",
    )


def _token_ids(
    spec: GenerationSpec,
    model: LoadedModel,
    template: PromptTemplate | None,
    max_chars: int | None,
) -> list[int]:
    return _encoder(spec, model, template)(_text(spec, model, template, max_chars))


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
    max_chars = max_prompt_chars(model)
    if not _renders_inline(spec, template):
        token_ids = await asyncio.to_thread(_token_ids, spec, model, template, max_chars)
    else:
        # Tokenizing is judged by what is tokenized: a few inputs' characters may
        # render to many more (a chat template's own text).
        text = _text(spec, model, template, max_chars)
        encode = _encoder(spec, model, template)
        if len(text) <= INLINE_CHARS:
            token_ids = encode(text)
        else:
            token_ids = await asyncio.to_thread(encode, text)
    if not token_ids:
        raise InvalidArgument(
            [FieldViolation(_input_field(spec), "renders to no tokens; at least one is needed")],
            reason="EMPTY_PROMPT",
        )
    return PreparedPrompt(token_ids, effective)
