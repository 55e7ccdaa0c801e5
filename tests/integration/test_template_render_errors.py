"""A catalogue template whose render fails on the request's variables (a Jinja filter
refusing its input) answers INVALID_ARGUMENT naming `template`, not INTERNAL with a
traceback: on a real worker over mTLS with the catalogue in real Redis, and for each
kind of exception a sandboxed render raises from its inputs."""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import grpc
import grpc.aio
import pytest
import redis.asyncio as aioredis
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from services.core.errors import InvalidArgument
from services.inference import templates
from services.inference.templates import Prompt, Variable, declare
from services.router.prompts import PromptCatalog
from tests.integration import test_prompts_selectors as prompts_selectors
from tokenmesh.inference.v2 import inference_service_pb2 as pb

MODEL = "deterministic-test"


# A v2 stub of a real worker with the deterministic engine (the selector tests').
stub = prompts_selectors.stub


@pytest.fixture
async def catalog(redis_url: str) -> AsyncIterator[PromptCatalog]:
    client = aioredis.from_url(redis_url)
    yield PromptCatalog(client)
    await client.aclose()


async def _refusal(
    call: grpc.aio.UnaryUnaryCall[Any, Any],
) -> tuple[grpc.StatusCode, dict[str, str], str]:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call
    status = await rpc_status.aio.from_call(call)
    assert status is not None
    violations: dict[str, str] = {}
    reason = ""
    for detail in status.details:
        bad, error = error_details_pb2.BadRequest(), error_details_pb2.ErrorInfo()
        if detail.Unpack(bad):
            violations.update({v.field: v.description for v in bad.field_violations})
        elif detail.Unpack(error):
            reason = error.reason
    return info.value.code(), violations, reason


@pytest.mark.parametrize(
    ("source", "variables", "raised"),
    [
        # Jinja's truncate asserts its length is at least len(end) ("...").
        ("{{ text | truncate(limit | int) }}", {"text": "hello world", "limit": "1"}, "Assertion"),
        # dictsort calls .items(): every variable is a string.
        ("{% for k, v in opts | dictsort %}{{ k }}={{ v }}{% endfor %}", {"opts": "a=1"}, "Attr"),
    ],
)
async def test_a_render_failing_on_the_variables_is_invalid_argument_not_internal(
    stub, catalog, caplog, source, variables, raised
):
    name = f"fails-{uuid.uuid4().hex[:8]}"
    declared = tuple(Variable(v, required=True) for v in variables)
    await catalog.create(name, source, "", declared, time.time())
    caplog.set_level(logging.ERROR)
    request = pb.CompleteRequest(
        model=MODEL, template=f"{name}@1", variables=variables, max_output_tokens=1
    )
    code, violations, reason = await _refusal(stub.Complete(request))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert reason == "TEMPLATE_RENDER_FAILED"
    assert list(violations) == ["template"]
    assert f"{name}@1" in violations["template"] and raised in violations["template"]
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert not errors, "a client's bad input is not a server error: no traceback logged"


def _render(source: str, variables: dict[str, str]) -> str:
    declared = declare(source, "", [Variable(n, max_length=64) for n in variables])
    return Prompt("t@1", source, "", declared).render(variables)


@pytest.mark.parametrize(
    ("source", "variables"),
    [
        ("{{ t | truncate(n | int) }}", {"t": "hello world", "n": "-5"}),  # AssertionError
        ("{{ t | truncate(3, leeway=n | int) }}", {"t": "hello world", "n": "-1"}),
        ("{{ v | dictsort }}", {"v": "x"}),  # AttributeError
        ("{{ messages | dictsort }}", {}),
        ("{{ (v | int) // 0 }}", {"v": "1"}),  # ZeroDivisionError
        ("{{ v | float | int }}", {"v": "inf"}),  # OverflowError
        ("{{ v.splitlines()[5] }}", {"v": "abc"}),  # IndexError, as Undefined
        ("{% for k, x in v %}{{ k }}{% endfor %}", {"v": "abc"}),  # ValueError
        ("{{ [v, 1] | sort }}", {"v": "abc"}),  # TypeError
        # A list nested n deep: printing it recurses past Python's limit.
        (
            "{% set ns = namespace(x=[]) %}{% for i in range(n | int) %}"
            "{% set ns.x = [ns.x] %}{% endfor %}{{ ns.x }}",
            {"n": "5000"},
        ),
    ],
)
def test_every_error_a_render_raises_from_its_inputs_names_the_template(source, variables):
    with pytest.raises(InvalidArgument) as info:
        _render(source, variables)
    assert info.value.reason == "TEMPLATE_RENDER_FAILED"
    assert [v.field for v in info.value.violations] == ["template"]
    assert info.value.violations[0].description.startswith("t@1: ")


def test_the_same_exceptions_from_the_sandboxs_own_code_are_bugs_not_mapped(monkeypatch):
    # AttributeError and AssertionError are mapped only when Jinja's filters or the
    # template raise them; one from this module's own helpers is a bug, for the error
    # boundary to log as INTERNAL. Here every printed value's accounting (_emit) breaks.
    monkeypatch.setattr(templates, "_Budget", templates._Sizes)  # no `rendered` to count
    with pytest.raises(AttributeError, match="rendered"):
        _render("{{ v }}", {"v": "x"})
