"""Reads OpenAI request bodies (raw JSON) into inference v2 requests.

Only the shape is checked here: which parameters exist, their JSON types,
and the OpenAI-only rules (`echo`, `dimensions`, token-array inputs). The
limits (ranges, lengths, counts) are inference v2's own, checked by v2's
validation when the request runs; `v2_param` names its field violations as
the OpenAI parameter the client sent.

A parameter set to JSON `null` counts as absent, as OpenAI treats it.
Parameters we do not implement are refused (400 naming them) unless they are
in the IGNORED lists: those never change the output (`user`, `store`), or
are accepted only at the value that changes nothing (a penalty of 0, a text
response format).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping, Sequence
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any

from google.api.httpbody_pb2 import HttpBody

from services.core import contract
from services.core.errors import FieldViolation, InvalidArgument
from tokenmesh.inference.v2 import inference_pb2
from tokenmesh.inference.v2 import inference_service_pb2 as pb

INT32_MAX = 2**31 - 1
SEED_MODULUS = 2**64  # OpenAI seeds are signed; v2's are uint64
# The metadata tag `user` is recorded under (usage reports group by it).
USER_TAG = contract.USER_TAG
# OpenAI's "developer" role (newer models) is what the chat template calls "system".
ROLE_ALIASES = {"developer": "system"}
# The v2 field a request's `user` is checked as (v2's tag limits: 256 characters).
USER_FIELD = f"metadata.{USER_TAG}"
# The reason (OpenAI `code`: unsupported_parameter) of a parameter, or a value of
# one, that asks for what we do not implement; a client may key on it to drop the
# parameter and retry. Bad values are INVALID_ARGUMENT.
UNSUPPORTED_PARAMETER = "UNSUPPORTED_PARAMETER"

CHAT_PARAMS = frozenset(
    {
        "model",
        "messages",
        "max_tokens",
        "max_completion_tokens",
        "temperature",
        "top_p",
        "n",
        "stop",
        "seed",
        "logprobs",
        "top_logprobs",
        "stream",
        "stream_options",
        "user",
        "metadata",
    }
)
COMPLETION_PARAMS = frozenset(
    {
        "model",
        "prompt",
        "max_tokens",
        "temperature",
        "top_p",
        "n",
        "stop",
        "seed",
        "logprobs",
        "echo",
        "best_of",
        "stream",
        "stream_options",
        "user",
    }
)
EMBEDDING_PARAMS = frozenset({"model", "input", "encoding_format", "dimensions", "user"})


def _is_zero(value: Any) -> bool:
    return _is_number(value) and value == 0


def _is_empty(value: Any) -> bool:
    return value in ({}, [])


def _text_format(value: Any) -> bool:
    return isinstance(value, dict) and value.get("type") == "text"


def _anything(value: Any) -> bool:
    return True


# Parameters accepted and ignored: name -> the values that are safe to ignore.
IGNORED_CHAT_PARAMS: Mapping[str, Callable[[Any], bool]] = {
    "frequency_penalty": _is_zero,
    "presence_penalty": _is_zero,
    "logit_bias": _is_empty,
    "response_format": _text_format,
    "modalities": lambda v: v == ["text"],
    "parallel_tool_calls": _anything,  # no tools, so nothing to call in parallel
    "store": _anything,
    "service_tier": _anything,
    "prompt_cache_key": _anything,  # our prefix cache needs no hint
    "safety_identifier": _anything,
}
IGNORED_COMPLETION_PARAMS: Mapping[str, Callable[[Any], bool]] = {
    "frequency_penalty": _is_zero,
    "presence_penalty": _is_zero,
    "logit_bias": _is_empty,
    "suffix": lambda v: v == "",
}
IGNORED_EMBEDDING_PARAMS: Mapping[str, Callable[[Any], bool]] = {}


@dataclass
class Renames:
    """Renames are the OpenAI names of the v2 fields a request set (for error messages)."""

    max_output_tokens: str = "max_tokens"
    input: str = "messages"  # v2's prompt/messages, as the client sent them
    top_logprobs: str = "top_logprobs"  # a legacy completion's `logprobs`
    # v2's metadata.user: the `user` parameter, or a chat's `metadata.user` when
    # the request has no `user` (which replaces it).
    user: str = "user"


@dataclass
class GenerationCall:
    """GenerationCall is a chat or legacy completion request mapped onto inference v2.

    `requests` holds one v2 request per prompt (a legacy completion's prompt
    may be a list; a chat has one).
    """

    model_id: str
    stream: bool
    include_usage: bool
    requests: list[dict[str, Any]]
    renames: Renames = field(default_factory=Renames)
    logprobs: bool = False

    def generate_requests(self) -> list[pb.GenerateRequest]:
        """Returns the v2 Generate requests (streamed responses)."""
        return [pb.GenerateRequest(**fields) for fields in self.requests]

    def complete_requests(self) -> list[pb.CompleteRequest]:
        """Returns the v2 Complete requests (one JSON response)."""
        return [pb.CompleteRequest(**fields) for fields in self.requests]


@dataclass(frozen=True)
class EmbeddingCall:
    """EmbeddingCall is an embeddings request mapped onto inference v2."""

    model_id: str
    request: pb.EmbedRequest
    dimensions: int | None
    base64: bool


def parse_model_id(model_id: str) -> tuple[str, str]:
    """Splits an OpenAI model id into (name, version): "demo-lm@2" pins version 2."""
    name, _, version = model_id.partition("@")
    return name, version


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _is_integer(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


# Sequences one legacy completion request may ask for (its prompts times n): each
# prompt is a request of its own on the worker, all at once, counted once by the
# rate limit; 200,000 prompts in 1 MB filled every queue for every tenant.
MAX_LEGACY_SEQUENCES = 32
_LONE_SURROGATE = re.compile("[\ud800-\udfff]")


def client_json(raw: bytes, field: str) -> Any:
    """Parses a client's JSON; raises InvalidArgument (INVALID_JSON) naming `field`.

    UTF-8 only, as the edge reads it: json.loads(bytes) also takes UTF-16, UTF-32
    and a BOM, bodies whose model the edge's routes never saw. Not JSON either,
    as answers go: nesting past the recursion limit (RecursionError), an integer
    of over 4,300 digits (ValueError), and a lone UTF-16 surrogate (a "\\ud800"
    escape): JSON parses it, protobuf strings cannot hold it, and each of them
    was an INTERNAL error (500) with a traceback in the log.
    """
    try:
        value = json.loads(raw.decode("utf-8"))
    except (ValueError, RecursionError):  # UnicodeDecodeError, JSONDecodeError among them
        raise _not_json(field) from None
    if b"\\u" in raw and _holds_lone_surrogate(value):
        raise _not_json(field, "holds a lone UTF-16 surrogate (a \\ud800-\\udfff escape)")
    return value


def _not_json(field: str, why: str = "is not valid JSON") -> InvalidArgument:
    return InvalidArgument([FieldViolation(field, why)], reason="INVALID_JSON")


def _holds_lone_surrogate(value: Any) -> bool:
    """Whether any string (key or value) in parsed JSON holds a surrogate code point
    (a pair of escapes decodes to one character: only a lone one is left)."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            if _LONE_SURROGATE.search(item):
                return True
        elif isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return False


@dataclass(frozen=True)
class ClientBody:
    """A request body as client_json read it: its JSON value, or why it has none."""

    value: Any = None
    error: InvalidArgument | None = None

    def json(self) -> Any:
        """Returns the body's JSON value; raises its INVALID_JSON."""
        if self.error is not None:
            raise self.error
        return self.value


def read_client_body(raw: bytes) -> ClientBody:
    """Parses a request body (client_json), keeping its INVALID_JSON for whoever answers."""
    try:
        return ClientBody(client_json(raw, "body"))
    except InvalidArgument as error:
        return ClientBody(error=error)


# The body of the RPC in progress (one task per RPC), as the request limits read it
# for the routed-model check before admission (services.inference.request_limits),
# until the servicer takes it: a body is parsed once per call, not once in each (a
# second parse of a 6.5 MiB body held the event loop ~20 ms more). Kept with the
# request it was read from: handed over only for that very message.
_CALL_BODY: ContextVar[tuple[HttpBody, ClientBody] | None] = ContextVar(
    "openai_call_body", default=None
)


def read_call_body(request: HttpBody) -> ClientBody:
    """Parses the RPC's request body and keeps it for its servicer (call_body)."""
    body = read_client_body(request.data)
    _CALL_BODY.set((request, body))
    return body


def call_body(request: HttpBody) -> ClientBody:
    """Returns the RPC's request body: as read_call_body read it, else parsed now (a
    call no check read: a direct internal call). Keeps nothing: the parsed JSON
    (megabytes) lives no longer than the servicer holds it."""
    kept = _CALL_BODY.get()
    if kept is not None:
        _CALL_BODY.set(None)
        if kept[0] is request:
            return kept[1]
    return read_client_body(request.data)


class _Body:
    """_Body reads one request's parameters, collecting a violation per problem."""

    def __init__(
        self,
        raw: bytes | ClientBody,
        known: frozenset[str],
        ignored: Mapping[str, Callable[[Any], bool]],
    ) -> None:
        self.out: list[FieldViolation] = []
        # Features and non-default values we do not implement (UNSUPPORTED_PARAMETER).
        self.unsupported: list[FieldViolation] = []
        body = raw.json() if isinstance(raw, ClientBody) else client_json(raw, "body")
        if not isinstance(body, dict):
            raise InvalidArgument(
                [FieldViolation("body", "must be a JSON object")], reason="INVALID_JSON"
            )
        self.values = {k: v for k, v in body.items() if v is not None}
        unknown = sorted(k for k in self.values if k not in known and k not in ignored)
        if unknown:
            raise InvalidArgument(
                [
                    FieldViolation(name, "is not a supported parameter (see docs/openai.md)")
                    for name in unknown
                ],
                reason=UNSUPPORTED_PARAMETER,
            )
        for name, safe in ignored.items():
            if name in self.values and not safe(self.values[name]):
                self.unsupported.append(
                    FieldViolation(name, "is only accepted at its default value")
                )

    def has(self, name: str) -> bool:
        return name in self.values

    def number(self, name: str) -> float | None:
        value = self.values.get(name)
        if value is None or _is_number(value):
            return value
        self.out.append(FieldViolation(name, "must be a number"))
        return None

    def integer(self, name: str, int32: bool = True) -> int | None:
        value = self.values.get(name)
        if value is None:
            return None
        if not _is_integer(value):
            self.out.append(FieldViolation(name, "must be an integer"))
            return None
        if int32 and not -INT32_MAX <= value <= INT32_MAX:
            self.out.append(FieldViolation(name, "is out of range"))
            return None
        return int(value)

    def boolean(self, name: str) -> bool:
        value = self.values.get(name, False)
        if isinstance(value, bool):
            return value
        self.out.append(FieldViolation(name, "must be true or false"))
        return False

    def string(self, name: str, required: bool = False) -> str:
        value = self.values.get(name)
        if isinstance(value, str):
            return value
        if value is not None or required:
            self.out.append(
                FieldViolation(name, "is required" if value is None else "must be a string")
            )
        return ""

    def strings(self, name: str) -> list[str] | None:
        """Reads a string or a list of strings."""
        value = self.values.get(name)
        if value is None:
            return None
        if isinstance(value, str):
            return [value]
        if isinstance(value, list) and all(isinstance(v, str) for v in value):
            return list(value)
        self.out.append(FieldViolation(name, "must be a string or a list of strings"))
        return None

    def texts(self, name: str) -> list[str] | None:
        """Reads a string or a list of strings. OpenAI's other forms, token ids (a list
        of ints, or of such lists), ask for what we do not implement: unsupported, so a
        client keying on `unsupported_parameter` sends the text instead."""
        if _token_ids(self.values.get(name)):
            self.unsupported.append(
                FieldViolation(name, "token id arrays are not supported: send the text")
            )
            return None
        return self.strings(name)

    def string_map(self, name: str) -> dict[str, str]:
        value = self.values.get(name, {})
        if isinstance(value, dict) and all(isinstance(v, str) for v in value.values()):
            return dict(value)
        self.out.append(FieldViolation(name, "must be an object of string values"))
        return {}

    def stream_options(self, stream: bool) -> bool:
        """Returns stream_options.include_usage."""
        value = self.values.get("stream_options")
        if value is None:
            return False
        if not stream:
            self.out.append(FieldViolation("stream_options", "is only allowed with stream: true"))
            return False
        if not isinstance(value, dict) or set(value) - {"include_usage", "include_obfuscation"}:
            self.out.append(
                FieldViolation(
                    "stream_options", "must be an object of include_usage, include_obfuscation"
                )
            )
            return False
        # A member set to null counts as absent, as a top-level parameter does.
        obfuscation = value.get("include_obfuscation")
        self._obfuscation(False if obfuscation is None else obfuscation)
        include = value.get("include_usage")
        if include is None:
            return False
        if not isinstance(include, bool):
            self.out.append(FieldViolation("stream_options.include_usage", "must be a boolean"))
            return False
        return include

    def _obfuscation(self, value: object) -> None:
        """Checks stream_options.include_obfuscation: false (the current SDKs may send
        it, to save bandwidth) asks for what the edge does anyway; true asks for
        padding of each chunk against size side channels, which it does not add."""
        where = "stream_options.include_obfuscation"
        if not isinstance(value, bool):
            self.out.append(FieldViolation(where, "must be a boolean"))
        elif value:
            self.unsupported.append(FieldViolation(where, "true is not supported (no padding)"))

    def check(self) -> None:
        """Raises what was found: UNSUPPORTED_PARAMETER when any parameter asks for
        what we do not implement (named first, so `param` is one the code is about;
        the bad values follow in the message), else INVALID_ARGUMENT."""
        if self.unsupported:
            raise InvalidArgument([*self.unsupported, *self.out], reason=UNSUPPORTED_PARAMETER)
        if self.out:
            raise InvalidArgument(self.out)


def _sampling(body: _Body, request: dict[str, Any]) -> None:
    """Copies temperature, top_p and seed into a v2 request's sampling."""
    sampling: dict[str, Any] = {}
    for name in ("temperature", "top_p"):
        value = body.number(name)
        if value is not None:
            sampling[name] = value
    seed = body.integer("seed", int32=False)
    if seed is not None:
        sampling["seed"] = seed % SEED_MODULUS
    if sampling:
        request["sampling"] = sampling


def _common(body: _Body, renames: Renames, max_names: Sequence[str]) -> dict[str, Any]:
    """Reads the parameters chat and legacy completions share into v2 request fields."""
    model_id = body.string("model", required=True)
    name, version = parse_model_id(model_id)
    request: dict[str, Any] = {"model": name, "version": version}
    _sampling(body, request)
    for max_name in max_names:  # the last one given wins (max_completion_tokens)
        value = body.integer(max_name)
        if value is not None:
            request["max_output_tokens"] = value
            renames.max_output_tokens = max_name
    n = body.integer("n")
    if n is not None:
        if n == 0:  # v2 reads 0 as 1; OpenAI refuses it
            body.out.append(FieldViolation("n", "must be at least 1"))
        request["n"] = n
    stop = body.strings("stop")
    if stop:
        request["stop_sequences"] = stop
    user = body.string("user")
    if user:
        request.setdefault("metadata", {})[USER_TAG] = user
    return request


def _content(value: Any, where: str, body: _Body) -> str:
    """Returns a message's text: a string, or the text parts of a content array joined."""
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        texts = []
        for i, part in enumerate(value):
            if not isinstance(part, dict):
                body.out.append(FieldViolation(f"{where}[{i}]", "must be a content part object"))
            elif part.get("type") != "text":
                # image_url, input_audio, file, ...: a part we do not implement.
                body.unsupported.append(
                    FieldViolation(f"{where}[{i}]", "only text parts are supported")
                )
            elif isinstance(part.get("text"), str):
                texts.append(part["text"])
            else:
                body.out.append(FieldViolation(f"{where}[{i}].text", "must be a string"))
        return "\n".join(texts)
    body.out.append(FieldViolation(where, "must be a string or an array of text parts"))
    return ""


MESSAGE_KEYS = frozenset({"role", "content", "name"})


def _messages(body: _Body) -> list[dict[str, str]]:
    value = body.values.get("messages")
    if not isinstance(value, list) or not value:
        body.out.append(FieldViolation("messages", "must be a non-empty array of messages"))
        return []
    messages = []
    for i, message in enumerate(value):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            body.out.append(FieldViolation(where, "must be an object"))
            continue
        for key in sorted(set(message) - MESSAGE_KEYS):
            if message[key] is not None:  # tool_calls, audio, refusal, ...
                body.unsupported.append(FieldViolation(f"{where}.{key}", "is not supported"))
        role = message.get("role")
        if not isinstance(role, str):
            body.out.append(FieldViolation(f"{where}.role", "must be a string"))
            continue
        content = _content(message.get("content"), f"{where}.content", body)
        messages.append({"role": ROLE_ALIASES.get(role, role), "content": content})
    return messages


def _logprobs_chat(body: _Body, request: dict[str, Any]) -> bool:
    logprobs = body.boolean("logprobs")
    top = body.integer("top_logprobs")
    if logprobs:
        request["logprobs"] = True
    if top is not None:
        request["top_logprobs"] = top
    return logprobs


def parse_chat(raw: bytes | ClientBody) -> GenerationCall:
    """Reads a chat completion request; raises InvalidArgument naming OpenAI parameters."""
    body = _Body(raw, CHAT_PARAMS, IGNORED_CHAT_PARAMS)
    renames = Renames(input="messages")
    request = _common(body, renames, ("max_tokens", "max_completion_tokens"))
    request["messages"] = _messages(body)
    logprobs = _logprobs_chat(body, request)
    metadata = body.string_map("metadata")
    if metadata:
        if USER_TAG in metadata and USER_TAG not in request.get("metadata", {}):
            renames.user = USER_FIELD  # the client's own metadata.user: no `user` replaced it
        request["metadata"] = {**metadata, **request.get("metadata", {})}
    stream = body.boolean("stream")
    include_usage = body.stream_options(stream)
    body.check()
    return GenerationCall(body.string("model"), stream, include_usage, [request], renames, logprobs)


def _token_ids(value: Any) -> bool:
    """Tells whether `value` is OpenAI's token-id form of a prompt or input: a non-empty
    list of ints, or a non-empty list of those."""

    def ids(item: Any) -> bool:
        return isinstance(item, list) and bool(item) and all(type(i) is int for i in item)

    return ids(value) or (isinstance(value, list) and bool(value) and all(map(ids, value)))


def parse_completion(raw: bytes | ClientBody) -> GenerationCall:
    """Reads a legacy completion request (one v2 request per prompt)."""
    body = _Body(raw, COMPLETION_PARAMS, IGNORED_COMPLETION_PARAMS)
    renames = Renames(input="prompt", top_logprobs="logprobs")
    request = _common(body, renames, ("max_tokens",))
    prompts = body.texts("prompt")
    if prompts is None and "prompt" in body.values:
        prompts = []  # not text: named by texts() already
    elif not prompts:
        body.out.append(FieldViolation("prompt", "is required"))
        prompts = []
    if body.boolean("echo"):
        body.unsupported.append(FieldViolation("echo", "true is not supported"))
    logprobs = body.integer("logprobs")
    if logprobs is not None:
        request["logprobs"] = True
        request["top_logprobs"] = logprobs
    best_of = body.integer("best_of")
    if best_of is not None and best_of != request.get("n", 1):
        body.unsupported.append(FieldViolation("best_of", "must equal n (choices are not ranked)"))
    choices = len(prompts) * int(request.get("n") or 1)
    if choices > MAX_LEGACY_SEQUENCES:
        body.out.append(
            FieldViolation(
                "prompt",
                f"{len(prompts)} prompts x n is {choices} sequences; at most"
                f" {MAX_LEGACY_SEQUENCES} per request (send more through /v1/batches)",
            )
        )
    stream = body.boolean("stream")
    include_usage = body.stream_options(stream)
    body.check()
    requests = [{**request, "prompt": prompt} for prompt in prompts]
    return GenerationCall(
        body.string("model"), stream, include_usage, requests, renames, logprobs is not None
    )


def parse_embedding(raw: bytes | ClientBody) -> EmbeddingCall:
    """Reads an embeddings request."""
    body = _Body(raw, EMBEDDING_PARAMS, IGNORED_EMBEDDING_PARAMS)
    model_id = body.string("model", required=True)
    name, version = parse_model_id(model_id)
    inputs = body.texts("input")
    if inputs is None and "input" not in body.values:
        body.out.append(FieldViolation("input", "is required"))
    encoding = body.string("encoding_format") or "float"
    if encoding not in ("float", "base64"):
        body.out.append(FieldViolation("encoding_format", "must be float or base64"))
    dimensions = body.integer("dimensions")
    user = body.string("user")
    body.check()
    request = pb.EmbedRequest(
        model=name,
        version=version,
        inputs=inputs or [],
        metadata={USER_TAG: user} if user else {},
    )
    if encoding == "base64":
        request.encoding = inference_pb2.EMBEDDING_ENCODING_BASE64
    if dimensions is not None:
        request.dimensions = dimensions  # the worker refuses another size before any work
    return EmbeddingCall(model_id, request, dimensions, encoding == "base64")


# v2 field path heads -> OpenAI parameter names (None: see Renames).
_V2_FIELDS: Mapping[str, str | None] = {
    "sampling": "",  # sampling.temperature -> temperature
    "stop_sequences": "stop",
    "inputs": "input",
    "version": "model",
    "max_output_tokens": None,
    "top_logprobs": None,
    "prompt": None,
}
_HEAD = re.compile(r"^([a-z_]+)\.?")


def v2_param(v2_field: str, renames: Renames) -> str:
    """Returns the OpenAI parameter a v2 field violation is about."""
    if v2_field == USER_FIELD:
        return renames.user
    match = _HEAD.match(v2_field)
    if match is None:
        return v2_field
    head, rest = match.group(1), v2_field[match.end() :]
    if head not in _V2_FIELDS:
        return v2_field
    name = _V2_FIELDS[head]
    if name is None:
        named = {
            "max_output_tokens": renames.max_output_tokens,
            "top_logprobs": renames.top_logprobs,
        }
        name = named.get(head, renames.input)
    if not name:
        return rest
    return name + (rest if rest.startswith("[") else f".{rest}" if rest else "")
