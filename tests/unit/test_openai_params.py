"""OpenAI request bodies mapped onto inference v2 requests, and the names errors use."""

from __future__ import annotations

import json
from typing import Any

import pytest

from services.core.errors import FieldViolation, InvalidArgument
from services.inference.openai import errors, params
from services.inference.openai.errors import renamed
from services.inference.openai.params import Renames, parse_completion, v2_param
from services.inference.v2 import validation as v2_validation


def _raw(**fields: Any) -> bytes:
    return json.dumps(fields).encode()


CHAT = {"model": "demo-lm@2", "messages": [{"role": "user", "content": "hi"}]}


def _violations(call: Any) -> dict[str, str]:
    with pytest.raises(InvalidArgument) as info:
        call()
    return {v.field: v.description for v in info.value.violations}


def test_a_chat_maps_onto_one_v2_request():
    call = params.parse_chat(
        _raw(
            model="demo-lm@2",
            messages=[
                {"role": "developer", "content": "be brief"},
                {
                    "role": "user",
                    "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}],
                },
            ],
            max_tokens=5,
            max_completion_tokens=7,
            seed=-1,
            stop="END",
            temperature=0,
            user="u-1",
            metadata={"team": "x"},
            logprobs=True,
            top_logprobs=2,
            frequency_penalty=0,
            logit_bias=None,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert (call.model_id, call.stream, call.include_usage, call.logprobs) == (
        "demo-lm@2",
        True,
        True,
        True,
    )
    [request] = call.generate_requests()
    assert (request.model, request.version) == ("demo-lm", "2")
    assert [(m.role, m.content) for m in request.messages] == [
        ("system", "be brief"),
        ("user", "a\nb"),
    ]
    assert (
        request.max_output_tokens == 7 and call.renames.max_output_tokens == "max_completion_tokens"
    )
    assert request.sampling.seed == 2**64 - 1 and request.sampling.temperature == 0
    assert request.sampling.HasField("temperature") and not request.sampling.HasField("top_p")
    assert list(request.stop_sequences) == ["END"]
    assert dict(request.metadata) == {"team": "x", "user": "u-1"}
    assert (request.logprobs, request.top_logprobs) == (True, 2)


def test_unknown_and_unsupported_parameters_are_named():
    assert set(_violations(lambda: params.parse_chat(_raw(**CHAT, tools=[], b=1)))) == {
        "b",
        "tools",
    }
    found = _violations(
        lambda: params.parse_chat(
            _raw(**CHAT, presence_penalty=1, n="2", stream_options={"include_usage": True})
        )
    )
    assert set(found) == {"presence_penalty", "n", "stream_options"}
    assert set(_violations(lambda: params.parse_chat(b"[1]"))) == {"body"}
    assert set(_violations(lambda: params.parse_chat(b"{"))) == {"body"}


def test_legacy_completions_take_prompt_lists_and_refuse_echo():
    call = params.parse_completion(_raw(model="m", prompt=["a", "b"], n=2, logprobs=3))
    assert [r.prompt for r in call.complete_requests()] == ["a", "b"]
    assert all(r.n == 2 and r.top_logprobs == 3 and r.logprobs for r in call.complete_requests())
    found = _violations(
        lambda: params.parse_completion(_raw(model="m", prompt=[1, 2], echo=True, best_of=3))
    )
    assert set(found) == {"prompt", "echo", "best_of"}


def test_echo_refused_names_the_field_once():
    # The client reads "<field>: <description>"; the description must not repeat the field.
    found = _violations(lambda: params.parse_completion(_raw(model="m", prompt="a", echo=True)))
    assert found == {"echo": "true is not supported"}


def test_embeddings_take_strings_and_an_encoding():
    call = params.parse_embedding(_raw(model="e@1", input="x", encoding_format="base64"))
    assert list(call.request.inputs) == ["x"] and call.base64 and call.request.version == "1"
    assert call.dimensions is None
    found = _violations(
        lambda: params.parse_embedding(_raw(model="e", input=[[1]], encoding_format="int8"))
    )
    assert set(found) == {"input", "encoding_format"}


@pytest.mark.parametrize("ids", [[1, 2], [[1, 2], [3]]])
def test_token_id_prompts_and_inputs_are_unsupported_parameters_not_bad_values(ids):
    # OpenAI accepts token ids for `prompt` and `input`; we take text only. A client
    # keys on `unsupported_parameter` to send the text instead (it read invalid_argument).
    for parse, name in ((params.parse_completion, "prompt"), (params.parse_embedding, "input")):
        with pytest.raises(InvalidArgument) as refused:
            parse(_raw(model="m", **{name: ids}))
        assert refused.value.reason == params.UNSUPPORTED_PARAMETER
        assert [v.field for v in refused.value.violations] == [name]
    with pytest.raises(InvalidArgument) as bad:  # neither text nor ids: a bad value
        params.parse_completion(_raw(model="m", prompt=[1, "a"]))
    assert bad.value.reason != params.UNSUPPORTED_PARAMETER


def test_v2_field_names_become_the_clients_parameters():
    renames = Renames(max_output_tokens="max_completion_tokens", input="messages")
    assert v2_param("sampling.temperature", renames) == "temperature"
    assert v2_param("max_output_tokens", renames) == "max_completion_tokens"
    assert v2_param("stop_sequences[1]", renames) == "stop[1]"
    assert v2_param("prompt", renames) == "messages"
    assert v2_param("messages[2].role", renames) == "messages[2].role"
    assert v2_param("inputs[3]", Renames(input="input")) == "input[3]"
    assert v2_param("version", renames) == "model"
    assert v2_param("top_logprobs", renames) == "top_logprobs"
    assert v2_param("top_logprobs", Renames(top_logprobs="logprobs")) == "logprobs"


def test_a_legacy_completion_s_logprobs_errors_name_logprobs_and_its_own_words():
    # Its `logprobs: 25` becomes v2's top_logprobs: the 400 named a parameter the
    # client never sent, and a context overflow's text said max_output_tokens.
    call = parse_completion(b'{"model": "m", "prompt": "hi", "logprobs": 25}')
    assert call.renames.top_logprobs == "logprobs"
    too_many = InvalidArgument([FieldViolation("top_logprobs", "must be between 0 and 20")])
    (violation,) = renamed(too_many, call.renames).violations
    assert (violation.field, violation.description) == ("logprobs", "must be between 0 and 20")
    overflow = InvalidArgument(
        [FieldViolation("max_output_tokens", "prompt (9 tokens) + max_output_tokens (4000) = 4009")]
    )
    (violation,) = renamed(overflow, call.renames).violations
    assert violation.field == "max_tokens"
    assert violation.description == "prompt (9 tokens) + max_tokens (4000) = 4009"


def test_error_json_is_printable_ascii_for_grpc_metadata():
    error = InvalidArgument([params.FieldViolation("model", "bad \u00e9\x7f\n")])
    value = errors.header_value(errors.from_error(error))
    assert all(0x20 <= ord(c) < 0x7F for c in value)
    assert json.loads(value)["error"]["message"] == "model: bad \u00e9\x7f\n"
    assert list(json.loads(value)["error"]) == ["message", "type", "param", "code"]


def test_bodies_nested_too_deep_or_not_utf8_are_invalid_json_not_internal_errors():
    # json.loads raises RecursionError past ~1,000 levels (it was an INTERNAL), and
    # takes UTF-16 and a BOM, which the edge does not read.
    deep = b'{"model": "demo-lm", "messages": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    plain = json.dumps(CHAT).encode()
    for raw in (deep, b"\xef\xbb\xbf" + plain, plain.decode().encode("utf-16")):
        assert _violations(lambda raw=raw: params.parse_chat(raw)) == {"body": "is not valid JSON"}


def test_a_batch_line_with_a_lone_surrogate_is_a_bad_line_not_an_internal_error() -> None:
    from services.jobs.openai_batches import parse_input

    line = {
        "custom_id": "a",
        "method": "POST",
        "url": "/v1/chat/completions",
        "body": {"model": "m", "messages": [{"role": "user", "content": "\ud800"}]},
    }
    data = json.dumps(line).encode()  # ensure_ascii: the surrogate as a \\ud800 escape
    with pytest.raises(InvalidArgument) as bad:
        parse_input(data, "/v1/chat/completions", 10)
    assert "surrogate" in bad.value.message


def test_an_error_reports_its_first_20_problems_and_counts_the_rest() -> None:
    from services.core.errors import MAX_VIOLATIONS, FieldViolation

    error = InvalidArgument([FieldViolation(f"f{i}", "bad") for i in range(5000)])
    assert len(error.violations) == MAX_VIOLATIONS + 1
    assert error.violations[-1] == FieldViolation("request", "and 4980 more problems")


def test_a_capped_error_re_raised_keeps_its_count() -> None:
    # The OpenAI routes rename every error's fields into a new InvalidArgument: the
    # count entry was counted as a violation, and 500 problems read "and 1 more".
    from services.core.errors import FieldViolation

    capped = InvalidArgument([FieldViolation(f"f{i}", "bad") for i in range(500)])
    again = InvalidArgument(capped.violations)
    assert again.violations[-1] == FieldViolation("request", "and 480 more problems")


def test_a_batch_file_may_open_with_a_utf8_bom() -> None:
    from services.jobs.openai_batches import parse_input

    line = {
        "custom_id": "a",
        "method": "POST",
        "url": "/v1/chat/completions",
        "body": {"model": "m", "messages": [{"role": "user", "content": "hi"}]},
    }
    data = b"\xef\xbb\xbf" + json.dumps(line).encode()
    assert [b.custom_id for b in parse_input(data, "/v1/chat/completions", 10)] == ["a"]


def test_openais_full_16_metadata_pairs_with_a_user_fit():
    # OpenAI allows 16 metadata pairs and a `user`; recorded as 17 usage tags, the
    # request was refused ("metadata must have at most 16 entries").
    tags = {f"k{i}": "v" for i in range(16)}
    call = params.parse_chat(
        _raw(model="demo-lm", messages=[{"role": "user", "content": "a"}], user="u", metadata=tags)
    )
    [request] = call.complete_requests()
    assert len(request.metadata) == 17
    v2_validation.validate_generation(request)  # no violation
    tags["k16"] = "v"
    too_many = params.parse_chat(
        _raw(model="demo-lm", messages=[{"role": "user", "content": "a"}], user="u", metadata=tags)
    )
    with pytest.raises(InvalidArgument, match="metadata"):
        v2_validation.validate_generation(too_many.complete_requests()[0])


def test_a_parameter_name_with_a_backslash_is_named_not_a_server_error():
    # The rename's re.sub read the client's "x\\1" as a group reference: re.error, 500.
    raw = json.dumps({"model": "m", "messages": [{"role": "user", "content": "hi"}], "x\\1": 1})
    with pytest.raises(InvalidArgument) as bad:
        params.parse_chat(raw.encode())
    (violation,) = renamed(bad.value, Renames()).violations
    assert violation.field == "x\\1"


def _error(call: Any) -> dict[str, Any]:
    """Returns the OpenAI error object a parse refuses with (as the edge answers it)."""
    with pytest.raises(InvalidArgument) as info:
        call()
    error: dict[str, Any] = errors.from_error(info.value)["error"]
    return error


TEXT = {"type": "text", "text": "hi"}
IMAGE = {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}
TOOL_CALL = {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"response_format": {"type": "json_object"}}, "response_format"),
        ({"response_format": {"type": "json_schema", "json_schema": {}}}, "response_format"),
        ({"frequency_penalty": 0.5}, "frequency_penalty"),
        ({"presence_penalty": -1}, "presence_penalty"),
        ({"logit_bias": {"50256": -100}}, "logit_bias"),
        ({"modalities": ["text", "audio"]}, "modalities"),
        ({"messages": [{"role": "user", "content": [TEXT, IMAGE]}]}, "messages[0].content[1]"),
        (
            {"messages": [{"role": "user", "content": [{"type": "input_audio"}]}]},
            "messages[0].content[0]",
        ),
        (
            {"messages": [{"role": "assistant", "content": None, "tool_calls": [TOOL_CALL]}]},
            "messages[0].tool_calls",
        ),
        ({"tools": [{"type": "function"}]}, "tools"),
    ],
)
def test_what_we_do_not_implement_is_code_unsupported_parameter(
    extra: dict[str, Any], param: str
) -> None:
    # docs/openai.md promises `unsupported_parameter` for all of these (a client may
    # drop the parameter and retry); only unknown names had it, the rest read
    # `invalid_argument`.
    error = _error(lambda: params.parse_chat(_raw(**{**CHAT, **extra})))
    assert (error["code"], error["param"], error["type"]) == (
        "unsupported_parameter",
        param,
        "invalid_request_error",
    )


def test_a_legacy_echo_or_best_of_is_unsupported_and_bad_values_stay_invalid() -> None:
    for extra, param in (({"echo": True}, "echo"), ({"best_of": 2}, "best_of")):
        error = _error(lambda extra=extra: parse_completion(_raw(model="m", prompt="a", **extra)))
        assert (error["code"], error["param"]) == ("unsupported_parameter", param)
    # A bad value of a parameter we implement is not "unsupported".
    for content, param in (
        ([{"type": "text"}], "messages[0].content[0].text"),
        ([{"type": "text", "text": 5}], "messages[0].content[0].text"),
        (["hi"], "messages[0].content[0]"),
    ):
        body = {**CHAT, "messages": [{"role": "user", "content": content}]}
        error = _error(lambda body=body: params.parse_chat(_raw(**body)))
        assert (error["code"], error["param"]) == ("invalid_argument", param)
    error = _error(lambda: params.parse_chat(_raw(**CHAT, temperature="hot")))
    assert (error["code"], error["param"]) == ("invalid_argument", "temperature")


def test_an_unsupported_parameter_is_named_first_among_bad_ones() -> None:
    # `param` and `code` describe the same parameter; the bad value is still reported.
    error = _error(lambda: params.parse_chat(_raw(**CHAT, temperature="hot", logit_bias={"1": 1})))
    assert (error["code"], error["param"]) == ("unsupported_parameter", "logit_bias")
    assert "temperature: must be a number" in error["message"]


def _first_field(error: InvalidArgument, renames: Renames) -> str:
    named = renamed(error, renames)
    assert isinstance(named, InvalidArgument)
    return named.violations[0].field


def _v2_param(call: params.GenerationCall) -> str:
    with pytest.raises(InvalidArgument) as bad:
        v2_validation.validate_generation(call.complete_requests()[0])
    return _first_field(bad.value, call.renames)


def test_a_user_over_256_characters_is_named_user_not_metadata_user() -> None:
    long = "u" * 300
    chat = params.parse_chat(_raw(**CHAT, user=long))
    assert _v2_param(chat) == "user"
    assert _v2_param(parse_completion(_raw(model="m", prompt="a", user=long))) == "user"
    # `user` replaces a chat's metadata.user: the long one is the `user` parameter...
    both = params.parse_chat(_raw(**CHAT, user=long, metadata={"user": "short"}))
    assert _v2_param(both) == "user"
    # ...and without `user`, a long metadata.user is the client's own metadata.user.
    own = params.parse_chat(_raw(**CHAT, metadata={"user": long}))
    assert _v2_param(own) == "metadata.user"
    embedding = params.parse_embedding(_raw(model="e", input="x", user=long))
    with pytest.raises(InvalidArgument) as bad:
        v2_validation.validate_embed(embedding.request)
    assert _first_field(bad.value, Renames(input="input")) == "user"


def test_stream_options_take_include_obfuscation_false_as_the_sdks_send_it() -> None:
    # The openai SDK's ChatCompletionStreamOptionsParam has include_obfuscation: false
    # saves bandwidth, and asks for what the edge does anyway (it pads nothing); it
    # was refused ("include_usage only"). true asks for the padding: unsupported.
    stream = {"stream": True}
    options = {"include_usage": True, "include_obfuscation": False}
    call = params.parse_chat(_raw(**CHAT, **stream, stream_options=options))
    assert call.include_usage
    call = params.parse_completion(
        _raw(model="m", prompt="a", **stream, stream_options={"include_obfuscation": False})
    )
    assert not call.include_usage
    padded = {"include_obfuscation": True}
    error = _error(lambda: params.parse_chat(_raw(**CHAT, **stream, stream_options=padded)))
    assert (error["code"], error["param"]) == (
        "unsupported_parameter",
        "stream_options.include_obfuscation",
    )
    error = _error(
        lambda: params.parse_chat(_raw(**CHAT, **stream, stream_options={"include_obfuscation": 1}))
    )
    assert (error["code"], error["param"]) == (
        "invalid_argument",
        "stream_options.include_obfuscation",
    )


def test_a_stream_option_set_to_null_counts_as_absent() -> None:
    # Clients that serialise unset optional members write null: a 400 ("must be a
    # boolean"), though a null parameter counts as absent.
    stream = {"stream": True}
    nulls = {"include_usage": None, "include_obfuscation": None}
    call = params.parse_chat(_raw(**CHAT, **stream, stream_options=nulls))
    assert not call.include_usage
    for member in ("include_usage", "include_obfuscation"):
        falsies: tuple[object, ...] = (0, "", [], {})
        for falsy in falsies:  # null only, not whatever reads as false
            options = {member: falsy}
            error = _error(
                lambda o=options: params.parse_chat(_raw(**CHAT, **stream, stream_options=o))
            )
            assert error["param"] == f"stream_options.{member}", (member, falsy)


def test_a_batch_lines_run_time_error_names_the_parameters_the_line_sent() -> None:
    # Context-length refusals come at run time; a line that sent max_completion_tokens
    # read `param: "max_tokens"` and a message naming max_output_tokens (v2's),
    # where the synchronous endpoint names max_completion_tokens in both.
    from services.jobs import openai_batches
    from tokenmesh.jobs.v1 import jobs_pb2

    def error_of(endpoint: str, body: dict[str, object], field: str) -> dict[str, object]:
        line = {"custom_id": "a", "method": "POST", "url": endpoint, "body": body}
        (parsed,) = openai_batches.parse_input(json.dumps(line).encode(), endpoint, 10)
        batch = openai_batches.BatchRecord(
            "batch_x", "k", endpoint, "file-x", {}, 0, lines=[("a", dict(parsed.options))]
        )
        failure = jobs_pb2.JobError(
            code="INVALID_ARGUMENT",
            grpc_code=3,
            field=field,
            message=f"{field}: prompt (1212 tokens) + {field} (4) = 1216 exceeds 512",
        )
        result = jobs_pb2.JobResult(index=0, error=failure)
        line_out, failed = openai_batches.output_line(batch, result, 0)
        assert failed
        return dict(json.loads(line_out)["response"]["body"]["error"])

    chat = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
    error = error_of(
        "/v1/chat/completions", {**chat, "max_completion_tokens": 4}, "max_output_tokens"
    )
    assert error["param"] == "max_completion_tokens"
    assert str(error["message"]).startswith(
        "max_completion_tokens: prompt (1212 tokens) + max_completion_tokens (4)"
    )
    error = error_of("/v1/chat/completions", {**chat, "max_tokens": 4}, "max_output_tokens")
    assert error["param"] == "max_tokens"
    legacy = {"model": "m", "prompt": "hi", "logprobs": 2}
    error = error_of("/v1/completions", legacy, "top_logprobs")
    assert error["param"] == "logprobs"
    tagged: dict[str, object] = {**chat, "metadata": {"user": "u"}}
    assert error_of("/v1/chat/completions", tagged, "metadata.user")["param"] == "metadata.user"


def test_a_batch_lines_names_take_a_few_bytes_of_its_record() -> None:
    # Every line's options are kept in the batch's record (MAX_RECORD_BYTES): the
    # whole names took ~56 bytes a line more, a third of the lines a record holds.
    from services.jobs import openai_batches

    endpoint = "/v1/chat/completions"
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}

    def stored(**more: object) -> int:
        line = {"custom_id": "a", "method": "POST", "url": endpoint, "body": {**body, **more}}
        (parsed,) = openai_batches.parse_input(json.dumps(line).encode(), endpoint, 10)
        return len(json.dumps(dict(parsed.options)))

    assert stored(max_completion_tokens=4) - stored(max_tokens=4) <= 10
