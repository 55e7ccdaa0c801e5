"""Recorded v1 behaviour: the requests, and how an outcome is reduced to what v1 promises.

tests/contract/data/v1_golden.json holds, for every case below, the request
and the outcome a worker gave before v1 became a translation onto v2: the
responses (text, token ids, finish reasons, usage, model, headers), the error
(status code, message, google.rpc details) and the usage event. Timing values
and generated ids are left out (they change from run to run); a stream is
reduced to what does not depend on how tokens were batched into messages
(the concatenated text and ids, ordered indexes, which fields the non-final
messages carry, and the final message).

Record again (only when v1's contract changes on purpose):
    TOKENMESH_RECORD_V1_GOLDEN=1 .venv/bin/pytest -q tests/contract/test_v1_contract.py
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
from google.protobuf import json_format
from google.protobuf.message import Message
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

from tests import mtls
from tests.answer_headers import answer_headers
from tokenmesh.inference.v1 import inference_pb2
from tokenmesh.inference.v1 import inference_service_pb2 as pb
from tokenmesh.inference.v1 import inference_service_pb2_grpc as rpc

GOLDEN = Path(__file__).parent / "data" / "v1_golden.json"
# Response headers a v1 client can rely on (others, e.g. deprecation notices, may be added).
HEADERS = (
    "x-request-id",
    "x-model-version",
    "x-tokenmesh-worker",
    "x-tokenmesh-model",
    "x-tokenmesh-fallback-from",
    "x-tokenmesh-budget-warning",
)
# What a v1 usage event meters (fields v2 added, e.g. cached_prompt_tokens, are v2's to test;
# timing, trace id and clock change from run to run).
METERING_FIELDS = (
    "request_id",
    "key_id",
    "tenant",
    "model",
    "usage",
    "finish_reason",
    "rpc",
    "metadata",
    "api_version",
)
# Fields of a non-final stream message: anything else belongs on the final one.
DELTA_FIELDS = {"index", "text", "token_ids", "request_id"}
DETAIL_TYPES: tuple[type[Message], ...] = (
    error_details_pb2.ErrorInfo,
    error_details_pb2.BadRequest,
    error_details_pb2.RetryInfo,
    error_details_pb2.QuotaFailure,
    error_details_pb2.PreconditionFailure,
    error_details_pb2.ResourceInfo,
)
REQUESTS: dict[str, type[Message]] = {
    "ListModels": pb.ListModelsRequest,
    "GetModel": pb.GetModelRequest,
    "Generate": pb.GenerateRequest,
    "Complete": pb.CompleteRequest,
    "Embed": pb.EmbedRequest,
}

METERED = ("Generate", "Complete", "Embed")
DET = "deterministic-test"
DEMO = "demo-lm"
EMBED = "all-minilm-l6-v2"
BAD_PARAMS = {
    "max_tokens": 0,
    "temperature": -1,
    "top_p": 0,
    "top_k": 5000,
    "stop": ["", "a", "b", "c", "d"],
    "request_id": "bad id with spaces",
}


def _generation_cases() -> list[dict[str, Any]]:
    """Generate and Complete with the same requests: seeded, greedy, stops, defaults."""
    requests: list[tuple[str, dict[str, Any]]] = [
        ("det-seed", {"model": DET, "prompt": "hello there", "max_tokens": 6, "seed": 5}),
        (
            "det-v1-seed",
            {"model": DET, "version": "1", "prompt": "same prompt", "max_tokens": 7, "seed": 11},
        ),
        ("det-defaults-seeded", {"model": DET, "prompt": "p", "seed": 1}),
        (
            "det-batch-priority",
            {
                "model": DET,
                "prompt": "batch it",
                "max_tokens": 3,
                "seed": 2,
                "priority": "PRIORITY_BATCH",
            },
        ),
        (
            "demo-greedy",
            {
                "model": DEMO,
                "prompt": "The LORD is my shepherd",
                "max_tokens": 16,
                "temperature": 0,
            },
        ),
        (
            "demo-seeded",
            {
                "model": DEMO,
                "prompt": "In the beginning",
                "max_tokens": 24,
                "temperature": 0.8,
                "top_p": 0.9,
                "top_k": 40,
                "seed": 42,
            },
        ),
        (
            "demo-seeded-hot",
            {
                "model": DEMO,
                "prompt": "Blessed are",
                "max_tokens": 20,
                "temperature": 1.3,
                "seed": 7,
            },
        ),
        (
            "demo-stop",
            {
                "model": DEMO,
                "prompt": "The LORD is my shepherd",
                "max_tokens": 40,
                "temperature": 0,
                "stop": [" will", "\n\n"],
            },
        ),
        ("demo-defaults-seeded", {"model": DEMO, "prompt": "And God said", "seed": 3}),
    ]
    cases = []
    for rpc_name in ("Generate", "Complete"):
        for name, request in requests:
            cases.append(
                {
                    "name": f"{rpc_name.lower()}-{name}",
                    "rpc": rpc_name,
                    "request": {**request, "request_id": f"{rpc_name.lower()}-{name}"},
                }
            )
    return cases


def _error_cases() -> list[dict[str, Any]]:
    long_prompt = {"$repeat": ["x", 100_001]}
    overflow = {"$repeat": ["word ", 500]}
    cases: list[dict[str, Any]] = []
    for rpc_name in ("Generate", "Complete"):
        prefix = rpc_name.lower()
        cases += [
            {"name": f"{prefix}-unknown-model", "request": {"model": "nope", "prompt": "x"}},
            {
                "name": f"{prefix}-unknown-version",
                "request": {"model": DET, "version": "9", "prompt": "x"},
            },
            {
                "name": f"{prefix}-bad-params",
                "request": {"model": DET, "prompt": "x", **BAD_PARAMS},
            },
            {
                "name": f"{prefix}-bad-floats",
                "request": {"model": DET, "prompt": "x", "temperature": "NaN", "top_p": 1.5},
            },
            {"name": f"{prefix}-empty", "request": {"model": "", "prompt": ""}},
            {"name": f"{prefix}-bad-name", "request": {"model": "Bad Name!", "prompt": "x"}},
            {"name": f"{prefix}-long-prompt", "request": {"model": DET, "prompt": long_prompt}},
            {
                "name": f"{prefix}-context-overflow",
                "request": {"model": DET, "prompt": overflow, "max_tokens": 100},
            },
            {"name": f"{prefix}-embedding-model", "request": {"model": EMBED, "prompt": "x"}},
            {
                "name": f"{prefix}-model-not-allowed",
                "request": {"model": DEMO, "prompt": "x"},
                "metadata": {"x-tokenmesh-models": DET},
            },
        ]
        for case in cases[-10:]:
            case["rpc"] = rpc_name
    cases += [
        {
            "name": "embed-generative-model",
            "rpc": "Embed",
            "request": {"model": DET, "inputs": ["a"]},
        },
        {"name": "embed-no-inputs", "rpc": "Embed", "request": {"model": EMBED}},
        {
            "name": "embed-bad-inputs",
            "rpc": "Embed",
            "request": {"model": EMBED, "inputs": ["", {"$repeat": ["y", 20_001]}, "ok"]},
        },
        {
            "name": "embed-unknown-model",
            "rpc": "Embed",
            "request": {"model": "nope", "inputs": ["a"]},
        },
        {"name": "list-models-page-too-big", "rpc": "ListModels", "request": {"page_size": 5000}},
        {"name": "get-model-unknown", "rpc": "GetModel", "request": {"model": "nope"}},
        {"name": "get-model-bad-name", "rpc": "GetModel", "request": {"model": "../etc"}},
        {
            "name": "get-model-not-allowed",
            "rpc": "GetModel",
            "request": {"model": DEMO},
            "metadata": {"x-tokenmesh-models": DET},
        },
    ]
    return cases


def _other_cases() -> list[dict[str, Any]]:
    return [
        {"name": "list-models", "rpc": "ListModels", "request": {}},
        {"name": "list-models-page-1", "rpc": "ListModels", "request": {"page_size": 1}},
        {
            "name": "list-models-page-2",
            "rpc": "ListModels",
            "request": {"page_size": 1, "page_token": EMBED},
        },
        {
            "name": "list-models-allowed",
            "rpc": "ListModels",
            "request": {},
            "metadata": {"x-tokenmesh-models": f"{DET},{EMBED}"},
        },
        {"name": "get-model-det", "rpc": "GetModel", "request": {"model": DET}},
        {"name": "get-model-demo", "rpc": "GetModel", "request": {"model": DEMO}},
        {"name": "get-model-embed", "rpc": "GetModel", "request": {"model": EMBED}},
        {
            "name": "embed-two",
            "rpc": "Embed",
            "request": {
                "model": EMBED,
                "inputs": ["The LORD is my shepherd", "a gRPC service mesh"],
                "request_id": "embed-two",
            },
            "metadata": {"x-tokenmesh-tenant": "acme", "x-tokenmesh-key-id": "key-1"},
        },
        {
            "name": "complete-metered",
            "rpc": "Complete",
            "request": {
                "model": DEMO,
                "prompt": "x",
                "max_tokens": 2,
                "temperature": 0,
                "request_id": "metered",
            },
            "metadata": {"x-tokenmesh-tenant": "acme", "x-tokenmesh-key-id": "key-1"},
        },
        {
            "name": "generate-generated-request-id",
            "rpc": "Generate",
            "request": {"model": DET, "prompt": "no id", "max_tokens": 2, "seed": 4},
        },
    ]


def _unload_case() -> dict[str, Any]:
    """A failure mid-stream: unloading the version ends the stream with an in-band StreamError."""
    return {
        "name": "generate-unloaded-mid-stream",
        "rpc": "Generate",
        "request": {
            "model": DET,
            "version": "1",
            "prompt": "long",
            "max_tokens": 400,
            "request_id": "unloaded-mid-stream",
        },
        "during": "unload",
    }


def all_cases() -> list[dict[str, Any]]:
    """Returns every case, the one that unloads a version last.

    Every model call gets its case's name as request id (its usage event, or
    the absence of one, is part of the outcome), except where the id itself
    is tested.
    """
    cases = [*_generation_cases(), *_other_cases(), *_error_cases(), _unload_case()]
    for case in cases:
        if case["rpc"] in METERED and case["name"] != "generate-generated-request-id":
            case["request"].setdefault("request_id", case["name"])
    return cases


def expand(value: Any) -> Any:
    """Expands {"$repeat": [text, times]} (long inputs are stored short)."""
    if isinstance(value, dict):
        if set(value) == {"$repeat"}:
            text, times = value["$repeat"]
            return text * times
        return {k: expand(v) for k, v in value.items()}
    if isinstance(value, list):
        return [expand(v) for v in value]
    return value


def to_dict(message: Message) -> dict[str, Any]:
    """Returns a message as JSON-like data, zero values included (as the edge prints them)."""
    return json_format.MessageToDict(
        message, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
    )


def _without_timing(data: dict[str, Any]) -> dict[str, Any]:
    """Replaces timing values by their field names: the shape is the contract, not the values."""
    out = dict(data)
    if "timing" in out:
        out["timing"] = sorted(out["timing"])
    return out


def _request_id(value: str, case: Mapping[str, Any]) -> str:
    return value if case["request"].get("request_id") else ("<generated>" if value else "")


def _status(status: status_pb2.Status | None) -> dict[str, Any] | None:
    if status is None:
        return None
    details = []
    for detail in status.details:
        for detail_type in DETAIL_TYPES:
            if detail.Is(detail_type.DESCRIPTOR):
                message = detail_type()
                detail.Unpack(message)
                details.append({"type": detail_type.DESCRIPTOR.full_name, **to_dict(message)})
                break
        else:
            details.append({"type": detail.type_url})
    return {"code": status.code, "message": status.message, "details": details}


async def _error(call: Any, error: grpc.aio.AioRpcError) -> dict[str, Any]:
    return {
        "code": error.code().name,
        "details": error.details(),
        "status": _status(await rpc_status.aio.from_call(call)),
    }


def _headers(metadata: Any) -> dict[str, str]:
    found = {k: v for k, v in (metadata or ()) if k in HEADERS and isinstance(v, str)}
    if "x-request-id" in found and len(found["x-request-id"]) == 32:
        found["x-request-id"] = "<generated>"
    return dict(sorted(found.items()))


def summarize_stream(
    messages: list[pb.GenerateResponse], case: Mapping[str, Any]
) -> dict[str, Any]:
    """Reduces a v1 stream to what does not depend on how tokens were batched."""
    token_ids = [t for m in messages for t in m.token_ids]
    summary: dict[str, Any] = {
        "messages": len(messages) > 0,
        "indexes_in_order": [m.index for m in messages] == list(range(len(messages))),
        "request_ids": sorted({_request_id(m.request_id, case) for m in messages}),
        "non_final_extra_fields": sorted(
            {f.name for m in messages[:-1] for f, _ in m.ListFields()} - DELTA_FIELDS
        ),
        "text": "".join(m.text for m in messages),
        "token_ids": token_ids,
    }
    if messages:
        final = _without_timing(to_dict(messages[-1]))
        for batched in ("index", "text", "token_ids"):
            final.pop(batched, None)
        final["request_id"] = _request_id(final["request_id"], case)
        summary["final"] = final
    if case.get("during") == "unload":
        # How far it got before the unload is a matter of timing; what it says is not.
        usage = summary["final"]["usage"]
        summary["completion_tokens_equal_sent"] = usage["completion_tokens"] == len(token_ids)
        summary["final"]["usage"] = {"prompt_tokens": usage["prompt_tokens"]}
        summary["text"] = summary["token_ids"] = "<varies>"
    return summary


async def _unload_soon(channel: grpc.aio.Channel, model: str, version: str) -> None:
    admin = rpc.InferenceAdminServiceStub(channel)
    await admin.UnloadModel(
        pb.UnloadModelRequest(model=model, version=version), metadata=mtls.EDGE_FOR_ADMIN
    )


async def run_case(channel: grpc.aio.Channel, case: Mapping[str, Any]) -> dict[str, Any]:
    """Sends a case's request and returns its normalized outcome (usage events come later)."""
    stub = rpc.InferenceServiceStub(channel)
    request = json_format.ParseDict(expand(case["request"]), REQUESTS[case["rpc"]]())
    metadata = tuple(case.get("metadata", {}).items())
    method: Callable[..., Any] = getattr(stub, case["rpc"])
    call = method(request, metadata=metadata)
    outcome: dict[str, Any] = {"status": "OK"}
    if case["rpc"] == "Generate":
        messages: list[pb.GenerateResponse] = []
        unloading: asyncio.Future[None] | None = None
        try:
            async for message in call:
                messages.append(message)
                if case.get("during") == "unload" and unloading is None:
                    req = case["request"]
                    unloading = asyncio.ensure_future(
                        _unload_soon(channel, req["model"], req["version"])
                    )
        except grpc.aio.AioRpcError as error:
            outcome["status"] = error.code().name
            outcome["error"] = await _error(call, error)
        finally:
            if unloading is not None:
                await unloading
        outcome["stream"] = summarize_stream(messages, case)
    else:
        try:
            response = await call
        except grpc.aio.AioRpcError as error:
            outcome["status"] = error.code().name
            outcome["error"] = await _error(call, error)
        else:
            data = _without_timing(to_dict(response))
            if "request_id" in data:
                data["request_id"] = _request_id(data["request_id"], case)
            outcome["response"] = data
    # A unary answer's headers ride its trailing metadata (tests/answer_headers.py).
    outcome["headers"] = _headers(
        answer_headers(await call.initial_metadata(), await call.trailing_metadata()).items()
    )
    return outcome


def usage_event_summary(event: inference_pb2.UsageEvent, case: Mapping[str, Any]) -> dict[str, Any]:
    """Reduces a usage event to what metering promises (no timing, trace or clock)."""
    everything = to_dict(event)
    data = {name: everything[name] for name in METERING_FIELDS}
    if case.get("during") == "unload":
        data["usage"] = {"prompt_tokens": data["usage"]["prompt_tokens"]}
    return data


def load_golden() -> dict[str, Any]:
    """Returns the recorded cases and outcomes."""
    data: dict[str, Any] = json.loads(GOLDEN.read_text())
    return data


def save_golden(data: dict[str, Any]) -> None:
    """Writes the recorded cases and outcomes (stable order, reviewable diffs)."""
    GOLDEN.parent.mkdir(parents=True, exist_ok=True)
    GOLDEN.write_text(json.dumps(data, indent=1, sort_keys=True, ensure_ascii=False) + "\n")
