"""The edge and the worker read the same model from a request, whatever its bytes.

The edge's Lua filter (gateway/model_routing.lua) reads `model` from the protobuf
body to pick the route and the per-model request window; the worker's parser
(upb) reads it again to serve. A body the two read differently (an empty group
between two `model` fields: the filter stopped at the group, upb skipped it) took
one model's route and window while the worker served another, past that model's
limit. Now the filter refuses what it cannot read as upb does, takes the last of
a field given twice as upb does, and the worker refuses a call whose routed model
(x-tokenmesh-model) is not the one its message names.

This module runs its own small mesh (one worker, deterministic models, two of
them with a request limit of 2 per minute) for the limits it spends.
"""

from __future__ import annotations

import json
import random
import re
import struct
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, cast

import grpc
import httpx
import pytest
from google.api import httpbody_pb2
from google.protobuf.message import DecodeError
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from gateway import model_routing
from gateway.envoy_config import EdgeLimits
from services.core import contract
from services.inference.openai import params as openai_params
from services.launcher.mesh import Mesh, MeshConfig
from services.launcher.processes import reserve_port
from tests.conftest import TEST_SERVICE_ENV
from tests.envoy_process import running_envoy
from tests.integration.conftest import inference_settings, start_inference
from tokenmesh.inference.v1 import inference_service_pb2 as v1
from tokenmesh.inference.v2 import inference_service_pb2 as v2

MODEL = "deterministic-test"
GROUP_CAPPED = "capped-group"  # spent by the group test only
TWICE_CAPPED = "capped-twice"  # spent by the field-given-twice test only
EMBEDDINGS = "all-minilm-l6-v2"  # a real embedding model (models/)
ENV = {
    **TEST_SERVICE_ENV,
    "TOKENMESH_TEST_MODELS": f"{MODEL}:1,{GROUP_CAPPED}:1,{TWICE_CAPPED}:1",
    "TOKENMESH_MODELS": "",
    "TOKENMESH_TEST_ENGINE_STEP_MS": "1",
    "TOKENMESH_RATELIMIT_MODEL_RPM": f"{GROUP_CAPPED}=2,{TWICE_CAPPED}=2",
}
V1 = "/tokenmesh.inference.v1.InferenceService/"
V2 = "/tokenmesh.inference.v2.InferenceService/"
OPENAI = "/tokenmesh.openai.v1.OpenAIService/"
# Server-streaming methods (the rest are unary).
STREAMS = {f"{V1}Generate", f"{V2}Generate", f"{OPENAI}CreateCompletion"}
EMPTY_GROUP = bytes([15 << 3 | 3, 15 << 3 | 4])  # field 15: start group, end group


def field(number: int, value: bytes) -> bytes:
    """One length-delimited protobuf field (a length below 128)."""
    assert len(value) < 128
    return bytes([number << 3 | 2, len(value)]) + value


def frame(message: bytes) -> bytes:
    """One uncompressed gRPC frame."""
    return b"\x00" + struct.pack(">I", len(message)) + message


def openai_body(*data: bytes) -> bytes:
    """A google.api.HttpBody message with `data` (field 2) given once per argument."""
    return field(1, b"application/json") + b"".join(field(2, d) for d in data)


def openai_json(model: str) -> bytes:
    return json.dumps({"model": model, "prompt": "a b", "max_tokens": 1}).encode()


def call(channel: grpc.Channel, path: str, message: bytes) -> list[bytes]:
    """Sends `message` (raw protobuf bytes) to `path`; returns the answers' raw bytes."""
    if path in STREAMS:
        return list(cast(Any, channel.unary_stream(path))(message, timeout=10))
    return [cast(Any, channel.unary_unary(path))(message, timeout=10)]


def code_of(channel: grpc.Channel, path: str, message: bytes) -> grpc.StatusCode:
    try:
        call(channel, path, message)
    except grpc.RpcError as error:
        return error.code()
    return grpc.StatusCode.OK


@pytest.fixture(scope="module")
def parsed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mesh]:
    """A mesh of its own: one worker serving deterministic models, two of them capped."""
    config = MeshConfig(
        state_dir=Path(tmp_path_factory.mktemp("parsed")),
        redis_url=None,
        workers=1,
        envoy_concurrency=1,
        health_check_interval_s=0.5,
        edge_tls_port=None,
        service_env=ENV,
    )
    with Mesh(config) as mesh:
        yield mesh


@pytest.fixture(autouse=True)
def _dump_logs_on_failure(request: pytest.FixtureRequest) -> Iterator[None]:
    yield
    report = getattr(request.node, "rep_call", None)
    if report is not None and report.failed and "parsed" in request.fixturenames:
        print(request.getfixturevalue("parsed").log_tails(40))


@pytest.fixture(scope="module")
def edge(parsed: Mesh) -> Iterator[grpc.Channel]:
    """A raw channel to the edge (messages are bytes) with the admin key."""
    key = _AddMetadata((("x-api-key", parsed.dev_api_key()),))
    with grpc.insecure_channel(parsed.edge_address) as channel:
        yield grpc.intercept_channel(channel, key)


class _AddMetadata(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor):
    def __init__(self, metadata: Sequence[tuple[str, str]]) -> None:
        self.metadata = list(metadata)

    def _details(self, details):
        return details._replace(metadata=[*(details.metadata or ()), *self.metadata])

    def intercept_unary_unary(self, continuation, details, request):
        return continuation(self._details(details), request)

    def intercept_unary_stream(self, continuation, details, request):
        return continuation(self._details(details), request)


def _crafted(path: str, model: str) -> bytes:
    """A request for `model` whose first `model` field, before an empty group, names
    another ("zzz"): the edge read "zzz", the worker `model`."""
    if path.startswith(OPENAI) and path.endswith("GetModel"):
        return field(1, b"zzz") + EMPTY_GROUP + field(1, model.encode())
    if path.startswith(OPENAI):
        return openai_body(openai_json("zzz")) + EMPTY_GROUP + field(2, openai_json(model))
    text = field(3, b"a b") + (bytes([4 << 3, 1]) if path.startswith(V1) else b"")
    return field(1, b"zzz") + EMPTY_GROUP + field(1, model.encode()) + text


@pytest.mark.parametrize(
    "path",
    [
        f"{V1}Generate",
        f"{V1}Complete",
        f"{V1}Embed",
        f"{V2}Generate",
        f"{V2}Complete",
        f"{V2}Embed",
        f"{OPENAI}CreateCompletion",
        f"{OPENAI}GetModel",
    ],
)
def test_a_body_the_edge_cannot_read_as_protobuf_does_is_refused(edge, path):
    with pytest.raises(grpc.RpcError) as refused:
        call(edge, path, _crafted(path, MODEL))
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "as protobuf does" in refused.value.details()
    status = rpc_status.from_call(refused.value)
    assert status is not None, "no google.rpc details"
    assert b"MALFORMED_REQUEST" in status.details[0].value


def test_a_models_request_limit_holds_whatever_the_bytes(edge):
    path = f"{V2}Complete"
    plain = field(1, GROUP_CAPPED.encode()) + field(3, b"a b")
    assert [code_of(edge, path, plain) for _ in range(2)] == [grpc.StatusCode.OK] * 2
    # The third request to a model of 2 per minute: the crafted one was served,
    # counted in the window of "zzz" (none).
    assert code_of(edge, path, _crafted(path, GROUP_CAPPED)) == grpc.StatusCode.INVALID_ARGUMENT
    assert code_of(edge, path, plain) == grpc.StatusCode.RESOURCE_EXHAUSTED


def test_of_a_field_given_twice_the_edge_reads_the_last_as_the_worker_does(edge):
    # v2: model "zzz", then the capped model (protobuf keeps the last).
    native = field(1, b"zzz") + field(1, TWICE_CAPPED.encode()) + field(3, b"a b")
    assert v2.CompleteRequest.FromString(native).model == TWICE_CAPPED
    assert code_of(edge, f"{V2}Complete", native) == grpc.StatusCode.OK
    # OpenAI: HttpBody's data twice; the edge read the first, the worker the last.
    twice = openai_body(openai_json("zzz"), openai_json(TWICE_CAPPED))
    assert httpbody_pb2.HttpBody.FromString(twice).data == openai_json(TWICE_CAPPED)
    assert code_of(edge, f"{OPENAI}CreateCompletion", twice) == grpc.StatusCode.OK
    # Both counted in the capped model's window of 2.
    for path, message in ((f"{V2}Complete", native), (f"{OPENAI}CreateCompletion", twice)):
        assert code_of(edge, path, message) == grpc.StatusCode.RESOURCE_EXHAUSTED


# --- The filter alone in a real Envoy, against protobuf's own parser -------------

# What the probe behind the filter sees: the headers the filter set ("-": none).
PROBE = """
function envoy_on_request(handle)
  local h = handle:headers()
  handle:respond({[":status"] = "200",
    ["x-seen-model"] = h:get("x-tokenmesh-model") or "-",
    ["x-seen-version"] = h:get("x-model-version") or "-",
    ["x-seen-prefix"] = h:get("x-tokenmesh-prefix") or "-"}, "")
end
"""
LUA = "type.googleapis.com/envoy.extensions.filters.http.lua.v3.Lua"
HCM = (
    "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3."
    "HttpConnectionManager"
)
# Pieces the fuzzed messages are made of: fields the filter reads, given twice and
# out of order; fields it skips (varint, fixed32, fixed64); an empty group; wire
# types 6 and 7; a 5- and 6-byte tag of field 1; an overlong length; a truncated
# field; stray bytes.
PIECES = [
    field(1, b"zzz"),
    field(1, MODEL.encode()),
    field(2, b"2"),
    field(3, b"a b"),
    field(3, b"c d"),
    EMPTY_GROUP,
    bytes([0x7B]),
    bytes([0x7C]),
    bytes([0x08, 0x05]),
    bytes([0x0E]),
    bytes([0x0F]),
    bytes([0x0D, 1, 2, 3, 4]),
    bytes([0x09]) + bytes(8),
    bytes([0x8A, 0x80, 0x80, 0x80, 0x00, 3]) + b"abc",
    bytes([0x8A, 0x80, 0x80, 0x80, 0x80, 0x00, 3]) + b"abc",
    bytes([0x0A, 0x83, 0x80, 0x00]) + b"abc",
    bytes([0x0A, 0x7F]),
    bytes([0x00]),
    bytes([0x80]),
]


def _filter_bootstrap(listen: int, admin: int) -> dict[str, object]:
    """An Envoy running the model-routing filter, then the probe, on every request."""

    def address(port: int) -> dict[str, object]:
        return {"socket_address": {"address": "127.0.0.1", "port_value": port}}

    probe = {"@type": LUA, "default_source_code": {"inline_string": PROBE}}
    router = {"@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}
    routes = [{"match": {"prefix": "/"}, "direct_response": {"status": 404}}]
    manager = {
        "@type": HCM,
        "stat_prefix": "parse",
        "route_config": {"virtual_hosts": [{"name": "v", "domains": ["*"], "routes": routes}]},
        "http_filters": [
            model_routing.lua_filter(),
            {"name": "probe", "typed_config": probe},
            {"name": "envoy.filters.http.router", "typed_config": router},
        ],
    }
    network = {"name": "envoy.filters.network.http_connection_manager", "typed_config": manager}
    listener = {"name": "l", "address": address(listen), "filter_chains": [{"filters": [network]}]}
    return {"admin": {"address": address(admin)}, "static_resources": {"listeners": [listener]}}


def _worker_reads(message: bytes) -> tuple[str, str, str] | None:
    """The headers the filter should set for `message` as the worker parses it (None:
    the worker refuses it): the model and version when they may travel in a header,
    and the hex of the prompt's first 64 bytes."""
    try:
        request = v2.CompleteRequest.FromString(message)
    except DecodeError:
        return None

    def safe(value: str, length: int) -> str:
        return value if re.fullmatch(rf"[A-Za-z0-9._-]{{1,{length}}}", value) else "-"

    prefix = request.prompt.encode()[:64].hex() or "-"
    return safe(request.model, 128), safe(request.version, 64), prefix


def test_the_filter_reads_every_body_the_worker_parses_as_the_worker_does(tmp_path):
    listen, admin = reserve_port(), reserve_port()
    draw = random.Random(20261205)
    messages = [
        field(1, b"zzz") + EMPTY_GROUP + field(1, MODEL.encode()),  # the finding
        field(1, b"zzz") + field(1, MODEL.encode()) + field(3, b"a b") + field(3, b"c d"),
        field(1, MODEL.encode()) + bytes([0x48]) + b"\xff" * 9 + b"\x01",  # a 10-byte varint
    ]
    for _ in range(400):
        pieces = b"".join(draw.choice(PIECES) for _ in range(draw.randint(1, 6)))
        if draw.random() < 0.3:  # and a byte anywhere set to anything
            at = draw.randrange(len(pieces))
            pieces = pieces[:at] + bytes([draw.randrange(256)]) + pieces[at + 1 :]
        messages.append(pieces)
    mismatches, refused = [], 0
    with running_envoy(_filter_bootstrap(listen, admin), admin, tmp_path), httpx.Client() as http:
        for message in messages:
            answer = http.post(
                f"http://127.0.0.1:{listen}{V2}Complete",
                content=frame(message),
                headers={"content-type": "application/grpc"},
                timeout=5,
            )
            if answer.headers.get("grpc-status") == "3":
                refused += 1
                continue
            seen = tuple(answer.headers[f"x-seen-{h}"] for h in ("model", "version", "prefix"))
            expected = _worker_reads(message)
            if expected is not None and seen != expected:
                mismatches.append((message.hex(), seen, expected))
        # Bytes after the one message of a unary call, and a frame cut short.
        for extra in (frame(field(1, MODEL.encode())) + b"\x00", frame(field(1, b"ab"))[:-1]):
            answer = http.post(
                f"http://127.0.0.1:{listen}{V2}Complete",
                content=extra,
                headers={"content-type": "application/grpc"},
                timeout=5,
            )
            assert answer.headers.get("grpc-status") == "3", extra.hex()
    assert not mismatches, mismatches[:5]
    assert 0 < refused < len(messages)  # the draw made both kinds


def _varint(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    return bytes(out) + bytes([value])


def _tag(number: int, wire_type: int) -> bytes:
    return _varint(number << 3 | wire_type)


# Fields a newer client might send that this version's messages do not have: a
# varint of 2^64-1, a fixed64, a fixed32, a packed repeated varint, a nested
# message, and the largest field number (2^29-1, a 5-byte tag).
NEWER_FIELDS = (
    _tag(100, 0)
    + _varint(2**64 - 1)
    + _tag(101, 1)
    + b"\x01" * 8
    + _tag(102, 5)
    + b"\x02" * 4
    + _tag(103, 2)
    + _varint(6)
    + b"\x01\x02\x03\x80\x01\x05"
    + _tag(104, 2)
    + _varint(4)
    + _tag(1, 2)
    + _varint(2)
    + b"xy"
    + _tag(2**29 - 1, 2)
    + _varint(3)
    + b"abc"
)


def _real_bodies() -> list[tuple[str, str, bytes, str, str]]:
    """(name, path, body, model, version) of what real clients send: the model and
    version the filter must read ("-": none in a header)."""
    full = v2.CompleteRequest(
        model="m",
        prompt="hello",
        n=2,
        max_output_tokens=64,
        stop_sequences=["a", "b"],
        logprobs=True,
        top_logprobs=3,
        metadata={"k": "v"},
        request_id="r-1",
    )
    full.sampling.temperature = 0.5
    full.sampling.seed = 2**63 - 1
    complete = full.SerializeToString()
    chat = v2.CompleteRequest(model="m", template="support@stable", variables={"x": "y"})
    chat.messages.add(role="user", content="hi")
    openai = json.dumps(
        {
            "model": "m@2",
            "messages": [{"role": "user", "content": 'hi \u00e9 "q" \\ \n'}],
            "stream": True,
            "logit_bias": {"50256": -100},
            "temperature": 1e-05,
            "some_new_option": {"nested": [1, 2.5e300, None]},
        }
    ).encode()
    http_body = httpbody_pb2.HttpBody(content_type="application/json", data=openai)
    generate = v2.GenerateRequest(model="m", version="2", prompt="p" * 900_000)
    embed = v2.EmbedRequest(model="m", inputs=["a"] * 256)
    return [
        ("v2 Generate, 900 KB prompt", f"{V2}Generate", generate.SerializeToString(), "m", "2"),
        ("v2 Complete, every field", f"{V2}Complete", complete, "m", "-"),
        ("v2 Complete, newer fields after", f"{V2}Complete", complete + NEWER_FIELDS, "m", "-"),
        ("v2 Complete, newer fields first", f"{V2}Complete", NEWER_FIELDS + complete, "m", "-"),
        ("v2 chat, template and variables", f"{V2}Complete", chat.SerializeToString(), "m", "-"),
        ("v2 Embed, 256 inputs", f"{V2}Embed", embed.SerializeToString(), "m", "-"),
        (
            "v1 Complete, negative int",
            f"{V1}Complete",
            v1.CompleteRequest(model="m", prompt="x", max_tokens=-1).SerializeToString(),
            "m",
            "-",
        ),
        ("empty message", f"{V2}Complete", b"", "-", "-"),
        (
            "OpenAI HttpBody",
            f"{OPENAI}CreateChatCompletion",
            http_body.SerializeToString(),
            "m",
            "2",
        ),
        (
            "OpenAI HttpBody, newer fields",
            f"{OPENAI}CreateChatCompletion",
            http_body.SerializeToString() + NEWER_FIELDS,
            "m",
            "2",
        ),
    ]


def test_the_filter_accepts_what_real_clients_send(tmp_path: Path) -> None:
    # The refusals above must not catch well-formed bodies: a large prompt, every
    # field set, fields of a newer client, JSON with escapes and exponents.
    listen, admin = reserve_port(), reserve_port()
    bootstrap = _filter_bootstrap(listen, admin)
    [listener] = cast(Any, bootstrap["static_resources"])["listeners"]
    # As the edge's listener has it (the 900 KB prompt is buffered whole).
    listener["per_connection_buffer_limit_bytes"] = EdgeLimits().connection_buffer_bytes
    seen: dict[str, tuple[str, str]] = {}
    with running_envoy(bootstrap, admin, tmp_path), httpx.Client() as http:
        for name, path, body, _, _ in _real_bodies():
            answer = http.post(
                f"http://127.0.0.1:{listen}{path}",
                content=frame(body),
                headers={"content-type": "application/grpc"},
                timeout=10,
            )
            # Past the filter, the probe answers with the headers the filter set; a
            # refusal is the filter's own INVALID_ARGUMENT (grpc-status 3).
            assert answer.status_code == 200, (name, answer.status_code)
            assert answer.headers.get("grpc-status") != "3", (name, answer.headers)
            seen[name] = (answer.headers["x-seen-model"], answer.headers["x-seen-version"])
    assert seen == {name: (model, version) for name, _, _, model, version in _real_bodies()}


def test_a_heads_prefix_key_is_its_tenants(tmp_path: Path) -> None:
    # One key for every tenant: the heads an Envoy thread saw, the router's pins and
    # the hash were shared, so a tenant sending a guess of another's prompt opening
    # twice read from the answering worker (x-tokenmesh-worker) whether that tenant
    # had just sent it. (The edge sets x-tokenmesh-tenant; here the client does.)
    listen, admin = reserve_port(), reserve_port()
    message = field(1, MODEL.encode()) + field(3, b"the shared opening")
    seen = {}
    with running_envoy(_filter_bootstrap(listen, admin), admin, tmp_path), httpx.Client() as http:
        for tenant in ("acme", "globex", "", "bad tenant"):
            headers = {"content-type": "application/grpc", "x-tokenmesh-tenant": tenant}
            answer = http.post(
                f"http://127.0.0.1:{listen}{V2}Complete",
                content=frame(message),
                headers=headers,
                timeout=5,
            )
            seen[tenant] = answer.headers["x-seen-prefix"]
    head = b"the shared opening".hex()
    assert seen == {
        "acme": b"acme".hex() + "00" + head,
        "globex": b"globex".hex() + "00" + head,
        "": head,  # an internal caller's
        "bad tenant": head,  # never a tenant's name (the edge sets only valid ones)
    }
    assert all(contract.is_prefix_key(key) for key in seen.values())
    assert contract.is_prefix_key((b"t" * 64).hex() + "00" + (b"h" * 64).hex())


# --- The worker's own guard (no edge: the header as the edge would set it) --------


async def test_a_worker_refuses_a_call_the_edge_routed_as_another_model(tmp_path, redis_url):
    request = v1.CompleteRequest(model=MODEL, prompt="a b", max_tokens=1).SerializeToString()
    openai = openai_body(openai_json(f"{MODEL}@1"))
    routed_as = model_routing.MODEL_HEADER
    async with await start_inference(inference_settings(tmp_path, redis_url)) as (_, channel):
        complete = channel.unary_unary(f"{V1}Complete")
        completion = channel.unary_stream(f"{OPENAI}CreateCompletion")
        # Its own model, or no header (a direct internal call): served.
        for metadata in ((), ((routed_as, MODEL),)):
            assert await complete(request, metadata=metadata, timeout=10)
            assert [m async for m in completion(openai, metadata=metadata, timeout=10)]
        with pytest.raises(grpc.aio.AioRpcError) as native:
            await complete(request, metadata=((routed_as, "zzz"),), timeout=10)
        with pytest.raises(grpc.aio.AioRpcError) as shaped:
            [m async for m in completion(openai, metadata=((routed_as, "zzz"),), timeout=10)]
    for refused in (native.value, shaped.value):
        assert refused.code() == grpc.StatusCode.INVALID_ARGUMENT
        status = rpc_status.from_call(refused)
        assert status is not None
        reasons = []
        for detail in status.details:
            info = error_details_pb2.ErrorInfo()
            if detail.Unpack(info):
                reasons.append(info.reason)
        assert reasons == ["MODEL_MISMATCH"]
    # An OpenAI route's refusal carries OpenAI's error shape (the edge's REST answer).
    error = json.loads(dict(shaped.value.trailing_metadata())[contract.OPENAI_ERROR_HEADER])
    assert error["error"]["type"] == "invalid_request_error"
    assert error["error"]["param"] == "model"


async def test_the_worker_parses_an_openai_body_once_per_call(
    tmp_path: Path, redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The routed-model check and the OpenAI servicer share one parse of the body (each
    parsed it: a 6.5 MiB body held the event loop 22 ms more), routed or not, counted
    in the request windows or not, well-formed or not."""
    parses: list[bytes] = []
    parse = openai_params.client_json

    def counted(raw: bytes, name: str) -> Any:
        parses.append(raw)
        return parse(raw, name)

    monkeypatch.setattr(openai_params, "client_json", counted)
    chat = {"model": f"{MODEL}@1", "messages": [{"role": "user", "content": "a b"}]}
    calls = {  # path: (its model, its body)
        f"{OPENAI}CreateChatCompletion": (MODEL, json.dumps({**chat, "max_tokens": 1})),
        f"{OPENAI}CreateCompletion": (MODEL, openai_json(f"{MODEL}@1").decode()),
        f"{OPENAI}CreateEmbedding": (EMBEDDINGS, json.dumps({"model": EMBEDDINGS, "input": "a"})),
    }
    key = (contract.KEY_ID_HEADER, f"key-{tmp_path.name}")  # counted in its key's windows
    settings = inference_settings(tmp_path, redis_url, models=(f"{EMBEDDINGS}:1",))
    async with await start_inference(settings) as (_, channel):
        for path, (model, text) in calls.items():
            body = text.encode()
            routed = (model_routing.MODEL_HEADER, model)
            for metadata in ((), (routed,), (routed, key)):
                parses.clear()
                assert await _answers(channel, path, openai_body(body), metadata), metadata
                assert parses == [body], (path, metadata)
        # A body that is no JSON: parsed once too, and answered INVALID_JSON as before.
        parses.clear()
        with pytest.raises(grpc.aio.AioRpcError) as invalid:
            await _answers(channel, f"{OPENAI}CreateEmbedding", openai_body(b"{"), (routed, key))
    assert parses == [b"{"]
    assert invalid.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    error = json.loads(dict(invalid.value.trailing_metadata())[contract.OPENAI_ERROR_HEADER])
    assert error["error"]["param"] == "body"


async def _answers(
    channel: grpc.aio.Channel, path: str, message: bytes, metadata: Sequence[tuple[str, str]]
) -> list[bytes]:
    """Sends `message` (raw bytes) to `path` on a worker; returns the answers' raw bytes."""
    if path.endswith("CreateEmbedding"):
        unary = cast(Any, channel.unary_unary(path))
        return [await unary(message, metadata=metadata, timeout=30)]
    stream = cast(Any, channel.unary_stream(path))
    return [answer async for answer in stream(message, metadata=metadata, timeout=30)]
