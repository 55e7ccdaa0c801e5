"""The Python SDK sends a token in the clear only to this host, unless told to.

`tls` defaulted to False, so `Client("edge.example.com:443", token=key)` put
the key in plaintext metadata to any host (gRPC's own token credentials refuse
an insecure channel; the SDK bypassed that with raw metadata). The edge's
plaintext listener is loopback-only by design: a non-loopback target now gets
TLS unless the caller passes tls=False.
"""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator
from typing import Any

import grpc
import grpc.aio
import pytest

import tokenmesh.client as sdk
from tokenmesh.inference.v2 import inference_service_pb2 as pb

LIST_MODELS = "/tokenmesh.inference.v2.InferenceService/ListModels"
SECRET = "tm-secret-key-do-not-send"


class _Listener(grpc.GenericRpcHandler):
    """A plaintext ListModels that records each caller's `authorization` (what an
    h2c proxy or a man in the middle on the path would read)."""

    def __init__(self) -> None:
        self.seen: list[str] = []

    def service(self, handler_call_details: grpc.HandlerCallDetails) -> Any:
        if handler_call_details.method != LIST_MODELS:
            return None

        async def list_models(
            request: pb.ListModelsRequest, context: grpc.aio.ServicerContext[Any, Any]
        ) -> pb.ListModelsResponse:
            metadata = dict(context.invocation_metadata() or ())
            self.seen.append(str(metadata.get("authorization", "")))
            return pb.ListModelsResponse()

        return grpc.unary_unary_rpc_method_handler(
            list_models,
            request_deserializer=pb.ListModelsRequest.FromString,
            response_serializer=pb.ListModelsResponse.SerializeToString,
        )


@pytest.fixture
async def named_listener() -> AsyncIterator[tuple[str, _Listener]]:
    """A plaintext server reached by this machine's host name (a name, as a remote
    edge's is: the SDK does not resolve it to decide); yields (target, listener)."""
    host = socket.gethostname()
    try:
        address = socket.getaddrinfo(host, None, socket.AF_INET)[0][4][0]
    except OSError:
        pytest.skip(f"the host name {host!r} does not resolve here")
    listener = _Listener()
    server = grpc.aio.server()
    server.add_generic_rpc_handlers((listener,))
    port = server.add_insecure_port(f"{address}:0")
    await server.start()
    try:
        yield f"{host}:{port}", listener
    finally:
        await server.stop(None)


async def test_a_token_never_goes_in_the_clear_to_a_host_name_by_default(
    named_listener: tuple[str, _Listener],
) -> None:
    target, listener = named_listener
    async with sdk.Client(target, token=SECRET, timeout_s=10) as client:
        with pytest.raises(sdk.TokenmeshRpcError) as refused:
            await client.list_models()
    assert refused.value.code == grpc.StatusCode.UNAVAILABLE  # TLS against plaintext
    assert listener.seen == []


async def test_tls_false_sends_plaintext_where_the_caller_asked(
    named_listener: tuple[str, _Listener],
) -> None:
    target, listener = named_listener
    async with sdk.Client(target, token=SECRET, timeout_s=10, tls=False) as client:
        await client.list_models()
    assert listener.seen == [f"Bearer {SECRET}"]


async def test_loopback_stays_plaintext_by_default() -> None:
    listener = _Listener()
    server = grpc.aio.server()
    server.add_generic_rpc_handlers((listener,))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        for target in (f"127.0.0.1:{port}", f"localhost:{port}", f"ipv4:127.0.0.1:{port}"):
            async with sdk.Client(target, token=SECRET, timeout_s=10) as client:
                await client.list_models()
    finally:
        await server.stop(None)
    assert listener.seen == [f"Bearer {SECRET}"] * 3


@pytest.mark.parametrize(
    ("target", "loopback"),
    [
        ("127.0.0.1:8080", True),
        ("127.3.4.5:8080", True),
        ("localhost:8080", True),
        ("LOCALHOST:8080", True),
        ("[::1]:8080", True),
        ("::1", True),
        ("dns:///localhost:8080", True),
        ("ipv4:127.0.0.1:8080", True),
        ("ipv6:[::1]:8080", True),
        ("unix:/run/tokenmesh.sock", True),
        ("10.0.0.5:8080", False),
        ("203.0.113.1:8080", False),
        ("[2001:db8::1]:443", False),
        ("edge.example.com:443", False),
        ("localhost.example.com:8080", False),
        ("dns:///edge:8080", False),
    ],
)
def test_which_targets_are_loopback(target: str, loopback: bool) -> None:
    assert sdk.is_loopback_target(target) is loopback


def test_tls_false_with_root_certificates_is_refused() -> None:
    # One of the two was ignored: the client used TLS against an explicit tls=False.
    with pytest.raises(ValueError, match="root_certificates need TLS"):
        sdk.Client("127.0.0.1:1", tls=False, root_certificates=b"-----BEGIN CERTIFICATE-----")
